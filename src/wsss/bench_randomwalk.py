"""Benchmark: IRN's random walk on the sparse transition matrix (:func:`wsss.randomwalk.random_walk`)
against the official dense algorithm (:func:`wsss.randomwalk.random_walk_dense`: the N x N
matrix squared ``exp_times`` times), in one run, as ratios (benchmarks/README.md).

Workload per size: a square image of ``size`` px (and VOC's 500 x 375) gives a stride-4 map of
ceil(H / 4) x ceil(W / 4) = N pixels; a seeded random boundary map (uniform^4: mostly low, as
a trained one) and ``classes`` seeded random CAMs. The affinities (``edge_to_affinity``) are
computed once, outside the timed region, and both implementations start from them: the time
is building the transition matrix plus the walk. float64 in both.

Time: wall clock of one call (best of ``repeats`` on maps up to 1,024 pixels, one call above;
one untimed warm-up call of each first). Peak memory: tracemalloc's peak over one
call (numpy and scipy allocate their arrays through the traced allocator), measured in a
second call so that tracing does not slow the timed one. The dense version runs where N is at
most ``dense_max_nodes``; above it its time is extrapolated as N^3 from the largest measured
size and its memory computed as 3 dense N x N float64 matrices (A, T and a product), marked
``estimated``.
"""

from __future__ import annotations

import math
import time
import tracemalloc
from typing import Any, Callable

import numpy as np
import torch

from .models.irn import edge_to_affinity
from .randomwalk import random_walk, random_walk_dense

VOC_SIZE = (375, 500)  # H, W of a typical VOC 2012 image


def _workload(h: int, w: int, radius: int, classes: int, seed: int):
    rng = np.random.default_rng(seed)
    edge = torch.from_numpy(rng.random((h, w)) ** 4).float()
    aff = edge_to_affinity(edge[None], radius)[0].numpy()
    cams = rng.random((classes, h, w)) * (1.0 - edge.numpy())
    return cams, aff


def _time(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    best, out = math.inf, None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def _peak_mb(fn: Callable[[], Any]) -> float:
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak / 2**20


def run_randomwalk_bench(sizes: tuple[int, ...] = (64, 96, 128, 256), voc: bool = True, radius: int = 5,
                         beta: float = 10.0, exp_times: int = 8, classes: int = 3, repeats: int = 3,
                         dense_max_nodes: int = 4096, seed: int = 0) -> dict:
    """Rows (one per size) of time and peak memory of both implementations and their ratios."""
    shapes = [(f"{s}x{s}", s, s) for s in sizes] + ([(f"{VOC_SIZE[1]}x{VOC_SIZE[0]} (VOC)", *VOC_SIZE)] if voc else [])
    rows, last_dense = [], None
    warm_x, warm_aff = _workload(4, 4, radius, classes, seed)  # imports and first-call costs, untimed
    random_walk(warm_x, warm_aff, radius, beta, exp_times)
    random_walk_dense(warm_x, warm_aff, radius, beta, exp_times)
    for name, hh, ww in shapes:
        h, w = math.ceil(hh / 4), math.ceil(ww / 4)
        n = h * w
        cams, aff = _workload(h, w, radius, classes, seed)
        sparse = lambda: random_walk(cams, aff, radius, beta, exp_times)  # noqa: E731
        dense = lambda: random_walk_dense(cams, aff, radius, beta, exp_times)  # noqa: E731
        reps = repeats if n <= 1024 else 1
        t_s, out_s = _time(sparse, reps)
        row = {"image": name, "map": f"{h}x{w}", "nodes": n, "sparse_s": t_s, "sparse_peak_mb": _peak_mb(sparse)}
        row["sparse_bytes_per_node"] = row["sparse_peak_mb"] * 2**20 / n
        if n <= dense_max_nodes:
            t_d, out_d = _time(dense, reps)
            row.update(dense_s=t_d, dense_peak_mb=_peak_mb(dense), dense_estimated=False,
                       max_abs_diff=float(np.abs(out_s - out_d).max() / max(np.abs(out_d).max(), 1e-30)))
            last_dense = (n, t_d)
        elif last_dense is not None:
            row.update(dense_s=last_dense[1] * (n / last_dense[0]) ** 3, dense_peak_mb=3 * n * n * 8 / 2**20,
                       dense_estimated=True, max_abs_diff=None)
        if "dense_s" in row:
            row["speedup"] = row["dense_s"] / row["sparse_s"]
            row["memory_ratio"] = row["dense_peak_mb"] / max(row["sparse_peak_mb"], 1e-9)
        rows.append(row)
    return {"radius": radius, "beta": beta, "exp_times": exp_times, "classes": classes,
            "threads": torch.get_num_threads(), "rows": rows}


def table(result: dict) -> str:
    """The result as a markdown table (benchmarks/README.md)."""
    lines = ["| image | stride-4 map | N | sparse s | dense s | speed-up | sparse peak MiB | dense peak MiB "
             "| memory ratio | sparse bytes / node | max rel. diff |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        est = " (est.)" if r.get("dense_estimated") else ""
        diff = f"{r['max_abs_diff']:.1e}" if r.get("max_abs_diff") is not None else "-"
        dense_s = f"{r['dense_s']:.3g}{est}" if "dense_s" in r else "-"
        dense_mb = f"{r['dense_peak_mb']:.4g}{est}" if "dense_peak_mb" in r else "-"
        lines.append(f"| {r['image']} | {r['map']} | {r['nodes']} | {r['sparse_s']:.3g} | {dense_s} "
                     f"| {r.get('speedup', float('nan')):.3g}x | {r['sparse_peak_mb']:.3g} | {dense_mb} "
                     f"| {r.get('memory_ratio', float('nan')):.3g}x | {r['sparse_bytes_per_node']:.0f} | {diff} |")
    return "\n".join(lines)
