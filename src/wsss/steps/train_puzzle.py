"""Step ``train-puzzle``: the classifier trained with Puzzle-CAM's reconstruction loss.

Jo and Yu, "Puzzle-CAM: Improved localization via matching partial and full features",
ICIP 2021.

From the same initialisation as ``train-cls`` (not from ``cls.pt``), for ``puzzle_epochs`` at
``puzzle_lr`` (batch ``cls_batch_size``, crop ``cls_crop``). With the logit-level class maps
A = W^T F(I) (B, K, h, w) of the full images (no ReLU; GAP(A) = W^T GAP(F) are the logits,
the same classifier as ``train-cls``) and the maps of the four 2x2 tiles of every image,
merged back into one map A^re:

    L = L_cls(GAP(A), y) + L_p-cls(GAP(A^re), y) + alpha_t * L_re,
    L_re = 1/(B K h w) sum_{b,c,i} y_bc |A_bc(i) - A^re_bc(i)|,

L_cls the multilabel soft-margin loss; L_re is the L1 distance on the present classes only,
averaged over all B*K*h*w entries (absent classes count as zeros), the normalisation with
which the paper's alpha = 4 was chosen. alpha_t rises linearly from 0 to ``puzzle_alpha``
over the first half of the optimiser steps and stays there (the paper's schedule).

Tile alignment: the merged tile maps line up with the full map exactly when the input side
is a multiple of 2 * output_stride (each tile side is then a multiple of the stride, and
ResNet's ceil arithmetic makes the full map exactly twice a tile's map). Other sizes are
padded at the bottom/right with zeros of the normalised image (the ImageNet-mean colour)
up to the next multiple, for the full image and the tiles alike, so the crop size is free.

Writes ``outputs/checkpoints/puzzlecam.pt`` (a plain classifier checkpoint: seeds use CAM)
and ``outputs/metrics/train_puzzlecam.json``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Params, resolve_device, seed_everything
from ..datasets import ClassificationData
from ..io import write_json
from ..models.classifier import build_classifier
from ..tracking import step_run
from ..trainer import LoopSpec, classification_scores, train_loop
from .common import open_split, out_dir, summary

NAME = "puzzlecam"
TRAINING_KEYS = ("seed", "dataset", "data_dir", "train_split", "subset", "backbone", "output_stride",
                 "pretrained", "puzzle_epochs", "puzzle_lr", "puzzle_alpha", "cls_batch_size",
                 "cls_weight_decay", "cls_crop", "max_steps")


# ---------------------------------------------------------------------------- tiles
def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad (B, C, H, W) at the bottom/right so H and W are multiples of ``multiple``."""
    H, W = x.shape[-2:]
    ph, pw = (-H) % multiple, (-W) % multiple
    return F.pad(x, (0, pw, 0, ph)) if ph or pw else x


def split_tiles(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) with even H, W -> (4B, C, H/2, W/2): top-left, top-right, bottom-left,
    bottom-right tiles of every image, tile-major (tile t of image b at index t*B + b)."""
    H, W = x.shape[-2:]
    if H % 2 or W % 2:
        raise ValueError(f"split_tiles needs an even size, got {H}x{W}; pad first")
    h, w = H // 2, W // 2
    return torch.cat([x[..., :h, :w], x[..., :h, w:], x[..., h:, :w], x[..., h:, w:]], dim=0)


def merge_tiles(t: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`split_tiles`: (4B, C, h, w) -> (B, C, 2h, 2w)."""
    tl, tr, bl, br = t.chunk(4, dim=0)
    return torch.cat([torch.cat([tl, tr], dim=-1), torch.cat([bl, br], dim=-1)], dim=-2)


# ---------------------------------------------------------------------------- the math
def class_maps(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logit-level class maps W^T F(x) (B, K, h, w), no ReLU; their GAP are the logits."""
    return F.conv2d(model.features(x), model.cam_weight())


def alpha_at(step: int, total: int, alpha: float) -> float:
    """alpha_t: linear from 0 at step 0 to ``alpha`` at half of ``total`` steps, then flat."""
    half = max(total * 0.5, 1.0)
    return alpha * min(1.0, step / half)


def puzzle_losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """``cls``, ``pcls`` and ``re`` terms of Puzzle-CAM for a normalised batch ``x`` and
    multi-hot ``y`` (B, K); ``x`` is padded to a multiple of 2 * output_stride first."""
    x = pad_to_multiple(x, 2 * int(model.output_stride))
    cams = class_maps(model, x)
    re_cams = merge_tiles(class_maps(model, split_tiles(x)))
    if re_cams.shape != cams.shape:  # cannot happen after padding; guard against other trunks
        re_cams = F.interpolate(re_cams, size=cams.shape[-2:], mode="bilinear", align_corners=False)
    l_cls = F.multilabel_soft_margin_loss(cams.mean((2, 3)), y)
    l_pcls = F.multilabel_soft_margin_loss(re_cams.mean((2, 3)), y)
    present = (y > 0).to(cams.dtype)[:, :, None, None]
    l_re = ((cams - re_cams).abs() * present).mean()
    return {"cls": l_cls, "pcls": l_pcls, "re": l_re}


def total_steps(n_items: int, epochs: int, batch_size: int, max_steps: int) -> int:
    """The optimiser steps :func:`wsss.trainer.train_loop` will take (drop_last batches)."""
    total = epochs * max(1, n_items // batch_size)
    return min(total, max_steps) if max_steps else total


def make_step_fn(params: Params, total: int):
    def step_fn(m, batch, step):
        x, y = batch[0], batch[1]
        t = puzzle_losses(m, x, y)
        alpha = alpha_at(step, total, params.puzzle_alpha)
        loss = t["cls"] + t["pcls"] + alpha * t["re"]
        return loss, {"loss": loss.item(), "loss_cls": t["cls"].item(), "loss_pcls": t["pcls"].item(),
                      "loss_re": t["re"].item(), "alpha": alpha}

    return step_fn


def run(params: Params) -> dict:
    seed_everything(params.seed)
    device = resolve_device(params.device)
    train = open_split(params, params.train_split)
    val = open_split(params, params.val_split)
    data = ClassificationData(train, params.cls_crop, params.seed)
    model = build_classifier(params)
    spec = LoopSpec(NAME, params.puzzle_epochs, params.puzzle_lr, params.cls_batch_size,
                    params.cls_weight_decay, params.max_steps,
                    {k: getattr(params, k) for k in TRAINING_KEYS})
    total = total_steps(len(data), params.puzzle_epochs, params.cls_batch_size, params.max_steps)
    step_fn = make_step_fn(params, total)

    with step_run("train-puzzle", params, method=NAME) as tracker:
        logs = train_loop(spec, model, data, step_fn, out_dir("checkpoints"), device, tracker, params.seed,
                          epoch_end=lambda m, e: classification_scores(m, val, device))
        nan = float("nan")
        metrics = {k: logs.get(k, nan) for k in ("loss", "loss_cls", "loss_pcls", "loss_re", "val_map", "val_f1")}
        metrics.update({"steps": int(logs["steps"]), "n_train": len(train)})
        tracker.log_metrics({f"final_{k}": v for k, v in metrics.items()})
        write_json(out_dir("metrics", f"train_{NAME}.json"), metrics)
    summary("train-puzzle", f"{metrics['steps']} steps, loss {metrics['loss']:.4f} "
                            f"(re {metrics['loss_re']:.4f}), val mAP {metrics['val_map']:.3f}, "
                            f"val F1 {metrics['val_f1']:.3f}")
    return metrics
