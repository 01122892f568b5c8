"""Canonical mIoU: golden values computed by hand, and parity with an independent
per-class reference implementation on random maps with void."""

import math

import numpy as np
import pytest

from wsss.metrics import ConfusionMatrix, miou


def test_golden_two_images_by_hand():
    # image 1: gt [[0,1],[1,255]], pred [[0,1],[0,1]]
    # image 2: gt [[2,2],[0,0]],   pred [[2,255],[0,2]]
    # class 0: TP 2 (img1 (0,0), img2 (1,0)), FP 1 (img1 (1,0) pred 0 gt 1), FN 1 (img2 (1,1) -> 2)
    #          IoU = 2 / 4
    # class 1: TP 1, FP 0 (img1 (1,1) is gt void -> ignored), FN 1 -> IoU 1/2
    # class 2: TP 1, FP 1 (img2 (1,1)), FN 1 (img2 (0,1) predicted 255 = miss) -> IoU 1/3
    gt1, p1 = np.array([[0, 1], [1, 255]]), np.array([[0, 1], [0, 1]])
    gt2, p2 = np.array([[2, 2], [0, 0]]), np.array([[2, 255], [0, 2]])
    cm = ConfusionMatrix(4)
    cm.update(p1, gt1)
    cm.update(p2, gt2)
    s = cm.scores()
    assert s["per_class_iou"] == {"0": 0.5, "1": 0.5, "2": pytest.approx(1 / 3)}
    # class 3 is absent from gt and prediction: excluded, not 0 and not 1
    assert s["miou"] == pytest.approx((0.5 + 0.5 + 1 / 3) / 3)
    assert s["n_classes_scored"] == 3
    assert s["precision"]["2"] == pytest.approx(0.5)
    assert s["recall"]["0"] == pytest.approx(2 / 3)


def test_class_only_in_prediction_counts_as_zero():
    gt = np.array([[0, 0]])
    pred = np.array([[0, 5]])
    cm = ConfusionMatrix(21)
    cm.update(pred, gt)
    s = cm.scores()
    assert s["per_class_iou"] == {"0": 0.5, "5": 0.0}
    assert s["miou"] == pytest.approx(0.25)


def test_all_void_ground_truth_gives_nan_and_no_error():
    cm = ConfusionMatrix(21)
    cm.update(np.full((3, 3), 255), np.full((3, 3), 255))
    assert math.isnan(cm.scores()["miou"])


def test_prediction_outside_range_is_a_miss_not_an_index_error():
    cm = ConfusionMatrix(3)
    cm.update(np.array([[200, 255, 1]]), np.array([[0, 1, 1]]))
    s = cm.scores()
    assert s["per_class_iou"] == {"0": 0.0, "1": 0.5}


def test_shape_mismatch_raises():
    with pytest.raises(ValueError):
        ConfusionMatrix(3).update(np.zeros((2, 2)), np.zeros((2, 3)))


def _reference_miou(preds, gts, n):
    """Independent reference: per-class set counting, no confusion matrix."""
    ious = []
    for c in range(n):
        tp = fp = fn = 0
        for p, g in zip(preds, gts):
            valid = g != 255
            tp += int(np.sum((p == c) & (g == c) & valid))
            fp += int(np.sum((p == c) & (g != c) & valid))
            fn += int(np.sum((p != c) & (g == c) & valid))
        if tp + fp + fn:
            ious.append(tp / (tp + fp + fn))
    return float(np.mean(ious))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_parity_with_reference_on_random_maps_with_void(seed):
    rng = np.random.default_rng(seed)
    n = 21
    preds, gts = [], []
    for _ in range(5):
        shape = tuple(rng.integers(5, 30, size=2))
        g = rng.integers(0, 6, size=shape)  # few classes present: most of 21 absent
        g[rng.random(shape) < 0.15] = 255
        p = np.where(rng.random(shape) < 0.6, g, rng.integers(0, 8, size=shape))
        p[rng.random(shape) < 0.05] = 255
        preds.append(p)
        gts.append(g)
    assert miou(preds, gts, n) == pytest.approx(_reference_miou(preds, gts, n), abs=1e-12)
