"""Canonical segmentation scoring: one int64 confusion matrix over the whole split.

- ground-truth 255 (void) is ignored;
- a 255 in a prediction is a miss for that ground-truth pixel (a false negative, never an
  index error): it is counted in an extra "void" prediction column;
- IoU_c = TP / (TP + FP + FN); classes absent from both ground truth and prediction are
  excluded from the mean (neither 0 nor 1); mIoU = mean over the remaining classes.
"""

from __future__ import annotations

import numpy as np

from .voc import NUM_LABELS, VOID


class ConfusionMatrix:
    """Accumulates (n x n+1) counts: rows = ground truth, columns = prediction, last = void."""

    def __init__(self, num_classes: int = NUM_LABELS):
        self.n = num_classes
        self.mat = np.zeros((num_classes, num_classes + 1), dtype=np.int64)

    def update(self, pred: np.ndarray, gt: np.ndarray) -> None:
        if pred.shape != gt.shape:
            raise ValueError(f"prediction shape {pred.shape} != ground truth shape {gt.shape}")
        gt = gt.astype(np.int64).ravel()
        pred = pred.astype(np.int64).ravel()
        keep = gt != VOID
        gt, pred = gt[keep], pred[keep]
        if gt.size and (gt.min() < 0 or gt.max() >= self.n):
            raise ValueError(f"ground truth label {int(gt.max())} outside 0..{self.n - 1} and {VOID}")
        # anything that is not a valid class (void, out of range) is a miss
        pred = np.where((pred >= 0) & (pred < self.n), pred, self.n)
        self.mat += np.bincount(gt * (self.n + 1) + pred, minlength=self.n * (self.n + 1)).reshape(
            self.n, self.n + 1
        )

    def scores(self, class_names: list[str] | None = None) -> dict:
        tp = np.diag(self.mat[:, : self.n]).astype(np.float64)
        gt_total = self.mat.sum(axis=1).astype(np.float64)  # TP + FN (void predictions included)
        pred_total = self.mat[:, : self.n].sum(axis=0).astype(np.float64)  # TP + FP
        fn, fp = gt_total - tp, pred_total - tp
        union = tp + fp + fn
        present = union > 0
        names = class_names or [str(i) for i in range(self.n)]
        iou = {names[c]: float(tp[c] / union[c]) for c in range(self.n) if present[c]}
        precision = {names[c]: float(tp[c] / pred_total[c]) for c in range(self.n) if pred_total[c] > 0}
        recall = {names[c]: float(tp[c] / gt_total[c]) for c in range(self.n) if gt_total[c] > 0}
        miou = float(np.mean([iou[k] for k in iou])) if iou else float("nan")
        return {
            "miou": miou,
            "per_class_iou": iou,
            "precision": precision,
            "recall": recall,
            "pixel_accuracy": float(tp.sum() / max(gt_total.sum(), 1)),
            "n_classes_scored": int(present.sum()),
        }


def miou(preds: list[np.ndarray], gts: list[np.ndarray], num_classes: int = NUM_LABELS) -> float:
    cm = ConfusionMatrix(num_classes)
    for p, g in zip(preds, gts):
        cm.update(p, g)
    return cm.scores()["miou"]


#: ReCAM's W' counts as untrained ("at chance") while its accuracy on the present (image,
#: class) pairs stays below this many times chance (1/K): its re-weighting W * W' of the
#: classifier then scrambles the CAM channels (issue 13).
CHANCE_FACTOR = 2.0


def predictor_warning(acc: float | None, num_classes: int = 20) -> str | None:
    """One loud line when ReCAM's W' is at chance (accuracy < CHANCE_FACTOR / K), else None."""
    if acc is None or not np.isfinite(acc) or acc >= CHANCE_FACTOR / num_classes:
        return None
    return (f"WARNING: ReCAM predictor W' at chance (accuracy {acc:.3f} on the present pairs, chance "
            f"{1 / num_classes:.3f}): its re-activation W * W' re-weights the CAM channels with noise; "
            f"do not read these ReCAM seeds as ReCAM's (raise recam_epochs or recipe_list_size)")
