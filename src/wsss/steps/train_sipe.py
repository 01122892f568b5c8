"""Step ``train-sipe``: the classifier with SIPE's general-specific consistency loss.

Chen, Yang, Lai and Xie, "Self-supervised Image-specific Prototype Exploration for Weakly
Supervised Semantic Segmentation", CVPR 2022; the recipe of the authors' code
(chenqi1126/SIPE ``train_resnet50_SIPE.py``; file:line in docs/methods.md):

* **Model** :class:`wsss.models.sipe.SIPEClassifier`: the classifier plus L2-normalised 1x1
  side projections of layers 1-4 (the hierarchical features). Stem and layers 1-2 get no
  gradient (layer2's output is detached), conv1/bn1 are frozen, BatchNorm runs on its running
  statistics. Trunk and classifier start from ``outputs/checkpoints/cls.pt`` (``sipe_init:
  cls``, the offline stand-in for the paper's ImageNet start) or from the same initialisation
  as ``train-cls`` (``sipe_init: pretrained``).
* **Optimiser.** SGD, backbone at ``sipe_lr``, new heads at 10x (the side projections; from
  scratch the classifier too, as the official ``newly_added``), poly decay (power 0.9), weight
  decay ``cls_weight_decay`` (official 1e-4), momentum ``sipe_momentum`` (official effective
  1e-4: ``PolyOptimizerSGD`` passes the weight decay into SGD's momentum slot, see the param),
  the gradient norm of all parameters clipped to ``sipe_grad_clip`` (official 1.0).
* **Recipe in steps.** ``sipe_epochs`` counts epochs of VOC's train_aug list (10,582 images,
  the paper's 5 epochs at batch 16 = 3,305 steps): the stage runs ``sipe_epochs *
  (10582 // cls_batch_size)`` optimiser steps on whatever list ``train_split`` names, as many
  epochs of it as that takes (the last one cut); ``max_steps`` still caps.
* **Crops** of ``cls_crop`` with the padding mask (1 on image pixels, 0 on padding): the
  official valid mask, which zeroes the CAMs on padding and keeps padding out of the seeds.
* **Loss** (math in :mod:`wsss.models.sipe`): L = L_soft-margin(z, y) + sipe_lambda * L_gsc,
  L_gsc = mean over all (B, 21, h, w) of |CAM - IS-CAM / max IS-CAM|.

Writes ``outputs/checkpoints/sipe.pt`` (spec ``kind: sipe``; load it with
:func:`wsss.models.sipe.load_any`) and ``outputs/metrics/train_sipe.json``.
"""

from __future__ import annotations


import numpy as np
import torch
import torch.nn.functional as F

from ..config import Params, seed_everything
from ..datasets import ClassificationData, random_scale_flip_crop, to_tensor
from ..models.classifier import start_from_classifier
from ..models.sipe import build_sipe, gsc_loss, sipe_outputs
from ..trainer import LoopSpec, fit_classifier, planned_schedule
from .common import checkpoint_path, open_split, out_dir, summary

NAME = "sipe"
#: Images in VOC 2012 train_aug, the list the official recipe's epochs count (data/trainaug_voc.txt).
TRAINING_KEYS = ("seed", "dataset", "data_dir", "train_split", "subset", "backbone", "output_stride",
                 "pretrained", "sipe_epochs", "sipe_lr", "sipe_lambda", "sipe_init", "sipe_momentum",
                 "sipe_grad_clip", "cls_batch_size", "cls_weight_decay", "cls_crop", "max_steps",
                 "recipe_list_size")


class CropMaskData(ClassificationData):
    """:class:`ClassificationData` crops plus their padding mask (H, W) float, 1 on image pixels:
    the same random draws, so the image crop is the one ``train-cls`` would see."""

    def __getitem__(self, idx: int):
        rng = np.random.default_rng((self.rng_seed, self.epoch, idx))
        image = self.images[idx]
        inside = np.ones(image.shape[:2], np.uint8)
        if self.train:
            image, inside = random_scale_flip_crop(rng, image, inside, self.crop)
        crop = torch.from_numpy((inside == 1).astype(np.float32))
        return to_tensor(image), torch.from_numpy(self.labels[idx]), idx, crop


def schedule(params: Params, n_items: int) -> tuple[int, int]:
    """(epochs run over a list of ``n_items`` images, optimiser steps) of train-sipe: ``sipe_epochs``
    epochs of a ``recipe_list_size``-image list (VOC train_aug) at ``cls_batch_size``, cut at
    ``max_steps`` (:func:`wsss.trainer.planned_schedule`, the rule of every training stage)."""
    _, steps, epochs = planned_schedule(n_items, params.cls_batch_size, params.sipe_epochs, params.max_steps,
                                        params.recipe_list_size)
    return epochs, steps


def loop_spec(params: Params, keys: dict) -> LoopSpec:
    """SIPE's optimiser and schedule (docs/methods.md, "SIPE")."""
    return LoopSpec(NAME, params.sipe_epochs, params.sipe_lr, params.cls_batch_size, params.cls_weight_decay,
                    params.max_steps, keys, momentum=params.sipe_momentum, ref_items=params.recipe_list_size,
                    grad_clip=params.sipe_grad_clip, batch_key="cls_batch_size", sync_bn=params.sync_bn,
                    cuda_amp=params.cuda_amp)


def make_step_fn(params: Params):
    lam = params.sipe_lambda

    def step_fn(m, batch, step):
        x, y = batch[0], batch[1]
        crop = batch[3] if len(batch) > 3 else None
        out = sipe_outputs(m, x, y, crop)
        l_cls = F.multilabel_soft_margin_loss(out["logits"], y)
        l_gsc = gsc_loss(out["maps"], out["iscam"])
        loss = l_cls + lam * l_gsc
        return loss, {"loss": loss.item(), "loss_cls": l_cls.item(), "loss_gsc": l_gsc.item()}

    return step_fn


def run(params: Params) -> dict:
    seed_everything(params.seed, params.threads)
    train = open_split(params, params.train_split)
    val = open_split(params, params.val_split)
    model = build_sipe(params)
    model.freeze_stem()
    keys = {k: getattr(params, k) for k in TRAINING_KEYS}
    new_heads: tuple[str, ...] = ("classifier", "side")
    if params.sipe_init == "cls":
        keys["init"] = start_from_classifier(model, checkpoint_path("cls"), params.backbone, "sipe_init")
        new_heads = ("side",)
    epochs, _ = schedule(params, len(train))
    data = CropMaskData(train, params.cls_crop, params.seed)
    metrics = fit_classifier("train", params, loop_spec(params, keys), model, train, val, make_step_fn(params),
                             out_dir("checkpoints"), out_dir("metrics", f"train_{NAME}.json"),
                             loss_keys=("loss", "loss_cls", "loss_gsc"), new_prefixes=new_heads, method=NAME,
                             data=data)
    summary("train-sipe", f"{metrics['steps']} steps ({epochs} epochs of {len(train)} images), "
                          f"loss {metrics['loss']:.4f} (gsc {metrics['loss_gsc']:.4f}), "
                          f"val mAP {metrics['val_map']:.3f}, val F1 {metrics['val_f1']:.3f}")
    return metrics
