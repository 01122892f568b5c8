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
                 bias_groups: bool = False):
    """Backbone at lr, freshly initialised heads (names starting with new_prefixes) at 10x lr
    (IRN/ReCAM ``trainable_parameters``), all with ``weight_decay``.

    ``bias_groups``: Puzzle-CAM's four groups (core/abc_modules.py ``get_parameter_groups``,
    train_classification_with_puzzle.py:218-223): backbone weights at lr with weight decay,
    backbone biases at 2x lr without, new weights at 10x lr with, new biases at 20x lr
    without. A bias is a parameter whose name ends in ``bias`` (BatchNorm's beta included);
    BatchNorm's gamma counts as a weight, as in the official split on ``'weight' in name``."""
    base, new, base_b, new_b = [], [], [], []
    for n, p in model.named_parameters():
        if p.requires_grad:
            is_new, is_bias = n.startswith(new_prefixes), bias_groups and n.rsplit(".", 1)[-1] == "bias"
            ((new_b if is_bias else new) if is_new else (base_b if is_bias else base)).append(p)
    groups = [
        {"params": base, "lr": lr, "initial_lr": lr, "weight_decay": weight_decay},
        {"params": new, "lr": 10 * lr, "initial_lr": 10 * lr, "weight_decay": weight_decay},
    ]
    if bias_groups:
        groups += [{"params": base_b, "lr": 2 * lr, "initial_lr": 2 * lr, "weight_decay": 0.0},
                   {"params": new_b, "lr": 20 * lr, "initial_lr": 20 * lr, "weight_decay": 0.0}]
    return groups


def planned_schedule(n_items: int, batch_size: int, epochs: int, max_steps: int) -> tuple[int, int, int]:
    """(steps per epoch, total steps, epochs run) of :func:`train_loop`: full batches only
    (drop_last, as IRN/ReCAM), ``epochs`` of them, cut at ``max_steps`` when it is set."""
    steps_per_epoch = max(1, n_items // batch_size)
    total = epochs * steps_per_epoch
    if max_steps:
        total = min(total, max_steps)
    return steps_per_epoch, total, math.ceil(total / steps_per_epoch)


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
    bias_groups: bool = False,
    momentum: float = 0.9,
    nesterov: bool = False,
) -> dict[str, float]:
    """Train ``model`` with ``step_fn(model, batch, step) -> (loss, logs)``; returns final logs.
    ``bias_groups``: see :func:`param_groups`; ``momentum``, ``nesterov``: SGD's."""
    model.to(device)
    opt = torch.optim.SGD(param_groups(model, spec.lr, spec.weight_decay, new_prefixes, bias_groups),
                          lr=spec.lr, momentum=momentum, nesterov=nesterov)
    steps_per_epoch, total, n_epochs = planned_schedule(len(dataset), spec.batch_size, spec.epochs, spec.max_steps)
    resume_path = ckpt_dir / f"{spec.name}.resume.pt"
    fp = fingerprint(spec.fingerprint_keys)
    start_epoch, step = 0, 0
    if resume_path.exists():
        try:
            state = load_torch(resume_path, "resume checkpoint", "starting over")
        except UserError as e:  # e.g. a truncated file from an old version: not worth stopping for
            print(e)
            state = {}
        if isinstance(state, dict) and state.get("fingerprint") == fp and "rng" in state:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            set_rng_state(state["rng"])
            start_epoch, step = state["epoch"], state["step"]
            print(f"[{spec.name}] resuming from epoch {start_epoch} (step {step})")
    logs: dict[str, float] = {}
    gen = torch.Generator().manual_seed(rng_seed)
    for epoch in range(start_epoch, n_epochs):
        if step >= total:
            break
        gen.manual_seed(rng_seed * 1000 + epoch)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        loader = DataLoader(dataset, batch_size=spec.batch_size, shuffle=True, drop_last=True,
                            generator=gen, num_workers=0)
        model.train()
        sums: dict[str, float] = {}
        n = 0
        bar = tqdm(loader, desc=f"{spec.name} epoch {epoch + 1}/{n_epochs}", leave=False, dynamic_ncols=True)
        for batch in bar:
            if step >= total:
                break
            lr_scale = (1 - step / total) ** 0.9
            for g in opt.param_groups:
                g["lr"] = g["initial_lr"] * lr_scale
            batch = tuple(b.to(device) if torch.is_tensor(b) else b for b in batch)
            loss, step_logs = step_fn(model, batch, step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            n += 1
            for k, v in step_logs.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            bar.set_postfix(loss=f"{loss.item():.4f}")
        logs = {k: v / max(n, 1) for k, v in sums.items()}
        if epoch_end is not None:
            logs.update(epoch_end(model, epoch))
        tracker.log_metrics(logs, step=epoch)
        model.train()
        save_torch(resume_path, {"fingerprint": fp, "model": model.state_dict(), "optimizer": opt.state_dict(),
                                 "epoch": epoch + 1, "step": step, "rng": rng_state()})
    final = {"spec": model.spec(), "model": model.state_dict(), "steps": step,
             "fingerprint": fp, **(extra_state or {})}
    save_torch(ckpt_dir / f"{spec.name}.pt", final)
    resume_path.unlink(missing_ok=True)
    remove_stale_temps(resume_path)
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
                   sgd: dict | None = None) -> dict:
    """One image-label training stage (train-cls, train-puzzle, train-sipe): ``train_loop`` over
    the random crops of ``train`` (crop ``cls_crop``) with val mAP/F1 after every epoch, in one
    MLflow run; writes the final metrics (``loss_keys`` + val_map, val_f1, steps, n_train) as
    JSON to ``metrics_path`` and returns them. ``sgd``: keyword arguments of :func:`train_loop`'s
    optimiser (``bias_groups``, ``momentum``, ``nesterov``)."""
    from .config import resolve_device
    from .datasets import ClassificationData
    from .io import write_json
    from .tracking import step_run

    device = resolve_device(params.device)
    data = ClassificationData(train, params.cls_crop, params.seed)
    with step_run(stage, params, method=method) as tracker:
        logs = train_loop(spec, model, data, step_fn, ckpt_dir, device, tracker, params.seed,
                          new_prefixes=new_prefixes, epoch_end=lambda m, e: classification_scores(m, val, device),
                          **(sgd or {}))
        metrics = {k: logs.get(k, float("nan")) for k in (*loss_keys, "val_map", "val_f1")}
        metrics.update({"steps": int(logs["steps"]), "n_train": len(train)})
        tracker.log_metrics({f"final_{k}": v for k, v in metrics.items()})
        write_json(metrics_path, metrics)
    return metrics
