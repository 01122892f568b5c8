"""Step ``train-sipe``: the classifier with SIPE's general-specific consistency loss.

Chen, Yang, Lai and Xie, "Self-supervised Image-specific Prototype Exploration for Weakly
Supervised Semantic Segmentation", CVPR 2022.

Model: :class:`wsss.models.sipe.SIPEClassifier` (the classifier plus 1x1 side projections of
layers 2-4 that form the hierarchical features). Trunk and classifier start from
``outputs/checkpoints/cls.pt`` (``sipe_init: cls``, the default; the offline stand-in for the
paper's ImageNet start) or from the same initialisation as ``train-cls`` (``sipe_init:
pretrained``); trained for ``sipe_epochs`` at ``sipe_lr`` (batch ``cls_batch_size``, crop
``cls_crop``; the side projections, and from scratch the classifier too, are new heads at
10x the learning rate). From scratch, 400 steps did not train it on the synthetic world
(val mAP 0.24-0.29, soft-margin loss near ln 2). Per step (math in :mod:`wsss.models.sipe`):
normalised CAMs of the present classes and the background 1 - max_c CAM, structure-aware
seeds from the pixel correlation of the semantic (last-stage) features with the background's
similarity halved, image-specific prototypes of the hierarchical features over the seed
regions, IS-CAM = ReLU(cos(f, p_k)), and

    L = L_soft-margin(z, y) + sipe_lambda * L_gsc,   L_gsc = mean |CAM_k - IS-CAM_k|

over the background and the present classes.

Writes ``outputs/checkpoints/sipe.pt`` (spec ``kind: sipe``; load it with
:func:`wsss.models.sipe.load_any`) and ``outputs/metrics/train_sipe.json``.
"""

from __future__ import annotations

import torch.nn.functional as F

from ..config import Params, seed_everything
from ..models.classifier import start_from_classifier
from ..models.sipe import build_sipe, gsc_loss, sipe_outputs
from ..trainer import LoopSpec, fit_classifier
from .common import checkpoint_path, open_split, out_dir, summary

NAME = "sipe"
TRAINING_KEYS = ("seed", "dataset", "data_dir", "train_split", "subset", "backbone", "output_stride",
                 "pretrained", "sipe_epochs", "sipe_lr", "sipe_lambda", "sipe_init", "cls_batch_size",
                 "cls_weight_decay", "cls_crop", "max_steps")


def make_step_fn(params: Params):
    lam = params.sipe_lambda

    def step_fn(m, batch, step):
        x, y = batch[0], batch[1]
        out = sipe_outputs(m, x, y)
        l_cls = F.multilabel_soft_margin_loss(out["logits"], y)
        l_gsc = gsc_loss(out["maps"], out["iscam"], out["valid"])
        loss = l_cls + lam * l_gsc
        return loss, {"loss": loss.item(), "loss_cls": l_cls.item(), "loss_gsc": l_gsc.item()}

    return step_fn


def run(params: Params) -> dict:
    seed_everything(params.seed, params.threads)
    train = open_split(params, params.train_split)
    val = open_split(params, params.val_split)
    model = build_sipe(params)
    keys = {k: getattr(params, k) for k in TRAINING_KEYS}
    new_heads: tuple[str, ...] = ("classifier", "side")
    if params.sipe_init == "cls":
        keys["init"] = start_from_classifier(model, checkpoint_path("cls"), params.backbone, "sipe_init")
        new_heads = ("side",)
    spec = LoopSpec(NAME, params.sipe_epochs, params.sipe_lr, params.cls_batch_size,
                    params.cls_weight_decay, params.max_steps, keys,
                    batch_key="cls_batch_size", sync_bn=params.sync_bn, cuda_amp=params.cuda_amp)
    metrics = fit_classifier("train", params, spec, model, train, val, make_step_fn(params),
                             out_dir("checkpoints"), out_dir("metrics", f"train_{NAME}.json"),
                             loss_keys=("loss", "loss_cls", "loss_gsc"), new_prefixes=new_heads, method=NAME)
    summary("train-sipe", f"{metrics['steps']} steps, loss {metrics['loss']:.4f} (gsc {metrics['loss_gsc']:.4f}), "
                          f"val mAP {metrics['val_map']:.3f}, val F1 {metrics['val_f1']:.3f}")
    return metrics
