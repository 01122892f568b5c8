"""IS-CAM inference of a SIPE-trained model.

Chen, Yang, Lai and Xie, "Self-supervised Image-specific Prototype Exploration for Weakly
Supervised Semantic Segmentation", CVPR 2022.

For one (resized, possibly flipped) image with requested classes P, as in training
(:mod:`wsss.models.sipe`): normalised CAMs M_k of P and the background M_0 = 1 - max_k M_k,
structure-aware seeds y_i = argmax_{k in {0} u P} IoU(ReLU(cos(a_i, a_.)), M_k) from the
semantic features a (background IoU halved), prototypes p_k = mean of the hierarchical
features f over the seed region of k, and

    IS-CAM_k(i) = ReLU(cos(f_i, p_k)),

returned for the requested classes at feature resolution. Prototypes are recomputed at every
scale and flip (they are image-specific); :class:`~wsss.cams.base.CAMMethod` sums the
upsampled maps over scales/flips and divides each class by its max.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..config import Params
from ..errors import UserError
from ..models.sipe import sipe_outputs
from .base import CAMMethod


class ISCAM(CAMMethod):
    """Image-specific CAM of SIPE (Chen et al., CVPR 2022); needs a ``train-sipe`` model
    (:class:`wsss.models.sipe.SIPEClassifier`, loaded with :func:`wsss.models.sipe.load_any`)."""

    name = "sipe"

    def __init__(self, model: nn.Module, params: Params | None = None, *,
                 device: torch.device | str | None = None):
        if not hasattr(model, "features_and_hie"):
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
        return self.maps_batch(x, [classes])[0]

    @torch.no_grad()
    def maps_batch(self, x: torch.Tensor, classes: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        # eval mode (BatchNorm on running stats): every image is independent of the others
        out = sipe_outputs(self.model, x, self._labels(classes))
        return [out["iscam"][b, c.to(self.device) + 1].float() for b, c in enumerate(classes)]
