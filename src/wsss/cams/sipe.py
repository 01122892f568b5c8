"""IS-CAM inference of a SIPE-trained model.

Chen, Yang, Lai and Xie, "Self-supervised Image-specific Prototype Exploration for Weakly
Supervised Semantic Segmentation", CVPR 2022.

As the official ``make_cam.py`` (chenqi1126/SIPE; math in :mod:`wsss.models.sipe`): for every
scale in ``cam_scales`` the image, resized as every method's is (``cam_resize: bicubic``: PIL's
bicubic on the uint8 image, SIPE's ``data_voc.py`` ``pil_rescale``), and with ``cam_flip`` its
mirror, in the same batch, go through the trunk; the class scores and the hierarchical features of the pair are summed
(mirror flipped back) *before* anything else, then the normalised CAMs with the background
1 - max over all 20 maps, the seeds from the fused hierarchical features, the prototypes and

    IS-CAM_k(i) = ReLU(cos(f_i, p_k))     for k in {background} u present classes.

Each scale's IS-CAMs are upsampled (bilinear) to the image size and summed over scales, and
each channel, the background's too, is divided by its max (+1e-5). The class maps are what
every method returns; the background IS-CAM is SIPE's own background score, which the
official evaluation puts beside the class maps in an argmax with no threshold
(``eval_cam.py``). :meth:`ISCAM.cams_with_background` returns both; the ``seeds`` step
writes the background as the seed file's ``bg`` array.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import Params
from ..errors import UserError
from ..models.sipe import inference_iscams
from .base import CAMMethod, _as_index


class ISCAM(CAMMethod):
    """Image-specific CAM of SIPE (Chen et al., CVPR 2022); needs a ``train-sipe`` model
    (:class:`wsss.models.sipe.SIPEClassifier`, loaded with :func:`wsss.models.sipe.load_any`)."""

    name = "sipe"

    def __init__(self, model: nn.Module, params: Params | None = None, *,
                 device: torch.device | str | None = None):
        if not hasattr(model, "hie_features"):
            raise UserError("method 'sipe' needs a SIPE checkpoint (outputs/checkpoints/sipe.pt written by "
                            "`python cli.py train-sipe`), loaded with wsss.models.sipe.load_any")
        super().__init__(model, params, device=device)

    def _labels(self, classes: Sequence[torch.Tensor]) -> torch.Tensor:
        labels = torch.zeros((len(classes), self.model.num_classes), device=self.device)
        for b, c in enumerate(classes):
            labels[b, c.to(self.device)] = 1.0
        return labels

    @torch.no_grad()
    def maps(self, x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """IS-CAMs of ``classes`` for one image, one scale, flip pair fused when ``cam_flip``."""
        return self.maps_batch(x, [classes])[0]

    @torch.no_grad()
    def maps_batch(self, x: torch.Tensor, classes: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        out = inference_iscams(self.model, x, self._labels(classes), self.params.cam_flip)
        return [out[b, c.to(self.device) + 1].float() for b, c in enumerate(classes)]

    def _cams_group(self, images: Sequence[np.ndarray], classes: Sequence[Sequence[int]]) -> list[np.ndarray]:
        return [c for c, _ in self._group_with_background(images, classes)]

    def cams_with_background(self, images: Sequence[np.ndarray],
                             classes: Sequence[Sequence[int]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """(class maps (n, H, W), background (H, W)) float32 in [0, 1] per image."""
        return self._in_groups(images, classes, self._group_with_background)

    @torch.no_grad()
    def _group_with_background(self, images: Sequence[np.ndarray],
                               classes: Sequence[Sequence[int]]) -> list[tuple[np.ndarray, np.ndarray]]:
        for im in images:
            if im.ndim != 3 or im.shape[2] != 3:
                raise ValueError(f"expected an HxWx3 RGB image, got shape {im.shape}")
        H, W = images[0].shape[:2]
        idx = [_as_index(c, self.device) for c in classes]
        labels = self._labels(idx)
        x = self._to_input(images)
        acc = torch.zeros((len(images), self.model.num_classes + 1, H, W), device=self.device)
        for s in self.params.cam_scales:
            size = (max(1, round(H * s)), max(1, round(W * s)))
            xs = self._resized(images, x, size)  # cam_resize: PIL bicubic, as SIPE's pil_rescale
            isc = inference_iscams(self.model, xs, labels, self.params.cam_flip).float()
            acc += F.interpolate(isc, size=(H, W), mode="bilinear", align_corners=False)
        acc = acc / (acc.flatten(2).amax(-1)[:, :, None, None] + 1e-5)
        result = []
        for b, c in enumerate(idx):
            cams = acc[b, c + 1].cpu().numpy().astype(np.float32, copy=False)
            bg = acc[b, 0].cpu().numpy().astype(np.float32, copy=False)
            result.append((cams, bg))
        return result
