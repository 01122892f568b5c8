"""Step ``train-cls``: the multi-label classifier (ResNet + GAP + bias-free 1x1 classifier)
trained with the multilabel soft-margin loss, as in IRN (Ahn et al. CVPR 2019) and ReCAM
(Chen et al. CVPR 2022). Writes ``outputs/checkpoints/cls.pt`` and
``outputs/metrics/train_cls.json``."""

from __future__ import annotations

import torch.nn.functional as F

from ..config import Params, resolve_device, seed_everything
from ..datasets import ClassificationData
from ..io import write_json
from ..models.classifier import build_classifier
from ..tracking import step_run
from ..trainer import LoopSpec, classification_scores, train_loop
from .common import out_dir, open_split, summary

TRAINING_KEYS = ("seed", "dataset", "data_dir", "train_split", "subset", "backbone", "output_stride",
                 "pretrained", "cls_epochs", "cls_batch_size", "cls_lr", "cls_weight_decay",
                 "cls_crop", "max_steps")


def run(params: Params) -> dict:
    seed_everything(params.seed)
    device = resolve_device(params.device)
    train = open_split(params, params.train_split)
    val = open_split(params, params.val_split)
    data = ClassificationData(train, params.cls_crop, params.seed)
    model = build_classifier(params)
    spec = LoopSpec("cls", params.cls_epochs, params.cls_lr, params.cls_batch_size,
                    params.cls_weight_decay, params.max_steps,
                    {k: getattr(params, k) for k in TRAINING_KEYS})

    def step_fn(m, batch, step):
        x, y, _ = batch
        loss = F.multilabel_soft_margin_loss(m(x), y)
        return loss, {"loss": loss.item()}

    with step_run("train-cls", params) as tracker:
        logs = train_loop(spec, model, data, step_fn, out_dir("checkpoints"), device, tracker, params.seed,
                          epoch_end=lambda m, e: classification_scores(m, val, device))
        metrics = {"loss": logs["loss"], "val_map": logs["val_map"], "val_f1": logs["val_f1"],
                   "steps": int(logs["steps"]), "n_train": len(train)}
        tracker.log_metrics({f"final_{k}": v for k, v in metrics.items()})
        write_json(out_dir("metrics", "train_cls.json"), metrics)
    summary("train-cls", f"{metrics['steps']} steps, loss {metrics['loss']:.4f}, "
                         f"val mAP {metrics['val_map']:.3f}, val F1 {metrics['val_f1']:.3f}")
    return metrics
