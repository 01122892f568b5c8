"""Step ``crf``: seeds -> pseudo-masks by dense CRF, scored against the ground truth.

For every id of ``params.seed_split`` the seeds ``outputs/seeds/<method>/<id>.npz`` ('keys',
'cams') become a pseudo-mask by the conf_fg / conf_bg rule of IRN / ReCAM
(:func:`wsss.crf.seeds_to_pseudo_mask`; Krähenbühl & Koltun 2011 for the CRF). The masks are
written as VOC palette PNGs to ``outputs/pseudo_masks/<method>/`` (swapped in atomically) and
scored: mIoU with 255 counted as a miss (the canonical score), the fraction of pixels that
carry a label, and the mIoU over labelled pixels only (how right the confident labels are).
Metrics go to ``outputs/metrics/crf/<method>.json`` and MLflow.

The CRF runs in a process pool of ``num_workers`` processes (0 = all cores). This module and
everything a worker touches (wsss.crf, wsss.io, wsss.voc, wsss.metrics) import no torch.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..config import Params
from ..crf import seeds_to_pseudo_mask
from ..errors import UserError
from ..io import atomic_dir, save_label_png, write_json
from ..metrics import ConfusionMatrix
from ..tracking import step_run
from ..voc import LABEL_NAMES, NUM_LABELS, PALETTE, VOID, VOCDataset
from .common import open_split, out_dir, read_seed, summary

N_SAMPLES = 4  # overlays logged to MLflow


def resolve_workers(params: Params) -> int:
    return params.num_workers if params.num_workers > 0 else (os.cpu_count() or 1)


def pool_context():
    """``fork`` where available: workers inherit the parent's modules and import nothing
    (in particular not torch); elsewhere the platform default (spawn)."""
    methods = mp.get_all_start_methods()
    return mp.get_context("fork") if "fork" in methods else mp.get_context()


def seed_path(method: str, image_id: str) -> Path:
    return out_dir("seeds", method, f"{image_id}.npz")


# --------------------------------------------------------------------- pool workers
_CTX: dict = {}


def _init_worker(root: str, split: str, subset: int, method: str, dest: str, params: Params) -> None:
    _CTX.update(voc=VOCDataset(Path(root), split, subset), method=method, dest=Path(dest), params=params)


def _pseudo_mask_job(image_id: str) -> dict:
    """Make, save and score the pseudo-mask of one id (runs in a worker)."""
    voc: VOCDataset = _CTX["voc"]
    image = voc.image(image_id)
    keys, cams = read_seed(seed_path(_CTX["method"], image_id), _CTX["method"], image.shape[:2])
    mask = seeds_to_pseudo_mask(image, keys, cams, _CTX["params"])
    save_label_png(_CTX["dest"] / f"{image_id}.png", mask, PALETTE)
    out = {"id": image_id, "labelled": int((mask != VOID).sum()), "pixels": int(mask.size)}
    if voc.mask_path(image_id).is_file():
        gt = voc.mask(image_id)
        cm, cm_labelled = ConfusionMatrix(NUM_LABELS), ConfusionMatrix(NUM_LABELS)
        cm.update(mask, gt)
        cm_labelled.update(mask, np.where(mask == VOID, VOID, gt).astype(np.uint8))
        out["cm"], out["cm_labelled"] = cm.mat, cm_labelled.mat
    return out


def _run_jobs(ids: list[str], workers: int, init_args: tuple, desc: str):
    if workers <= 1 or len(ids) <= 1:
        _init_worker(*init_args)
        yield from (_pseudo_mask_job(i) for i in tqdm(ids, desc=desc, dynamic_ncols=True))
        return
    chunksize = max(1, min(16, len(ids) // (4 * workers)))
    with pool_context().Pool(workers, initializer=_init_worker, initargs=init_args) as pool:
        yield from tqdm(pool.imap(_pseudo_mask_job, ids, chunksize=chunksize), total=len(ids),
                        desc=desc, dynamic_ncols=True)


# --------------------------------------------------------------------- step
def sample_panel(voc: VOCDataset, ids: list[str], method: str, mask_dir: Path) -> np.ndarray:
    from PIL import Image

    from ..overlays import cam_heatmap, overlay, panel

    rows = []
    for image_id in ids:
        image = voc.image(image_id)
        keys, cams = read_seed(seed_path(method, image_id), method, image.shape[:2])
        cam = cams.max(0) if keys.size else np.zeros(image.shape[:2], np.float32)
        pseudo = np.asarray(Image.open(mask_dir / f"{image_id}.png"))
        row = [image, cam_heatmap(image, cam), overlay(image, pseudo)]
        if voc.mask_path(image_id).is_file():
            row.append(overlay(image, voc.mask(image_id)))
        rows.append(row)
    return panel(rows, ["image", "seed (max CAM)", "pseudo-mask", "ground truth"])


def seeded_split(params: Params, method: str) -> tuple[VOCDataset, list[str]]:
    """The ``seed_split`` and its ids, every one with a seed file of ``method`` (else one error)."""
    voc = open_split(params, params.seed_split)
    ids = list(voc.ids)
    if not ids:
        raise UserError(f"split '{params.seed_split}' has no ids; fix key 'seed_split' or the split list")
    missing = [i for i in ids if not seed_path(method, i).is_file()]
    if missing:
        raise UserError(f"{seed_path(method, missing[0])}: seed file missing ({len(missing)} of {len(ids)} ids "
                        f"have none); run `python cli.py seeds --method {method}` first")
    return voc, ids


def log_masks(tracker, metrics: dict, voc: VOCDataset, ids: list[str], method: str, mask_dir: Path,
              title: str, name: str) -> None:
    """MLflow: the numeric metrics, the per-class IoU chart and sample overlays of a mask step."""
    if not tracker.active:
        return
    tracker.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    if metrics.get("n_scored"):
        from ..overlays import iou_bar_chart

        tracker.log_figure(iou_bar_chart(metrics["per_class_iou"], f"{title} ({method})"), "charts/per_class_iou.png")
    tracker.log_image(sample_panel(voc, ids[:N_SAMPLES], method, mask_dir), f"overlays/{name}_samples.png")


def run(params: Params, method: str) -> dict:
    voc, ids = seeded_split(params, method)
    workers = min(resolve_workers(params), len(ids))
    final_dir = out_dir("pseudo_masks", method)
    cm, cm_labelled = ConfusionMatrix(NUM_LABELS), ConfusionMatrix(NUM_LABELS)
    labelled = pixels = scored = 0
    with step_run("crf", params, method=method) as tracker:
        with atomic_dir(final_dir) as tmp:
            init_args = (str(voc.root), voc.split, params.subset, method, str(tmp), params)
            for res in _run_jobs(ids, workers, init_args, f"crf {method}"):
                labelled += res["labelled"]
                pixels += res["pixels"]
                if "cm" in res:
                    cm.mat += res["cm"]
                    cm_labelled.mat += res["cm_labelled"]
                    scored += 1
        metrics: dict = {"method": method, "n_images": len(ids), "n_scored": scored,
                         "labelled_fraction": labelled / max(pixels, 1)}
        if scored:
            s = cm.scores(LABEL_NAMES)
            sl = cm_labelled.scores(LABEL_NAMES)
            metrics.update(s)
            metrics.update({"miou_labelled": sl["miou"], "per_class_iou_labelled": sl["per_class_iou"],
                            "pixel_accuracy_labelled": sl["pixel_accuracy"]})
        write_json(out_dir("metrics", "crf", f"{method}.json"), metrics)
        log_masks(tracker, metrics, voc, ids, method, final_dir, "pseudo-masks", "crf")
    miou = f"mIoU {metrics['miou']:.3f}, labelled-only mIoU {metrics['miou_labelled']:.3f}, " if scored else ""
    summary("crf", f"{method}: {len(ids)} pseudo-masks, {miou}"
                   f"{metrics['labelled_fraction']:.1%} of pixels labelled -> {final_dir}")
    return metrics
