"""``python cli.py eval --pred DIR --gt DIR --out FILE.json``: score a folder of label PNGs
against a folder of ground-truth PNGs with the same ids (canonical mIoU, see wsss.metrics)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import UserError
from ..io import write_json
from ..metrics import ConfusionMatrix
from ..voc import LABEL_NAMES, NUM_LABELS, VOID


def read_label_png(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L"):
                raise UserError(f"{path}: label PNG must be single-channel (palette or grey), got mode {im.mode}; save class indices, not colours")
            return np.asarray(im)
    except (UnidentifiedImageError, OSError):
        raise UserError(f"{path}: not a readable PNG; re-create it") from None


def score_folders(pred_dir: Path, gt_dir: Path, num_classes: int = NUM_LABELS) -> dict:

    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    for d in (pred_dir, gt_dir):
        if not d.is_dir():
            raise UserError(f"{d}: folder not found; pass an existing folder of label PNGs")
    gt_files = sorted(gt_dir.glob("*.png"))
    if not gt_files:
        raise UserError(f"{gt_dir}: no .png files; pass the folder of ground-truth label PNGs")
    cm = ConfusionMatrix(num_classes)
    for g in gt_files:
        p = pred_dir / g.name
        if not p.is_file():
            raise UserError(f"{p}: prediction missing for ground truth {g.name}; both folders need the same ids")
        pred, gt = read_label_png(p), read_label_png(g)
        if pred.shape != gt.shape:
            raise UserError(f"{p}: size {pred.shape[::-1]} != ground truth {gt.shape[::-1]}; predict at image size")
        bad = (gt != VOID) & (gt >= num_classes)
        if bad.any():
            raise UserError(f"{g}: label {int(gt[bad][0])} outside 0..{num_classes - 1} and {VOID}; fix the ground truth")
        bad = (pred != VOID) & (pred >= num_classes)
        if bad.any():
            raise UserError(f"{p}: label {int(pred[bad][0])} outside 0..{num_classes - 1} and {VOID}; "
                            f"save class indices ({VOID} = no prediction), not colours")
        cm.update(pred, gt)
    names = LABEL_NAMES if num_classes == NUM_LABELS else None
    scores = cm.scores(names)
    scores["n_images"] = len(gt_files)
    return scores


def run(pred: Path, gt: Path, out: Path | None) -> dict:
    scores = score_folders(pred, gt)
    if out is not None:
        write_json(out, scores)
    print(f"[eval] mIoU {scores['miou']:.4f} over {scores['n_images']} images ({scores['n_classes_scored']} classes)")
    return scores
