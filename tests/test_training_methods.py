"""ReCAM, Puzzle-CAM and SIPE training stages: golden checks of their math on hand-built
cases, and one tiny training run of each stage (checkpoint written and reloadable)."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from conftest import predictor_only
from wsss.config import Params  # noqa: E402
from wsss.datasets import random_scale_flip_crop  # noqa: E402
from wsss.errors import UserError  # noqa: E402
from wsss.io import save_npz, save_torch  # noqa: E402
from wsss.models import sipe as msipe  # noqa: E402
from wsss.models.classifier import Classifier, build_classifier, load_classifier  # noqa: E402
from wsss.steps import train_puzzle, train_recam, train_sipe  # noqa: E402


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Every test here runs on one thread (conftest.one_thread)."""


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A tiny synthetic VOC world (8 train, 4 val images of 48 px)."""
    from wsss.synth import generate

    root = tmp_path_factory.mktemp("world") / "VOC2012"
    generate(root, Params(synth_n_train=8, synth_n_val=4, synth_n_extra=0, synth_size=48))
    return root


@pytest.fixture()
def params(world, tmp_path, monkeypatch) -> Params:
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.setenv("WSSS_TRACKING", "0")
    return Params(data_dir=str(world), train_split="train", backbone="resnet18", cls_batch_size=4, cls_crop=32, max_steps=2, threads=1,
                  recam_epochs=1, puzzle_epochs=1, sipe_epochs=1, scorecam_chunk=128,
                  cam_scales=[1.0], cam_flip=False)


def write_cls_checkpoint(params: Params, root: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = build_classifier(params)
    path = root / "outputs" / "checkpoints" / "cls.pt"
    save_torch(path, {"spec": model.spec(), "model": model.state_dict(), "steps": 0, "fingerprint": "test"})
    return path


def read_metrics(root: Path, name: str) -> dict:
    return json.loads((root / "outputs" / "metrics" / f"train_{name}.json").read_text())


# ---------------------------------------------------------------------------- ReCAM math
def test_recam_loss_hand_built():
    # one image, 2 pixels, 2 channels; class 0 lives on pixel 0, class 1 on pixel 1
    feats = torch.tensor([[[[2.0, 0.0]], [[0.0, 4.0]]]])  # (1, 2, 1, 2)
    masks = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])  # (1, 2, 1, 2)
    labels = torch.tensor([[1.0, 1.0]])
    model = predictor_only(torch.eye(2))
    # f_0 = mean(A * M_0) = (1, 0), f_1 = (0, 2); W' = I so p = f
    expected = 0.5 * (-math.log(math.e / (math.e + 1)) - math.log(math.e ** 2 / (1 + math.e ** 2)))
    loss = train_recam.recam_loss(model, feats, labels, masks)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # an absent class does not count
    only0 = train_recam.recam_loss(model, feats, torch.tensor([[1.0, 0.0]]), masks)
    assert only0.item() == pytest.approx(-math.log(math.e / (math.e + 1)), rel=1e-6)
    # no class at all: zero, still differentiable
    none = train_recam.recam_loss(model, feats.requires_grad_(), torch.zeros(1, 2), masks)
    assert none.item() == 0.0 and none.requires_grad


def test_recam_loss_matches_loop_and_cam_masks():
    torch.manual_seed(0)
    model = Classifier("resnet18", 16, "none", recam=True)
    feats = torch.rand(3, 512, 3, 4)
    labels = torch.zeros(3, 20)
    labels[0, [1, 5]] = 1
    labels[2, 7] = 1
    masks = torch.rand(3, 20, 3, 4)
    vec = train_recam.recam_loss(model, feats, labels, masks)
    per_image = {}
    for b, c in labels.nonzero().tolist():
        f = (feats[b] * masks[b, c]).mean((1, 2))
        p = model.recam_predictor.weight[:, :, 0, 0] @ f
        per_image.setdefault(b, []).append(F.cross_entropy(p[None], torch.tensor([c])))
    # the official averaging: mean over each image's classes, summed, / B (image 1 has none)
    expected = sum(torch.stack(t).mean() for t in per_image.values()) / 3
    assert vec.item() == pytest.approx(expected.item(), rel=1e-5)
    # default masks: the max-normalised CAM of the features
    cams = F.relu(F.conv2d(feats, model.classifier.weight))
    cams = cams / (cams.amax((2, 3), keepdim=True) + 1e-5)
    assert train_recam.recam_loss(model, feats, labels).item() == pytest.approx(
        train_recam.recam_loss(model, feats, labels, cams).item(), rel=1e-6)


def test_joint_crop_moves_maps_with_the_image():
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (40, 52, 3), dtype=np.uint8)
    maps = np.stack([image[..., 0], image[..., 2], image[..., 1], 255 - image[..., 0]])
    img, out = train_recam.joint_scale_flip_crop(np.random.default_rng((1, 2, 3)), image, maps, 48)
    ref, _ = random_scale_flip_crop(np.random.default_rng((1, 2, 3)), image, None, 48)
    assert np.array_equal(img, ref)  # the image crop is the one ClassificationData makes
    assert out.shape == (4, 48, 48)
    assert np.array_equal(out[0], img[..., 0]) and np.array_equal(out[1], img[..., 2])
    assert np.array_equal(out[2], img[..., 1])


def test_pool_masks_to_feature_size():
    maps = torch.zeros(1, 2, 8, 8)
    maps[0, 0, :4, :4] = 0.5
    out = train_recam.pool_masks(maps, (2, 2))
    assert out.shape == (1, 2, 2, 2)
    assert out[0, 0, 0, 0].item() == pytest.approx(1.0, abs=1e-4) and out[0, 0, 1, 1].item() == 0.0
    assert out[0, 1].abs().sum().item() == 0.0


# ---------------------------------------------------------------------------- Puzzle-CAM math
@pytest.mark.parametrize("shape", [(2, 3, 8, 12), (1, 20, 6, 6)])
def test_puzzle_tiles_round_trip(shape):
    x = torch.randn(shape)
    tiles = train_puzzle.split_tiles(x)
    assert tiles.shape == (4 * shape[0], shape[1], shape[2] // 2, shape[3] // 2)
    assert torch.equal(tiles[shape[0]], x[0, :, : shape[2] // 2, shape[3] // 2:])  # top-right of image 0
    assert torch.equal(train_puzzle.merge_tiles(tiles), x)


def test_puzzle_padding_and_alpha():
    x = torch.randn(2, 3, 33, 40)
    p = train_puzzle.pad_to_multiple(x, 32)
    assert p.shape[-2:] == (64, 64) and torch.equal(p[..., :33, :40], x) and p[..., 33:, :].abs().sum() == 0
    assert train_puzzle.alpha_at(0, 100, 4.0) == 0.0
    assert train_puzzle.alpha_at(25, 100, 4.0) == pytest.approx(2.0)
    assert train_puzzle.alpha_at(50, 100, 4.0) == train_puzzle.alpha_at(99, 100, 4.0) == 4.0


def test_puzzle_losses_odd_crop():
    torch.manual_seed(0)
    model = Classifier("resnet18", 16, "none").train()
    x = torch.randn(2, 3, 37, 37)
    y = torch.zeros(2, 20)
    y[0, 3] = y[1, 4] = 1
    t = train_puzzle.puzzle_losses(model, x, y)
    assert set(t) == {"cls", "pcls", "re"} and all(torch.isfinite(v) for v in t.values())
    (t["cls"] + t["pcls"] + t["re"]).backward()
    # GAP of the logit-level maps is the classifier output
    model.eval()
    xp = train_puzzle.pad_to_multiple(x, 32)
    assert torch.allclose(train_puzzle.class_maps(model, xp).mean((2, 3)), model(xp), atol=1e-5)


# ---------------------------------------------------------------------------- SIPE math
# Hand-made cases under the official convention (chenqi1126/SIPE network/resnet50_SIPE.py,
# train_resnet50_SIPE.py); channel 0 is the background, channel k+1 class k.
def test_sipe_normalised_cams_background_over_all_twenty_maps():
    """bg = 1 - max over all 20 normalised maps (absent classes too), then the valid mask."""
    raw = torch.zeros(1, 20, 1, 2)
    raw[0, 3] = torch.tensor([4.0, 2.0])  # present: normalised [1, 0.5]
    raw[0, 7] = torch.tensor([-1.0, 5.0])  # absent: ReLU, normalised [0, 1]
    maps = msipe.normalised_cams(raw)
    assert torch.allclose(maps[0, 0, 0], torch.tensor([0.0, 0.0]), atol=1e-4)  # 1 - max(1, 0) | 1 - max(.5, 1)
    assert torch.allclose(maps[0, 4, 0], torch.tensor([1.0, 0.5]), atol=1e-4)
    labels = torch.zeros(1, 20)
    labels[0, 3] = 1
    crop = torch.tensor([[[1.0, 0.0]]])  # right pixel is padding
    mask = msipe.valid_mask(labels, (1, 2), crop)
    assert mask[0, :, 0, 0].nonzero().flatten().tolist() == [0, 4] and mask[0, :, 0, 1].sum() == 0


def _sipe_case():
    """1x4 image: semantic features e1, e1, e2, e2 (two orthogonal groups, S_ij = 1 inside a
    group); class 3 map [1, .5, 0, 0], background [0, .5, 1, 1]; hierarchical features
    f = [1,0], [3,0], [0,1], [1,1]."""
    feats = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]]).view(1, 2, 1, 4)
    maps = torch.zeros(1, 21, 1, 4)
    maps[0, 4, 0] = torch.tensor([1.0, 0.5, 0.0, 0.0])
    maps[0, 0, 0] = torch.tensor([0.0, 0.5, 1.0, 1.0])
    hie = torch.tensor([[1.0, 3.0, 0.0, 1.0], [0.0, 0.0, 1.0, 1.0]]).view(1, 2, 1, 4)
    labels = torch.zeros(1, 20)
    labels[0, 3] = 1
    return feats, maps, hie, labels


def test_sipe_seeds_prototypes_iscam_hand_made():
    feats, maps, hie, labels = _sipe_case()
    mask = msipe.valid_mask(labels, (1, 4))
    # pixel 0 (row S = [1,1,0,0], sum 2): class 3 IoU = 1.5 / (2 + 1.5 - 1.5) = .75,
    # background .5 / (2 + 2.5 - .5) = .125, halved .0625 -> class 3 (pixel 1 the same);
    # pixel 2: class 3 IoU 0, background 2 / (2 + 2.5 - 2) = .8, halved .4 -> background
    seeds = msipe.structure_seeds(feats, maps, mask)
    assert seeds.shape == (1, 21, 1, 4)
    assert seeds[0, 4, 0].tolist() == [1, 1, 0, 0] and seeds[0, 0, 0].tolist() == [0, 0, 1, 1]
    assert seeds.sum() == 4
    # prototypes: average pooling over all 4 pixels of the seed-masked f
    protos = msipe.prototypes(hie, seeds)
    assert torch.allclose(protos[0, 4], torch.tensor([1.0, 0.0]))  # ([1,0] + [3,0]) / 4
    assert torch.allclose(protos[0, 0], torch.tensor([0.25, 0.5]))  # ([0,1] + [1,1]) / 4
    assert protos[0, 1].abs().sum() == 0
    isc = msipe.is_cams(hie, protos)
    r2, r5 = math.sqrt(2), math.sqrt(0.3125)  # |[1,1]|, |[.25,.5]|
    assert torch.allclose(isc[0, 4, 0], torch.tensor([1.0, 1.0, 0.0, 1 / r2]), atol=1e-5)
    assert torch.allclose(isc[0, 0, 0], torch.tensor([0.25 / r5, 0.75 / (3 * r5), 0.5 / r5, 0.75 / (r2 * r5)]),
                          atol=1e-5)
    assert isc[0, 1].abs().sum() == 0  # zero prototype -> 0


def test_sipe_seeds_halve_background_and_drop_masked_winners():
    # one group (S all ones): class [1, 0] and background [0, 1] tie at IoU .5; halving -> class
    feats = torch.ones(1, 2, 1, 2)
    maps = torch.zeros(1, 21, 1, 2)
    maps[0, 1, 0] = torch.tensor([1.0, 0.0])
    maps[0, 0, 0] = torch.tensor([0.0, 1.0])
    labels = torch.zeros(1, 20)
    labels[0, 0] = 1
    seeds = msipe.structure_seeds(feats, maps, msipe.valid_mask(labels, (1, 2)))
    assert seeds[0, 1, 0].tolist() == [1, 1] and seeds[0, 0].sum() == 0
    # an absent class whose map wins (inference: maps are not masked) seeds nothing
    feats, maps, hie, labels = _sipe_case()
    maps[0, 6, 0] = torch.tensor([0.0, 0.0, 1.0, 1.0])  # absent class 5: IoU at pixel 2 = 1 > .4
    seeds = msipe.structure_seeds(feats, maps, msipe.valid_mask(labels, (1, 4)))
    assert seeds[0, 4, 0].tolist() == [1, 1, 0, 0] and seeds[0, 0].sum() == 0 and seeds[0, 6].sum() == 0
    # padding (crop mask 0) seeds nothing either
    feats, maps, hie, labels = _sipe_case()
    crop = torch.tensor([[[1.0, 1.0, 1.0, 0.0]]])
    seeds = msipe.structure_seeds(feats, maps, msipe.valid_mask(labels, (1, 4), crop))
    assert seeds[0, 0, 0].tolist() == [0, 0, 1, 0]


def test_sipe_gsc_loss_hand_made():
    """IS-CAM / (its max + 1e-5), then the mean over all 21 channels and pixels:
    bg |[0,1] - [.2,.4]/.4| = [.5, 0], class 3 |[1,0] - [.5,.25]/.5| = [0, .5], absent 0:
    (0.5 + 0.5) / (21 * 2)."""
    maps = torch.zeros(1, 21, 1, 2)
    maps[0, 0, 0] = torch.tensor([0.0, 1.0])
    maps[0, 4, 0] = torch.tensor([1.0, 0.0])
    isc = torch.zeros(1, 21, 1, 2)
    isc[0, 0, 0] = torch.tensor([0.2, 0.4])
    isc[0, 4, 0] = torch.tensor([0.5, 0.25])
    assert msipe.gsc_loss(maps, isc).item() == pytest.approx(1.0 / 42, abs=1e-5)


def test_sipe_model_forward_and_spec():
    torch.manual_seed(0)
    model = msipe.SIPEClassifier("resnet18", 16, "none")
    torch.manual_seed(0)
    plain = Classifier("resnet18", 16, "none")
    assert torch.equal(model.classifier.weight, plain.classifier.weight)  # same init as train-cls
    assert len(model.side) == 4 and model.side_dims == [32, 32, 64, 64]  # layers 1-4, official ratios
    y = torch.zeros(2, 20)
    y[0, 1] = 1
    x = torch.randn(2, 3, 40, 40)
    out = msipe.sipe_outputs(model, x, y)
    assert out["iscam"].shape == (2, 21, 3, 3) and out["maps"].shape == (2, 21, 3, 3)
    with torch.no_grad():  # background = 1 - max over all 20 normalised CAMs, present or not
        cam = F.relu(F.conv2d(model.features(x), model.classifier.weight))
        bg = 1 - (cam / (cam.amax((2, 3), keepdim=True) + 1e-5)).amax(1)
    assert torch.allclose(out["maps"][:, 0], bg, atol=1e-5)
    assert out["maps"][0, 3:].abs().sum() == 0 and out["maps"][1, 1:].abs().sum() == 0  # absent classes 0
    assert out["seeds"].shape == (2, 21, 3, 3) and out["seeds"][1, 1:].sum() == 0  # no class: seeds bg only
    hie = model.hie_features(model.stages(torch.randn(1, 3, 40, 40)))
    assert hie.shape[1] == 192
    # each branch is L2-normalised per pixel *before* the resize to layer3's size (official order):
    # unit norm for layers 3-4 (already 3x3), an average of unit vectors (< 1) for layers 1-2
    norms = [hie[0, a:b].norm(dim=0) for a, b in [(0, 32), (32, 64), (64, 128), (128, 192)]]
    assert all(torch.allclose(n, torch.ones(3, 3), atol=1e-3) for n in norms[2:])
    assert all(bool((n < 1).all()) and bool((n > 0.3).all()) for n in norms[:2])
    assert model.spec()["kind"] == "sipe"


def test_sipe_crop_mask_marks_padding():
    """White images: the crop is black exactly on padding, so mask == (pixel not black)."""
    from wsss.models.backbone import IMAGENET_MEAN, IMAGENET_STD

    class _Voc:
        ids = ["a", "b"]

        def image(self, i):
            return np.full((20, 30, 3), 255, np.uint8)

        def labels(self, i):
            return np.zeros(20, np.float32)

    data = train_sipe.CropMaskData(_Voc(), 32, rng_seed=0)
    for idx in range(2):
        x, _, _, crop = data[idx]
        red = x[0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]  # back to [0, 1]
        assert crop.shape == (32, 32) and 0 < crop.sum() < 32 * 32
        assert torch.equal(crop, (red > 0.5).float())


def _tiny_sipe_world():
    """(model, batches) for two optimiser steps of train_loop on random crops."""
    torch.manual_seed(0)
    model = msipe.SIPEClassifier("resnet18", 16, "none")
    model.freeze_stem()
    x = torch.randn(8, 3, 32, 32)
    y = torch.zeros(8, 20)
    y[:, 2] = 1
    y[::2, 5] = 1

    class _Data(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return x[i] * 3, y[i], i, torch.ones(32, 32)

    return model, _Data()


def test_sipe_frozen_layers_and_learning_rates(params, tmp_path, monkeypatch):
    """Official: stem and layers 1-2 never move (layer2's output detached, conv1/bn1 without
    gradient), BatchNorm statistics stay; layers 3-4, classifier and side branches move.
    Learning rates: backbone sipe_lr, side branches 10x, times (1 - t/T)^0.9; momentum
    sipe_momentum; gradient norm clipped to sipe_grad_clip before each step."""
    from wsss import trainer

    model, data = _tiny_sipe_world()
    before = copy.deepcopy(model.state_dict())
    seen = []
    real_step = torch.optim.SGD.step

    def spy(self, *a, **k):
        norm = torch.sqrt(sum((p.grad.detach() ** 2).sum() for g in self.param_groups for p in g["params"]
                              if p.grad is not None))
        seen.append(([(g["lr"], g["momentum"], len(g["params"])) for g in self.param_groups], float(norm)))
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.SGD, "step", spy)
    p = dataclasses.replace(params, sipe_lr=0.1, cls_batch_size=2, max_steps=0)
    spec = dataclasses.replace(train_sipe.loop_spec(dataclasses.replace(p, max_steps=4, cls_batch_size=2,
                                                                         recipe_list_size=0), {}),
                               epochs=1)  # 4 steps of batch 2
    trainer.train_loop(spec, model, data, train_sipe.make_step_fn(p), tmp_path, torch.device("cpu"),
                       _NoTracker(), 0, new_prefixes=("side",))
    assert len(seen) == 4
    n_side = len(list(model.side.parameters()))
    for t, (groups, norm) in enumerate(seen):
        decay = (1 - t / 4) ** 0.9  # t = 0: 1; t = 2: 0.5^0.9 = 0.5359
        assert groups[0][0] == pytest.approx(0.1 * decay) and groups[1][0] == pytest.approx(1.0 * decay)
        assert groups[0][1] == groups[1][1] == 1e-4 and groups[1][2] == n_side
        assert norm <= 1.0 + 1e-4
    assert seen[2][0][0][0] == pytest.approx(0.1 * 0.5 ** 0.9)
    after = model.state_dict()
    for name, v in before.items():
        frozen = name.startswith(("backbone.stem", "backbone.layer1", "backbone.layer2")) or "running" in name \
            or "num_batches" in name
        if frozen:
            assert torch.equal(v, after[name]), name
    for prefix in ("backbone.layer3", "backbone.layer4", "classifier", "side.0", "side.3"):
        assert any(not torch.equal(v, after[n]) for n, v in before.items() if n.startswith(prefix)
                   and "running" not in n and "num_batches" not in n), prefix


class _NoTracker:
    def log_metrics(self, *a, **k):
        pass


def test_sipe_recipe_in_voc_steps(params):
    """sipe_epochs counts epochs of VOC train_aug (10,582 images): 5 at batch 16 = 5 * 661 = 3305
    steps; on 640 images (40 steps an epoch) that is 83 epochs, the last cut; max_steps caps."""
    p = dataclasses.replace(params, sipe_epochs=5, cls_batch_size=16, max_steps=0, recipe_list_size=10582)
    assert train_sipe.schedule(p, 640) == (83, 3305)
    assert train_sipe.schedule(dataclasses.replace(p, max_steps=100), 640) == (3, 100)


# ---------------------------------------------------------------------------- tiny runs
def test_train_recam_cam_run(params, tmp_path):
    with pytest.raises(UserError, match="cls.pt"):
        train_recam.run(params)
    write_cls_checkpoint(params, tmp_path)
    metrics = train_recam.run(params)
    assert metrics["steps"] == 2 and math.isfinite(metrics["loss_sce"])
    assert read_metrics(tmp_path, "recam")["steps"] == 2
    model, ckpt = load_classifier(tmp_path / "outputs" / "checkpoints" / "recam.pt")
    assert model.recam_predictor is not None and ckpt["spec"]["recam"]
    from wsss.cams.cam import ReCAM

    cams = ReCAM(model, params)(np.zeros((40, 44, 3), np.uint8), [2, 5])
    assert cams.shape == (2, 40, 44)


def test_train_recam_scorecam_seeds(params, tmp_path, monkeypatch):
    """recam_scorecam_mask: seeds makes its own Score-CAM masks of cls.pt (the maps `seeds
    --method scorecam` writes, so the stage needs no other method listed) and removes them."""
    from wsss.cams.scorecam import ScoreCAM
    from wsss.steps.seeds import method_params
    from wsss.voc import VOCDataset

    write_cls_checkpoint(params, tmp_path)
    voc = VOCDataset(Path(params.data_dir), "train")
    masks, folder = train_recam.scorecam_masks(params, voc, "cpu")
    assert Path(masks.name) == folder
    model, _ = load_classifier(tmp_path / "outputs" / "checkpoints" / "cls.pt")
    reference = ScoreCAM(model, method_params(params, "scorecam"))
    for id_ in voc.ids[:2]:
        z = np.load(folder / f"{id_}.npz")
        keys = np.flatnonzero(voc.labels(id_)).astype(np.int64)
        assert z["keys"].tolist() == keys.tolist()
        np.testing.assert_allclose(z["cams"], reference(voc.image(id_), keys.tolist()), atol=1e-5)
    data = train_recam.SeedMaskData(voc, params.cls_crop, params.seed, folder=folder)
    x, y, idx, maps = data[0]
    assert maps.shape == (20, 32, 32) and x.shape == (3, 32, 32)
    assert (maps.flatten(1).amax(1) > 0).tolist() == (y > 0).tolist()
    masks.cleanup()

    made = []
    real = train_recam.scorecam_masks
    monkeypatch.setattr(train_recam, "scorecam_masks", lambda *a: made.append(real(*a)) or made[-1])
    metrics = train_recam.run(params, "scorecam")
    assert metrics["steps"] == 2 and math.isfinite(metrics["loss_sce"])
    assert not made[0][1].exists()  # the temporary masks are gone
    assert read_metrics(tmp_path, "recam-scorecam")["steps"] == 2
    model, _ = load_classifier(tmp_path / "outputs" / "checkpoints" / "recam-scorecam.pt")
    assert model.recam_predictor is not None


def test_train_recam_scorecam_online_batch3_odd_crop(params, tmp_path):
    # correct Score-CAM of the current model per step; batch 3, odd crop (17 px keeps the
    # 512 forwards per image cheap)
    p = dataclasses.replace(params, cls_batch_size=3, cls_crop=17, max_steps=1, recam_scorecam_mask="online")
    write_cls_checkpoint(p, tmp_path)
    metrics = train_recam.run(p, "scorecam")
    assert metrics["steps"] == 1 and math.isfinite(metrics["loss"])
    model, _ = load_classifier(tmp_path / "outputs" / "checkpoints" / "recam-scorecam.pt")
    assert model.recam_predictor is not None


def test_recam_online_masks_use_scorecam_score_and_weights(monkeypatch):
    """recam_scorecam_mask: online scores the channels with ``scorecam_score`` and weighs them
    with ``scorecam_weights``, as the seeds of method scorecam do: the masks the step hands to
    L_sce are those of ``scorecam_batch`` with those options (computed here on a twin of the
    model, in the step's order: the training forward first, then the Score-CAM in eval mode),
    and each option gives clearly different masks."""
    from wsss.cams.scorecam import scorecam_batch

    seen = []
    loss = train_recam.recam_loss
    monkeypatch.setattr(train_recam, "recam_loss", lambda m, f, y, masks, **kw: seen.append(masks) or loss(m, f, y, masks, **kw))
    torch.manual_seed(0)
    model = Classifier("resnet18", 16, "none", recam=True).train()
    with torch.no_grad():  # logits of a few units, where sigmoid and logit scores part ways
        model.classifier.weight.mul_(30)
    x = torch.randn(2, 3, 17, 17)
    y = torch.zeros(2, 20)
    y[0, 2] = y[1, 5] = y[1, 9] = 1
    expected = {}
    for score, weights in (("sigmoid", "softmax"), ("logit", "softmax"), ("sigmoid", "linear")):
        p = Params(scorecam_score=score, scorecam_weights=weights, scorecam_chunk=512)
        train_recam.make_step_fn(p, "scorecam", "online")(copy.deepcopy(model), (x, y, torch.arange(2)), 0)
        twin = copy.deepcopy(model)
        feats = twin.features(x)
        raw = scorecam_batch(twin, x, y, chunk=512, baseline=p.scorecam_baseline, score=score, weights=weights)
        expected[score, weights] = train_recam.pool_masks(raw, feats.shape[-2:])
        assert torch.allclose(seen[-1], expected[score, weights], atol=1e-5), (score, weights)
    base = expected["sigmoid", "softmax"]
    assert (base - expected["logit", "softmax"]).abs().max() > 0.05
    assert (base - expected["sigmoid", "linear"]).abs().max() > 0.05


def test_recam_online_study_step():
    # the student project's batch Score-CAM as the mask source: one training step
    p = Params(scorecam_variant="study", scorecam_chunk=256)
    torch.manual_seed(0)
    model = Classifier("resnet18", 16, "none", recam=True).train()
    x = torch.randn(3, 3, 17, 17)
    y = torch.zeros(3, 20)
    y[0, 2] = y[1, 5] = y[2, 2] = y[2, 9] = 1
    twin = copy.deepcopy(model)
    step = train_recam.make_step_fn(p, "scorecam", "online")
    loss, logs = step(model, (x, y, torch.arange(3)), 0)
    assert math.isfinite(loss.item()) and logs["loss_sce"] > 0
    loss.backward()
    assert model.recam_predictor.weight.grad is not None and model.training
    # the Score-CAM forwards ran in eval mode: BatchNorm statistics moved by the one training
    # forward only
    twin.features(x)
    for a, b in zip(model.modules(), twin.modules()):
        if isinstance(a, nn.BatchNorm2d):
            assert torch.allclose(a.running_mean, b.running_mean, atol=1e-6)


def test_bad_mask_source_is_refused_on_construction(params):
    with pytest.raises(UserError, match="recam_scorecam_mask"):
        dataclasses.replace(params, recam_scorecam_mask="nope")


def test_train_puzzle_run(params, tmp_path, monkeypatch):
    from wsss import trainer

    with pytest.raises(UserError, match="puzzle_init"):  # starts from cls.pt by default
        train_puzzle.run(params)
    starts = []  # (weights, new heads, fingerprinted keys) as each training begins
    real_loop = trainer.train_loop

    def spy(spec, model, *args, **kwargs):
        starts.append(({k: v.clone() for k, v in model.state_dict().items()}, kwargs.get("new_prefixes"),
                       dict(spec.fingerprint_keys)))
        return real_loop(spec, model, *args, **kwargs)

    monkeypatch.setattr(trainer, "train_loop", spy)
    # cls.pt from another torch seed than the run's (params.seed 0): a fresh init differs from it
    cls_path = write_cls_checkpoint(params, tmp_path, seed=1)
    cls_state = torch.load(cls_path, weights_only=True)["model"]
    metrics = train_puzzle.run(params)
    assert metrics["steps"] == 2 and math.isfinite(metrics["loss_re"])
    assert read_metrics(tmp_path, "puzzlecam")["steps"] == 2
    model, ckpt = load_classifier(tmp_path / "outputs" / "checkpoints" / "puzzlecam.pt")
    assert model.recam_predictor is None
    # puzzle_init: cls starts at cls.pt's trunk and classifier exactly (BN statistics too), trains
    # them all at puzzle_lr (no 10x head), and cls.pt's fingerprint is part of the run's
    start, heads, keys = starts[-1]
    assert set(start) == set(cls_state)
    for name, value in cls_state.items():
        assert torch.equal(start[name], value), name
    assert heads == () and keys["init"] == "test" and keys["puzzle_init"] == "cls"
    assert ckpt["fingerprint"] == trainer.fingerprint(keys)
    # from scratch: no cls.pt needed; the start is the fresh init of the run's seed, with the
    # classifier a new head at 10x, and no cls.pt fingerprint in the run's
    (tmp_path / "outputs" / "checkpoints" / "cls.pt").unlink()
    train_puzzle.run(dataclasses.replace(params, puzzle_init="pretrained"))
    start, heads, keys = starts[-1]
    torch.manual_seed(params.seed)
    fresh = build_classifier(params).state_dict()
    assert torch.equal(start["classifier.weight"], fresh["classifier.weight"])
    assert torch.equal(start["backbone.stem.0.weight"], fresh["backbone.stem.0.weight"])
    assert not torch.equal(start["classifier.weight"], cls_state["classifier.weight"])
    assert heads == ("classifier",) and "init" not in keys and keys["puzzle_init"] == "pretrained"


def test_start_from_classifier_copies_trunk_and_head(params, tmp_path):
    """puzzle_init/sipe_init: cls start exactly at cls.pt's trunk and classifier; SIPE's side
    projections stay as built; a backbone mismatch is one clear error."""
    from wsss.models.classifier import start_from_classifier

    path = write_cls_checkpoint(params, tmp_path)
    cls, ckpt = load_classifier(path)
    torch.manual_seed(5)
    model = msipe.build_sipe(params)
    side = copy.deepcopy(model.side.state_dict())
    assert start_from_classifier(model, path, "resnet18", "sipe_init") == str(ckpt.get("fingerprint"))
    for (name, a), b in zip(cls.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
    for name, a in model.side.state_dict().items():
        assert torch.equal(a, side[name]), name
    with pytest.raises(UserError, match="sipe_init: pretrained"):
        start_from_classifier(msipe.build_sipe(dataclasses.replace(params, backbone="resnet34")), path,
                              "resnet34", "sipe_init")


def test_train_sipe_run_and_iscam(params, tmp_path):
    write_cls_checkpoint(params, tmp_path)
    metrics = train_sipe.run(params)
    assert metrics["steps"] == 2 and math.isfinite(metrics["loss_gsc"])
    assert read_metrics(tmp_path, "sipe")["steps"] == 2
    path = tmp_path / "outputs" / "checkpoints" / "sipe.pt"
    model, ckpt = msipe.load_any(path)
    assert isinstance(model, msipe.SIPEClassifier) and ckpt["spec"]["kind"] == "sipe"
    with pytest.raises(UserError):
        load_classifier(path)  # a plain classifier loader refuses it; load_any dispatches
    from wsss.cams.sipe import ISCAM

    image = np.random.default_rng(0).integers(0, 256, (44, 40, 3), dtype=np.uint8)
    cams = ISCAM(model, dataclasses.replace(params, cam_scales=[1.0, 1.5], cam_flip=True))(image, [3, 7])
    assert cams.shape == (2, 44, 40) and cams.dtype == np.float32
    assert cams.min() >= 0 and cams.max() <= 1
    with pytest.raises(UserError, match="SIPE"):
        ISCAM(build_classifier(params), params)
    # the seed file carries SIPE's background IS-CAM as `bg`. With every class weight zero all
    # CAMs are 0, the background 1 - 0 = 1 wins every pixel, so the background prototype is the
    # mean of the hierarchical features f and bg = ReLU(cos(f_i, mean f)), upsampled, / its max
    from wsss.datasets import to_tensor
    from wsss.steps import seeds as seeds_step
    from wsss.steps.common import open_split, read_seed

    seeds_step.run(params, "sipe")
    voc = open_split(params, params.seed_split)
    id_ = voc.ids[0]
    path = tmp_path / "outputs" / "seeds" / "sipe" / f"{id_}.npz"
    shape = voc.mask(id_).shape
    keys, cams, bg = read_seed(path, "sipe", shape, with_bg=True)
    assert bg.shape == shape and bg.dtype == np.float32 and 0 <= bg.min() and bg.max() <= 1
    k2, c2 = read_seed(path, "sipe", shape)  # the two-item reading of every other step
    assert np.array_equal(k2, keys) and np.array_equal(c2, cams)
    np.testing.assert_allclose(cams, ISCAM(model, params)(voc.image(id_), keys.tolist()), atol=1e-5)
    with torch.no_grad():
        model.classifier.weight.zero_()
    save_torch(path.parents[2] / "checkpoints" / "sipe.pt", {**ckpt, "model": model.state_dict()})
    seeds_step.run(params, "sipe")
    for id_ in voc.ids[:3]:
        image = voc.image(id_)
        keys, cams, bg = read_seed(path.with_name(f"{id_}.npz"), "sipe", image.shape[:2], with_bg=True)
        with torch.no_grad():
            f = model.hie_features(model.stages(to_tensor(image)[None]))
            b = F.relu(F.cosine_similarity(f, f.mean((2, 3), keepdim=True), dim=1))[None]
            b = F.interpolate(b, size=image.shape[:2], mode="bilinear", align_corners=False)[0, 0]
        np.testing.assert_allclose(bg, (b / (b.max() + 1e-5)).numpy(), atol=1e-4)
        assert bg.max() == pytest.approx(1.0, abs=1e-4) and not cams.any()
    path = path.with_name(f"{id_}.npz")
    shape = image.shape[:2]
    z = dict(np.load(path))
    save_npz(path, keys=z["keys"], cams=z["cams"], bg=z["bg"][:-1])
    with pytest.raises(UserError, match="'bg' has shape"):
        read_seed(path, "sipe", shape, with_bg=True)
    save_npz(path, keys=z["keys"], cams=z["cams"])  # files of other methods: no bg
    assert read_seed(path, "sipe", shape, with_bg=True)[2] is None
    # load_any reads plain checkpoints too
    write_cls_checkpoint(params, tmp_path)
    plain, _ = msipe.load_any(tmp_path / "outputs" / "checkpoints" / "cls.pt")
    assert type(plain) is Classifier


def test_train_step_of_a_method_without_training_writes_an_alias_of_cls(params, tmp_path):
    """`train --method cam` (dvc stage train@cam): cam.pt names cls.pt, loads as the classifier
    itself and carries its fingerprint; a method with training runs its declared step."""
    from wsss.steps import train as train_step

    write_cls_checkpoint(params, tmp_path)
    metrics = train_step.run(params, "gradcam")
    assert metrics == {"method": "gradcam", "trained": False, "checkpoint": "cls"}
    alias = torch.load(tmp_path / "outputs" / "checkpoints" / "gradcam.pt", weights_only=True)
    assert alias == {"alias": "cls", "fingerprint": "test"}
    model, _ = load_classifier(tmp_path / "outputs" / "checkpoints" / "gradcam.pt")
    cls_model, _ = load_classifier(tmp_path / "outputs" / "checkpoints" / "cls.pt")
    for a, b in zip(model.state_dict().values(), cls_model.state_dict().values()):
        assert torch.equal(a, b)
    assert train_step.run(params, "recam")["steps"] == 2  # the declared train_recam:run, variant cam
    assert read_metrics(tmp_path, "recam")["steps"] == 2
