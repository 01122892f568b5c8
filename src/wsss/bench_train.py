"""Training and CAM throughput benchmarks (``python cli.py bench train``), each a ratio of two
configurations measured in the same run on the same machine.

* ``--mode cpu``: the classifier's training step (:func:`wsss.trainer.train_loop`, the code the
  pipeline runs) as 2 DDP processes x 1 thread (torchrun, gloo) against 1 process x 2 threads,
  the same global batch and model. Each configuration runs in fresh processes; throughput is
  the global batch over the median step time after warm-up, memory the peak resident set
  (``VmHWM``) of each process, summed over the ranks.
* ``--mode gpu``: the same step on CUDA in fp32 (``cuda_amp: false``) against autocast +
  channels_last + cudnn.benchmark (``cuda_amp: true``), ResNet-50 at 512 px by default (the
  VOC recipe's crop); peak memory from ``torch.cuda.max_memory_allocated``. Then Score-CAM's
  seconds per image on the same network and size against its FLOP floor: one masked forward
  per channel of the last stage (2048 for ResNet-50), each costing the FLOPs that
  ``torch.utils.flop_counter`` counts for one forward, divided by the device's dense bf16 peak.

A step's time is the gap between two consecutive calls of the step function (forward,
backward, optimiser step, and on CUDA a synchronise before the clock is read).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import Dataset

#: dense bf16 tensor-core peaks (TFLOP/s, no sparsity) of the GPUs this was run on
BF16_PEAK_TFLOPS = {"H100 80GB HBM3": 989.0, "H100": 989.0, "H200": 989.0, "A100": 312.0}


class RandomImages(Dataset):
    """``n`` fixed random (image, multi-hot label, index) triples, as ClassificationData yields."""

    def __init__(self, n: int, size: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, size, size, generator=g)
        self.y = (torch.rand(n, 20, generator=g) < 0.15).float()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i], i


class _NoTracker:
    active = False

    def log_metrics(self, *a, **k) -> None:
        pass


def peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM; ru_maxrss where /proc is missing)."""
    from .bench import _read_status_kb

    kb = _read_status_kb("VmHWM")
    if kb is None:
        import resource

        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024


def measure_training(backbone: str, size: int, batch: int, steps: int, warmup: int, device: str,
                     cuda_amp: bool, output_stride: int = 16, seed: int = 0) -> dict:
    """Median step time of ``steps`` training steps of the classifier (after ``warmup``) in this
    process (one rank of a torchrun group when run under one)."""
    import torch.nn.functional as F

    from . import distributed
    from .config import resolve_device
    from .models.classifier import Classifier
    from .trainer import LoopSpec, train_loop

    distributed.init(device)
    dev = resolve_device(device, cuda_amp)
    torch.manual_seed(seed)
    model = Classifier(backbone, output_stride, "none")
    stamps: list[float] = []

    def step_fn(m, b, step):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        stamps.append(time.perf_counter())
        x, y, _ = b
        loss = F.multilabel_soft_margin_loss(m(x), y)
        return loss, {"loss": loss.item()}

    n_steps = steps + warmup + 1
    data = RandomImages(n_steps * batch, size, seed)
    spec = LoopSpec("bench", 1, 0.01, batch, 1e-4, n_steps, {}, batch_key="--batch", sync_bn=True,
                    cuda_amp=cuda_amp)
    if dev.type == "cuda":
        # the memory-stat calls do not start CUDA themselves: before any allocation they fail
        # with "Invalid device argument" (seen on an H100, torch 2.11)
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats(dev)
    with tempfile.TemporaryDirectory() as tmp:
        train_loop(spec, model, data, step_fn, Path(tmp), dev, _NoTracker(), seed)
    gaps = [b - a for a, b in zip(stamps, stamps[1:])][warmup:]
    out = {"step_s": statistics.median(gaps), "steps_timed": len(gaps), "peak_rss_mib": peak_rss_mib()}
    if dev.type == "cuda":
        out["peak_cuda_mib"] = torch.cuda.max_memory_allocated(dev) / 2**20
        out["device_name"] = torch.cuda.get_device_name(dev)
    out["world"] = distributed.world_size()
    return out


def _worker(argv: list[str]) -> None:
    """``python -m wsss.bench_train worker OUT backbone size batch steps warmup device amp threads``."""
    out, backbone, size, batch, steps, warmup, device, amp, threads = argv
    torch.set_num_threads(int(threads))
    from . import distributed

    r = measure_training(backbone, int(size), int(batch), int(steps), int(warmup), device, amp == "1")
    parts = distributed.gather(r)
    if distributed.is_main():
        Path(out).write_text(json.dumps(parts))
    distributed.shutdown()


def _spawn(nproc: int, threads: int, backbone: str, size: int, batch: int, steps: int, warmup: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        args = ["-m", "wsss.bench_train", "worker", str(out), backbone, str(size), str(batch), str(steps),
                str(warmup), "cpu", "0", str(threads)]
        head = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                     f"--nproc_per_node={nproc}"]
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), WSSS_TRACKING="0")
        for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
            env.pop(k, None)
        subprocess.run([*head, *args], check=True, env=env, capture_output=True, text=True)
        return json.loads(out.read_text())


def run_cpu(backbone: str = "resnet18", size: int = 96, batch: int = 16, steps: int = 30, warmup: int = 5) -> dict:
    """2 DDP processes x 1 thread against 1 process x 2 threads, same global batch."""
    single = _spawn(1, 2, backbone, size, batch, steps, warmup)
    ddp = _spawn(2, 1, backbone, size, batch, steps, warmup)

    def summary(parts):
        step = max(p["step_s"] for p in parts)  # a DDP step ends when the slowest rank does
        return {"step_s": step, "images_per_s": batch / step, "peak_rss_mib_total": sum(p["peak_rss_mib"] for p in parts),
                "processes": len(parts)}

    s, d = summary(single), summary(ddp)
    return {"workload": {"backbone": backbone, "size": size, "global_batch": batch, "steps_timed": steps,
                         "cpu_cores": os.cpu_count()},
            "one_process_two_threads": s, "ddp_two_processes_one_thread": d,
            "throughput_ratio_ddp_over_single": d["images_per_s"] / s["images_per_s"],
            "memory_ratio_ddp_over_single": d["peak_rss_mib_total"] / s["peak_rss_mib_total"]}


def scorecam_seconds_per_image(backbone: str, size: int, n_images: int, chunk: int, device: str,
                               cuda_amp: bool = True) -> dict:
    """Score-CAM (ours, default settings) on random images of ``size`` with 2 classes each, and
    its FLOP floor: channels x FLOPs of one forward at ``size``."""
    from torch.utils.flop_counter import FlopCounterMode

    from .cams.scorecam import ScoreCAM
    from .config import Params, resolve_device
    from .models.backbone import normalize
    from .models.classifier import Classifier

    dev = resolve_device(device, cuda_amp)
    torch.manual_seed(0)
    model = Classifier(backbone, 16, "none").to(dev).eval()
    x = normalize(torch.rand(n_images + 1, 3, size, size, generator=torch.Generator().manual_seed(1))).to(dev)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        feats = model.features(x[:1])
        model.head(feats)
    flops = fc.get_total_flops()
    channels = feats.shape[1]
    cam = ScoreCAM(model, Params(device=device, cuda_amp=cuda_amp, scorecam_chunk=chunk))
    classes = torch.tensor([3, 14], device=dev)
    cam.maps(x[:1], classes)  # warm-up (cudnn.benchmark picks its kernels here)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t = time.perf_counter()
    for i in range(1, n_images + 1):
        cam.maps(x[i:i + 1], classes)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    s_per_image = (time.perf_counter() - t) / n_images
    out = {"backbone": backbone, "size": size, "chunk": chunk, "channels": channels,
           "gflop_per_forward": flops / 1e9, "tflop_per_image": channels * flops / 1e12,
           "seconds_per_image": s_per_image, "achieved_tflops": channels * flops / 1e12 / s_per_image}
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)
        out["device_name"] = name
        if peak:
            out["bf16_peak_tflops"] = peak
            out["floor_seconds_per_image"] = channels * flops / 1e12 / peak
            out["fraction_of_peak"] = out["achieved_tflops"] / peak
    return out


def run_gpu(backbone: str = "resnet50", size: int = 512, batch: int = 16, steps: int = 20, warmup: int = 5,
            scorecam_images: int = 2, scorecam_chunk: int = 128) -> dict:
    fp32 = measure_training(backbone, size, batch, steps, warmup, "cuda", cuda_amp=False)
    torch.cuda.empty_cache()
    amp = measure_training(backbone, size, batch, steps, warmup, "cuda", cuda_amp=True)
    torch.cuda.empty_cache()
    sc = scorecam_seconds_per_image(backbone, size, scorecam_images, scorecam_chunk, "cuda")
    return {"workload": {"backbone": backbone, "size": size, "batch": batch, "steps_timed": steps},
            "fp32": fp32, "amp_channels_last": amp, "speedup_amp_over_fp32": fp32["step_s"] / amp["step_s"],
            "memory_ratio_amp_over_fp32": amp["peak_cuda_mib"] / fp32["peak_cuda_mib"],
            "devices": torch.cuda.device_count(), "scorecam": sc}


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        _worker(sys.argv[2:])
