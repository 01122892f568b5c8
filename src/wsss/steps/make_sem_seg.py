"""Step ``make-sem-seg --method M``: IRN's semantic pseudo-masks by a random walk.

Ahn, Cho and Kwak, CVPR 2019 (official code jiwoon-ahn/irn step/make_sem_seg_labels.py and
misc/indexing.py ``propagate_to_edge``). For every id of ``seed_split``:

1. the boundary map B (stride 4) of ``outputs/checkpoints/irn-<M>.pt`` on the image and its
   mirror image (:meth:`wsss.models.irn.IRNet.boundary`);
2. the seeds ``outputs/seeds/<M>/<id>.npz`` brought to the stride-4 grid (area mean over each
   4x4 cell, then divided by each class's max + 1e-5);
3. affinities a_ij = (1 - max B on the segment ij) within ``irn_walk_radius``, raised to
   ``irn_beta``, a column-normalised transition matrix, and 2^``irn_exp_times`` walk steps
   over CAM * (1 - B) on the sparse matrix (:func:`wsss.randomwalk.random_walk`);
4. bilinear upsampling x4 (cropped to the image), division by the maximum over all classes and
   pixels, a constant background score ``sem_seg_bg_thres``, argmax -> VOC palette PNG in
   ``outputs/irn_masks/<M>/`` (swapped in atomically), scored as the CRF masks are.

Departure: the official make_cam writes the stride-4 CAMs itself (multi-scale maps resized to
the stride-4 grid); here the seeds of the ``seeds`` step (at image size) are area-pooled to that
grid, so IRN walks on exactly the maps every other stage scores. Metrics (with a digest of the
PNGs, which ``train-seg`` depends on when ``pseudo_masks: irn``) go to
``outputs/metrics/irn/<M>.json`` and MLflow.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .. import methods
from ..config import Params, resolve_device, seed_everything
from ..datasets import to_tensor
from ..io import atomic_dir, save_label_png, write_json
from ..metrics import ConfusionMatrix
from ..models.irn import STRIDE, checkpoint_name, edge_to_affinity, load_irn
from ..randomwalk import random_walk
from ..tracking import step_run
from ..voc import LABEL_NAMES, NUM_LABELS, PALETTE
from .common import checkpoint_path, mask_fingerprint, out_dir, read_seed, summary
from .crf import log_masks, seed_path, seeded_split

EPS = 1e-5


def mask_dir(method: str) -> Path:
    return out_dir("irn_masks", method)


def strided_cams(cams: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """Image-size maps (n, H, W) -> the stride-4 grid ``size`` (area mean), each divided by
    its max + 1e-5 (the official stride-4 CAM normalisation)."""
    t = F.adaptive_avg_pool2d(torch.from_numpy(cams).float()[None], size)[0]
    return t / (t.flatten(1).amax(1)[:, None, None] + EPS)


def walk_to_mask(rw: torch.Tensor, keys: np.ndarray, shape: tuple[int, int], bg_thres: float) -> np.ndarray:
    """Walked maps (n, h, w) -> uint8 label map (H, W): x4 bilinear, cropped, divided by the
    global max, background score ``bg_thres``, argmax, mapped to 0 / keys + 1."""
    up = F.interpolate(rw[None], scale_factor=STRIDE, mode="bilinear", align_corners=False)[0, :, :shape[0], :shape[1]]
    up = up / up.max().clamp_min(1e-12)
    scores = torch.cat([torch.full_like(up[:1], bg_thres), up], 0)
    lut = np.concatenate([[0], keys.astype(np.int64) + 1]).astype(np.uint8)
    return lut[scores.argmax(0).numpy()]


def sem_seg_mask(model, image: np.ndarray, keys: np.ndarray, cams: np.ndarray, params: Params,
                 device) -> np.ndarray:
    """The IRN pseudo-mask (uint8 H x W: 0 or class + 1) of one image."""
    h, w = image.shape[:2]
    if keys.size == 0:
        return np.zeros((h, w), np.uint8)
    edge = model.boundary(to_tensor(image)[None].to(device)).float().cpu()
    cams4 = strided_cams(cams, tuple(edge.shape))
    aff = edge_to_affinity(edge[None], params.irn_walk_radius)[0].numpy()
    x = (cams4 * (1.0 - edge)).numpy()
    rw = random_walk(x, aff, params.irn_walk_radius, params.irn_beta, params.irn_exp_times)
    return walk_to_mask(torch.from_numpy(rw).float(), keys, (h, w), params.sem_seg_bg_thres)


def run(params: Params, method: str) -> dict:
    methods.get(method)
    seed_everything(params.seed, params.threads)
    device = resolve_device(params.device, False)
    voc, ids = seeded_split(params, method)
    model, _ = load_irn(checkpoint_path(checkpoint_name(method)), method, device)
    final_dir = mask_dir(method)
    cm = ConfusionMatrix(NUM_LABELS)
    scored = 0
    with step_run("make-sem-seg", params, method=method) as tracker:
        with atomic_dir(final_dir) as tmp:
            for image_id in tqdm(ids, desc=f"make-sem-seg {method}", dynamic_ncols=True):
                image = voc.image(image_id)
                keys, cams = read_seed(seed_path(method, image_id), method, image.shape[:2])
                mask = sem_seg_mask(model, image, keys, cams, params, device)
                save_label_png(tmp / f"{image_id}.png", mask, PALETTE)
                if voc.mask_path(image_id).is_file():
                    cm.update(mask, voc.mask(image_id))
                    scored += 1
            digest = mask_fingerprint(tmp, chars=40)
        metrics: dict = {"method": method, "n_images": len(ids), "n_scored": scored, "masks_sha1": digest}
        if scored:
            metrics.update(cm.scores(LABEL_NAMES))
        write_json(out_dir("metrics", "irn", f"{method}.json"), metrics)
        log_masks(tracker, metrics, voc, ids, method, final_dir, "IRN pseudo-masks", "irn")
    miou = f", mIoU {metrics['miou']:.3f}" if scored else ""
    summary("make-sem-seg", f"{method}: {len(ids)} IRN pseudo-masks{miou} -> {final_dir}")
    return metrics
