"""Step ``seeds``: class activation maps for the classes present in each image of
``seed_split``, by the chosen method (see :mod:`wsss.cams.registry`), multi-scale + flip.

Each image gets ``outputs/seeds/<method>/<id>.npz`` holding ``keys`` (int64 class indices
0..19 of the present classes) and ``cams`` (float32 (n, H, W), each map divided by its max, so in
[0, 1], at image size); a method with a background map of its own (SIPE's background IS-CAM,
``cams_with_background``) adds ``bg`` (float32 (H, W) in [0, 1]). Plain arrays only, nothing
pickled. The folder is built under a
temporary name and swapped in when complete.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
from tqdm import tqdm

from ..config import Params, resolve_device, seed_everything
from ..distributed import atomic_dir_all_ranks
from ..io import save_npz
from ..tracking import step_run
from .common import method_checkpoint, open_split, out_dir, summary


def load_model(method: str, device):
    """Load the checkpoint a method's seeds are computed from; ``load_any`` dispatches on the
    checkpoint's kind (plain classifier or SIPE)."""
    from ..models.sipe import load_any

    return load_any(method_checkpoint(method), device)[0]


def method_params(params: Params, method: str) -> Params:
    """Score-CAM costs one forward per channel per pass, so it has its own scales/flip keys."""
    if method == "scorecam":
        return dataclasses.replace(params, cam_scales=params.scorecam_scales, cam_flip=params.scorecam_flip)
    return params


def write_seeds(cam, voc, dest, desc: str) -> int:
    """One ``<id>.npz`` per image of ``voc`` into ``dest``: the maps of ``cam`` for its present
    classes; returns the number of maps. Under torchrun each rank writes its shard of the ids
    (:func:`wsss.distributed.shard`; each image's maps do not depend on the others, so the files
    are those of one process) and the count is summed on rank 0."""
    from .. import distributed

    n_maps = 0
    with_bg = hasattr(cam, "cams_with_background")  # a method with its own background map (SIPE)
    for id_ in tqdm(distributed.shard(voc.ids), desc=desc, dynamic_ncols=True, leave=False,
                    disable=not distributed.is_main()):
        keys = np.flatnonzero(voc.labels(id_) > 0).astype(np.int64)
        if with_bg:
            maps, bg = cam.cams_with_background([voc.image(id_)], [keys.tolist()])[0]
            save_npz(dest / f"{id_}.npz", keys=keys, cams=maps.astype(np.float32), bg=bg.astype(np.float32))
        else:
            maps = cam(voc.image(id_), keys.tolist()).astype(np.float32)
            save_npz(dest / f"{id_}.npz", keys=keys, cams=maps)
        n_maps += len(keys)
    return distributed.sum_over_ranks(n_maps)


def run(params: Params, method: str) -> dict:
    from ..cams.registry import get_method

    seed_everything(params.seed, params.threads)
    device = resolve_device(params.device, params.cuda_amp)
    voc = open_split(params, params.seed_split)
    model = load_model(method, device)
    cam = get_method(method, model, method_params(params, method))
    start = time.perf_counter()
    with step_run("seeds", params, method=method) as tracker, atomic_dir_all_ranks(out_dir("seeds", method)) as tmp:
        n_maps = write_seeds(cam, voc, tmp, f"seeds {method}")
        seconds = time.perf_counter() - start
        tracker.log_metrics({"n_images": len(voc.ids), "n_maps": n_maps,
                             "seconds": seconds, "seconds_per_image": seconds / max(len(voc.ids), 1)})
    metrics = {"n_images": len(voc.ids), "n_maps": n_maps}
    summary("seeds", f"{method}: {len(voc.ids)} images, {n_maps} maps in {seconds:.1f}s "
                     f"({seconds / max(len(voc.ids), 1):.2f}s/image) -> {out_dir('seeds', method)}")
    return metrics
