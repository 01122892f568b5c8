"""Dense CRF, pseudo-masks, the DeepLab network and the crf / train-seg / eval-seg steps."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import isolate_outputs
import torch
from PIL import Image

from wsss.config import Params
from wsss.crf import crf_label_inference, crf_postprocess, dense_crf, seeds_to_pseudo_mask
from wsss.errors import UserError
from wsss.io import save_label_png, save_npz
from wsss.voc import PALETTE

RED, GREEN, BLUE = (220, 30, 30), (30, 200, 30), (30, 30, 220)


# ----------------------------------------------------------------------------- dense CRF
def _two_regions(h: int = 48, w: int = 48):
    image = np.zeros((h, w, 3), np.uint8)
    image[:, : w // 2] = RED
    image[:, w // 2:] = BLUE
    truth = np.zeros((h, w), np.int64)
    truth[:, w // 2:] = 1
    return image, truth


def test_dense_crf_keeps_clean_labels_and_fixes_flipped_pixels():
    image, truth = _two_regions()
    p1 = np.where(truth == 1, 0.8, 0.2).astype(np.float32)
    clean = np.stack([1 - p1, p1])
    q = dense_crf(image, clean, Params())
    assert q.shape == clean.shape and q.dtype == np.float32
    np.testing.assert_allclose(q.sum(0), 1.0, atol=1e-4)
    assert (q.argmax(0) == truth).all()

    rng = np.random.default_rng(0)
    flipped = rng.random(truth.shape) < 0.05
    noisy_p1 = np.where(flipped, 1 - p1, p1)
    noisy = np.stack([1 - noisy_p1, noisy_p1])
    assert (noisy.argmax(0) != truth).sum() == flipped.sum() > 20
    assert (crf_postprocess(image, noisy, Params()) == truth).all()


def test_crf_label_inference_smooths_isolated_labels_and_handles_one_label():
    image, truth = _two_regions()
    labels = truth.astype(np.uint8).copy()
    labels[10, 5], labels[30, 40] = 1, 0  # two wrong pixels
    out = crf_label_inference(image, labels, 2, Params())
    assert out.dtype == np.uint8 and (out == truth).all()
    assert (crf_label_inference(image, labels, 1, Params()) == 0).all()


def _bands(flat: bool):
    """96x96: a CAM of 0.8 (left), 0.2 (middle) and 0.02 (right) over three vertical bands."""
    h = w = 96
    cam = np.zeros((1, h, w), np.float32)
    cam[0, :, :32], cam[0, :, 32:64], cam[0, :, 64:] = 0.8, 0.2, 0.02
    image = np.full((h, w, 3), 128, np.uint8)
    if not flat:
        image[:, :32], image[:, 32:64], image[:, 64:] = RED, GREEN, BLUE
    return image, cam


@pytest.mark.parametrize("flat", [False, True])
def test_seeds_to_pseudo_mask_thresholds(flat):
    """fg where cam > conf_fg, 255 between conf_bg and conf_fg, background below conf_bg.

    On an image whose colours follow the CAM regions the default CRF keeps them; on a flat
    image the CRF is made weak (its appearance kernel cannot separate anything there)."""
    image, cam = _bands(flat)
    params = Params(conf_fg=0.35, conf_bg=0.10)
    if flat:
        params = dataclasses.replace(params, crf_gauss_compat=0.05, crf_bilateral_compat=0.05)
    mask = seeds_to_pseudo_mask(image, np.array([4]), cam, params)
    assert mask.dtype == np.uint8 and mask.shape == (96, 96)
    inner = slice(8, 88)  # stay clear of the band borders
    assert (mask[inner, 4:28] == 5).all()  # class 4 -> label 5
    assert (mask[inner, 36:60] == 255).all()
    assert (mask[inner, 68:92] == 0).all()


def test_seeds_to_pseudo_mask_two_classes_and_no_class():
    image, cam = _bands(False)
    cams = np.zeros((2, 96, 96), np.float32)
    cams[0, :, :32] = 0.9
    cams[1, :, 64:] = 0.9
    mask = seeds_to_pseudo_mask(image, np.array([2, 14]), cams, Params())
    assert (mask[8:88, 4:28] == 3).all() and (mask[8:88, 68:92] == 15).all()
    assert (mask[8:88, 36:60] == 0).all()
    empty = seeds_to_pseudo_mask(image, np.zeros(0, np.int64), np.zeros((0, 96, 96), np.float32), Params())
    assert (empty == 0).all()


# ----------------------------------------------------------------------------- overlays
def test_overlays():
    from wsss.overlays import cam_heatmap, colorize, iou_bar_chart, overlay, panel

    label = np.array([[0, 1], [15, 255]], np.uint8)
    rgb = colorize(label)
    assert rgb.shape == (2, 2, 3) and tuple(rgb[0, 1]) == (128, 0, 0) and tuple(rgb[1, 0]) == (192, 128, 128)
    image = np.full((2, 2, 3), 100, np.uint8)
    ov = overlay(image, label)
    assert tuple(ov[0, 0]) == (100, 100, 100) and ov.dtype == np.uint8
    heat = cam_heatmap(np.zeros((8, 8, 3), np.uint8), np.linspace(0, 1, 64).reshape(8, 8))
    assert heat.shape == (8, 8, 3) and heat.dtype == np.uint8
    grid = panel([[image, label], [image]], ["a", "b"])
    assert grid.ndim == 3 and grid.dtype == np.uint8
    assert iou_bar_chart({"background": 0.9, "cat": 0.5}) is not None


# ----------------------------------------------------------------------------- network
def test_deeplab_forward_odd_sizes():
    from wsss.models.deeplab import DeepLab, aspp_rates, predict_probs

    torch.manual_seed(0)
    assert aspp_rates(16) == (6, 12, 18) and aspp_rates(8) == (12, 24, 36)
    model = DeepLab("resnet18", 16)
    assert model.spec()["kind"] == "deeplab"
    model.train()
    out = model(torch.randn(2, 3, 37, 53))
    assert out.shape == (2, 21, 37, 53)
    out.mean().backward()
    assert model.head.classifier.weight.grad is not None
    assert model(torch.randn(1, 3, 33, 41)).shape == (1, 21, 33, 41)  # one image trains too (no BN on 1x1)
    probs = predict_probs(model, np.zeros((35, 29, 3), np.uint8), "cpu", flip=True)
    assert probs.shape == (21, 35, 29)
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)
    with torch.no_grad():
        assert DeepLab("resnet18", 8).eval()(torch.randn(1, 3, 31, 27)).shape == (1, 21, 31, 27)


def test_v3plus_decoder_reads_the_stride4_features(tmp_path):
    """v3+ predicts at stride 4 from the stride-4 features (layer1); without it the logits come
    from the last stage alone, so changing layer1's output changes nothing."""
    from wsss.models.deeplab import DeepLab, SegHead, load_deeplab

    torch.manual_seed(0)
    channels = [64, 128, 256, 512]
    stages = [torch.randn(1, c, s, s) for c, s in zip(channels, (24, 12, 6, 6))]
    other = [stages[0] + torch.randn_like(stages[0])] + stages[1:]
    for decoder, changes, size in (("none", False, 6), ("v3plus", True, 24)):
        head = SegHead(channels, 21, (6, 12, 18), decoder).eval()
        with torch.no_grad():
            a, b = head(stages), head(other)
        assert a.shape == (1, 21, size, size)
        assert (not torch.equal(a, b)) == changes, decoder
    model = DeepLab("resnet18", 16, decoder="v3plus").eval()
    assert model(torch.randn(1, 3, 37, 53)).shape == (1, 21, 37, 53)
    torch.save({"spec": model.spec(), "model": model.state_dict()}, tmp_path / "seg-gt.pt")
    loaded, _ = load_deeplab(tmp_path / "seg-gt.pt")
    assert loaded.decoder == "v3plus"
    with pytest.raises(UserError, match="seg_decoder"):
        DeepLab("resnet18", 16, decoder="v4")


@pytest.mark.parametrize("shape", [(5, 7), (5, 30), (30, 5), (30, 30)])
def test_atrous_conv_shortcut_is_exact(shape):
    from wsss.models.deeplab import AtrousConv2d

    torch.manual_seed(0)
    conv = AtrousConv2d(4, 3, 3, padding=12, dilation=12, bias=True)
    x = torch.randn(2, 4, *shape, requires_grad=True)
    ref = torch.nn.functional.conv2d(x, conv.weight, conv.bias, 1, 12, 12)
    torch.testing.assert_close(conv(x), ref)
    g_fast = torch.autograd.grad(conv(x).square().sum(), (x, conv.weight))
    g_ref = torch.autograd.grad(ref.square().sum(), (x, conv.weight))
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b)


def test_load_deeplab_missing_checkpoint(tmp_path):
    from wsss.models.deeplab import load_deeplab

    with pytest.raises(UserError, match="train-seg --method cam"):
        load_deeplab(tmp_path / "seg-cam.pt")


# ----------------------------------------------------------------------------- steps
def _handmade_world(root: Path, n_train: int, n_val: int, size: int) -> None:
    """A mini VOC tree: coloured rectangles (class c has its own colour) on a grey floor."""
    rng = np.random.default_rng(0)
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClass").mkdir()
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    ids = [f"2026_{i + 1:06d}" for i in range(n_train + n_val)]
    for image_id in ids:
        image = np.full((size, size, 3), 120, np.uint8)
        mask = np.zeros((size, size), np.uint8)
        for _ in range(rng.integers(1, 3)):
            c = int(rng.integers(0, 3))
            y, x = rng.integers(0, size // 2, 2)
            hh, ww = rng.integers(size // 4, size // 2, 2)
            image[y:y + hh, x:x + ww] = np.array(PALETTE[3 * (c + 1):3 * (c + 2)]) // 2 + 60
            mask[y:y + hh, x:x + ww] = c + 1
        Image.fromarray(image).save(root / "JPEGImages" / f"{image_id}.jpg", quality=95)
        save_label_png(root / "SegmentationClass" / f"{image_id}.png", mask, PALETTE)
    seg = root / "ImageSets" / "Segmentation"
    seg.joinpath("train.txt").write_text("".join(f"{i}\n" for i in ids[:n_train]))
    seg.joinpath("val.txt").write_text("".join(f"{i}\n" for i in ids[n_train:]))


@pytest.fixture
def world(tmp_path, monkeypatch):
    isolate_outputs(monkeypatch, tmp_path)
    root = tmp_path / "data" / "VOC2012"
    params = Params(data_dir=str(root), synth_n_train=6, synth_n_val=3, synth_n_extra=0, synth_size=64,
                    seg_init="pretrained", seg_epochs=1, seg_batch_size=3, seg_crop=32, num_workers=1, crf_iters=5)
    if importlib.util.find_spec("wsss.synth") is not None:
        from wsss.synth import generate

        generate(root, params)
    else:
        _handmade_world(root, 6, 3, 64)
    return tmp_path, params


def _gt_seeds(tmp_path: Path, params: Params, method: str) -> list[str]:
    """Seeds made from the ground truth: cam 1 inside each class's mask, 0 elsewhere."""
    from wsss.steps.common import open_split

    voc = open_split(params, params.seed_split)
    for image_id in voc.ids:
        gt = voc.mask(image_id)
        keys = np.array(sorted({int(v) - 1 for v in np.unique(gt) if 1 <= v <= 20}), np.int64)
        cams = np.stack([(gt == k + 1).astype(np.float32) for k in keys]) if keys.size else \
            np.zeros((0,) + gt.shape, np.float32)
        save_npz(tmp_path / "outputs" / "seeds" / method / f"{image_id}.npz", keys=keys, cams=cams)
    return list(voc.ids)


def test_crf_step_missing_seed_is_a_clear_error(world):
    from wsss.steps import crf

    tmp_path, params = world
    ids = _gt_seeds(tmp_path, params, "cam")
    (tmp_path / "outputs" / "seeds" / "cam" / f"{ids[2]}.npz").unlink()
    with pytest.raises(UserError) as err:
        crf.run(params, "cam")
    assert f"{ids[2]}.npz" in str(err.value) and "python cli.py seeds --method cam" in str(err.value)
    assert not (tmp_path / "outputs" / "pseudo_masks" / "cam").exists()


@pytest.mark.parametrize("workers", [1, 2])
def test_crf_step_on_ground_truth_seeds(world, workers):
    from wsss.steps import crf

    tmp_path, params = world
    ids = _gt_seeds(tmp_path, params, "cam")
    metrics = crf.run(dataclasses.replace(params, num_workers=workers), "cam")
    out = tmp_path / "outputs" / "pseudo_masks" / "cam"
    assert sorted(p.stem for p in out.glob("*.png")) == sorted(ids)
    saved = json.loads((tmp_path / "outputs" / "metrics" / "crf" / "cam.json").read_text())
    for key in ("miou", "per_class_iou", "labelled_fraction", "miou_labelled"):
        assert key in saved
    assert 0.5 < metrics["labelled_fraction"] <= 1.0
    assert metrics["miou_labelled"] >= metrics["miou"] > 0.5


def test_train_seg_and_eval_seg_end_to_end(world):
    from wsss.steps import eval_seg, train_seg

    tmp_path, params = world
    m = train_seg.run(params, "gt")
    assert m["steps"] == 2 and np.isfinite(m["loss"])
    assert (tmp_path / "outputs" / "checkpoints" / "seg-gt.pt").is_file()
    assert (tmp_path / "outputs" / "metrics" / "train_seg" / "gt.json").is_file()
    for crf_on in (False, True):
        metrics = eval_seg.run(dataclasses.replace(params, seg_crf=crf_on, num_workers=2), "gt")
        saved = json.loads((tmp_path / "outputs" / "metrics" / "eval_seg" / "gt.json").read_text())
        for key in ("miou", "per_class_iou", "precision", "recall"):
            assert key in saved
        assert 0.0 <= metrics["miou"] <= 1.0 and saved["crf"] is crf_on
        preds = sorted((tmp_path / "outputs" / "predictions" / "gt").glob("*.png"))
        assert len(preds) == 3
        with Image.open(preds[0]) as im:
            assert im.mode == "P" and im.size == (64, 64)


def test_train_seg_on_pseudo_masks_needs_crf_first(world):
    from wsss.steps import eval_seg, train_seg

    _, params = world
    with pytest.raises(UserError, match="cli.py crf --method cam"):
        train_seg.run(params, "cam")
    with pytest.raises(UserError, match="train-seg --method cam"):
        eval_seg.run(params, "cam")
    with pytest.raises(UserError, match="unknown method"):
        train_seg.run(params, "nope")


@pytest.mark.parametrize("epochs,every,max_steps,expected", [
    (5, 0, 0, {4}),            # default: only after the last epoch
    (5, 2, 0, {1, 3, 4}),      # every 2nd epoch and the last
    (5, 1, 0, {0, 1, 2, 3, 4}),
    (5, 2, 7, {1, 2}),         # 3 steps per epoch, a 7-step budget ends inside epoch 2
])
def test_train_seg_validation_epochs(epochs, every, max_steps, expected):
    from wsss.steps.train_seg import validation_epochs

    p = Params(seg_epochs=epochs, seg_val_every=every, max_steps=max_steps, seg_batch_size=3)
    assert validation_epochs(p, n_train=10) == expected  # 10 // 3 = 3 steps per epoch


def test_train_seg_starts_from_the_classifier_trunk(world):
    """seg_init: cls copies the classifier's trunk exactly; a missing cls.pt is a clear error."""
    from wsss.io import save_torch
    from wsss.models.classifier import Classifier
    from wsss.models.deeplab import build_deeplab
    from wsss.steps.train_seg import init_from_classifier

    tmp_path, params = world
    params = dataclasses.replace(params, seg_init="cls")
    model = build_deeplab(params)
    with pytest.raises(UserError, match="train-cls"):
        init_from_classifier(model, params)
    torch.manual_seed(3)
    cls = Classifier("resnet18", 16, "none")
    save_torch(tmp_path / "outputs" / "checkpoints" / "cls.pt",
               {"spec": cls.spec(), "model": cls.state_dict(), "steps": 0, "fingerprint": "abc"})
    assert init_from_classifier(model, params) == "abc"
    for (name, a), b in zip(cls.backbone.state_dict().items(), model.backbone.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(UserError, match="differs from resnet34"):
        r34 = dataclasses.replace(params, seg_backbone="resnet34")
        init_from_classifier(build_deeplab(r34), r34)
