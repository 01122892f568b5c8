"""Step ``train-irn --method M``: IRN's boundary network trained from M's IR labels.

Ahn, Cho and Kwak, "Weakly Supervised Learning of Instance Segmentation with Inter-pixel
Relations", CVPR 2019 (official code jiwoon-ahn/irn step/train_irn.py; model and loss in
:mod:`wsss.models.irn`, conventions in docs/methods.md, "IRN").

* IR labels: the pseudo-masks of the ``crf`` step, ``outputs/pseudo_masks/<M>/`` (confident
  foreground at ``conf_fg``, confident background at ``conf_bg``, 255 between: IRN's
  ``cam_to_ir_label`` output), on ``seed_split``, the list they are made for. They are read,
  not written again.
* Trunk: the ResNet of ``outputs/checkpoints/cls.pt`` (the offline stand-in for IRN's
  ImageNet ResNet-50), frozen; only the boundary branch trains, at ``irn_lr`` (official: the
  edge layers at 1x lr), SGD with poly decay, weight decay ``cls_weight_decay`` and momentum
  ``cls_momentum`` (IRN's PolyOptimizer has the same 1e-4 weight decay and passes it into
  SGD's momentum slot, as for the classifier).
* Data: random rescale 0.5-1.5, horizontal flip, random ``irn_crop`` crop (labels padded with
  255), the label reduced to stride 4 by nearest sampling (every 4th pixel), as the official
  ``VOC12AffinityDataset``; pairs within ``irn_radius`` at stride 4.
* Recipe in optimiser steps: ``irn_epochs`` epochs of ``recipe_list_size`` images at
  ``irn_batch_size`` (VOC: 3 x 10582 // 32 = 990 steps) on whatever list ``seed_split``
  names; ``max_steps`` caps. Full batches only (drop_last, as the official loader): a list
  shorter than one batch gives no step at all and the branch keeps its initialisation. That
  is what the official code does on the seed study's 30-image lists with batch 32, so the
  study is replayed as it ran; the summary line says so.

Writes ``outputs/checkpoints/irn-<M>.pt`` (spec ``kind: irn``) and
``outputs/metrics/train_irn/<M>.json``; one MLflow run.
"""

from __future__ import annotations

import numpy as np
import torch

from .. import methods
from ..config import Params, resolve_device, seed_everything
from ..datasets import SegmentationData, random_scale_flip_crop, to_tensor
from ..distributed import is_main
from ..errors import UserError
from ..io import write_json
from ..models.classifier import load_classifier
from ..models.irn import STRIDE, IRNet, affinity_labels, affinity_loss, checkpoint_name, edge_to_affinity
from ..tracking import step_run
from ..trainer import LoopSpec, spec_schedule, train_loop
from .common import checkpoint_path, mask_fingerprint, open_split, out_dir, summary

TRAINING_KEYS = ("seed", "dataset", "data_dir", "seed_split", "subset", "irn_epochs", "irn_lr", "irn_batch_size",
                 "irn_crop", "irn_radius", "cls_weight_decay", "cls_momentum", "max_steps", "recipe_list_size")
#: IRN's rescale range (official train_irn.py ``rescale=(0.5, 1.5)``)
SCALES = (0.5, 1.5)


def ir_label_dir(method: str):
    return out_dir("pseudo_masks", method)


class AffinityData(SegmentationData):
    """(image crop, IR label at stride 4) pairs; the crops of :class:`SegmentationData` with
    IRN's scale range, the label sampled at every 4th pixel (nearest, as cv2's 0.25 resize)."""

    def __getitem__(self, idx: int):
        rng = np.random.default_rng((self.rng_seed, self.epoch, idx))
        image, label = random_scale_flip_crop(rng, self.images[idx], self.masks[idx], self.crop, SCALES)
        small = np.ascontiguousarray(label[::STRIDE, ::STRIDE]).astype(np.int64)
        return to_tensor(image), torch.from_numpy(small)


def make_step_fn(radius: int):
    def step_fn(m, batch, step):
        x, labels = batch
        edge = torch.sigmoid(m(x))[:, 0].float()
        h, w = edge.shape[-2:]
        labels = labels[:, :h, :w]
        losses = affinity_loss(edge_to_affinity(edge, radius), *affinity_labels(labels, radius))
        return losses["total"], {"loss": losses["total"].item(), "loss_pos": losses["pos"].item(),
                                 "loss_neg": losses["neg"].item()}

    return step_fn


def loop_spec(params: Params, method: str, keys: dict, n_items: int) -> LoopSpec:
    """train-irn's optimiser and schedule: one group (the boundary branch) at ``irn_lr``; no
    epoch at all when ``n_items`` is below one batch (drop_last leaves nothing to run)."""
    epochs = params.irn_epochs if n_items >= params.irn_batch_size else 0
    return LoopSpec(checkpoint_name(method), epochs, params.irn_lr, params.irn_batch_size,
                    params.cls_weight_decay, params.max_steps, keys, batch_key="irn_batch_size",
                    sync_bn=params.sync_bn, cuda_amp=params.cuda_amp, lr_mults=(1.0, 1.0),
                    momentum=params.cls_momentum, ref_items=params.recipe_list_size)


def run(params: Params, method: str) -> dict:
    methods.get(method)
    seed_everything(params.seed, params.threads)
    device = resolve_device(params.device, params.cuda_amp)
    label_dir = ir_label_dir(method)
    if not label_dir.is_dir():
        raise UserError(f"{label_dir}: IR labels missing (the crf step's pseudo-masks); "
                        f"run `python cli.py crf --method {method}` first")
    train = open_split(params, params.seed_split)
    data = AffinityData(train, params.irn_crop, label_dir, params.seed)
    cls_model, cls_ckpt = load_classifier(checkpoint_path("cls"), "cpu")
    model = IRNet(cls_model.arch, cls_model.output_stride)
    model.backbone.load_state_dict(cls_model.backbone.state_dict())
    del cls_model
    keys = {k: getattr(params, k) for k in TRAINING_KEYS}
    keys.update(method=method, masks=mask_fingerprint(label_dir), init=cls_ckpt.get("fingerprint"))
    spec = loop_spec(params, method, keys, len(data))
    _, planned, _ = spec_schedule(spec, len(data))
    short = len(data) < params.irn_batch_size
    with step_run("train-irn", params, method=method) as tracker:
        logs = train_loop(spec, model, data, make_step_fn(params.irn_radius), out_dir("checkpoints"), device,
                          tracker, params.seed, new_prefixes=("edge",))
        nan = float("nan")
        metrics = {"method": method, **{k: logs.get(k, nan) for k in ("loss", "loss_pos", "loss_neg")},
                   "steps": int(logs["steps"]), "planned_steps": planned, "n_train": len(train)}
        tracker.log_metrics({f"final_{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
        if is_main():
            write_json(out_dir("metrics", "train_irn", f"{method}.json"),
                       {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in metrics.items()})
    note = (f"; {len(train)} images < irn_batch_size {params.irn_batch_size}: no full batch, no step "
            f"(drop_last, as the official loader), the boundary branch keeps its initialisation") if short else ""
    summary("train-irn", f"{method}: {metrics['steps']} steps on {len(train)} images, loss {metrics['loss']:.4f} "
                         f"(pos {metrics['loss_pos']:.4f}, neg {metrics['loss_neg']:.4f}){note}")
    return metrics
