"""Fully connected CRF inference and the conf_fg / conf_bg pseudo-mask rule.

The CRF is the one of Krähenbühl & Koltun, "Efficient Inference in Fully Connected CRFs with
Gaussian Edge Potentials" (NeurIPS 2011), run with the ``pydensecrf`` bindings: a unary term
``-log p`` per pixel and label, a Gaussian (smoothness) kernel over pixel positions and a
bilateral (appearance) kernel over positions and RGB, both with Potts compatibility, and mean-
field inference for ``params.crf_iters`` iterations.

The pseudo-mask rule follows the two-threshold scheme of IRN (Ahn et al., "Weakly Supervised
Learning of Instance Segmentation with Inter-pixel Relations", CVPR 2019) and ReCAM (Chen et
al., "Class Re-Activation Maps for Weakly-Supervised Semantic Segmentation", CVPR 2022); see
:func:`seeds_to_pseudo_mask`.

This module must stay free of torch: the ``crf`` step runs it in a process pool whose workers
should not pay for (or fork into) a torch import.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .voc import VOID  # the mask value of uncertain / ignored pixels
#: Smallest probability fed to ``-log``: keeps the unary finite where a label has p = 0.
PROB_FLOOR = 1e-5


def _default_params() -> Any:
    from .config import Params

    return Params()


def _check_image(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be HxWx3, got shape {image.shape}")
    if image.shape[:2] != tuple(shape):
        raise ValueError(f"image is {image.shape[:2]} but the label maps are {tuple(shape)}")
    # pydensecrf takes a writable C-contiguous buffer (PIL-backed arrays are read-only)
    return np.require(image, dtype=np.uint8, requirements=["C_CONTIGUOUS", "WRITEABLE"])


def _infer(image: np.ndarray, unary: np.ndarray, params) -> np.ndarray:
    """Mean-field inference from a unary energy (L, H, W); returns the marginals Q (L, H, W)."""
    import pydensecrf.densecrf as dcrf

    n_labels, h, w = unary.shape
    crf = dcrf.DenseCRF2D(w, h, n_labels)
    crf.setUnaryEnergy(np.require(unary.reshape(n_labels, -1), dtype=np.float32,
                                  requirements=["C_CONTIGUOUS", "WRITEABLE"]))
    crf.addPairwiseGaussian(sxy=float(params.crf_gauss_sxy), compat=float(params.crf_gauss_compat))
    crf.addPairwiseBilateral(sxy=float(params.crf_bilateral_sxy), srgb=float(params.crf_bilateral_srgb),
                             rgbim=image, compat=float(params.crf_bilateral_compat))
    q = crf.inference(int(params.crf_iters))
    return np.asarray(q, dtype=np.float32).reshape(n_labels, h, w)


def dense_crf(image: np.ndarray, probs: np.ndarray, params=None) -> np.ndarray:
    """Refine per-pixel label probabilities with a dense CRF.

    ``image``: uint8 HxWx3 RGB; ``probs``: float (L, H, W), a distribution over L labels per
    pixel. The unary is ``-log(max(p, PROB_FLOOR))``; the pairwise terms use
    ``crf_gauss_sxy``/``crf_gauss_compat`` and ``crf_bilateral_sxy``/``crf_bilateral_srgb``/
    ``crf_bilateral_compat`` of ``params`` (defaults of :class:`wsss.config.Params` when None).
    Returns the refined marginals, float32 (L, H, W), summing to 1 over L.
    """
    params = params or _default_params()
    probs = np.asarray(probs, dtype=np.float32)
    if probs.ndim != 3:
        raise ValueError(f"probs must be (L, H, W), got shape {probs.shape}")
    image = _check_image(image, probs.shape[1:])
    if probs.shape[0] == 1:
        return np.ones_like(probs)
    unary = -np.log(np.clip(probs, PROB_FLOOR, 1.0))
    return _infer(image, unary, params)


def crf_postprocess(image: np.ndarray, probs: np.ndarray, params=None) -> np.ndarray:
    """Label map (uint8 HxW) of the CRF-refined ``probs`` (L, H, W): eval-seg's optional step."""
    return dense_crf(image, probs, params).argmax(0).astype(np.uint8)


def crf_label_inference(image: np.ndarray, labels: np.ndarray, n_labels: int, params=None,
                        gt_prob: float = 0.7) -> np.ndarray:
    """Refine a hard label map (values 0..n_labels-1) with a dense CRF; returns uint8 HxW.

    The unary trusts each pixel's label with probability ``gt_prob`` and spreads the rest
    evenly over the other labels, as the label-map inference of IRN (Ahn et al. 2019). A pixel
    whose label is outside 0..n_labels-1 (e.g. 255) gets a uniform, uninformative unary.
    """
    params = params or _default_params()
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be HxW, got shape {labels.shape}")
    image = _check_image(image, labels.shape)
    if n_labels <= 1:
        return np.zeros(labels.shape, np.uint8)
    if not 0.0 < gt_prob < 1.0:
        raise ValueError(f"gt_prob must be in (0, 1), got {gt_prob}")
    other = (1.0 - gt_prob) / (n_labels - 1)
    lab = labels.astype(np.int64)
    probs = np.full((n_labels,) + labels.shape, other, np.float32)
    known = (lab >= 0) & (lab < n_labels)
    ys, xs = np.nonzero(known)
    probs[lab[known], ys, xs] = gt_prob
    probs[:, ~known] = 1.0 / n_labels
    unary = -np.log(probs)
    return _infer(image, unary, params).argmax(0).astype(np.uint8)


def _threshold_labels(image: np.ndarray, keys: np.ndarray, cams: np.ndarray, threshold: float,
                      params) -> np.ndarray:
    """One threshold run: argmax over [threshold, cams...], CRF over that label map, and the
    result mapped to mask labels (0 = background, keys + 1 = classes)."""
    bg = np.full((1,) + cams.shape[1:], threshold, np.float32)
    initial = np.concatenate([bg, cams], axis=0).argmax(0)
    refined = crf_label_inference(image, initial, len(keys) + 1, params)
    lut = np.concatenate([[0], keys.astype(np.int64) + 1]).astype(np.uint8)
    return lut[refined]


def seeds_to_pseudo_mask(image: np.ndarray, keys: np.ndarray, cams: np.ndarray, params=None) -> np.ndarray:
    """Turn the seeds of one image into a pseudo-mask (uint8 HxW: 0, class + 1, 255).

    The two-threshold rule of IRN / ReCAM (their ``cam_to_ir_label`` stage), written here as:

    1. For a threshold ``t`` the background score is the constant ``t`` (not a function of the
       CAMs): the initial label of a pixel is ``argmax([t, cam_1, ..., cam_n])``, i.e. the
       strongest class whose CAM exceeds ``t``, else background.
    2. That label map is refined by :func:`crf_label_inference` (unary from the labels with
       ``gt_prob = 0.7``; CRF settings from ``params``).
    3. ``fg_conf`` is the refined map at ``t = conf_fg`` (high threshold: confident
       foreground), ``bg_conf`` the one at ``t = conf_bg`` (low threshold: confident
       background, since even weak activations count as foreground there).
    4. The pseudo-mask takes ``fg_conf``'s class where ``fg_conf`` is foreground, background
       (0) where both runs say background, and 255 (uncertain, ignored in training) where
       ``fg_conf`` says background but ``bg_conf`` says foreground.

    ``keys``: int class indices 0..19 of the n classes present; ``cams``: (n, H, W) in [0, 1].
    An image with no classes is all background.
    """
    params = params or _default_params()
    keys = np.asarray(keys).reshape(-1)
    image = np.asarray(image)
    h, w = image.shape[:2]
    if keys.size == 0:
        return np.zeros((h, w), np.uint8)
    cams = np.asarray(cams, dtype=np.float32)
    if cams.ndim != 3 or cams.shape[0] != keys.size:
        raise ValueError(f"cams must be ({keys.size}, H, W) for {keys.size} keys, got shape {cams.shape}")
    if cams.shape[1:] != (h, w):
        raise ValueError(f"cams are {cams.shape[1:]} but the image is {(h, w)}")
    fg_conf = _threshold_labels(image, keys, cams, float(params.conf_fg), params)
    bg_conf = _threshold_labels(image, keys, cams, float(params.conf_bg), params)
    mask = fg_conf.copy()
    mask[(fg_conf == 0) & (bg_conf != 0)] = VOID
    return mask
