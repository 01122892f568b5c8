"""Side-by-side seeds of several methods on the same images (``python cli.py compare``).

One row per image: the image, its ground truth, then for every method the seed heatmap (max
over the present classes, after each method's per-class max normalisation) and the seed label
map at ``threshold``. It answers "why does method A score below method B here?" by showing
where each method's activation lies and how the shared threshold cuts it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .config import Params
from .errors import UserError
from .io import atomic_path


def seed_panel(params: Params, methods: list[str], n_images: int = 6, start: int = 0) -> np.ndarray:
    """The panel (uint8 HxWx3) for ids ``start .. start+n_images`` of ``seed_split``."""
    from .overlays import cam_heatmap, colorize, panel
    from .steps.common import open_split, out_dir, read_seed
    from .steps.eval_seeds import seed_to_label

    if not methods:
        raise UserError("--methods: name at least one method, e.g. cam,recam-scorecam")
    voc = open_split(params, params.seed_split)
    ids = voc.ids[start:start + n_images]
    if not ids:
        raise UserError(f"split '{params.seed_split}' has no ids from {start} on ({len(voc.ids)} ids)")
    rows = []
    for id_ in ids:
        image, gt = voc.image(id_), voc.mask(id_)
        row = [image, colorize(gt)]
        for m in methods:
            keys, cams = read_seed(out_dir("seeds", m) / f"{id_}.npz", m, gt.shape)
            heat = cams.max(axis=0) if len(keys) else np.zeros(gt.shape, np.float32)
            row += [cam_heatmap(image, heat), colorize(seed_to_label(keys, cams, params.threshold, gt.shape))]
        rows.append(row)
    titles = ["image", "truth"]
    for m in methods:
        titles += [m, f"@{params.threshold:g}"]
    return panel(rows, titles)


def write_panel(canvas: np.ndarray, path: Path) -> None:
    from PIL import Image

    with atomic_path(path, ".png") as tmp:
        Image.fromarray(canvas).save(tmp, format="png")
