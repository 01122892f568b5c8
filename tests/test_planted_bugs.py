"""Tests that catch small deliberate bugs in core behaviour (issue: "all tests pass, yet small
planted bugs survive"). Every expected value is worked out by hand (in the comments) or from an
independent formula written out here, never read back from the code under test:

1. resume from ``<name>.resume.pt`` (trainer.train_loop)
2. eval-seeds scoring at ``params.threshold`` (eval_seeds.seed_to_label / run)
3. Puzzle-CAM's reconstruction loss on the present classes only (train_puzzle.puzzle_losses)
4. the poly learning-rate decay lr = initial * (1 - step / total) ** 0.9 (trainer.train_loop)
5. the ``sipe_lambda`` weight of SIPE's GSC loss (train_sipe.make_step_fn)
6. DeepLab's flip averaging (deeplab.predict_probs with flip=True)
7. the probability floor before the CRF unary (crf.dense_crf) and the clipping of seeds
   read by the crf step (steps/common.read_seed)

Everything runs on tensors of a few elements, a two-layer toy network or a 2x2 VOC tree.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import isolate_outputs
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import TensorDataset

from wsss.config import Params
from wsss.io import save_label_png, save_npz
from wsss.voc import PALETTE


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Every test here runs on one thread (conftest.one_thread)."""


# ---------------------------------------------------------------------------- shared helpers
def tiny_voc(root: Path, masks: dict[str, dict[str, np.ndarray]]) -> Path:
    """A minimal VOC tree: ``masks[split][id]`` is the uint8 label map of image ``id`` (the
    image itself is flat grey of the same size); image-level labels come from the masks."""
    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
    for split, items in masks.items():
        for image_id, mask in items.items():
            Image.fromarray(np.full(mask.shape + (3,), 128, np.uint8)).save(root / "JPEGImages" / f"{image_id}.jpg")
            save_label_png(root / "SegmentationClass" / f"{image_id}.png", mask, PALETTE)
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(f"{i}\n" for i in items))
    return root


@pytest.fixture()
def workspace(tmp_path, monkeypatch) -> Path:
    """Outputs under tmp_path, MLflow off."""
    isolate_outputs(monkeypatch, tmp_path)
    return tmp_path


class _NoTracker:
    active = False

    def log_metrics(self, *args, **kwargs):
        pass


class _Toy(nn.Module):
    """Two parameter groups as train_loop sees them: a trunk (``body``) and a new head
    (``classifier``, 10x learning rate)."""

    def __init__(self, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.body = nn.Parameter(torch.randn(3, 4, generator=g))
        self.classifier = nn.Parameter(torch.randn(4, 2, generator=g))

    def forward(self, x):
        return torch.tanh(x @ self.body) @ self.classifier

    def spec(self):
        return {"kind": "toy"}


def _toy_data(n: int = 8) -> TensorDataset:
    g = torch.Generator().manual_seed(123)
    return TensorDataset(torch.randn(n, 3, generator=g), torch.randn(n, 2, generator=g))


# ---------------------------------------------------------------------------- 1. resume
class _Interrupt(Exception):
    pass


def test_resume_after_interruption_matches_uninterrupted_run(tmp_path):
    """8 items, batch 2 -> 4 steps per epoch, 3 epochs = 12 steps. A run killed during its
    third epoch (at step 9) leaves a resume file at epoch 2 / step 8; the rerun - with a model
    built from *another* init, as a fresh process with other weights would be - must continue
    at step 8 (steps 8..11 only) and end with exactly the weights of the uninterrupted run."""
    from wsss.trainer import LoopSpec, train_loop

    spec = LoopSpec("toy", epochs=3, lr=0.05, batch_size=2, weight_decay=1e-4, max_steps=0,
                    fingerprint_keys={"what": "toy"})
    data = _toy_data()

    def make_step(seen: list[int], fail_at: int | None = None):
        def step_fn(m, batch, step):
            if step == fail_at:
                raise _Interrupt
            seen.append(step)
            x, y = batch
            loss = F.mse_loss(m(x), y)
            return loss, {"loss": loss.item()}

        return step_fn

    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    full, full_steps = _Toy(0), []
    train_loop(spec, full, data, make_step(full_steps), full_dir, torch.device("cpu"), _NoTracker(), rng_seed=0)
    assert full_steps == list(range(12))

    first, first_steps = _Toy(0), []
    with pytest.raises(_Interrupt):
        train_loop(spec, first, data, make_step(first_steps, fail_at=9), cut_dir, torch.device("cpu"),
                   _NoTracker(), rng_seed=0)
    assert first_steps == list(range(9))
    state = torch.load(cut_dir / "toy.resume.pt", weights_only=True)
    assert (state["epoch"], state["step"]) == (2, 8)
    assert not (cut_dir / "toy.pt").exists()

    resumed, resumed_steps = _Toy(7), []
    assert not torch.equal(resumed.body, full.body)
    logs = train_loop(spec, resumed, data, make_step(resumed_steps), cut_dir, torch.device("cpu"),
                      _NoTracker(), rng_seed=0)
    assert resumed_steps == [8, 9, 10, 11]  # the two finished epochs are not redone
    assert logs["steps"] == 12
    for name, p in full.named_parameters():
        assert torch.equal(p, dict(resumed.named_parameters())[name]), name
    assert not (cut_dir / "toy.resume.pt").exists()
    final = torch.load(cut_dir / "toy.pt", weights_only=True)
    assert final["steps"] == 12 and torch.equal(final["model"]["body"], full.body.detach())

    # a resume file written under other training params is not used: the run starts over
    other = dataclasses.replace(spec, fingerprint_keys={"what": "other"})
    with pytest.raises(_Interrupt):
        train_loop(spec, _Toy(0), data, make_step([], fail_at=5), cut_dir, torch.device("cpu"), _NoTracker(), rng_seed=0)
    steps_other: list[int] = []
    train_loop(other, _Toy(0), data, make_step(steps_other), cut_dir, torch.device("cpu"), _NoTracker(), rng_seed=0)
    assert steps_other == list(range(12))


# ---------------------------------------------------------------------------- 2. eval-seeds threshold
def test_eval_seeds_scores_at_params_threshold(workspace):
    """One 2x2 image, ground truth [[bg, bg], [aeroplane, aeroplane]], one seed map
    [[0.1, 0.3], [0.5, 0.2]] for aeroplane; a pixel is aeroplane where its map beats the
    threshold (the constant background score).

    threshold 0.25 -> [[bg, aero], [aero, bg]]:
        background TP 1, FP 1 (bottom right), FN 1 (top right) -> 1/3
        aeroplane  TP 1, FP 1, FN 1                            -> 1/3;   mIoU 1/3
    threshold 0.15 -> [[bg, aero], [aero, aero]]:
        background TP 1, FP 0, FN 1 -> 1/2;  aeroplane TP 2, FP 1, FN 0 -> 2/3;  mIoU 7/12
    so the two mIoUs differ by exactly 1/4. The sweep is [0.05, 0.9], below and above both,
    so the mIoU at ``threshold`` cannot be borrowed from it: at 0.05 all is aeroplane
    (IoUs 0 and 2/4), at 0.9 all is background (IoUs 2/4 and 0): mIoU 1/4 at either."""
    from wsss.steps import eval_seeds

    root = tiny_voc(workspace / "voc", {"train": {"a": np.array([[0, 0], [1, 1]], np.uint8)}})
    save_npz(workspace / "outputs" / "seeds" / "cam" / "a.npz", keys=np.array([0], np.int64),
             cams=np.array([[[0.1, 0.3], [0.5, 0.2]]], np.float32))
    base = dict(data_dir=str(root), threshold_sweep=[0.05, 0.9], threads=1)
    low = eval_seeds.run(Params(threshold=0.15, **base), "cam")
    high = eval_seeds.run(Params(threshold=0.25, **base), "cam")
    assert high["miou"] == pytest.approx(1 / 3)
    assert high["per_class_iou"] == pytest.approx({"background": 1 / 3, "aeroplane": 1 / 3})
    assert low["miou"] == pytest.approx(7 / 12)
    assert low["per_class_iou"] == pytest.approx({"background": 1 / 2, "aeroplane": 2 / 3})
    assert low["miou"] - high["miou"] == pytest.approx(1 / 4)
    assert (low["threshold"], high["threshold"]) == (0.15, 0.25)
    # the sweep, threshold included, and its best point
    assert (low["best_threshold"], low["best_miou"]) == (0.15, pytest.approx(7 / 12))
    csv = (workspace / "outputs" / "plots" / "threshold" / "cam.csv").read_text().split()
    assert csv == ["threshold,miou", "0.05,0.250000", "0.25,0.333333", "0.9,0.250000"]
    # the label map itself: ties go to the background (the threshold is the first score)
    lab = eval_seeds.seed_to_label(np.array([4]), np.array([[[0.1, 0.3], [0.5, 0.2]]], np.float32), 0.3, (2, 2))
    assert lab.tolist() == [[0, 0], [5, 0]]


# ---------------------------------------------------------------------------- 3. Puzzle-CAM L_re
class _MeanFreeMaps(nn.Module):
    """features(x) = x minus its own spatial mean (per image and channel), classifier = I, stride
    1: the class maps of a tile differ from the full image's by the tile's mean."""

    output_stride = 1

    def features(self, x):
        return x - x.mean((2, 3), keepdim=True)

    def cam_weight(self):
        return torch.eye(2)[:, :, None, None]


def test_puzzle_reconstruction_loss_counts_present_classes_only():
    """One 2x2 image, 2 classes, stride 1: every tile is one pixel, so each tile's mean-free
    map is 0 and A^re = 0, while A = x - mean(x):
        class 0: x = [[1, 2], [3, 6]], mean 3 -> |A| = 2 + 1 + 0 + 3 = 6
        class 1: x = [[0, 0], [0, 8]], mean 2 -> |A| = 2 + 2 + 2 + 6 = 12
    L_re = sum_{c present} |A_c - A^re_c| / (B K h w) = 6 / 8 = 0.75 with only class 0
    present, 18 / 8 = 2.25 with both. The GAPs of A and A^re are all 0, so L_cls = L_p-cls
    = ln 2 whatever the labels."""
    from wsss.steps import train_puzzle

    x = torch.tensor([[[[1.0, 2.0], [3.0, 6.0]], [[0.0, 0.0], [0.0, 8.0]]]])
    only0 = train_puzzle.puzzle_losses(_MeanFreeMaps(), x, torch.tensor([[1.0, 0.0]]))
    assert only0["re"].item() == pytest.approx(0.75)
    assert only0["cls"].item() == pytest.approx(math.log(2)) and only0["pcls"].item() == pytest.approx(math.log(2))
    both = train_puzzle.puzzle_losses(_MeanFreeMaps(), x, torch.tensor([[1.0, 1.0]]))
    assert both["re"].item() == pytest.approx(2.25)
    none = train_puzzle.puzzle_losses(_MeanFreeMaps(), x, torch.tensor([[0.0, 0.0]]))
    assert none["re"].item() == 0.0
    # the step's total: L_cls + L_p-cls + alpha_t * L_re, alpha_t = 4 * 3 / (10 / 2) = 2.4 at step 3 of 10
    step = train_puzzle.make_step_fn(Params(puzzle_alpha=4.0), total=10)
    loss, logs = step(_MeanFreeMaps(), (x, torch.tensor([[1.0, 0.0]])), 3)
    assert logs["alpha"] == pytest.approx(2.4)
    assert loss.item() == pytest.approx(2 * math.log(2) + 2.4 * 0.75)


# ---------------------------------------------------------------------------- 4. poly lr decay
def test_poly_learning_rate_at_every_step(monkeypatch, tmp_path):
    """6 items, batch 2 -> 3 steps per epoch, 2 epochs = 6 steps, cut to max_steps = 5, so
    total = 5. The lr in force at step s must be lr0 * (1 - s / 5) ** 0.9 for the trunk and
    10x that for the new head. The loss is linear in the weights (gradient = constant c), so
    with SGD momentum 0.9 and no weight decay the buffer after step s is
    c * (1 + 0.9 + ... + 0.9 ** s) and the weights end at
        w0 - sum_s lr_s * c * sum_{j <= s} 0.9 ** j."""
    from wsss import trainer

    opts: list[torch.optim.Optimizer] = []

    class SpySGD(torch.optim.SGD):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            opts.append(self)

    monkeypatch.setattr(torch.optim, "SGD", SpySGD)
    c_body, c_head = torch.full((3, 4), 0.5), torch.full((4, 2), -2.0)
    seen: list[tuple[int, float, float]] = []

    def step_fn(m, batch, step):
        (opt,) = opts
        seen.append((step, opt.param_groups[0]["lr"], opt.param_groups[1]["lr"]))
        return (m.body * c_body).sum() + (m.classifier * c_head).sum(), {}

    lr0 = 0.2
    model = _Toy(0)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    spec = trainer.LoopSpec("toy", epochs=2, lr=lr0, batch_size=2, weight_decay=0.0, max_steps=5,
                            fingerprint_keys={})
    logs = trainer.train_loop(spec, model, _toy_data(6), step_fn, tmp_path, torch.device("cpu"), _NoTracker(), rng_seed=0)
    assert logs["steps"] == 5
    expected = [lr0 * (1 - s / 5) ** 0.9 for s in range(5)]  # 0.2, 0.16363, 0.12637, 0.08797, 0.04705
    assert expected[2] == pytest.approx(0.2 * 0.6 ** 0.9)
    assert [s for s, _, _ in seen] == [0, 1, 2, 3, 4]
    assert [b for _, b, _ in seen] == pytest.approx(expected, rel=1e-12)
    assert [h for _, _, h in seen] == pytest.approx([10 * e for e in expected], rel=1e-12)
    moved = sum(e * sum(0.9 ** j for j in range(s + 1)) for s, e in enumerate(expected))
    torch.testing.assert_close(model.body.detach(), w0["body"] - moved * c_body, rtol=0, atol=1e-5)
    torch.testing.assert_close(model.classifier.detach(), w0["classifier"] - 10 * moved * c_head, rtol=0, atol=1e-4)


# ---------------------------------------------------------------------------- 5. sipe_lambda
def test_sipe_total_loss_weights_gsc_by_lambda(monkeypatch):
    """Fixed SIPE outputs: logits 0 -> soft-margin loss ln 2 (every class contributes
    -ln sigmoid(0) or -ln(1 - sigmoid(0))); maps (background, class 0) = [[1, 0]], [[0, 1]] and
    IS-CAMs 0 over 2 pixels -> mean |map - 0| over the 4 entries = 1/2. Total = ln 2 + lambda / 2."""
    from wsss.steps import train_sipe

    outs = {"logits": torch.zeros(1, 20), "maps": torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]]),
            "iscam": torch.zeros(1, 2, 1, 2), "valid": torch.tensor([[True, True]])}
    monkeypatch.setattr(train_sipe, "sipe_outputs", lambda m, x, y, crop=None: outs)
    y = torch.zeros(1, 20)
    y[0, 0] = 1
    totals = {}
    for lam in (0.5, 3.0):
        loss, logs = train_sipe.make_step_fn(Params(sipe_lambda=lam))(None, (torch.zeros(1, 3, 4, 4), y), 0)
        assert logs["loss_cls"] == pytest.approx(math.log(2)) and logs["loss_gsc"] == pytest.approx(0.5)
        assert loss.item() == pytest.approx(math.log(2) + lam * 0.5) == logs["loss"]
        totals[lam] = loss.item()
    assert totals[3.0] - totals[0.5] == pytest.approx(2.5 * 0.5)


# ---------------------------------------------------------------------------- 6. DeepLab flip
class _LeftRightNet(nn.Module):
    """Logits that depend on the column and on the pixel's colour: not mirror-symmetric."""

    def forward(self, x):
        b, _, h, w = x.shape
        col = torch.linspace(-2.0, 2.0, w).view(1, 1, 1, w).expand(b, 1, h, w)
        k = torch.arange(21, dtype=x.dtype).view(1, 21, 1, 1)
        return col * (k - 10) / 5 + x[:, :1] * torch.cos(k) + x[:, 2:3] * torch.sin(k)


def test_predict_probs_averages_with_the_mirror():
    from wsss.models.backbone import IMAGENET_MEAN, IMAGENET_STD
    from wsss.models.deeplab import predict_probs

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    model = _LeftRightNet()
    # the input, normalised by hand: (I / 255 - mean) / std, channels first
    x = (torch.from_numpy(image).float() / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    x = x.permute(2, 0, 1)[None]
    plain = model(x).softmax(1)[0]
    mirrored = model(x.flip(-1)).softmax(1)[0].flip(-1)
    assert (plain - mirrored).abs().max() > 0.1  # the model is far from symmetric
    expected = ((plain + mirrored) / 2).numpy()
    got = predict_probs(model, image, "cpu", flip=True)
    assert got.shape == (21, 5, 7)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(predict_probs(model, image, "cpu", flip=False), plain.numpy(), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------- 7. clipping before the CRF
def test_dense_crf_floors_probabilities_before_the_unary():
    """With 0 mean-field iterations the CRF returns softmax(-unary) = p' / sum p' where
    p' = clip(p, 1e-5, 1): a label with p = 0 keeps 1e-5 / (1 + 1e-5), not 0 - so the
    pairwise terms could still overturn it. A pixel with p = (0, 0) gets (1/2, 1/2)."""
    from wsss.crf import dense_crf

    image = np.full((1, 3, 3), 100, np.uint8)
    probs = np.array([[[0.0, 0.25, 0.0]], [[1.0, 0.75, 0.0]]], np.float32)
    q = dense_crf(image, probs, Params(crf_iters=0))
    floor = 1e-5
    expected = np.array([[[floor / (1 + floor), 0.25, 0.5]], [[1 / (1 + floor), 0.75, 0.5]]], np.float32)
    np.testing.assert_allclose(q, expected, rtol=1e-4, atol=0)
    # with inference the floored label is alive: an isolated (0, 1) pixel in a uniform image of
    # confident label-0 pixels is pulled over to label 0 by its neighbours
    image = np.full((9, 9, 3), 100, np.uint8)
    p0 = np.full((9, 9), 0.999, np.float32)
    p0[4, 4] = 0.0
    q = dense_crf(image, np.stack([p0, 1 - p0]), Params(crf_iters=5))
    assert np.isfinite(q).all() and q[0, 4, 4] > 0.5


def test_crf_step_clips_seed_maps_to_unit_range(workspace):
    """read_seed returns clip(nan_to_num(cams), 0, 1): 1.7 -> 1, -0.3 -> 0, NaN -> 0, inf -> 1."""
    from wsss.steps.common import read_seed

    path = workspace / "s.npz"
    save_npz(path, keys=np.array([2], np.int64), cams=np.array([[[1.7, -0.3], [np.nan, 0.4]]], np.float32))
    keys, cams = read_seed(path, "cam", (2, 2))
    assert keys.tolist() == [2]
    np.testing.assert_array_equal(cams, np.array([[[1.0, 0.0], [0.0, 0.4]]], np.float32))
    save_npz(path, keys=np.array([2], np.int64), cams=np.array([[[np.inf, 0.5], [0.5, 0.5]]], np.float32))
    assert read_seed(path, "cam", (2, 2))[1][0, 0, 0] == 1.0
