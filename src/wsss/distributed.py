"""Running a step on several processes with PyTorch's own distributed engine (torchrun).

A step runs distributed when torchrun started it (``WORLD_SIZE`` > 1 in the environment), on
one machine or across nodes with torchrun's rendezvous. ``python cli.py <step>`` with
``nproc`` > 1 in params.yaml starts torchrun itself (:func:`torchrun_args`), so dvc.yaml's
commands stay the same and ``dvc exp run -S nproc=4`` works.

- Training stages (:func:`wsss.trainer.train_loop`) wrap the model in
  ``DistributedDataParallel``; each rank reads its share of every batch through a
  ``DistributedSampler`` seeded per epoch from ``seed`` (the global batch stays
  ``*_batch_size``, split over the ranks), rank 0 alone writes checkpoints, metrics and MLflow.
- Per-image stages (seeds, eval-seg) :func:`shard` the ids over the ranks; rank 0 merges.
- Backend: nccl on CUDA (one GPU per local rank), gloo on CPU.

Everything here is a no-op with one process, so a single run takes exactly the code path it
took before distributed training existed (same bits).
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

#: set by torchrun in every process it starts
_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK")


def launched() -> bool:
    """True in a process torchrun started with more than one process in all."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def init(device: str) -> None:
    """Join the process group torchrun describes (once per process). ``device`` is the params
    key's value: nccl when it resolves to CUDA, gloo otherwise."""
    if not launched() or active():
        return
    _die_with_launcher()
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank())
    dist.init_process_group("nccl" if use_cuda else "gloo")


def _die_with_launcher() -> None:
    """torchrun starts each worker in a session of its own, so a ``kill -9`` of the launcher
    (a user, DVC, the OOM killer) would leave the workers training on as orphans, racing the
    rerun for the checkpoints. On Linux ask the kernel to kill this worker when its launcher dies
    (prctl PR_SET_PDEATHSIG)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the launcher died before the request took effect
        os._exit(1)


def shutdown() -> None:
    if active():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if active():
        dist.barrier()


def shard(items: Sequence[T]) -> list[T]:
    """This rank's share of ``items``: every ``world_size``-th item from ``rank`` on, so each
    item lands on exactly one rank whatever the count."""
    return list(items[rank()::world_size()])


def gather(obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` as a list ordered by rank on rank 0 (None on the others); one
    process: ``[obj]``."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world_size() if is_main() else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast(obj: T) -> T:
    """Rank 0's ``obj`` on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextlib.contextmanager
def atomic_dir_all_ranks(path: str | os.PathLike) -> Iterator[Path]:
    """:func:`wsss.io.atomic_dir` shared by the ranks: rank 0 makes the temporary folder, every
    rank writes its shard into it, rank 0 swaps it in once all have finished. Across machines the
    outputs folder must be shared (as DVC's workspace is)."""
    from .io import atomic_dir

    if not active():
        with atomic_dir(path) as tmp:
            yield tmp
        return
    if is_main():
        with atomic_dir(path) as tmp:
            broadcast(str(tmp))
            yield tmp
            barrier()
    else:
        tmp = Path(broadcast(None))
        yield tmp
        barrier()


def sum_over_ranks(value):
    """The sum of ``value`` (a number or numpy array) over the ranks, on rank 0 (None elsewhere)."""
    parts = gather(value)
    if parts is None:
        return None
    total = parts[0]
    for p in parts[1:]:
        total = total + p
    return total


def sum_all_ranks(value: float) -> float:
    """The sum of a number over the ranks, on every rank."""
    if not active():
        return value
    t = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item())


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """The mean of each value over the ranks (the same keys on every rank)."""
    if not active() or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return {k: float(v) / world_size() for k, v in zip(keys, t.tolist())}


def per_rank_batch(batch_size: int, key: str) -> int:
    """The share of a global batch each rank reads; the global batch must split evenly."""
    from .errors import UserError

    w = world_size()
    if batch_size % w:
        raise UserError(f"params.yaml: key '{key}' = {batch_size} does not split over nproc = {w} processes; "
                        f"choose a multiple of {w}")
    return batch_size // w


def torchrun_args(nproc: int, argv: Sequence[str]) -> list[str] | None:
    """torchrun's arguments to re-run ``argv`` (script and its arguments) on ``nproc`` processes
    of this machine, or None when this process runs the step itself (``nproc`` 1, or already
    under torchrun: across machines, start torchrun yourself with its rendezvous options)."""
    if nproc <= 1 or any(k in os.environ for k in _ENV):
        return None
    return ["--standalone", f"--nproc_per_node={nproc}", *argv]


class GlooSyncBatchNorm(torch.nn.BatchNorm2d):
    """BatchNorm2d normalising with the statistics of the global batch (every rank's share), for
    CPU / gloo, where ``torch.nn.SyncBatchNorm`` refuses to run (it supports GPUs only).

    Training forward: per-channel sum, sum of squares and count are summed over the ranks with
    ``torch.distributed.nn.functional.all_reduce``, which is differentiable (its backward sums the
    gradients over the ranks), so each rank's input receives the gradient of every rank's loss
    through the shared mean and variance, as torch's SyncBatchNorm does on CUDA. Sums are taken
    in float64 (var = E[x^2] - mean^2 would otherwise lose digits). Running statistics follow
    BatchNorm2d (unbiased variance, ``momentum``). Eval mode, or one process: plain BatchNorm2d.
    The state dict is BatchNorm2d's, so checkpoints load into the plain model.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and active()):
            return super().forward(x)
        import warnings

        with warnings.catch_warnings():  # its successor in torch._functional_collectives is private
            warnings.simplefilter("ignore", FutureWarning)
            from torch.distributed.nn.functional import all_reduce

        c = x.shape[1]
        xd = x.double()
        count = xd.new_tensor([x.numel() // c])
        stats = all_reduce(torch.cat([xd.sum((0, 2, 3)), (xd * xd).sum((0, 2, 3)), count]))
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean * mean).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                f = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - f).add_(f * mean.to(self.running_mean.dtype))
                unbiased = var * n / (n - 1).clamp_min(1)
                self.running_var.mul_(1 - f).add_(f * unbiased.to(self.running_var.dtype))
        scale = torch.rsqrt(var + self.eps).to(x.dtype)
        y = (x - mean.to(x.dtype)[None, :, None, None]) * scale[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y


def convert_sync_batchnorm(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Every BatchNorm2d of ``model`` computing its training statistics over all ranks: torch's
    SyncBatchNorm on CUDA, :class:`GlooSyncBatchNorm` on CPU. Same parameters and buffers."""
    if device.type == "cuda":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if type(child) is torch.nn.BatchNorm2d:
            new = GlooSyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                    child.track_running_stats).to(child.weight.device if child.affine else "cpu")
            new.load_state_dict(child.state_dict())
            new.train(child.training)
            for p_old, p_new in zip(child.parameters(), new.parameters()):
                p_new.requires_grad_(p_old.requires_grad)
            setattr(model, name, new)
        else:
            convert_sync_batchnorm(child, device)
    return model
