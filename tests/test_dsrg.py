"""DSRG (train-dsrg): seeds, seeded region growing, the balanced seed loss and the boundary
loss on tiny hand-made maps whose values are worked out by hand in the comments; one short
training that lowers the loss; a missing seed file ends in one clear error line."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from test_bad_input import assert_one_error, invoke, write_params
from test_planted_bugs import tiny_voc
from conftest import isolate_outputs
from wsss.dsrg import grow_seeds, make_seeds
from wsss.steps.train_dsrg import RATIO_CLIP, boundary_loss, seed_loss

V = 255  # unlabeled


# ------------------------------------------------------------------------------- seeds
def test_seeds_from_cams_by_hand():
    keys = np.array([2, 5])  # mask labels 3 and 6
    cams = np.array([[[0.9, 0.2, 0.05], [0.4, 0.0, 0.3]],
                     [[0.5, 0.3, 0.08], [0.6, 0.05, 0.1]]], np.float32)
    # per pixel: argmax class and its CAM; fg where > 0.35, bg where every CAM < 0.10
    # (0,0) class 2 at 0.9 -> 3 | (0,1) 0.3: neither -> 255 | (0,2) 0.08 -> bg
    # (1,0) class 5 at 0.6 -> 6 | (1,1) 0.05 -> bg          | (1,2) 0.3 -> 255
    want = np.array([[3, V, 0], [6, 0, V]], np.uint8)
    np.testing.assert_array_equal(make_seeds(keys, cams, 0.35, 0.10), want)
    # a user's saliency map gives the background instead (< 0.10); fg and bg both: unlabeled
    sal = np.array([[0.0, 0.05, 0.5], [0.9, 0.02, 0.01]], np.float32)
    want_sal = np.array([[V, 0, V], [6, 0, 0]], np.uint8)
    np.testing.assert_array_equal(make_seeds(keys, cams, 0.35, 0.10, sal), want_sal)


# ------------------------------------------------------------------------------- growing
def _probs(shape=(5, 5)) -> np.ndarray:
    """21 labels; background and label 3 at 0.5 everywhere (below both thresholds)."""
    p = np.zeros((21,) + shape, np.float32)
    p[0] = p[3] = 0.5
    return p


def _set(p, y, x, **labels):
    p[:, y, x] = 0.0
    for name, v in labels.items():
        p[int(name[1:]), y, x] = v


def test_growing_by_hand_connectivity_and_thresholds():
    seed = np.full((5, 5), V, np.uint8)
    seed[0, 0] = 0  # a background seed
    seed[2, 2] = 3  # a seed of label 3
    p = _probs()
    _set(p, 0, 0, l3=0.99, l0=0.01)    # a seed is never changed, whatever the network says
    _set(p, 0, 1, l0=0.995, l3=0.005)  # background 0.995 > 0.99, touches the bg seed: grows to 0
    _set(p, 1, 1, l0=0.995, l3=0.005)  # same, touching (0, 1) and diagonally (0, 0): grows to 0
    _set(p, 1, 0, l0=0.98, l3=0.02)    # background 0.98 < 0.99: stays unlabeled
    _set(p, 2, 1, l3=0.9, l0=0.1)      # 0.9 > 0.85, next to the seed (2, 2): grows to 3
    _set(p, 2, 3, l3=0.9, l0=0.1)      # same on the other side: 3
    _set(p, 3, 4, l3=0.9, l0=0.1)      # diagonal to (2, 3), itself grown: 3 (8-connected chain)
    _set(p, 1, 2, l3=0.8, l0=0.2)      # 0.8 < 0.85: stays unlabeled
    _set(p, 4, 0, l3=0.95, l0=0.05)    # high, but its region touches no seed of 3: must not grow
    _set(p, 4, 4, l7=0.97, l3=0.02, l0=0.01)  # label 7 is absent; among {0, 3} nothing passes
    want = seed.copy()
    want[0, 1] = want[1, 1] = 0
    want[2, 1] = want[2, 3] = want[3, 4] = 3
    grown = grow_seeds(seed, p, np.array([0, 3]), 0.85, 0.99)
    np.testing.assert_array_equal(grown, want)
    # from the original seeds every time: growing again from the same seeds gives the same map,
    # and the seeds passed in are not modified
    np.testing.assert_array_equal(grow_seeds(seed, p, np.array([3]), 0.85, 0.99), want)
    assert seed[0, 1] == V


def test_growing_needs_a_seed_of_the_same_label():
    """A confident region of label 3 next to a seed of another label (6) stays unlabeled."""
    seed = np.full((3, 3), V, np.uint8)
    seed[1, 1] = 6
    p = np.zeros((21, 3, 3), np.float32)
    p[3] = 0.95
    p[6] = 0.05
    grown = grow_seeds(seed, p, np.array([0, 3, 6]), 0.85, 0.99)
    np.testing.assert_array_equal(grown, seed)


def test_growing_takes_the_argmax_over_present_labels_only():
    """Absent label 7 is the network's top guess at (0, 1), but among the present {0, 3} label 3
    wins there with 0.45 > 0.4 (a low threshold, so that a present label can pass while an
    absent one is higher) next to the seed of 3: it joins 3. At (0, 2) no present label passes."""
    seed = np.array([[3, V, V]], np.uint8)
    p = np.zeros((21, 1, 3), np.float32)
    p[[7, 3, 0], 0, 1] = [0.5, 0.45, 0.05]
    p[[7, 3, 0], 0, 2] = [0.9, 0.05, 0.05]
    grown = grow_seeds(seed, p, np.array([3]), 0.4, 0.99)
    np.testing.assert_array_equal(grown, np.array([[3, 3, V]], np.uint8))


# ------------------------------------------------------------------------------- losses
def test_seed_loss_by_hand():
    # 3 labels, images of 1 x 3 pixels; probs[b, label, 0, x]
    probs = torch.full((3, 3, 1, 3), 1 / 3, dtype=torch.float64)
    labels = torch.tensor([[[0, 2, V]], [[1, 1, 0]], [[V, V, V]]])
    probs[0, :, 0, 0] = torch.tensor([0.5, 0.3, 0.2])   # bg seed: p0 = 0.5
    probs[0, :, 0, 1] = torch.tensor([0.5, 0.25, 0.25])  # seed of label 2: p2 = 0.25
    probs[1, :, 0, 0] = torch.tensor([0.1, 0.8, 0.1])   # label 1: 0.8
    probs[1, :, 0, 1] = torch.tensor([0.3, 0.4, 0.3])   # label 1: 0.4
    probs[1, :, 0, 2] = torch.tensor([0.9, 0.05, 0.05])  # bg: 0.9
    # image 0: bg -log 0.5, fg -log 0.25; image 1: bg -log 0.9, fg -(log 0.8 + log 0.4) / 2;
    # image 2 has no seeds: 0 in both terms, but it counts in the batch mean (official: mean over
    # the batch of per-image normalised sums)
    bg = (-math.log(0.5) - math.log(0.9) + 0.0) / 3
    fg = (-math.log(0.25) - (math.log(0.8) + math.log(0.4)) / 2 + 0.0) / 3
    assert seed_loss(probs, labels).item() == pytest.approx(bg + fg, rel=1e-6)  # = 0.9182
    assert bg + fg == pytest.approx(0.91817, abs=1e-4)


def test_boundary_loss_is_kl_of_crf_to_softmax():
    g = torch.Generator().manual_seed(0)
    p = torch.rand(2, 4, 3, 3, generator=g, dtype=torch.float64) + 0.2
    q = torch.rand(2, 4, 3, 3, generator=g, dtype=torch.float64) + 0.2
    p, q = p / p.sum(1, keepdim=True), q / q.sum(1, keepdim=True)  # ratios stay inside [0.05, 20]
    direct = 0.0
    for b in range(2):
        for y in range(3):
            for x in range(3):
                direct += sum(float(q[b, c, y, x] * math.log(q[b, c, y, x] / p[b, c, y, x])) for c in range(4))
    direct /= 2 * 3 * 3  # mean over images and pixels
    p.requires_grad_(True)
    q.requires_grad_(True)
    loss = boundary_loss(p, q)
    assert loss.item() == pytest.approx(direct, rel=1e-9)
    loss.backward()
    assert q.grad is None  # the CRF output is a constant target
    assert p.grad is not None
    # the official clip of Q / P to [0.05, 20]: one pixel, P = (0.001, 0.999), Q = (0.5, 0.5)
    p1 = torch.tensor([0.001, 0.999], dtype=torch.float64).view(1, 2, 1, 1)
    q1 = torch.tensor([0.5, 0.5], dtype=torch.float64).view(1, 2, 1, 1)
    want = 0.5 * math.log(RATIO_CLIP[1]) + 0.5 * math.log(0.5 / 0.999)
    assert boundary_loss(p1, q1).item() == pytest.approx(want, rel=1e-9)


# ------------------------------------------------------------------------------- training
def _square_masks(n: int, side: int) -> dict[str, np.ndarray]:
    out = {}
    for i in range(n):
        m = np.zeros((side, side), np.uint8)
        a = 4 + 2 * i
        m[a:a + 14, a:a + 14] = 1 + (i % 3)  # aeroplane, bicycle, bird
        out[f"im{i}"] = m
    return out


def test_short_training_lowers_the_loss(tmp_path, monkeypatch):
    """Six SGD steps of train-dsrg's own step (CRF on the pool-free path, growing, both losses)
    on one batch of four 32 px images lower its loss."""
    from wsss.config import Params
    from wsss.models.deeplab import build_deeplab
    from wsss.steps.train_dsrg import GrowthCurve, SeedData, _init_pool, dsrg_step
    from wsss.voc import VOCDataset

    isolate_outputs(monkeypatch, tmp_path)
    masks = _square_masks(4, 32)
    root = tiny_voc(tmp_path / "voc", {"train": masks})
    voc = VOCDataset(root, "train")
    seeds, present = [], []
    for i in voc.ids:  # seeds: the object's core and the image border, the rest unlabeled
        m = masks[i]
        s = np.full(m.shape, V, np.uint8)
        s[:3], s[-3:], s[:, :3], s[:, -3:] = 0, 0, 0, 0
        ys, xs = np.nonzero(m)
        s[ys.min() + 4:ys.max() - 3, xs.min() + 4:xs.max() - 3] = m.max()
        seeds.append(s)
        present.append(np.array([0, m.max()]))
    params = Params(seg_crop=32, seg_batch_size=4, crf_iters=2, threads=1)
    _init_pool(params)
    torch.manual_seed(0)
    model = build_deeplab(params).train()
    data = SeedData(voc, 32, seeds, present, 0)
    batch = tuple(torch.stack(t) for t in zip(*[data[i] for i in range(4)]))
    step = dsrg_step(None, GrowthCurve(), 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    losses = []
    for i in range(6):
        loss, logs = step(model, batch, i)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        assert logs["coverage_after"] >= logs["coverage_before"]  # growing only adds labels
    assert losses[-1] < 0.8 * losses[0], losses  # measured: 6.01 -> 4.44


# ------------------------------------------------------------------------------- bad input
def test_missing_seeds_is_one_error_line(tmp_path, monkeypatch):
    root = tmp_path
    mask = np.zeros((8, 8), np.uint8)
    mask[2:6, 2:6] = 8
    tiny_voc(root / "data" / "VOC2012", {"train": {"a": mask}, "val": {"b": mask}})
    isolate_outputs(monkeypatch, root)
    write_params(root, seg_batch_size=1)
    res = invoke(root, "train-dsrg", "--method", "cam")
    assert_one_error(res, "seeds/cam/a.npz", "seed file missing", "python cli.py seeds --method cam")


def test_crf_refine_scales_the_kernels_of_the_params_it_is_given():
    """crf_refine caches the scaled CRF params: a second Params with other kernels must not get
    the first one's (reference: dense_crf on a Params built by hand with the scaled sxy)."""
    import dataclasses

    from wsss.config import Params
    from wsss.crf import dense_crf
    from wsss.dsrg import MIN_PROB, crf_refine

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
    probs = np.ascontiguousarray(rng.dirichlet(np.ones(21), size=(10, 12)).transpose(2, 0, 1).astype(np.float32))
    for sxy in (3.0, 40.0):  # same scale, two Params: the cache must tell them apart
        params = Params(crf_gauss_sxy=sxy, crf_bilateral_sxy=sxy * 2, crf_iters=3, threads=1)
        by_hand = dataclasses.replace(params, crf_gauss_sxy=sxy * 0.25, crf_bilateral_sxy=sxy * 2 * 0.25)
        q = np.maximum(dense_crf(image, probs, by_hand), MIN_PROB)
        np.testing.assert_allclose(crf_refine(image, probs, params, 0.25), q / q.sum(0, keepdims=True), atol=1e-6)
