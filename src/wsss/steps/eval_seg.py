"""Step ``eval-seg``: the segmentation network of one method scored on ``params.val_split``.

Predictions at full image size, single scale, the softmax averaged with the one of the
mirrored image; with ``seg_crf`` the dense CRF of Krähenbühl & Koltun (NeurIPS 2011) refines
them (as DeepLab-v1/v2 did; run in a process pool of ``num_workers``). Label maps go to
``outputs/predictions/<method>/`` as VOC palette PNGs (swapped in atomically); the canonical
confusion-matrix scores (:class:`wsss.metrics.ConfusionMatrix`) to
``outputs/metrics/eval_seg/<method>.json`` and MLflow, with a per-class IoU chart and
image | ground truth | prediction overlays. ``method == "gt"`` scores the fully supervised
upper bound ``seg-gt.pt``.
"""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
from tqdm import tqdm

from .. import distributed, methods
from ..config import Params, resolve_device, seed_everything
from ..crf import crf_postprocess
from ..errors import UserError
from ..io import save_label_png, write_json
from ..metrics import ConfusionMatrix
from ..models.deeplab import load_deeplab, predict_probs
from ..tracking import step_run
from ..voc import LABEL_NAMES, NUM_LABELS, PALETTE
from .common import checkpoint_path, open_split, out_dir, summary
from .crf import pool_context, resolve_workers

N_SAMPLES = 6

_CRF_PARAMS: dict = {}


def _init_crf(params: Params) -> None:
    _CRF_PARAMS["params"] = params


def _crf_job(job: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    image, probs = job
    return crf_postprocess(image, probs, _CRF_PARAMS["params"])


def run(params: Params, method: str) -> dict:
    methods.get(method, allow_gt=True)
    return evaluate(params, method, f"seg-{method}", method, out_dir("metrics", "eval_seg", f"{method}.json"),
                    "eval-seg", f"python cli.py train-seg --method {method}")


def evaluate(params: Params, method: str, checkpoint: str, predictions: str, metrics_path, step: str,
             trainer: str) -> dict:
    """Score ``outputs/checkpoints/<checkpoint>.pt`` on ``val_split``: label maps to
    ``outputs/predictions/<predictions>/``, scores to ``metrics_path``, MLflow run ``step``;
    ``trainer`` is the command that makes the checkpoint (named when it is missing)."""
    seed_everything(params.seed, params.threads)
    val = open_split(params, params.val_split)
    if not val.ids:
        raise UserError(f"split '{params.val_split}' has no ids; fix key 'val_split' or the split list")
    if not val.has_masks:
        raise UserError(f"split '{params.val_split}' has ids without a ground-truth mask; "
                        f"eval-seg needs SegmentationClass/ masks for every id of key 'val_split'")
    device = resolve_device(params.device, params.cuda_amp)
    workers = min(resolve_workers(params), len(val.ids)) if params.seg_crf else 1
    # the pool is forked before the network runs, so no worker inherits busy torch threads
    pool = (pool_context().Pool(workers, initializer=_init_crf, initargs=(params,))
            if workers > 1 else nullcontext())
    with pool:
        model, _ = load_deeplab(checkpoint_path(checkpoint), device, trainer)
        _init_crf(params)
        cm = ConfusionMatrix(NUM_LABELS)
        samples = []
        my_ids = distributed.shard(val.ids)  # under torchrun: this rank's share; rank 0 sums
        bar = tqdm(total=len(my_ids), desc=f"eval-seg {method}", dynamic_ncols=True, disable=not distributed.is_main())
        chunk = max(8, 4 * workers)
        with step_run(step, params, method=method) as tracker:
            with distributed.atomic_dir_all_ranks(out_dir("predictions", predictions)) as tmp:
                for start in range(0, len(my_ids), chunk):
                    ids = my_ids[start:start + chunk]
                    images = [val.image(i) for i in ids]
                    probs = [predict_probs(model, im, device, flip=True) for im in images]
                    if not params.seg_crf:
                        preds = [p.argmax(0).astype(np.uint8) for p in probs]
                    elif workers > 1:
                        preds = pool.map(_crf_job, list(zip(images, probs)))
                    else:
                        preds = [_crf_job(job) for job in zip(images, probs)]
                    for image_id, image, pred in zip(ids, images, preds):
                        gt = val.mask(image_id)
                        cm.update(pred, gt)
                        save_label_png(tmp / f"{image_id}.png", pred, PALETTE)
                        if len(samples) < N_SAMPLES:
                            samples.append((image, gt, pred))
                    bar.update(len(ids))
            bar.close()
            cm.mat = distributed.sum_over_ranks(cm.mat)
            if not distributed.is_main():
                return {}
            metrics = {"method": method, "n_images": len(val.ids), "crf": bool(params.seg_crf),
                       **cm.scores(LABEL_NAMES)}
            write_json(metrics_path, metrics)
            if tracker.active:
                from ..overlays import iou_bar_chart, overlay, panel

                tracker.log_metrics({k: v for k, v in metrics.items()
                                     if isinstance(v, (int, float)) and not isinstance(v, bool)})
                tracker.log_figure(iou_bar_chart(metrics["per_class_iou"], f"{step} ({method})"),
                                   "charts/per_class_iou.png")
                rows = [[im, overlay(im, gt), overlay(im, pred)] for im, gt, pred in samples]
                tracker.log_image(panel(rows, ["image", "ground truth", "prediction"]),
                                  "overlays/eval_samples.png")
    summary(step, f"{method}: mIoU {metrics['miou']:.3f} on {len(val.ids)} {params.val_split} images"
                  f"{' (CRF)' if params.seg_crf else ''} -> {out_dir('predictions', predictions)}")
    return metrics
