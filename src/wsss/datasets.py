"""Torch datasets over a :class:`wsss.voc.VOCDataset`: classification crops with image-level
labels, and segmentation crops with (pseudo-)masks. Augmentation follows IRN/ReCAM: random
rescale, horizontal flip, random crop with padding (255 for labels)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .errors import UserError
from .voc import VOID, VOCDataset


def _resize(arr: np.ndarray, size: tuple[int, int], nearest: bool) -> np.ndarray:
    img = Image.fromarray(arr)
    return np.asarray(img.resize((size[1], size[0]), Image.NEAREST if nearest else Image.BILINEAR))


def random_scale_flip_crop(rng: np.random.Generator, image: np.ndarray, label: np.ndarray | None,
                           crop: int, scale_range=(0.7, 1.3)):
    h, w = image.shape[:2]
    s = rng.uniform(*scale_range)
    nh, nw = max(8, int(round(h * s))), max(8, int(round(w * s)))
    image = _resize(image, (nh, nw), nearest=False)
    if label is not None:
        label = _resize(label, (nh, nw), nearest=True)
    if rng.random() < 0.5:
        image = image[:, ::-1]
        label = label[:, ::-1] if label is not None else None
    ph, pw = max(crop - nh, 0), max(crop - nw, 0)
    if ph or pw:
        image = np.pad(image, ((0, ph), (0, pw), (0, 0)), constant_values=0)
        if label is not None:
            label = np.pad(label, ((0, ph), (0, pw)), constant_values=VOID)
    y = rng.integers(0, image.shape[0] - crop + 1)
    x = rng.integers(0, image.shape[1] - crop + 1)
    image = image[y:y + crop, x:x + crop]
    label = label[y:y + crop, x:x + crop] if label is not None else None
    return np.ascontiguousarray(image), (np.ascontiguousarray(label) if label is not None else None)


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> normalised (3,H,W) float tensor."""
    from .models.backbone import normalize

    t = torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1).float().div_(255.0)
    return normalize(t.unsqueeze(0))[0]


class ClassificationData(Dataset):
    """(image crop, 20-dim multi-hot label) pairs; deterministic per (rng_seed, epoch, index)."""

    def __init__(self, voc: VOCDataset, crop: int, rng_seed: int = 0, train: bool = True):
        self.voc, self.crop, self.rng_seed, self.train = voc, crop, rng_seed, train
        self.epoch = 0
        self.images = [voc.image(i) for i in voc.ids]  # small worlds: keep decoded images in memory
        self.labels = [voc.labels(i) for i in voc.ids]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.voc.ids)

    def __getitem__(self, idx: int):
        rng = np.random.default_rng((self.rng_seed, self.epoch, idx))
        image = self.images[idx]
        if self.train:
            image, _ = random_scale_flip_crop(rng, image, None, self.crop)
        return to_tensor(image), torch.from_numpy(self.labels[idx]), idx


class SegmentationData(Dataset):
    """(image crop, label crop) pairs; labels come from a folder of PNGs (pseudo-masks) or the
    dataset's ground truth when ``mask_dir`` is None."""

    def __init__(self, voc: VOCDataset, crop: int, mask_dir: Path | None, rng_seed: int = 0):
        self.voc, self.crop, self.rng_seed, self.epoch = voc, crop, rng_seed, 0
        self.images = [voc.image(i) for i in voc.ids]
        self.masks = [self._load_mask(mask_dir, i) for i in voc.ids]

    def _load_mask(self, mask_dir: Path | None, id_: str) -> np.ndarray:
        if mask_dir is None:
            return self.voc.mask(id_)
        path = Path(mask_dir) / f"{id_}.png"
        if not path.is_file():
            raise UserError(f"{path}: pseudo-mask missing; re-run `python cli.py crf` for this method")
        return np.asarray(Image.open(path))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.voc.ids)

    def __getitem__(self, idx: int):
        rng = np.random.default_rng((self.rng_seed, self.epoch, idx))
        image, label = random_scale_flip_crop(rng, self.images[idx], self.masks[idx], self.crop)
        return to_tensor(image), torch.from_numpy(label.astype(np.int64))
