"""Benchmark: the cost of DSRG's CRF-in-the-loop training against plain train-seg, as a ratio
measured in one run (``python cli.py bench dsrg``; benchmarks/README.md).

Both time the same DeepLab (the default ``seg_*`` network: ResNet-18, v3+ decoder, output
stride 16) on the same fixed random images, with SGD at ``seg_lr``:

* **plain**: train-seg's step, pixel-wise cross-entropy on a full-resolution label map;
* **dsrg**: train-dsrg's step (:func:`wsss.steps.train_dsrg.dsrg_step`): softmax at output
  resolution, a dense CRF per image on a process pool of ``workers``, seeded region growing from
  random sparse seeds, seed loss + boundary loss.

A step's time is forward, loss, backward and optimiser step; the median over ``steps`` timed
steps after two warm-up steps of each, the two kinds interleaved so that machine load hits both
alike. ``ratio`` = dsrg / plain in wall-clock time; ``cpu_ratio`` the same in CPU time of this
process (``time.process_time``, all its threads), which other jobs on a shared machine barely
disturb. With ``workers`` 1 the CRF runs in this process, so its CPU time is counted; with a
pool it runs in the workers and only the wall-clock ratio includes it.
"""

from __future__ import annotations

import contextlib
import os
import time

import numpy as np
import torch

from .config import Params
from .voc import NUM_LABELS, VOID


def _batch(batch: int, size: int, seed: int = 0):
    from .datasets import to_tensor

    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    x = torch.stack([to_tensor(im) for im in images])
    labels = rng.integers(0, NUM_LABELS, (batch, size, size))
    seeds = np.where(rng.random((batch, size, size)) < 0.3, labels % 3, VOID)  # sparse seeds of 0, 1, 2
    present = np.zeros((batch, NUM_LABELS), bool)
    present[:, :3] = True
    valid = np.ones((batch, size, size), bool)
    dsrg = (x, torch.from_numpy(images), torch.from_numpy(seeds), torch.from_numpy(labels), torch.from_numpy(valid),
            torch.from_numpy(present))
    return (x, torch.from_numpy(labels)), dsrg


def run(steps: int = 10, batch: int = 16, size: int = 96, workers: int = 0, threads: int = 2) -> dict:
    from .models.deeplab import build_deeplab
    from .steps.crf import pool_context
    from .steps.train_dsrg import GrowthCurve, _init_pool, ce_step, dsrg_step

    params = Params(seg_crop=size, seg_batch_size=batch)
    n_workers = workers if workers > 0 else (os.cpu_count() or 1)
    pool_cm = (pool_context().Pool(n_workers, initializer=_init_pool, initargs=(params,))
               if n_workers > 1 else contextlib.nullcontext())
    with pool_cm as pool:
        _init_pool(params)
        torch.set_num_threads(threads)
        torch.manual_seed(0)
        model = build_deeplab(params).train()
        opt = torch.optim.SGD(model.parameters(), lr=params.seg_lr, momentum=0.9)
        plain_batch, dsrg_batch = _batch(batch, size)
        fns = {"plain": (ce_step, plain_batch), "dsrg": (dsrg_step(pool, GrowthCurve(), 1), dsrg_batch)}
        times: dict[str, list[float]] = {k: [] for k in fns}
        cpu: dict[str, list[float]] = {k: [] for k in fns}
        for i in range(steps + 2):
            for kind, (fn, b) in fns.items():
                t0, c0 = time.perf_counter(), time.process_time()
                loss, _ = fn(model, b, i)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if i >= 2:
                    times[kind].append(time.perf_counter() - t0)
                    cpu[kind].append(time.process_time() - c0)
    plain, dsrg = (float(np.median(times[k])) for k in ("plain", "dsrg"))
    plain_cpu, dsrg_cpu = (float(np.median(cpu[k])) for k in ("plain", "dsrg"))
    return {"plain_step_s": plain, "dsrg_step_s": dsrg, "ratio": dsrg / plain, "plain_step_cpu_s": plain_cpu,
            "dsrg_step_cpu_s": dsrg_cpu, "cpu_ratio": dsrg_cpu / plain_cpu, "steps": steps, "batch": batch,
            "size": size, "workers": n_workers, "threads": threads}
