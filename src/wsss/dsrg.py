"""Deep Seeded Region Growing (DSRG): Huang, Wang, Wang, Liu & Wang, "Weakly-Supervised
Semantic Segmentation Network with Deep Seeded Region Growing", CVPR 2018 (the DSRG notes of
../shared/SEEDS.md; official Caffe code: speedinghzl/DSRG, pylayers/pylayers/pylayers.py).

The label-side parts of the method, in numpy: no torch here, since :func:`crf_and_grow` runs in
the worker processes of train-dsrg's pool (as :mod:`wsss.crf`).

* :func:`make_seeds`: the seed map of one image from its CAMs (and optionally a saliency map).
* :func:`grow_seeds`: one seeded-region-growing pass over a probability map, always started
  from the original seeds.
* :func:`crf_refine`: the dense CRF of the boundary loss at the network's output resolution.

Label maps use the mask convention of the harness: 0 background, c + 1 for class c (0..19),
255 (``VOID``) for unlabeled pixels.
"""

from __future__ import annotations

import numpy as np

from .voc import NUM_LABELS, VOID

#: The probability floor of DSRG's softmax and CRF layers (pylayers/pylayers.py:21 ``min_prob``).
MIN_PROB = 1e-4
#: 8-connectivity, as the official CC_labeling_8 connected-component labelling.
EIGHT = np.ones((3, 3), dtype=bool)


def make_seeds(keys: np.ndarray, cams: np.ndarray, fg_thres: float, bg_thres: float,
               saliency: np.ndarray | None = None) -> np.ndarray:
    """Seed map (uint8 HxW: 0, c + 1, 255) of one image from its seeds file.

    ``keys``: the n present classes (0..19); ``cams``: (n, H, W) normalised CAMs in [0, 1].
    A pixel is foreground class c when c is the argmax over the present classes' CAMs and that
    CAM is above ``fg_thres``; background when every present class's CAM is below ``bg_thres``;
    else unlabeled. With ``saliency`` (HxW in [0, 1], a user's saliency map: DSRG's background
    cue), background is instead where the saliency is below ``bg_thres``, and a pixel that is
    both a foreground seed and saliency background is left unlabeled (the two cues disagree).
    An image with no present class is all background seed.
    """
    keys = np.asarray(keys).reshape(-1)
    cams = np.asarray(cams, dtype=np.float32)
    shape = cams.shape[1:] if cams.ndim == 3 else (saliency.shape if saliency is not None else None)
    if keys.size == 0:
        return np.zeros(shape, np.uint8)
    top = cams.argmax(0)
    peak = cams.max(0)
    seed = np.full(top.shape, VOID, np.uint8)
    fg = peak > fg_thres
    seed[fg] = (keys[top] + 1).astype(np.uint8)[fg]
    if saliency is None:
        seed[peak < bg_thres] = 0
    else:
        bg = np.asarray(saliency, np.float32) < bg_thres
        seed[bg & ~fg] = 0
        seed[bg & fg] = VOID
    return seed


def grow_seeds(seed: np.ndarray, probs: np.ndarray, present: np.ndarray, fg_thres: float,
               bg_thres: float) -> np.ndarray:
    """One seeded-region-growing pass (DSRG Sec. 3.2; official ``generate_seed_step``).

    ``seed``: the original seed map (uint8 HxW: 0, c + 1, 255); ``probs``: (L, H, W) class
    probabilities (L = 21: background + 20 classes); ``present``: the labels present in the
    image (mask labels, background included or not: it is always added).

    An unlabeled pixel u becomes label l when l is the argmax of ``probs`` over the present
    labels at u, ``probs[l, u]`` exceeds l's threshold (``bg_thres`` for background, ``fg_thres``
    for a class) and u lies in an 8-connected region of such pixels (together with the seeds of
    l) that touches a seed of l. Seeds are never changed. Returns the grown map (new array).
    """
    from scipy import ndimage

    seed = np.asarray(seed)
    labels = np.union1d(np.asarray(present, dtype=np.int64).reshape(-1), [0])
    labels = labels[(labels >= 0) & (labels < probs.shape[0])]
    sel = np.asarray(probs, np.float32)[labels]
    best = labels[sel.argmax(0)]
    value = sel.max(0)
    thres = np.where(best == 0, bg_thres, fg_thres)
    unlabeled = seed == VOID
    candidate = unlabeled & (value > thres)
    grown = seed.copy()
    for lab in labels:
        own = seed == lab
        if not own.any():
            continue
        cand = candidate & (best == lab)
        if not cand.any():
            continue
        regions, _ = ndimage.label(cand | own, structure=EIGHT)
        keep = np.unique(regions[own])
        grown[cand & np.isin(regions, keep[keep > 0])] = lab
    return grown


_SCALED: dict = {}


def _scaled_crf_params(params, scale: float):
    """``params`` with the CRF's spatial kernels times ``scale``, built once per (params, scale):
    every image of every step asks for the same few, and a ``dataclasses.replace`` re-validates
    all of Params (about 0.1 ms, 13% of a 12 x 12 CRF). The entry keeps ``params`` itself, so
    its id cannot be reused by another object while cached."""
    import dataclasses

    hit = _SCALED.get((id(params), scale))
    if hit is None or hit[0] is not params:
        if len(_SCALED) > 16:
            _SCALED.clear()
        hit = (params, dataclasses.replace(params, crf_gauss_sxy=params.crf_gauss_sxy * scale,
                                           crf_bilateral_sxy=params.crf_bilateral_sxy * scale))
        _SCALED[(id(params), scale)] = hit
    return hit[1]


def crf_refine(image: np.ndarray, probs: np.ndarray, params, scale: float) -> np.ndarray:
    """The dense CRF of DSRG's boundary loss (SEC's constrain-to-boundary): ``probs`` (L, h, w)
    refined with the uint8 image ``image`` (h, w, 3) resized to the network's output size.

    The CRF settings are the harness's (``crf_*``; unary -log p, :func:`wsss.crf.dense_crf`),
    with the spatial standard deviations (``crf_gauss_sxy``, ``crf_bilateral_sxy``, in pixels
    of the input image) multiplied by ``scale`` = output size / input size, so the kernels span
    the same part of the image as at full resolution (DSRG divides its 80 / 3 px by 12 at its
    41 x 41 output). Floored at :data:`MIN_PROB` and renormalised, as the official CRF layer.
    """
    from .crf import dense_crf

    q = dense_crf(image, probs, _scaled_crf_params(params, scale))
    q = np.maximum(q, MIN_PROB)
    return (q / q.sum(0, keepdims=True)).astype(np.float32)


def crf_and_grow(image: np.ndarray, probs: np.ndarray, seed: np.ndarray, present: np.ndarray, params,
                 scale: float, grow_on: str) -> tuple[np.ndarray, np.ndarray]:
    """One image of a training batch: (CRF-refined probs, grown seed map). The growing reads
    the refined probs (``grow_on: crf``, the official UpdateSeedLayer3) or the network's own
    (``softmax``, the paper's H)."""
    q = crf_refine(image, probs, params, scale)
    grown = grow_seeds(seed, q if grow_on == "crf" else probs, present, params.dsrg_grow_fg, params.dsrg_grow_bg)
    return q, grown


def seed_scores(seed: np.ndarray, valid: np.ndarray, gt: np.ndarray | None) -> dict[str, float]:
    """Counts for the coverage and precision of one seed map: image pixels (``valid``: not crop
    padding), labelled seeds among them, and, against ``gt`` (void 255 ignored), labelled pixels
    with a ground truth (``judged``) and those that agree (``correct``)."""
    labelled = (seed != VOID) & valid
    out = {"pixels": float(valid.sum()), "labelled": float(labelled.sum())}
    if gt is not None:
        judged = labelled & (gt != VOID)
        out["judged"] = float(judged.sum())
        out["correct"] = float((judged & (seed == gt)).sum())
    return out


__all__ = ["MIN_PROB", "NUM_LABELS", "make_seeds", "grow_seeds", "crf_refine", "crf_and_grow", "seed_scores"]
