"""The training loop shared by every classifier stage (train-cls, train-recam, train-puzzle,
train-sipe): seeded data order, SGD with polynomial decay (IRN/ReCAM: power 0.9, 10x learning
rate on newly added heads), an optional optimiser-step budget (``max_steps``, the seed-study
protocol), per-epoch MLflow metrics, and atomic, resumable checkpoints.

Resuming: after every epoch ``<name>.resume.pt`` holds the model, optimiser, epoch and step
and torch's global random state (dropout draws from it: DeepLab's ASPP), tagged with a
fingerprint of the params that shape training; a rerun with the same params continues from
there, a rerun with other params starts over. The data order and augmentation of an epoch
depend only on (rng_seed, epoch) and the learning rate only on the step, so with the same
``threads`` a resumed run ends with the same bits as an uninterrupted one
(tests/test_crash_resume.py). The final ``<name>.pt`` is written atomically and the resume
file removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from .errors import UserError
from .config import cuda_amp_dtype
from .io import load_torch, remove_stale_temps, save_torch


@dataclass
class LoopSpec:
    name: str  # checkpoint stem, e.g. "cls"
    epochs: int
    lr: float
    batch_size: int
    weight_decay: float
    max_steps: int  # 0 = no budget
    fingerprint_keys: dict  # params that shape this training (for resume)
    batch_key: str = "cls_batch_size"  # the params key of batch_size (named in errors)
    sync_bn: bool = True  # under torchrun: BatchNorm statistics over the global batch
    cuda_amp: bool = True  # on CUDA: autocast (bf16, else fp16 + GradScaler) and channels_last
    #: learning-rate multipliers of the two parameter groups (:func:`param_groups`): the trunk
    #: and the freshly added heads (IRN/ReCAM train_cam.py: 1x and 10x; ReCAM train_recam.py:
    #: 0.1x for the trunk and the classifier W, 1x for the predictor W')
    lr_mults: tuple[float, float] = (1.0, 10.0)
    #: SGD momentum. The official PolyOptimizer (IRN/ReCAM misc/torchutils.py:11-12) passes its
    #: weight decay into SGD's third positional argument, which is the momentum: 1e-4 there.
    momentum: float = 0.9
    #: epochs count passes over a list of this many items (VOC train_aug: 10,582), not over
    #: the dataset trained on; 0 = over the dataset (see :func:`planned_schedule`)
    ref_items: int = 0
    #: > 0: clip the gradient norm of all parameters to it before each step (SIPE's
    #: ``clip_grad_norm_(..., max_norm=1)``; under fp16 AMP after unscaling)
    grad_clip: float = 0.0
    nesterov: bool = False  # Puzzle-CAM's PolyOptimizer runs SGD with nesterov
    bias_groups: bool = False  # Puzzle-CAM's biases apart at 2x lr, no weight decay (param_groups)


def fingerprint(d: dict) -> str:
    return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def rng_state() -> dict:
    """torch's global random state (CPU, and every GPU when there are any)."""
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def param_groups(model: nn.Module, lr: float, weight_decay: float, new_prefixes: tuple[str, ...],
                 lr_mults: tuple[float, float] = (1.0, 10.0), bias_groups: bool = False):
    """SGD groups: the trunk (every trainable parameter not named by ``new_prefixes``) at
    ``lr_mults[0] * lr`` and the freshly initialised heads (names starting with
    ``new_prefixes``) at ``lr_mults[1] * lr``, both with ``weight_decay``. Frozen parameters
    (``requires_grad`` False: the stem under
    :meth:`~wsss.models.classifier.Classifier.freeze_stem_bn`) are in no group.

    IRN/ReCAM step/train_cam.py:59-63 (lr, 10 lr) is the default; ReCAM's step/train_recam.py:71-75
    puts the trunk and the classifier W at 0.1 lr and the predictor W' at lr: ``(0.1, 1.0)``.

    ``bias_groups``: Puzzle-CAM's four groups (core/abc_modules.py ``get_parameter_groups``,
    train_classification_with_puzzle.py:218-223): the biases of each of the two groups apart, at
    twice its lr and without weight decay. A bias is a parameter whose name ends in ``bias``
    (BatchNorm's beta included); BatchNorm's gamma counts as a weight, as in the official split
    on ``'weight' in name``."""
    base, new, base_b, new_b = [], [], [], []
    for n, p in model.named_parameters():
        if p.requires_grad:
            is_new, is_bias = n.startswith(new_prefixes), bias_groups and n.rsplit(".", 1)[-1] == "bias"
            ((new_b if is_bias else new) if is_new else (base_b if is_bias else base)).append(p)
    lr0, lr1 = lr_mults[0] * lr, lr_mults[1] * lr
    groups = [
        {"params": base, "lr": lr0, "initial_lr": lr0, "weight_decay": weight_decay},
        {"params": new, "lr": lr1, "initial_lr": lr1, "weight_decay": weight_decay},
    ]
    if bias_groups:
        groups += [{"params": base_b, "lr": 2 * lr0, "initial_lr": 2 * lr0, "weight_decay": 0.0},
                   {"params": new_b, "lr": 2 * lr1, "initial_lr": 2 * lr1, "weight_decay": 0.0}]
    return groups


def frozen(params, trained_start: bool) -> bool:
    """Whether ``freeze_stem_bn`` freezes the stem and BatchNorm statistics of a trunk that starts
    from trained weights (``trained_start``) or from random ones."""
    return params.freeze_stem_bn == "always" or (params.freeze_stem_bn == "trained" and trained_start)


def make_optimizer(model: nn.Module, spec: LoopSpec, new_prefixes: tuple[str, ...]) -> torch.optim.SGD:
    """SGD over :func:`param_groups` with ``spec.momentum`` and ``spec.nesterov``."""
    return torch.optim.SGD(param_groups(model, spec.lr, spec.weight_decay, new_prefixes, spec.lr_mults,
                                        spec.bias_groups),
                           lr=spec.lr, momentum=spec.momentum, nesterov=spec.nesterov)


def planned_schedule(n_items: int, batch_size: int, epochs: int, max_steps: int,
                     ref_items: int = 0) -> tuple[int, int, int]:
    """(steps per epoch, total steps, epochs run) of :func:`train_loop`: full batches only
    (drop_last, as IRN/ReCAM), cut at ``max_steps`` when it is set.

    Total steps: ``epochs * (n // batch_size)`` with n = ``ref_items`` when it is set (a recipe
    given in epochs of a reference list, e.g. VOC's 10,582-image train_aug, reaches the same
    number of optimiser steps on a smaller list: ReCAM's 4 epochs are 4 x 661 = 2,644 steps on
    any list), else n = ``n_items``. Epochs run = passes over the ``n_items`` actually trained on
    that the steps need (the last one cut short)."""
    steps_per_epoch = max(1, n_items // batch_size)
    total = epochs * (max(1, ref_items // batch_size) if ref_items else steps_per_epoch)
    if max_steps:
        total = min(total, max_steps)
    return steps_per_epoch, total, math.ceil(total / steps_per_epoch)


class _Step(nn.Module):
    """The model and its step function as one module, so that DistributedDataParallel sees the
    whole step (whatever methods of the model ``step_fn`` calls) as its forward."""

    def __init__(self, model: nn.Module, step_fn):
        super().__init__()
        self.model, self.step_fn = model, step_fn

    def forward(self, batch, step):
        return self.step_fn(self.model, batch, step)


def _to_device(batch: tuple, device: torch.device, channels_last: bool) -> tuple:
    out = []
    for b in batch:
        if torch.is_tensor(b):
            b = b.to(device, non_blocking=True)
            if channels_last and b.dim() == 4:
                b = b.contiguous(memory_format=torch.channels_last)
        out.append(b)
    return tuple(out)


def spec_schedule(spec: LoopSpec, n_items: int) -> tuple[int, int, int]:
    """:func:`planned_schedule` of a :class:`LoopSpec` over ``n_items`` items."""
    return planned_schedule(n_items, spec.batch_size, spec.epochs, spec.max_steps, spec.ref_items)


def train_loop(
    spec: LoopSpec,
    model: nn.Module,
    dataset,
    step_fn: Callable[[nn.Module, tuple, int], tuple[torch.Tensor, dict[str, float]]],
    ckpt_dir: Path,
    device: torch.device,
    tracker,
    rng_seed: int,
    new_prefixes: tuple[str, ...] = ("classifier",),
    extra_state: dict | None = None,
    epoch_end: Callable[[nn.Module, int], dict[str, float]] | None = None,
) -> dict[str, float]:
    """Train ``model`` with ``step_fn(model, batch, step) -> (loss, logs)``; returns final logs.

    Under torchrun (:mod:`wsss.distributed`) the step runs inside DistributedDataParallel, each
    rank reading ``batch_size / world`` items of every global batch: a DistributedSampler with
    seed ``rng_seed * 1000`` and ``set_epoch(epoch)`` draws the same permutation a single process
    draws, and rank r reads its positions r, r + world, ..., so the ranks' shares of a step are
    exactly the single process's batch. DDP averages the gradients over the ranks, which equals
    the single-process gradient for a loss averaged over the batch's items; with ``spec.sync_bn``
    BatchNorm uses the global batch's statistics too. ``epoch_end``, logs, checkpoints and
    MLflow run on rank 0; epoch logs are averaged over the ranks first.
    """
    from torch.utils.data.distributed import DistributedSampler

    from . import distributed as dist

    world, main = dist.world_size(), dist.is_main()
    per_rank_batch = dist.per_rank_batch(spec.batch_size, spec.batch_key)
    amp_dtype = cuda_amp_dtype(device, spec.cuda_amp)
    channels_last = amp_dtype is not None
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if world > 1 and spec.sync_bn:
        dist.convert_sync_batchnorm(model, device)
    opt = make_optimizer(model, spec, new_prefixes)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    steps_per_epoch, total, n_epochs = spec_schedule(spec, len(dataset))
    resume_path = ckpt_dir / f"{spec.name}.resume.pt"
    fp = fingerprint(spec.fingerprint_keys)
    start_epoch, step = 0, 0
    if world > 1:  # dropout (DeepLab's ASPP) draws from torch's global RNG: one stream per rank
        torch.manual_seed(rng_seed * 1000 + 7919 * (dist.rank() + 1))
    if resume_path.exists():
        try:
            state = load_torch(resume_path, "resume checkpoint", "starting over")
        except UserError as e:  # e.g. a truncated file from an old version: not worth stopping for
            print(e)
            state = {}
        if state.get("fingerprint") == fp and "rng" in state:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            rngs = state.get("rng_ranks") or [state["rng"]]
            if len(rngs) == world:
                set_rng_state(rngs[dist.rank()])
            if "scaler" in state:
                scaler.load_state_dict(state["scaler"])
            start_epoch, step = state["epoch"], state["step"]
            if main:
                print(f"[{spec.name}] resuming from epoch {start_epoch} (step {step})")
    ddp = None
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        # static_graph: every step uses the same parameters (frozen ones have no grad; a loss
        # weighted 0 at a ramp's start is still in the graph), so DDP learns the used set in the
        # first step instead of walking the autograd graph every step as find_unused_parameters
        # does (which also warned on every run that it found nothing unused).
        ddp = DistributedDataParallel(_Step(model, step_fn), device_ids=[device.index] if device.type == "cuda" else None,
                                      static_graph=True)
    run_step = ddp if ddp is not None else (lambda batch, step_: step_fn(model, batch, step_))
    logs: dict[str, float] = {}
    sampler = DistributedSampler(dataset, num_replicas=world, rank=dist.rank(), shuffle=True,
                                 seed=rng_seed * 1000, drop_last=True)
    for epoch in range(start_epoch, n_epochs):
        if step >= total:
            break
        sampler.set_epoch(epoch)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        loader = DataLoader(dataset, batch_size=per_rank_batch, sampler=sampler, drop_last=True, num_workers=0,
                            pin_memory=device.type == "cuda")
        model.train()
        sums: dict[str, float] = {}
        n = 0
        bar = tqdm(loader, desc=f"{spec.name} epoch {epoch + 1}/{n_epochs}", leave=False, dynamic_ncols=True,
                   disable=not main)
        for batch in bar:
            if step >= total:
                break
            lr_scale = (1 - step / total) ** 0.9
            for g in opt.param_groups:
                g["lr"] = g["initial_lr"] * lr_scale
            batch = _to_device(batch, device, channels_last)
            with torch.autocast("cuda", dtype=amp_dtype) if amp_dtype else contextlib.nullcontext():
                loss, step_logs = run_step(batch, step)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if spec.grad_clip > 0:
                scaler.unscale_(opt)
                nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
            scaler.step(opt)
            scaler.update()
            step += 1
            n += 1
            for k, v in step_logs.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            bar.set_postfix(loss=f"{loss.item():.4f}")
        logs = dist.mean_over_ranks({k: v / max(n, 1) for k, v in sums.items()})
        rngs = dist.gather(rng_state())
        if main:
            if epoch_end is not None:
                logs.update(epoch_end(model, epoch))
            tracker.log_metrics(logs, step=epoch)
            model.train()
            save_torch(resume_path, {"fingerprint": fp, "model": model.state_dict(), "optimizer": opt.state_dict(),
                                     "epoch": epoch + 1, "step": step, "rng": rngs[0],
                                     "rng_ranks": rngs if world > 1 else None,
                                     **({"scaler": scaler.state_dict()} if scaler.is_enabled() else {})})
    if main:
        final = {"spec": model.spec(), "model": model.state_dict(), "steps": step,
                 "fingerprint": fp, **(extra_state or {})}
        save_torch(ckpt_dir / f"{spec.name}.pt", final)
        resume_path.unlink(missing_ok=True)
        remove_stale_temps(resume_path)
    dist.barrier()
    logs["steps"] = float(step)
    return logs


@torch.no_grad()
def classification_scores(model: nn.Module, voc, device: torch.device, batch_size: int = 32) -> dict[str, float]:
    """Mean average precision and exact-match F1 of the multi-label classifier on a split."""
    from .datasets import to_tensor

    model.eval()
    logits, labels = [], []
    for i in range(0, len(voc.ids), batch_size):
        ids = voc.ids[i:i + batch_size]
        images = [voc.image(j) for j in ids]
        # images of one split can differ in size: run one at a time when they do
        if len({im.shape for im in images}) == 1:
            x = torch.stack([to_tensor(im) for im in images]).to(device)
            logits.append(model(x).float().cpu())
        else:
            logits.extend(model(to_tensor(im)[None].to(device)).float().cpu() for im in images)
        labels.extend(torch.from_numpy(voc.labels(j)) for j in ids)
    s = torch.cat(logits).numpy() if logits[0].dim() == 2 else torch.stack(logits).numpy()
    y = torch.stack(labels).numpy()
    aps = []
    for c in range(y.shape[1]):
        if y[:, c].sum() == 0:
            continue
        order = np.argsort(-s[:, c])
        hits = y[order, c]
        prec = np.cumsum(hits) / (np.arange(len(hits)) + 1)
        aps.append(float((prec * hits).sum() / hits.sum()))
    pred = s > 0
    tp = (pred & (y > 0)).sum()
    f1 = 2 * tp / max(pred.sum() + (y > 0).sum(), 1)
    return {"val_map": float(np.mean(aps)) if aps else float("nan"), "val_f1": float(f1)}


def fit_classifier(stage: str, params, spec: LoopSpec, model: nn.Module, train, val, step_fn,
                   ckpt_dir: Path, metrics_path: Path, loss_keys: tuple[str, ...] = ("loss",),
                   new_prefixes: tuple[str, ...] = ("classifier",), method: str | None = None,
                   data=None) -> dict:
    """One image-label training stage (train-cls, train-puzzle, train-sipe): ``train_loop`` over
    the random crops of ``train`` (crop ``cls_crop``) with val mAP/F1 after every epoch, in one
    MLflow run; writes the final metrics (``loss_keys`` + val_map, val_f1, steps, n_train) as
    JSON to ``metrics_path`` and returns them."""
    from . import distributed as dist
    from .config import resolve_device
    from .datasets import ClassificationData
    from .io import write_json
    from .tracking import step_run

    device = resolve_device(params.device, params.cuda_amp)
    data = data if data is not None else ClassificationData(train, params.cls_crop, params.seed)
    with step_run(stage, params, method=method) as tracker:
        logs = train_loop(spec, model, data, step_fn, ckpt_dir, device, tracker, params.seed,
                          new_prefixes=new_prefixes, epoch_end=lambda m, e: classification_scores(m, val, device))
        metrics = {k: logs.get(k, float("nan")) for k in (*loss_keys, "val_map", "val_f1")}
        metrics.update({"steps": int(logs["steps"]), "n_train": len(train)})
        tracker.log_metrics({f"final_{k}": v for k, v in metrics.items()})
        if dist.is_main():
            write_json(metrics_path, metrics)
    return metrics
