"""Issue 13, the classifier and ReCAM as their official code trains them (docs/methods.md,
"Classifier", "ReCAM", "Recipes in optimiser steps"): the losses on hand-worked cases under
the official averaging, the frozen stem and BatchNorm, the learning rate of every parameter
group at step 0 and mid-schedule, and recipes counted in optimiser steps."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from conftest import predictor_only
from wsss.config import Params
from wsss.errors import UserError
from wsss.metrics import predictor_warning
from wsss.models.classifier import Classifier
from wsss.steps import train_cls, train_recam
from wsss.trainer import frozen, planned_schedule, train_loop

LN2, LN3 = math.log(2.0), math.log(3.0)


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Every test here runs on one thread (conftest.one_thread)."""


# ---------------------------------------------------------------------------- losses by hand
def test_recam_sce_official_averaging_by_hand():
    """Three images, K = C = 3, W' = I (so p_bc = f_bc), 1 x 2 feature maps.

    Image 0 holds classes 0 and 1; both masks keep pixel 0 only, where A = (2 ln2, 0, 0), so
    f = mean over the 2 pixels of A * M = (ln2, 0, 0) and softmax(p) = (1/2, 1/4, 1/4):
    CE(class 0) = ln2, CE(class 1) = ln4; its mean: 1.5 ln2. Image 1 holds class 2 with A = 0:
    p = 0, CE = ln3. Image 2 holds no class and still counts in B = 3 (Class_Predictor
    divides the sum by the batch size). L_sce = (1.5 ln2 + ln3) / 3 (the per-pair mean would
    be (3 ln2 + ln3) / 3, the per-image mean over images with classes (1.5 ln2 + ln3) / 2).
    W' accuracy: pair (0,0) right, (0,1) and (1,2) argmax 0: 1/3."""
    feats = torch.zeros(3, 3, 1, 2)
    feats[0, :, 0, 0] = torch.tensor([2 * LN2, 0.0, 0.0])
    feats[0, :, 0, 1] = 5.0  # masked out
    masks = torch.zeros(3, 3, 1, 2)
    masks[:, :, 0, 0] = 1.0
    labels = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    loss, acc = train_recam.recam_loss(predictor_only(torch.eye(3)), feats, labels, masks, with_acc=True)
    assert loss.item() == pytest.approx((1.5 * LN2 + LN3) / 3, rel=1e-6)
    assert acc == pytest.approx(1 / 3)


def test_recam_mask_carries_gradient_unless_detached():
    """The official mask (net/resnet50_cam.py:93-98) is not detached: L_sce alone reaches W
    through it; recam_detach_mask cuts that path."""
    torch.manual_seed(0)
    model = Classifier("resnet18", 16, "none", recam=True)
    feats = torch.rand(2, 512, 3, 3)
    labels = torch.zeros(2, 20)
    labels[0, 3] = labels[1, [4, 9]] = 1
    for detach in (False, True):
        model.zero_grad()
        train_recam.recam_loss(model, feats, labels, train_recam.cam_masks(model, feats, detach)).backward()
        grad = model.classifier.weight.grad
        assert bool(grad is not None and grad.abs().sum() > 0) == (not detach)


def test_soft_margin_loss_by_hand():
    """-[y log s(z) + (1 - y) log s(-z)], mean over the K classes, then over the batch.
    Image 0: z = (0, ln3), y = (1, 0): ln2 and -log s(-ln3) = ln4 -> 1.5 ln2.
    Image 1: z = (ln3, 0), y = (1, 1): -log(3/4) and ln2 -> (ln(4/3) + ln2) / 2."""
    z = torch.tensor([[0.0, LN3], [LN3, 0.0]])
    y = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    expected = (1.5 * LN2 + (math.log(4 / 3) + LN2) / 2) / 2
    assert train_cls.soft_margin_loss(z, y).item() == pytest.approx(expected, rel=1e-6)


def test_predictor_warning_only_at_chance():
    assert "at chance" in predictor_warning(0.06, 20)
    assert predictor_warning(0.44, 20) is None
    assert predictor_warning(float("nan"), 20) is None


# ---------------------------------------------------------------------------- the loop
class _Data(torch.utils.data.Dataset):
    def __init__(self, n: int = 8, size: int = 32):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, size, size, generator=g)
        self.y = (torch.rand(n, 20, generator=g) < 0.2).float()
        self.y[:, 0] = 1

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i], i


class _Null:
    def log_metrics(self, *a, **k):
        pass


def _run(spec, model, tmp_path, monkeypatch, step_fn, n: int = 8):
    """train_loop, recording (lr, momentum, param ids) of every SGD group at each step."""
    seen = []
    step = torch.optim.SGD.step

    def recording(self, *a, **k):
        seen.append([(g["lr"], g["momentum"], {id(p) for p in g["params"]}) for g in self.param_groups])
        return step(self, *a, **k)

    monkeypatch.setattr(torch.optim.SGD, "step", recording)
    train_loop(spec, model, _Data(n), step_fn, tmp_path, torch.device("cpu"), _Null(), 0,
               new_prefixes=("recam_predictor",) if spec.name == "recam" else ("classifier",))
    return seen


def _cls_step(m, batch, step):
    x, y, _ = batch
    loss = train_cls.soft_margin_loss(m(x), y)
    return loss, {"loss": loss.item()}


def _recam_step(m, batch, step):
    x, y, _ = batch
    feats = m.features(x)
    loss = train_cls.soft_margin_loss(m.head(feats), y) + train_recam.recam_loss(m, feats, y)
    return loss, {"loss": loss.item()}


def test_recam_groups_lr_momentum_and_frozen_stem(tmp_path, monkeypatch):
    """ReCAM (train_recam.py:71-75, torchutils.py:11-12, resnet50.py:10-13): trunk and W at
    5e-5, W' at 5e-4, momentum 1e-4; at step 2 of 4 both scaled by (1 - 2/4)^0.9. conv1 and
    bn1 never change, no BatchNorm's running statistics move, the rest trains."""
    params = Params(max_steps=4, cls_batch_size=2)
    torch.manual_seed(0)
    model = Classifier("resnet18", 16, "none", recam=True)
    model.freeze_stem_bn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = _run(train_recam.loop_spec(params), model, tmp_path, monkeypatch, _recam_step)
    assert len(seen) == 4
    (lr0, mom0, ids0), (lr1, mom1, ids1) = seen[0]
    assert (lr0, lr1) == (pytest.approx(5e-5), pytest.approx(5e-4)) and mom0 == mom1 == pytest.approx(1e-4)
    assert ids1 == {id(model.recam_predictor.weight)} and id(model.classifier.weight) in ids0
    assert id(model.backbone.stem[0].weight) not in ids0 | ids1
    mid = 0.5 ** 0.9
    assert [g[0] for g in seen[2]] == [pytest.approx(5e-5 * mid), pytest.approx(5e-4 * mid)]
    after = model.state_dict()
    for k, v in before.items():
        if k.startswith(("backbone.stem.0.", "backbone.stem.1.")) or k.endswith(("running_mean", "running_var")):
            assert torch.equal(v, after[k]), k
    assert not torch.equal(before["backbone.layer4.1.conv2.weight"], after["backbone.layer4.1.conv2.weight"])
    model.train()
    assert all(not m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def test_cls_groups_lr_momentum_and_trainable_from_scratch(tmp_path, monkeypatch):
    """train-cls (IRN/ReCAM train_cam.py): trunk at cls_lr 0.1, W at 1.0, momentum 1e-4; from
    random weights (pretrained: none) nothing is frozen: BatchNorm statistics move."""
    params = Params(max_steps=4, cls_batch_size=2)
    assert not frozen(params, params.pretrained != "none")
    assert frozen(dataclasses.replace(params, pretrained="x.pth"), True)
    assert not frozen(dataclasses.replace(params, freeze_stem_bn="never"), True)
    torch.manual_seed(0)
    model = Classifier("resnet18", 16, "none")
    bn = model.backbone.stem[1].running_mean.clone()
    seen = _run(train_cls.loop_spec(params), model, tmp_path, monkeypatch, _cls_step)
    (lr0, mom0, ids0), (lr1, _, ids1) = seen[0]
    assert (lr0, lr1, mom0) == (pytest.approx(0.1), pytest.approx(1.0), pytest.approx(1e-4))
    assert ids1 == {id(model.classifier.weight)} and id(model.backbone.stem[0].weight) in ids0
    assert [g[0] for g in seen[2]] == [pytest.approx(0.1 * 0.5 ** 0.9), pytest.approx(0.5 ** 0.9)]
    assert not torch.equal(bn, model.backbone.stem[1].running_mean)


# ---------------------------------------------------------------------------- recipes in steps
def test_recipes_reach_voc_step_counts():
    """Epochs count passes over VOC train_aug (10,582 images, batch 16: 661 steps each)."""
    p = Params()
    assert planned_schedule(640, 16, p.cls_epochs, 0, p.recipe_list_size)[1] == 5 * 661 == 3305
    assert planned_schedule(640, 16, p.recam_epochs, 0, p.recipe_list_size) == (40, 2644, 67)
    assert planned_schedule(640, 16, 4, 100, 10582)[1] == 100  # max_steps still caps
    assert planned_schedule(640, 16, 4, 0, 0) == (40, 160, 4)  # 0: epochs of the list itself
    assert train_recam.loop_spec(p).ref_items == train_cls.loop_spec(p).ref_items == 10582


def test_bad_recipe_values_are_refused():
    with pytest.raises(UserError, match="recam_momentum"):
        Params(recam_momentum=1.0)
    with pytest.raises(UserError, match="recipe_list_size"):
        Params(recipe_list_size=3)
    with pytest.raises(UserError, match="freeze_stem_bn"):
        Params(freeze_stem_bn="yes")


def test_report_warns_when_recam_predictor_is_at_chance():
    from wsss.steps import report

    metrics = {"train_recam.json": {"predictor_acc": 0.06}, "train_recam-scorecam.json": {"predictor_acc": 0.6}}
    lines = report.training_warnings(["cam", "recam", "recam-scorecam"], lambda *p: metrics.get(p[-1], {}))
    assert len(lines) == 1 and lines[0].startswith("**recam: WARNING") and "at chance" in lines[0]
    text = report.markdown([], Params(), warnings=lines)
    assert lines[0] in text
