"""Step ``train-cls``: the multi-label classifier (ResNet + GAP + bias-free 1x1 classifier)
trained with the multilabel soft-margin loss, as in IRN (Ahn et al. CVPR 2019) and ReCAM
(Chen et al. CVPR 2022). Writes ``outputs/checkpoints/cls.pt`` and
``outputs/metrics/train_cls.json``.

The recipe of ReCAM's step/train_cam.py (docs/methods.md, "Classifier"): trunk at ``cls_lr``,
W at 10x, poly decay 0.9, SGD with ``cls_momentum`` (1e-4 in the official code, see
:class:`~wsss.config.Params`), ``cls_epochs`` epochs of ``recipe_list_size`` images, the loss
averaged over the 20 classes and the batch; conv1/bn1 and BatchNorm statistics frozen when the
trunk starts from trained weights (``freeze_stem_bn``)."""

from __future__ import annotations

import torch.nn.functional as F

from ..config import Params, seed_everything
from ..models.classifier import build_classifier
from ..trainer import LoopSpec, fit_classifier, frozen
from .common import open_split, out_dir, summary

TRAINING_KEYS = ("seed", "dataset", "data_dir", "train_split", "subset", "backbone", "output_stride",
                 "pretrained", "cls_epochs", "cls_batch_size", "cls_lr", "cls_weight_decay", "cls_momentum",
                 "cls_crop", "max_steps", "recipe_list_size", "freeze_stem_bn")


def soft_margin_loss(logits, labels):
    """The multilabel soft-margin loss as IRN/ReCAM average it (step/train_cam.py:86 of ReCAM):
    -[y log s(z) + (1 - y) log s(-z)] averaged over the K classes of an image, then over the
    batch (torch's ``multilabel_soft_margin_loss``, reduction mean)."""
    return F.multilabel_soft_margin_loss(logits, labels)


def step_fn(m, batch, step):
    x, y, _ = batch
    loss = soft_margin_loss(m(x), y)
    return loss, {"loss": loss.item()}


def loop_spec(params: Params) -> LoopSpec:
    """The optimiser and schedule of train-cls (docs/methods.md, "Classifier")."""
    return LoopSpec("cls", params.cls_epochs, params.cls_lr, params.cls_batch_size,
                    params.cls_weight_decay, params.max_steps,
                    {k: getattr(params, k) for k in TRAINING_KEYS},
                    momentum=params.cls_momentum, ref_items=params.recipe_list_size,
                    batch_key="cls_batch_size", sync_bn=params.sync_bn, cuda_amp=params.cuda_amp)


def run(params: Params) -> dict:
    seed_everything(params.seed, params.threads)
    train = open_split(params, params.train_split)
    val = open_split(params, params.val_split)
    model = build_classifier(params)
    if frozen(params, params.pretrained != "none"):
        model.freeze_stem_bn()
    spec = loop_spec(params)
    metrics = fit_classifier("train-cls", params, spec, model, train, val, step_fn, out_dir("checkpoints"),
                             out_dir("metrics", "train_cls.json"))
    summary("train-cls", f"{metrics['steps']} steps, loss {metrics['loss']:.4f}, "
                         f"val mAP {metrics['val_map']:.3f}, val F1 {metrics['val_f1']:.3f}")
    return metrics
