"""Benchmarks: our fast Score-CAM against the ``grad-cam`` package's ScoreCAM.

:func:`run_scorecam_bench` times, on the same randomly initialised classifier, images,
classes and target layer (the last stage, ``layer4``, which is also ``model.features``):

* reference: ``pytorch_grad_cam.ScoreCAM`` (grad-cam 1.5.7), one call per (image, present
  class) with ``ClassifierOutputTarget(c)``, ``batch_size`` = our chunk. Each call masks
  the image with all C channel maps at once and forwards them in batches of ``chunk``;
* ours: :class:`wsss.cams.ScoreCAM` ``.maps`` (the default settings: sigmoid score,
  baseline on), one call per image for all its present classes: one chunked pass over the
  C channels, every class column read from each masked forward.

Both do the same kind of work per masked forward (a full classifier forward of a
``chunk`` x 3 x H x W batch); the reference repeats the whole pass for each class, so the
expected speed-up is about the mean number of classes per image (2.5 here), plus what the
reference loses to per-output ``.item()`` and to materialising all C masked images.
The reference's tqdm progress bars are silenced for the run (that only helps it).

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` growth over the memory in use
before the run. On CPU (where torch's allocator is invisible to tracemalloc) each
implementation runs in a fresh spawned process on the first image (all images have the
same size, so one image's peak is the run's peak): the kernel's peak-RSS mark is reset
(``/proc/self/clear_refs``) just before the run and the peak resident set
(``VmHWM``) minus the resident set before the run is reported. The child sets glibc's
``MALLOC_MMAP_THRESHOLD_`` to 64 KiB so that freed large tensors leave the resident set
at once instead of being kept in the heap. Without ``/proc`` the growth of
``ru_maxrss`` is used instead (an upper bound).
"""

from __future__ import annotations

import contextlib
import copy
import gc
import multiprocessing as mp
import os
import random
import resource
import time
from typing import Any

import torch

from .config import Params, resolve_device
from .voc import NUM_CLASSES


# ---------------------------------------------------------------------- the workload
def _setup(n_images: int, size: int, backbone: str, device: torch.device, seed: int):
    from .models.backbone import normalize
    from .models.classifier import Classifier

    torch.manual_seed(seed)
    model = Classifier(backbone, 16, "none").to(device).eval()
    g = torch.Generator().manual_seed(seed + 1)
    x = normalize(torch.rand((n_images, 3, size, size), generator=g)).to(device)
    rng = random.Random(seed)
    classes = [sorted(rng.sample(range(NUM_CLASSES), rng.choice([2, 3]))) for _ in range(n_images)]
    return model, x, classes


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _run_ours(model, x, classes, chunk: int, device: torch.device) -> None:
    from .cams.scorecam import ScoreCAM

    # its own copy: the fast path converts weights to channels_last, the reference keeps the
    # memory format a user of the grad-cam package would have
    method = ScoreCAM(copy.deepcopy(model), Params(), chunk=chunk, device=device)
    for i, cls in enumerate(classes):
        method.maps(x[i:i + 1], torch.tensor(cls, device=device))
    _sync(device)


@contextlib.contextmanager
def _quiet_tqdm():
    """Replace tqdm in the grad-cam ScoreCAM module by a pass-through while running."""
    import pytorch_grad_cam.score_cam as sc

    class _NoBar:
        @staticmethod
        def tqdm(iterable, *args, **kwargs):
            return iterable

    old = sc.tqdm
    sc.tqdm = _NoBar
    try:
        yield
    finally:
        sc.tqdm = old


def _run_reference(model, x, classes, chunk: int, device: torch.device) -> None:
    from pytorch_grad_cam import ScoreCAM as PGCScoreCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    with _quiet_tqdm(), PGCScoreCAM(model=model, target_layers=[model.backbone.layer4]) as cam:
        cam.batch_size = chunk
        for i, cls in enumerate(classes):
            for c in cls:
                cam(input_tensor=x[i:i + 1], targets=[ClassifierOutputTarget(c)])
    _sync(device)


def _run_ours_layer(model, x, classes, chunk: int, device: torch.device, layer: str) -> None:
    from .cams.scorecam import ScoreCAM

    method = ScoreCAM(copy.deepcopy(model), Params(), chunk=chunk, device=device, target_layer=layer)
    for i, cls in enumerate(classes):
        method.maps(x[i:i + 1], torch.tensor(cls, device=device))
    _sync(device)


_IMPLS = {"ours": _run_ours, "reference": _run_reference}


# ---------------------------------------------------------------------- peak memory
def _read_status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _cpu_peak_child(impl: str, cfg: dict[str, Any], conn) -> None:
    try:
        device = torch.device("cpu")
        model, x, classes = _setup(cfg["n_images"], cfg["size"], cfg["backbone"], device, cfg["seed"])
        x, classes = x[:1], classes[:1]
        import pytorch_grad_cam  # noqa: F401  imports are not part of either run
        import pytorch_grad_cam.utils.model_targets  # noqa: F401

        from .cams import scorecam  # noqa: F401
        with torch.inference_mode():  # load the kernels once (one image, not a chunk)
            model(x)
        gc.collect()
        exact = _reset_hwm() and _read_status_kb("VmHWM") is not None
        before_kb = _read_status_kb("VmRSS") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if impl.startswith("layer:"):
            _run_ours_layer(model, x, classes, cfg["chunk"], device, impl.split(":", 1)[1])
        else:
            _IMPLS[impl](model, x, classes, cfg["chunk"], device)
        peak_kb = _read_status_kb("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        conn.send({"peak_mb": max(0, peak_kb - before_kb) / 1024.0,
                   "method": "VmHWM-reset" if exact else "ru_maxrss"})
    except BaseException as e:  # report, do not hang the parent
        conn.send({"error": f"{type(e).__name__}: {e}"})
    finally:
        conn.close()


def _cpu_peak_mb(impl: str, cfg: dict[str, Any]) -> tuple[float, str]:
    """Peak resident-set growth (MiB) of ``impl`` in a fresh spawned process."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    old = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    try:
        proc = ctx.Process(target=_cpu_peak_child, args=(impl, cfg, child))
        proc.start()
    finally:
        if old is None:
            os.environ.pop("MALLOC_MMAP_THRESHOLD_", None)
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = old
    child.close()
    try:
        res = parent.recv()
    except EOFError:
        res = {"error": "child process died"}
    proc.join()
    if "error" in res:
        raise RuntimeError(f"memory measurement of {impl} failed: {res['error']}")
    return res["peak_mb"], res["method"]


def _cuda_peak_mb(fn, device: torch.device) -> float:
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


# ---------------------------------------------------------------------- benchmarks
def run_scorecam_bench(n_images: int = 4, size: int = 96, backbone: str = "resnet18", device: str = "cpu",
                       repeats: int = 1, chunk: int = 64, seed: int = 0,
                       measure_memory: bool = True) -> dict[str, Any]:
    """Time our fast Score-CAM against grad-cam's ScoreCAM on the same work; see module doc.

    Returns ``ours_s``, ``reference_s`` (best of ``repeats`` wall-clock seconds for all
    images and classes, after one untimed warm-up call each; the two are run alternately
    image by image), ``speedup`` = reference_s / ours_s, the same in process CPU seconds
    (``ours_cpu_s``, ``reference_cpu_s``, ``speedup_cpu``: steadier on a shared machine),
    ``peak_mem_ours_mb``, ``peak_mem_reference_mb`` (MiB; None when ``measure_memory`` is
    off) and the settings.
    """
    dev = resolve_device(device)
    model, x, classes = _setup(n_images, size, backbone, dev, seed)
    # warm-up (untimed): first image, first class
    _run_ours(model, x[:1], [classes[0][:1]], chunk, dev)
    _run_reference(model, x[:1], [classes[0][:1]], chunk, dev)
    # interleaved image by image, so that a change of machine load hits both alike
    wall = {name: [0.0] * max(1, repeats) for name in _IMPLS}
    cpu = {name: [0.0] * max(1, repeats) for name in _IMPLS}
    for r in range(max(1, repeats)):
        for i in range(n_images):
            for name, fn in _IMPLS.items():
                c0, t0 = time.process_time(), time.perf_counter()
                fn(model, x[i:i + 1], classes[i:i + 1], chunk, dev)
                wall[name][r] += time.perf_counter() - t0
                cpu[name][r] += time.process_time() - c0
    ours_s, ref_s = min(wall["ours"]), min(wall["reference"])
    ours_cpu, ref_cpu = min(cpu["ours"]), min(cpu["reference"])
    mem: dict[str, float | None] = {"ours": None, "reference": None}
    mem_method = "off"
    if measure_memory:
        if dev.type == "cuda":
            for name, fn in _IMPLS.items():
                mem[name] = _cuda_peak_mb(lambda fn=fn: fn(model, x, classes, chunk, dev), dev)
            mem_method = "cuda.max_memory_allocated"
        else:
            cfg = {"n_images": n_images, "size": size, "backbone": backbone, "seed": seed, "chunk": chunk}
            for name in _IMPLS:
                mem[name], mem_method = _cpu_peak_mb(name, cfg)
    channels = model.backbone.out_channels
    return {
        "ours_s": ours_s,
        "reference_s": ref_s,
        "speedup": ref_s / ours_s,
        "ours_cpu_s": ours_cpu,
        "reference_cpu_s": ref_cpu,
        "speedup_cpu": ref_cpu / ours_cpu,
        "peak_mem_ours_mb": mem["ours"],
        "peak_mem_reference_mb": mem["reference"],
        "n_images": n_images,
        "n_maps": sum(len(c) for c in classes),
        "size": size,
        "backbone": backbone,
        "channels": channels,
        "chunk": chunk,
        "repeats": max(1, repeats),
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "memory_method": mem_method,
    }


def run_scorecam_memory_scaling(size: int = 96, backbone: str = "resnet18", device: str = "cpu",
                                chunk: int = 16, layers: tuple[str, ...] = ("layer1", "layer2", "layer3", "layer4"),
                                seed: int = 0) -> dict[str, Any]:
    """Peak memory of our fast Score-CAM on one image for target layers of growing width.

    The model, image, classes and chunk are fixed; only the target layer (hence the
    number of channels C, i.e. of masked images) changes. Returns per layer
    ``<layer>_channels``, ``<layer>_peak_mb`` and ``<layer>_all_masks_mb``: what holding all
    C masked images at once would take (C x 3 x H x W float32, the reference's approach),
    for contrast.
    """
    dev = resolve_device(device)
    out: dict[str, Any] = {"size": size, "backbone": backbone, "chunk": chunk, "device": str(dev)}
    cfg = {"n_images": 1, "size": size, "backbone": backbone, "seed": seed, "chunk": chunk}
    model = x = classes = None
    if dev.type == "cuda":
        model, x, classes = _setup(1, size, backbone, dev, seed)
    from .models.classifier import Classifier

    widths = Classifier(backbone, 16, "none").backbone.channels
    for layer in layers:
        C = widths[int(layer[-1]) - 1]
        if dev.type == "cuda":
            peak = _cuda_peak_mb(lambda layer=layer: _run_ours_layer(model, x, classes, chunk, dev, layer), dev)
            method = "cuda.max_memory_allocated"
        else:
            peak, method = _cpu_peak_mb(f"layer:{layer}", cfg)
        out[f"{layer}_channels"] = C
        out[f"{layer}_peak_mb"] = peak
        out[f"{layer}_all_masks_mb"] = C * 3 * size * size * 4 / 2**20
        out["memory_method"] = method
    return out


def _main() -> None:  # python -m wsss.bench
    import json

    print(json.dumps(run_scorecam_bench(), indent=2))
    print(json.dumps(run_scorecam_memory_scaling(), indent=2))


if __name__ == "__main__":
    _main()
