"""Issue 13 (Puzzle-CAM part): the official conventions, each on a tiny case worked out by hand.

- Puzzle-CAM's loss L = L_cls + L_p-cls + alpha_t * L_re with its ramp
  (shjo-april/PuzzleCAM train_classification_with_puzzle.py:344-381);
- its optimiser: four parameter groups (biases 2x lr, no weight decay; new layers 10x / 20x),
  poly decay, effective momentum 1e-4 with nesterov (the PolyOptimizer argument slip);
- eval-seeds' three columns: shared threshold, official scoring (fixed threshold, sweep,
  background argmax over the seed file's ``bg``), oracle;
- map normalisation (max vs Score-CAM's min-max) and the bicubic test-time resize.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from wsss import methods
from wsss.cams.base import CAMMethod, normalise_maps
from wsss.cams.cam import CAM
from wsss.cams.scorecam import ScoreCAM
from wsss.config import Params
from wsss.models.backbone import normalize
from wsss.steps import eval_seeds
from wsss.steps.train_puzzle import make_step_fn, puzzle_losses, sgd_options
from wsss.trainer import LoopSpec, param_groups, train_loop


def softplus(v: float) -> float:
    return math.log1p(math.exp(v))


# ----------------------------------------------------------------------------- Puzzle-CAM loss
class HalfMeanFeatures(nn.Module):
    """features(x) = x - mean_hw(x) / 2 (depends on the context, so tiles differ from the whole);
    identity 1x1 classifier: the class maps are the features, K = C = 2; stride 1."""

    output_stride = 1

    def features(self, x):
        return x - 0.5 * x.mean(dim=(2, 3), keepdim=True)

    def cam_weight(self, reactivate=False):
        return torch.eye(2)[:, :, None, None]


# channel 0: [[1, 3], [5, 7]] (mean 4), channel 1: [[2, 2], [2, 6]] (mean 3)
X = torch.tensor([[[[1.0, 3.0], [5.0, 7.0]], [[2.0, 2.0], [2.0, 6.0]]]])
Y = torch.tensor([[1.0, 0.0]])
# By hand. Full maps A = x - m/2: A0 = [[-1, 1], [3, 5]] (GAP 2), A1 = [[.5, .5], [.5, 4.5]] (GAP 1.5).
# Tiles are single pixels v -> v - v/2 = v/2; merged: R0 = [[.5, 1.5], [2.5, 3.5]] (GAP 2),
# R1 = [[1, 1], [1, 3]] (GAP 1.5).
# L_cls = mean over the 2 classes of the soft margin: (softplus(-2) + softplus(1.5)) / 2; L_p-cls equal.
L_CLS = (softplus(-2.0) + softplus(1.5)) / 2
# L_re (official 'masking'): |A - R| on class 0 only = [1.5, .5, .5, 1.5], sum 4, divided by all
# B*K*h*w = 8 entries (absent class 1 counts as zeros): 0.5 (per present entry it would be 1.0).
L_RE = 4.0 / 8.0


def test_puzzle_loss_terms_by_hand():
    t = puzzle_losses(HalfMeanFeatures(), X, Y)
    assert t["cls"].item() == pytest.approx(L_CLS, abs=1e-6)
    assert t["pcls"].item() == pytest.approx(L_CLS, abs=1e-6)
    assert t["re"].item() == pytest.approx(L_RE, abs=1e-6)


def test_puzzle_loss_averaged_per_image_over_the_batch():
    """Batch of 2 (same image; labels [1, 0] and [0, 1]). class_loss_fn(reduction='none') gives
    each image's mean over classes, then .mean() over the batch (:344); the masked L1 is
    divided by all B*K*h*w = 16 entries (:353-355). Image 2 keeps class 1:
    |A1 - R1| = [.5, .5, .5, 1.5], sum 3; with image 1's 4: L_re = 7 / 16."""
    x = torch.cat([X, X])
    y = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t = puzzle_losses(HalfMeanFeatures(), x, y)
    img2 = (softplus(2.0) + softplus(-1.5)) / 2
    assert t["cls"].item() == pytest.approx((L_CLS + img2) / 2, abs=1e-6)
    assert t["pcls"].item() == pytest.approx((L_CLS + img2) / 2, abs=1e-6)
    assert t["re"].item() == pytest.approx(7 / 16, abs=1e-6)


@pytest.mark.parametrize("step,alpha", [(0, 0.0), (2, 1.6), (5, 4.0), (8, 4.0)])
def test_puzzle_total_loss_with_alpha_ramp(step, alpha):
    """alpha_t = min(alpha * t / (0.5 * T), alpha) (train_classification_with_puzzle.py:376-379,
    README: --alpha 4 --alpha_schedule 0.5); T = 10: 0, 1.6, 4, 4."""
    step_fn = make_step_fn(Params(puzzle_alpha=4.0), total=10)
    loss, logs = step_fn(HalfMeanFeatures(), (X, Y), step)
    assert logs["alpha"] == pytest.approx(alpha)
    assert loss.item() == pytest.approx(2 * L_CLS + alpha * L_RE, abs=1e-5)


# ----------------------------------------------------------------------------- optimiser
class Tiny(nn.Module):
    """Parameter names as in the classifier: a trunk with a conv and a BatchNorm, a head."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(1, 2, 1, bias=False), nn.BatchNorm2d(2))
        self.classifier = nn.Conv2d(2, 1, 1, bias=True)

    def forward(self, x):
        return self.classifier(self.backbone(x)).mean((1, 2, 3))

    def spec(self):
        return {}


def _groups_by_name(model, groups):
    names = {id(p): n for n, p in model.named_parameters()}
    return [(g["lr"], g["weight_decay"], sorted(names[id(p)] for p in g["params"])) for g in groups]


def test_puzzle_param_groups_as_official():
    """get_parameter_groups splits on 'weight' in the name; the optimiser gives biases 2x lr and
    no weight decay, new (scratch) layers 10x / 20x (train_classification_with_puzzle.py:218-223)."""
    model = Tiny()
    got = _groups_by_name(model, param_groups(model, 0.1, 1e-4, ("classifier",), bias_groups=True))
    assert got == [
        (0.1, 1e-4, ["backbone.0.weight", "backbone.1.weight"]),
        (pytest.approx(1.0), 1e-4, ["classifier.weight"]),
        (pytest.approx(0.2), 0.0, ["backbone.1.bias"]),
        (pytest.approx(2.0), 0.0, ["classifier.bias"]),
    ]
    # without bias_groups: the two IRN groups of train-cls, unchanged
    got = _groups_by_name(model, param_groups(model, 0.1, 1e-4, ("classifier",)))
    assert got == [(0.1, 1e-4, ["backbone.0.weight", "backbone.1.bias", "backbone.1.weight"]),
                   (pytest.approx(1.0), 1e-4, ["classifier.bias", "classifier.weight"])]


class _Tracker:
    def log_metrics(self, *a, **k):
        pass


def test_puzzle_learning_rates_at_step_0_and_mid_schedule(tmp_path, monkeypatch):
    """The lr of every group at step 0 and at step 2 of 4 (poly 0.9: (1 - 2/4)^0.9 = 0.5359),
    and the SGD the official PolyOptimizer really builds: momentum 1e-4, nesterov."""
    seen = []
    real_sgd = torch.optim.SGD

    class Recording(real_sgd):
        def step(self, closure=None):
            seen.append([(g["lr"], g["momentum"], g["nesterov"], g["weight_decay"]) for g in self.param_groups])
            return super().step(closure)

    monkeypatch.setattr(torch.optim, "SGD", Recording)
    data = [(torch.ones(1, 2, 2), torch.zeros(())) for _ in range(8)]
    spec = LoopSpec("tiny", epochs=1, lr=0.1, batch_size=2, weight_decay=1e-4, max_steps=0, fingerprint_keys={},
                    **sgd_options(Params()))

    def step_fn(m, batch, step):
        return (m(batch[0]) ** 2).mean(), {}

    train_loop(spec, Tiny(), data, step_fn, tmp_path, torch.device("cpu"), _Tracker(), 0)
    assert len(seen) == 4
    scale = 0.5 ** 0.9
    for step, s in ((0, 1.0), (2, scale)):
        lrs = [g[0] for g in seen[step]]
        assert lrs == pytest.approx([0.1 * s, 1.0 * s, 0.2 * s, 2.0 * s])
        assert {g[1] for g in seen[step]} == {1e-4}
        assert all(g[2] for g in seen[step])
        assert [g[3] for g in seen[step]] == [1e-4, 1e-4, 0.0, 0.0]


def test_puzzle_optimiser_params_validated():
    from wsss.errors import UserError

    with pytest.raises(UserError, match="puzzle_nesterov"):
        Params(puzzle_momentum=0.0, puzzle_nesterov=True)
    with pytest.raises(UserError, match="puzzle_momentum"):
        Params(puzzle_momentum=1.0)


# ----------------------------------------------------------------------------- three columns
def test_official_scoring_declared_per_method():
    by = {m.name: m.scoring for m in methods.METHODS}
    assert by["cam"].label == "threshold 0.15" and by["cam"].paper == "official"
    assert by["recam"].label == "threshold 0.21" and by["recam"].paper == "oracle"
    assert by["puzzlecam"].thresholds == pytest.approx([0.05 * i for i in range(1, 16)])  # arange(.05, .8, .05)
    assert by["sipe"].rule == methods.BACKGROUND and by["sipe"].thresholds == ()
    assert {by[m].paper for m in ("gradcam", "gradcampp", "scorecam")} == {"none"}


def test_seed_to_label_bg_by_hand():
    keys = np.array([2, 5])
    cams = np.array([[[0.9, 0.3, 0.1]], [[0.2, 0.6, 0.1]]], np.float32)
    bg = np.array([[0.5, 0.5, 0.5]], np.float32)
    # pixel 0: class 2 (0.9 > 0.5); pixel 1: class 5 (0.6); pixel 2: background (0.5 > 0.1)
    assert eval_seeds.seed_to_label_bg(keys, cams, bg).tolist() == [[3, 6, 0]]


def test_official_column_rules():
    miou_at = {0.05: 0.30, 0.1: 0.42, 0.15: 0.40, 0.2: 0.42, 0.21: 0.38}
    fixed = eval_seeds.official_column(methods.Scoring(methods.THRESHOLD, (0.15,)), miou_at, None, 0)
    assert (fixed["official_miou"], fixed["official_threshold"]) == (0.40, 0.15)
    # sweep: the best; a tie goes to the first threshold, as evaluate.py's strict '>' does
    sweep = eval_seeds.official_column(methods.Scoring(methods.SWEEP, (0.05, 0.1, 0.15, 0.2)), miou_at, None, 0)
    assert (sweep["official_miou"], sweep["official_threshold"]) == (0.42, 0.1)
    bg = methods.Scoring(methods.BACKGROUND)
    ok = eval_seeds.official_column(bg, miou_at, 0.5, 0)
    assert ok["official_miou"] == 0.5 and ok["official_threshold"] is None
    # some files without bg: NaN even if the others could be scored (no silent partial column)
    missing = eval_seeds.official_column(bg, miou_at, 0.5, 3)
    assert math.isnan(missing["official_miou"]) and "3 seed file(s) carry no 'bg'" in missing["official_note"]


# ----------------------------------------------------------------------------- normalisation
def test_normalise_maps_by_hand():
    m = torch.tensor([[[0.2, 0.4], [0.6, 1.0]], [[0.3, 0.3], [0.3, 0.3]]])
    mx = normalise_maps(m, "max")
    assert mx[0].flatten().tolist() == pytest.approx([0.2 / 1.00001, 0.4 / 1.00001, 0.6 / 1.00001, 1 / 1.00001])
    assert mx[1].flatten().tolist() == pytest.approx([0.3 / 0.30001] * 4)
    mm = normalise_maps(m, "minmax")
    assert mm[0].flatten().tolist() == pytest.approx([0.0, 0.25, 0.5, 1.0])
    assert mm[1].flatten().tolist() == [0.0] * 4  # constant: nothing to rank


class FixedMaps(CAMMethod):
    """Raw maps with a floor: 0.5 + the image's red channel at pixel (0, 0)."""

    name = "fixed"

    def maps(self, x, classes):
        base = torch.tensor([[0.5, 0.75], [1.0, 1.5]], device=x.device)
        return base.expand(len(classes), 2, 2).clone()


def test_reference_norm_per_method():
    model = nn.Conv2d(3, 1, 1)
    params = Params(cam_scales=[1.0], cam_flip=False)
    f = FixedMaps(model, params)
    img = np.zeros((2, 2, 3), np.uint8)
    assert f(img, [0])[0].flatten().tolist() == pytest.approx([0.5 / 1.50001, 0.75 / 1.50001, 1 / 1.50001, 1.5 / 1.50001])
    f.reference_norm = "minmax"  # Score-CAM's code: (M - min) / (max - min) = [0, .25, .5, 1]
    assert f(img, [0])[0].flatten().tolist() == pytest.approx([0.0, 0.25, 0.5, 1.0])
    forced = FixedMaps(model, Params(cam_scales=[1.0], cam_flip=False, cam_norm="max"))
    forced.reference_norm = "minmax"
    assert forced.norm == "max"
    assert ScoreCAM.reference_norm == "minmax" and CAM.reference_norm == "max"


# ----------------------------------------------------------------------------- bicubic resize
class Recorder(nn.Module):
    """A 'classifier' that records its inputs; features are the input's first channel."""

    output_stride = 1

    def __init__(self):
        super().__init__()
        self.seen = []

    def features(self, x):
        self.seen.append(x.clone())
        return x[:, :1]


class FirstChannel(CAMMethod):
    name = "first"

    def maps(self, x, classes):
        return self.model.features(x)[0, :1].expand(len(classes), *x.shape[-2:]).abs()


def test_bicubic_resize_feeds_the_pil_bicubic_image():
    """cam_resize: bicubic resizes the uint8 image with PIL's bicubic filter (IRN pil_rescale,
    Puzzle-CAM get_cam), then normalises; bilinear is torch's on the normalised tensor."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    expected = np.array(Image.fromarray(img).resize((14, 10), resample=Image.BICUBIC))
    exp_t = normalize(torch.from_numpy(expected).permute(2, 0, 1)[None].float() / 255)
    for mode in ("bicubic", "bilinear"):
        rec = Recorder()
        FirstChannel(rec, Params(cam_scales=[2.0], cam_flip=False, cam_resize=mode))(img, [0])
        (seen,) = rec.seen
        assert seen.shape == (1, 3, 10, 14)
        close = torch.allclose(seen, exp_t, atol=1e-5)
        assert close == (mode == "bicubic")


def test_sipe_bicubic_resize_feeds_the_pil_bicubic_image(monkeypatch):
    """SIPE's make_cam.py reads VOC12ClsDatasetMSF, which rescales with pil_rescale(order=3):
    the IS-CAM trunk must see the PIL-bicubic image under cam_resize: bicubic, as CAM does."""
    import wsss.cams.sipe as sipe_cams

    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    expected = np.array(Image.fromarray(img).resize((14, 10), resample=Image.BICUBIC))
    exp_t = normalize(torch.from_numpy(expected).permute(2, 0, 1)[None].float() / 255)
    seen = []

    def recording_iscams(model, x, labels, flip=True):
        seen.append(x.clone())
        return torch.ones((x.shape[0], model.num_classes + 1, *x.shape[-2:]))

    class FakeSIPE(nn.Module):
        num_classes = 20
        output_stride = 1

        def hie_features(self, stages):  # only its presence is checked
            raise AssertionError

    monkeypatch.setattr(sipe_cams, "inference_iscams", recording_iscams)
    for mode in ("bicubic", "bilinear"):
        seen.clear()
        sipe_cams.ISCAM(FakeSIPE(), Params(cam_scales=[2.0], cam_flip=False, cam_resize=mode))(img, [0])
        (x,) = seen
        assert x.shape == (1, 3, 10, 14)
        assert torch.allclose(x, exp_t, atol=1e-5) == (mode == "bicubic")


# ----------------------------------------------------------------------------- eval-seeds end to end
def test_eval_seeds_writes_the_three_labelled_columns(tmp_path, monkeypatch):
    """One 2x4 image, ground truth [bg, bg, cat, cat] in both rows; the cat map
    [.1, .18, .3, .9] and a background map [.5, .05, .5, .2]. By hand:
    shared 0.21 -> [bg, bg, cat, cat]: mIoU 1;
    IRN's 0.15 (cam) -> [bg, cat, cat, cat]: bg 1/2, cat 2/3, mIoU 7/12;
    SIPE's argmax over [bg map, cat] -> [bg, cat, bg, cat]: bg 1/3, cat 1/3, mIoU 1/3;
    oracle over {0.21, 0.5}: 1 at 0.21. Without 'bg' SIPE's official column is NaN."""
    from conftest import isolate_outputs
    from test_planted_bugs import tiny_voc

    from wsss.io import save_npz

    isolate_outputs(monkeypatch, tmp_path)
    mask = np.array([[0, 0, 8, 8]] * 2, np.uint8)
    tiny_voc(tmp_path / "voc", {"train": {"a": mask}})
    params = Params(data_dir=str(tmp_path / "voc"), seed_split="train", threshold_sweep=[0.5], threads=1)
    cams = np.array([[[0.1, 0.18, 0.3, 0.9]] * 2], np.float32)
    bg = np.array([[0.5, 0.05, 0.5, 0.2]] * 2, np.float32)
    for method, extra in (("cam", {}), ("sipe", {"bg": bg})):
        (tmp_path / "outputs" / "seeds" / method).mkdir(parents=True)
        save_npz(tmp_path / "outputs" / "seeds" / method / "a.npz", keys=np.array([7]), cams=cams, **extra)
    cam = eval_seeds.run(params, "cam")
    assert cam["miou"] == pytest.approx(1.0)
    assert (cam["official_miou"], cam["official_threshold"], cam["official_rule"]) == \
        (pytest.approx(7 / 12), 0.15, "threshold 0.15")
    assert (cam["best_miou"], cam["best_threshold"]) == (pytest.approx(1.0), 0.21)
    sipe = eval_seeds.run(params, "sipe")
    assert sipe["official_miou"] == pytest.approx(1 / 3) and sipe["official_rule"] == "background argmax"
    assert sipe["miou"] == pytest.approx(1.0)  # the headline ignores bg
    save_npz(tmp_path / "outputs" / "seeds" / "sipe" / "a.npz", keys=np.array([7]), cams=cams)
    sipe = eval_seeds.run(params, "sipe")
    assert math.isnan(sipe["official_miou"]) and "carry no 'bg'" in sipe["official_note"]
    import json
    written = json.loads((tmp_path / "outputs" / "metrics" / "eval_seeds" / "sipe.json").read_text())
    assert written["official_rule"] == "background argmax" and written["paper_column"] == "official"
