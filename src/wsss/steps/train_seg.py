"""Step ``train-seg``: the DeepLab-v3-style network (Chen et al. 2017) trained on the
pseudo-masks of one seed method, the last stage of the IRN / ReCAM pipeline.

``method`` names the pseudo-masks made on ``params.seed_split``: the dense-CRF ones
``outputs/pseudo_masks/<method>/`` or, with ``pseudo_masks: irn``, IRN's random-walk ones
``outputs/irn_masks/<method>/``; ``method == "gt"`` trains on the ground-truth masks of the same
``params.seed_split`` images instead (the fully supervised upper bound: same images, same
network, same schedule, so the gap measures label quality alone). Pixel-wise cross-entropy
ignoring 255, SGD with polynomial decay (:func:`wsss.trainer.train_loop`, 10x learning rate
on the ``head``), ``seg_epochs`` epochs of ``seg_batch_size`` random ``seg_crop`` crops.

The backbone starts from ``pretrained`` (``seg_init: pretrained``) or from the trunk of
``outputs/checkpoints/cls.pt`` (``seg_init: cls``). DeepLab is always initialised from a
classifier (ImageNet in Chen et al.; IRN, ReCAM and SIPE do the same); offline there are no
ImageNet weights, and the classifier trained on this dataset's image labels is the closest
stand-in that still uses no mask. It is the same start for every method and for the ``gt``
upper bound.
Writes ``outputs/checkpoints/seg-<method>.pt`` and ``outputs/metrics/train_seg/<method>.json``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .. import distributed, methods
from ..config import Params, resolve_device, seed_everything
from ..datasets import SegmentationData
from ..errors import UserError
from ..distributed import is_main
from ..io import write_json
from ..metrics import ConfusionMatrix
from ..models.deeplab import build_deeplab
from ..tracking import step_run
from ..trainer import LoopSpec, planned_schedule, train_loop
from ..voc import NUM_LABELS, VOID
from .common import mask_fingerprint, open_split, out_dir, summary

GT = methods.GT
TRAINING_KEYS = ("seed", "dataset", "data_dir", "subset", "seg_backbone", "output_stride", "pretrained",
                 "seg_decoder", "seg_epochs", "seg_batch_size", "seg_lr", "seg_crop", "seg_weight_decay",
                 "max_steps")
#: Validation images scored after every epoch (the full score is eval-seg's job).
VAL_QUICK = 100


@torch.no_grad()
def quick_val_miou(model, voc, device, limit: int = VAL_QUICK, batch_size: int = 16) -> dict[str, float]:
    """mIoU of single-scale, unflipped predictions on the first ``limit`` ids with a mask
    (images of equal size batched together)."""
    from ..datasets import to_tensor

    ids = [i for i in voc.ids[:limit] if voc.mask_path(i).is_file()]
    if not ids:
        return {}
    model.eval()
    cm = ConfusionMatrix(NUM_LABELS)
    by_shape: dict[tuple, list[str]] = {}
    for i in ids:
        by_shape.setdefault(voc.image_size(i), []).append(i)
    for group in by_shape.values():
        for start in range(0, len(group), batch_size):
            chunk = group[start:start + batch_size]
            x = torch.stack([to_tensor(voc.image(i)) for i in chunk]).to(device)
            preds = model(x).argmax(1).cpu().numpy()
            for i, pred in zip(chunk, preds):
                cm.update(pred, voc.mask(i))
    return {"val_miou": cm.scores()["miou"]}


def validation_epochs(params: Params, n_train: int) -> set[int]:
    """Epochs (0-based) after which train-seg scores the quick val mIoU: every
    ``seg_val_every`` epochs and always after the last one (the loop's epoch count, with
    ``max_steps`` applied)."""
    last = planned_schedule(n_train, params.seg_batch_size, params.seg_epochs, params.max_steps)[2] - 1
    every = params.seg_val_every
    return {e for e in range(last + 1) if e == last or (every and (e + 1) % every == 0)}


def init_from_classifier(model, params: Params) -> str:
    """Copy the trunk of ``outputs/checkpoints/cls.pt`` into the DeepLab backbone (``seg_init:
    cls``); returns the classifier's fingerprint."""
    from ..models.classifier import start_from_classifier
    from .common import checkpoint_path

    return start_from_classifier(model, checkpoint_path("cls"), params.seg_backbone, "seg_init", head=False)


def pseudo_mask_dir(params: Params, method: str):
    """The masks train-seg trains on: the dense-CRF ones (``pseudo_masks: crf``,
    outputs/pseudo_masks/<method>) or IRN's random-walk ones (``irn``, outputs/irn_masks/<method>)."""
    return out_dir("pseudo_masks" if params.pseudo_masks == "crf" else "irn_masks", method)


def pixel_ce_step(m, batch, step):
    """One step of pixel-wise cross-entropy over the labelled pixels of ``batch = (x, y)``
    (255 ignored), averaged over the labelled pixels of the whole batch, every rank's under DDP."""
    x, y = batch
    logits = m(x)
    if distributed.world_size() > 1:
        # each rank holds part of the batch: normalise by the whole batch's labelled pixels
        # (their mean per rank, as DDP averages the gradients), so that 2 x B/2 computes the
        # loss of 1 x B, not a mean of two differently weighted means
        labelled = distributed.sum_all_ranks(float((y != VOID).sum())) / distributed.world_size()
        loss = F.cross_entropy(logits, y, ignore_index=VOID, reduction="sum") / max(labelled, 1.0)
    elif bool((y != VOID).any()):
        loss = F.cross_entropy(logits, y, ignore_index=VOID)
    else:  # a batch of crops with no labelled pixel: no gradient, but no NaN either
        loss = logits.sum() * 0.0
    return loss, {"loss": loss.item()}


def run(params: Params, method: str) -> dict:
    methods.get(method, allow_gt=True)  # one clear error for an unknown method
    seed_everything(params.seed, params.threads)
    device = resolve_device(params.device, params.cuda_amp)
    keys = {k: getattr(params, k) for k in TRAINING_KEYS}
    if method == GT:
        train = open_split(params, params.seed_split)
        if not train.has_masks:
            raise UserError(f"split '{params.seed_split}' has ids without a ground-truth mask; "
                            f"method 'gt' needs SegmentationClass/ masks for all of them")
        mask_dir = None
        keys["split"] = params.seed_split
    else:
        train = open_split(params, params.seed_split)
        mask_dir = pseudo_mask_dir(params, method)
        if not mask_dir.is_dir():
            make = "crf" if params.pseudo_masks == "crf" else "make-sem-seg"
            raise UserError(f"{mask_dir}: pseudo-masks missing (pseudo_masks: {params.pseudo_masks}); "
                            f"run `python cli.py {make} --method {method}` first")
        keys["split"] = params.seed_split
        keys["pseudo_masks"] = params.pseudo_masks
        keys["masks"] = mask_fingerprint(mask_dir)
    keys["method"] = method
    if len(train) < params.seg_batch_size:
        raise UserError(f"split '{train.split}' has {len(train)} images, fewer than seg_batch_size "
                        f"{params.seg_batch_size}; lower key 'seg_batch_size'")
    data = SegmentationData(train, params.seg_crop, mask_dir, params.seed)
    val = open_split(params, params.val_split)
    model = build_deeplab(params)
    if params.seg_init == "cls":
        keys["init"] = init_from_classifier(model, params)
    spec = LoopSpec(f"seg-{method}", params.seg_epochs, params.seg_lr, params.seg_batch_size,
                    params.seg_weight_decay, params.max_steps, keys,
                    batch_key="seg_batch_size", sync_bn=params.sync_bn, cuda_amp=params.cuda_amp)

    val_epochs = validation_epochs(params, len(data))

    with step_run("train-seg", params, method=method) as tracker:
        logs = train_loop(spec, model, data, pixel_ce_step, out_dir("checkpoints"), device, tracker, params.seed,
                          new_prefixes=("head",),
                          epoch_end=lambda m, e: quick_val_miou(m, val, device) if e in val_epochs else {})
        metrics = {"method": method, "loss": logs.get("loss", float("nan")),
                   "val_miou_quick": logs.get("val_miou", float("nan")),
                   "steps": int(logs["steps"]), "n_train": len(train)}
        tracker.log_metrics({f"final_{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
        if is_main():
            write_json(out_dir("metrics", "train_seg", f"{method}.json"),
                       {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in metrics.items()})
    summary("train-seg", f"{method}: {metrics['steps']} steps on {len(train)} images, loss {metrics['loss']:.4f}, "
                         f"quick val mIoU {metrics['val_miou_quick']:.3f}")
    return metrics

