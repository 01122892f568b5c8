"""Step ``train-cls``: the multi-label classifier (ResNet + GAP + bias-free 1x1 classifier)
trained with the multilabel soft-margin loss, as in IRN (Ahn et al. CVPR 2019) and ReCAM
(Chen et al. CVPR 2022). Writes ``outputs/checkpoints/cls.pt`` and
``outputs/metrics/train_cls.json``."""

from __future__ import annotations

import torch.nn.functional as F

from ..config import Params, seed_everything
from ..models.classifier import build_classifier
from ..trainer import LoopSpec, fit_classifier
from .common import open_split, out_dir, summary

TRAINING_KEYS = ("seed", "dataset", "data_dir", "train_split", "subset", "backbone", "output_stride",
                 "pretrained", "cls_epochs", "cls_batch_size", "cls_lr", "cls_weight_decay",
                 "cls_crop", "max_steps")


def step_fn(m, batch, step):
    x, y, _ = batch
    loss = F.multilabel_soft_margin_loss(m(x), y)
    return loss, {"loss": loss.item()}


def run(params: Params) -> dict:
    seed_everything(params.seed, params.threads)
    train = open_split(params, params.train_split)
    val = open_split(params, params.val_split)
    model = build_classifier(params)
    spec = LoopSpec("cls", params.cls_epochs, params.cls_lr, params.cls_batch_size,
                    params.cls_weight_decay, params.max_steps,
                    {k: getattr(params, k) for k in TRAINING_KEYS},
                    batch_key="cls_batch_size", sync_bn=params.sync_bn, cuda_amp=params.cuda_amp)
    metrics = fit_classifier("train-cls", params, spec, model, train, val, step_fn, out_dir("checkpoints"),
                             out_dir("metrics", "train_cls.json"))
    summary("train-cls", f"{metrics['steps']} steps, loss {metrics['loss']:.4f}, "
                         f"val mAP {metrics['val_map']:.3f}, val F1 {metrics['val_f1']:.3f}")
    return metrics
