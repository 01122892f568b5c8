"""PASCAL VOC 2012 reader: split lists, images, class masks and image-level labels.

The layout is the one of ``VOCdevkit/VOC2012``::

    JPEGImages/{id}.jpg                RGB photos
    SegmentationClass/{id}.png         palette-index masks (0 = background, 1..20, 255 = void)
    SegmentationClassAug/{id}.png      optional: the 10,582-image augmented masks (SBD)
    Annotations/{id}.xml               object boxes; their <name>s give image-level labels
    ImageSets/Segmentation/{split}.txt one id per line
    cls_labels.npy                     optional: IRN/ReCAM image-level labels

Every problem the user can fix (a missing file, a corrupt image, a mask with a label that
is not in the VOC palette, ...) raises :class:`~wsss.errors.UserError` with one line that
names the file and the fix. :func:`check` collects them all instead of raising.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import UserError
from .io import atomic_path

#: The 20 VOC object classes in the standard order; mask label ``c + 1`` is ``CLASSES[c]``.
CLASSES: list[str] = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
]
NUM_CLASSES = 20
#: The names of the mask labels 0..20 (background, then CLASSES): the one label-name list.
LABEL_NAMES: list[str] = ["background", *CLASSES]
#: Mask labels a segmentation is scored on (background + the classes).
NUM_LABELS = len(LABEL_NAMES)
#: Mask value of pixels that are ignored in training and scoring (object borders, unsure).
VOID = 255
#: Mask value of background pixels.
BACKGROUND = 0

_CLASS_INDEX = {name: i for i, name in enumerate(CLASSES)}
#: Splits whose ids must all have a mask when the dataset ships SegmentationClass/.
_MASKED_SPLITS = ("train", "val")


def _voc_palette() -> list[int]:
    """The VOC colormap: the bits of the label index are spread over R, G and B, high bit first.

    Bit ``3k`` of the index sets bit ``7-k`` of red, bit ``3k+1`` of green, bit ``3k+2`` of
    blue. Label 1 is (128, 0, 0), label 15 (person) is (192, 128, 128), 255 is (224, 224, 192).
    """
    palette: list[int] = []
    for index in range(256):
        rgb = [0, 0, 0]
        bits = index
        for shift in range(7, -1, -1):
            for channel in range(3):
                rgb[channel] |= ((bits >> channel) & 1) << shift
            bits >>= 3
        palette.extend(rgb)
    return palette


#: 768 ints (256 RGB triples) to pass to ``PIL.Image.putpalette``.
PALETTE: list[int] = _voc_palette()


# ------------------------------------------------------------------------ split lists
def _split_dir(root: Path) -> Path:
    return Path(root) / "ImageSets" / "Segmentation"


def available_splits(root: Path) -> list[str]:
    """Names of the split lists under ``root/ImageSets/Segmentation`` (sorted)."""
    d = _split_dir(root)
    if not d.is_dir():
        return []
    return sorted(p.stem for p in d.glob("*.txt") if p.is_file())


def _parse_id(line: str) -> str:
    """One split-list line to an id; also accepts ``/JPEGImages/x.jpg /SegmentationClassAug/x.png``."""
    token = line.split()[0]
    if "/" in token or token.endswith((".jpg", ".png")):
        token = Path(token).stem
    return token


def read_split(root: Path, split: str) -> list[str]:
    """The ids listed in ``root/ImageSets/Segmentation/{split}.txt``, in file order."""
    path = _split_dir(root) / f"{split}.txt"
    if not path.is_file():
        existing = available_splits(root)
        have = f"existing splits: {', '.join(existing)}" if existing else f"{_split_dir(root)} has no split lists"
        raise UserError(f"{path}: split list not found; {have}; pick one of those or add the file")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot be read ({e.__class__.__name__}); replace it with a text file of ids") from None
    return [_parse_id(line) for line in text.splitlines() if line.strip()]


# ------------------------------------------------------------------------ image-level labels
def _int_id(image_id: str) -> int:
    try:
        return int(image_id.replace("_", ""))
    except ValueError:
        raise UserError(f"id {image_id!r} is not numeric, so it cannot be a key of cls_labels.npy; "
                        f"use VOC-style ids such as 2007_000032") from None


def _str_id(key: int) -> str:
    s = str(int(key))
    return f"{s[:4]}_{s[4:]}" if len(s) == 10 else s


def load_cls_labels(path: Path) -> dict[str, np.ndarray]:
    """Read an IRN/ReCAM ``cls_labels.npy`` ({int id: float32 (20,)}) keyed by VOC string id."""
    path = Path(path)
    try:
        obj = np.load(path, allow_pickle=True)  # the IRN format is a pickled dict
        raw = obj.item() if isinstance(obj, np.ndarray) and obj.dtype == object and obj.shape == () else obj
    except (OSError, ValueError, EOFError) as e:
        raise UserError(f"{path}: not a readable .npy file ({e.__class__.__name__}); delete or regenerate it") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a pickled dict {{int id: 20 labels}}; delete or regenerate it")
    out: dict[str, np.ndarray] = {}
    for key, value in raw.items():
        vec = np.asarray(value, dtype=np.float32).reshape(-1)
        if vec.shape != (NUM_CLASSES,):
            raise UserError(f"{path}: entry {key!r} has {vec.size} labels, expected {NUM_CLASSES}; regenerate the file")
        out[_str_id(key) if not isinstance(key, str) else key] = vec
    return out


def save_cls_labels(path: Path, labels: dict[str, np.ndarray]) -> None:
    """Write ``labels`` in the IRN ``cls_labels.npy`` format (int keys), atomically."""
    data = {_int_id(k): np.asarray(v, dtype=np.float32).reshape(NUM_CLASSES) for k, v in labels.items()}
    with atomic_path(path, ".npy") as tmp:
        with open(tmp, "wb") as f:
            np.save(f, data, allow_pickle=True)


def labels_from_xml(path: Path) -> np.ndarray:
    """Multi-hot float32 (20,) from the ``object/name`` entries of a VOC annotation."""
    path = Path(path)
    try:
        tree = ET.parse(path)
    except FileNotFoundError:
        raise UserError(f"{path}: annotation not found; restore it or provide cls_labels.npy") from None
    except (ET.ParseError, OSError) as e:
        raise UserError(f"{path}: not valid XML ({e}); restore the file from the VOC archive") from None
    vec = np.zeros(NUM_CLASSES, np.float32)
    for obj in tree.getroot().iter("object"):
        name = (obj.findtext("name") or "").strip()
        if name not in _CLASS_INDEX:
            raise UserError(f"{path}: unknown class name {name!r}; use one of the 20 VOC names "
                            f"({', '.join(CLASSES[:3])}, ...)")
        vec[_CLASS_INDEX[name]] = 1.0
    return vec


def labels_from_mask(mask: np.ndarray) -> np.ndarray:
    """Multi-hot float32 (20,) of the object labels 1..20 present in a class mask."""
    values = np.unique(np.asarray(mask))
    vec = np.zeros(NUM_CLASSES, np.float32)
    for v in values:
        if 1 <= v <= NUM_CLASSES:
            vec[int(v) - 1] = 1.0
    return vec


# ------------------------------------------------------------------------ dataset
class VOCDataset:
    """The ids of one split of a VOC-format tree and lazy access to their files.

    ``subset > 0`` keeps only the first ``subset`` ids of the list.
    """

    def __init__(self, root: Path, split: str, subset: int = 0):
        self.root = Path(root)
        self.split = split
        ids = read_split(self.root, split)
        self.ids: list[str] = ids[:subset] if subset > 0 else ids
        self._cls_labels: dict[str, np.ndarray] | None = None
        self._labels: dict[str, np.ndarray] = {}
        self._has_masks: bool | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return f"VOCDataset(root={str(self.root)!r}, split={self.split!r}, n={len(self.ids)})"

    # -- paths
    def image_path(self, image_id: str) -> Path:
        return self.root / "JPEGImages" / f"{image_id}.jpg"

    def mask_path(self, image_id: str) -> Path:
        """SegmentationClassAug/{id}.png when that folder has it, else SegmentationClass/{id}.png."""
        aug = self.root / "SegmentationClassAug" / f"{image_id}.png"
        if aug.is_file():
            return aug
        return self.root / "SegmentationClass" / f"{image_id}.png"

    def xml_path(self, image_id: str) -> Path:
        return self.root / "Annotations" / f"{image_id}.xml"

    # -- images
    def image(self, image_id: str) -> np.ndarray:
        """The photo as uint8 HxWx3 RGB."""
        path = self.image_path(image_id)
        if not path.is_file():
            raise UserError(f"{path}: image not found; restore it or remove id {image_id} from {self.split}.txt")
        try:
            with Image.open(path) as img:
                img.load()
                rgb = img.convert("RGB")
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
            raise UserError(f"{path}: corrupt or unreadable image ({e.__class__.__name__}); "
                            f"re-extract it from the VOC archive or remove id {image_id} from {self.split}.txt") from None
        return np.asarray(rgb, dtype=np.uint8)

    def image_size(self, image_id: str) -> tuple[int, int]:
        """(height, width) read from the image header only."""
        path = self.image_path(image_id)
        if not path.is_file():
            raise UserError(f"{path}: image not found; restore it or remove id {image_id} from {self.split}.txt")
        try:
            with Image.open(path) as img:
                w, h = img.size
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
            raise UserError(f"{path}: corrupt or unreadable image ({e.__class__.__name__}); "
                            f"re-extract it from the VOC archive or remove id {image_id} from {self.split}.txt") from None
        return h, w

    # -- masks
    @property
    def has_masks(self) -> bool:
        """True when every id of the split has a class mask."""
        if self._has_masks is None:
            self._has_masks = bool(self.ids) and all(self.mask_path(i).is_file() for i in self.ids)
        return self._has_masks

    def mask(self, image_id: str) -> np.ndarray:
        """The class mask as uint8 HxW of label indices (0 background, 1..20, 255 void)."""
        path = self.mask_path(image_id)
        mask = read_mask(path)
        h, w = self.image_size(image_id)
        if mask.shape != (h, w):
            raise UserError(f"{path}: mask is {mask.shape[1]}x{mask.shape[0]} but image {self.image_path(image_id).name} "
                            f"is {w}x{h}; use the mask that belongs to this image")
        return mask

    # -- labels
    def labels(self, image_id: str) -> np.ndarray:
        """Image-level multi-hot float32 (20,): cls_labels.npy, else the XML, else the mask."""
        if image_id in self._labels:
            return self._labels[image_id]
        if self._cls_labels is None:
            npy = self.root / "cls_labels.npy"
            self._cls_labels = load_cls_labels(npy) if npy.is_file() else {}
        if image_id in self._cls_labels:
            vec = self._cls_labels[image_id]
        elif self.xml_path(image_id).is_file():
            vec = labels_from_xml(self.xml_path(image_id))
        elif self.mask_path(image_id).is_file():
            vec = labels_from_mask(self.mask(image_id))
        else:
            raise UserError(f"{self.xml_path(image_id)}: no image-level labels for id {image_id} "
                            f"(no cls_labels.npy entry, annotation or mask); add one of them")
        self._labels[image_id] = vec
        return vec


def read_mask(path: Path) -> np.ndarray:
    """Read a palette-index (or greyscale) label PNG as indices and check them against the palette."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: mask not found; restore it or remove its id from the split list")
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            if mode in ("RGB", "RGBA"):
                raise UserError(f"{path}: is a {mode} colour image, expected a palette-index PNG; "
                                f"use the original VOC PNG (mode P) or SegmentationClassAug (mode L)")
            mask = np.array(img)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        raise UserError(f"{path}: corrupt or unreadable mask ({e.__class__.__name__}); re-extract it") from None
    if mask.ndim != 2:
        raise UserError(f"{path}: mask has shape {mask.shape}, expected HxW label indices; use a palette-index PNG")
    bad = np.setdiff1d(np.unique(mask), np.r_[np.arange(NUM_CLASSES + 1), VOID])
    if bad.size:
        raise UserError(f"{path}: label {int(bad[0])} is outside the VOC palette (0..20 and 255); "
                        f"fix or replace the mask")
    return mask.astype(np.uint8)


# ------------------------------------------------------------------------ checking
def _first_line(err: Exception) -> str:
    return str(err).splitlines()[0] if str(err) else err.__class__.__name__


def check(root: Path, splits: list[str] | None = None) -> dict:
    """Scan a VOC tree and collect every problem instead of raising.

    Returns ``{"splits": {split: n_ids}, "class_counts": {split: {class: n_images}},
    "problems": [one-line str, ...]}``. ``splits=None`` scans every list in
    ImageSets/Segmentation; otherwise only the named ones (a missing one is a problem).
    """
    root = Path(root)
    problems: list[str] = []
    seen: set[str] = set()

    def problem(msg: str) -> None:
        if msg not in seen:
            seen.add(msg)
            problems.append(msg)

    result: dict = {"splits": {}, "class_counts": {}, "problems": problems}
    if not root.is_dir():
        problem(f"{root}: dataset folder not found; run `link-voc` or generate the synthetic world")
        return result
    if not (root / "JPEGImages").is_dir():
        problem(f"{root / 'JPEGImages'}: folder not found; point the dataset at a VOC2012 folder that has JPEGImages/")
    if not _split_dir(root).is_dir():
        problem(f"{_split_dir(root)}: folder not found; the VOC2012 tree needs its ImageSets/Segmentation split lists")

    names = available_splits(root) if splits is None else list(splits)
    has_seg_class = (root / "SegmentationClass").is_dir()
    image_done: dict[str, str | None] = {}
    mask_done: dict[str, str | None] = {}
    xml_done: dict[str, str | None] = {}
    for split in names:
        try:
            ds = VOCDataset(root, split)
        except UserError as e:
            problem(_first_line(e))
            continue
        result["splits"][split] = len(ds)
        counts = np.zeros(NUM_CLASSES, np.int64)
        need_mask = has_seg_class and split in _MASKED_SPLITS
        for image_id in ds.ids:
            if image_id not in image_done:
                try:
                    ds.image(image_id)
                    image_done[image_id] = None
                except UserError as e:
                    image_done[image_id] = _first_line(e)
            if image_done[image_id]:
                problem(image_done[image_id])
            mask_file = ds.mask_path(image_id)
            if mask_file.is_file():
                if image_id not in mask_done:
                    try:
                        mask = read_mask(mask_file)
                        if image_done[image_id] is None:
                            h, w = ds.image_size(image_id)
                            if mask.shape != (h, w):
                                raise UserError(
                                    f"{mask_file}: mask is {mask.shape[1]}x{mask.shape[0]} but image "
                                    f"{ds.image_path(image_id).name} is {w}x{h}; use the mask that belongs to this image")
                        mask_done[image_id] = None
                    except UserError as e:
                        mask_done[image_id] = _first_line(e)
                if mask_done[image_id]:
                    problem(mask_done[image_id])
            elif need_mask:
                problem(f"{mask_file}: mask not found for id {image_id} listed in {split}.txt; "
                        f"restore it or remove the id from the list")
            xml_file = ds.xml_path(image_id)
            if image_id not in xml_done:
                xml_done[image_id] = None
                if xml_file.is_file():
                    try:
                        labels_from_xml(xml_file)
                    except UserError as e:
                        xml_done[image_id] = _first_line(e)
            if xml_done[image_id]:
                problem(xml_done[image_id])
            try:
                counts += ds.labels(image_id).astype(bool)
            except UserError as e:
                problem(_first_line(e))
        result["class_counts"][split] = {name: int(n) for name, n in zip(CLASSES, counts)}
    return result


def validate(root: Path, splits: list[str]) -> None:
    """Raise :class:`UserError` with the first problem :func:`check` finds in ``splits``."""
    report = check(root, splits=list(dict.fromkeys(splits)))
    if report["problems"]:
        raise UserError(report["problems"][0])


# ------------------------------------------------------------------------ linking real data
def link_voc(src: Path, dst: Path) -> dict:
    """Point ``dst`` (e.g. data/VOC2012) at a real VOC2012 folder by a symlink.

    ``src`` may be the VOCdevkit folder or VOC2012 itself. An existing symlink at ``dst`` is
    replaced; a real folder there is never touched. Returns :func:`check` of the result,
    plus ``source`` and ``segmentation_aug`` (where SegmentationClassAug was found, if anywhere).
    """
    src = Path(src).expanduser()
    dst = Path(dst)
    if not src.is_dir():
        raise UserError(f"{src}: folder not found; pass the VOCdevkit or VOC2012 folder of the extracted archive")
    voc = src / "VOC2012" if (src / "VOC2012" / "JPEGImages").is_dir() else src
    if not (voc / "JPEGImages").is_dir():
        raise UserError(f"{src}: has no JPEGImages/ (nor VOC2012/JPEGImages/); pass the VOCdevkit or VOC2012 folder")
    voc = voc.resolve()
    if dst.is_symlink():
        pass  # replaced below
    elif dst.exists():
        raise UserError(f"{dst}: exists as a real folder; move it away (e.g. mv {dst} {dst}.bak) and rerun link-voc")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.link")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(voc, tmp, target_is_directory=True)
    os.replace(tmp, dst)

    aug = None
    if (voc / "SegmentationClassAug").is_dir():
        aug = str(voc / "SegmentationClassAug")
    elif (voc.parent / "SegmentationClassAug").is_dir():
        aug = str(voc.parent / "SegmentationClassAug")
    report = check(dst)
    report["source"] = str(voc)
    report["segmentation_aug"] = aug
    if aug is not None and not (voc / "SegmentationClassAug").is_dir():
        report["problems"].append(
            f"{aug}: found next to VOC2012 but the reader looks in {voc / 'SegmentationClassAug'}; "
            f"move or symlink it there to use the augmented masks")
    return report
