"""CAM and its ReCAM re-activated variant: maps read off the classifier's own weights."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..config import Params
from ..errors import UserError
from .base import CAMMethod


class CAM(CAMMethod):
    """Class Activation Mapping.

    Zhou et al., "Learning Deep Features for Discriminative Localization", CVPR 2016.

    With A (C, h, w) the last feature map and w_c the weights of class c in the GAP + 1x1
    classifier (logit y_c = sum_k w_ck GAP(A_k)):

        M_c = ReLU( sum_k w_ck A_k )

    computed by ``model.raw_cams(A, reactivate)``. The maps are only defined on the feature
    map the classifier reads, so the target layer must be the last one (``'features'`` or,
    for the ResNet classifier, the identical ``'layer4'``).
    """

    name = "cam"
    reactivate = False

    def __init__(self, model: nn.Module, params: Params | None = None, *,
                 reactivate: bool | None = None, target_layer: str | nn.Module | None = None,
                 device: torch.device | str | None = None):
        super().__init__(model, params, target_layer=target_layer, device=device)
        if reactivate is not None:
            self.reactivate = reactivate
        # fail now, not on the first image, when ReCAM's predictor is missing
        self.model.cam_weight(self.reactivate)

    def _raw(self, A: torch.Tensor) -> torch.Tensor:
        W = self.model.cam_weight(self.reactivate)
        if A.shape[1] != W.shape[1]:
            raise UserError(f"{type(self).__name__} needs the classifier's feature map "
                            f"({W.shape[1]} channels); target layer has {A.shape[1]}: use target_layer='features'")
        return self.model.raw_cams(A, reactivate=self.reactivate)

    @torch.inference_mode()
    def maps(self, x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        return self._raw(self.activations(x))[0, classes]

    @torch.inference_mode()
    def maps_batch(self, x: torch.Tensor, classes: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        raw = self._raw(self.activations(x))  # one forward for the batch; eval mode: same result
        return [raw[b, c] for b, c in enumerate(classes)]


class ReCAM(CAM):
    """CAM from a ReCAM-trained classifier, with re-activation at inference.

    Chen et al., "Class Re-Activation Maps for Weakly-Supervised Semantic Segmentation",
    CVPR 2022.

    ReCAM trains a second 1x1 predictor W' with a softmax cross-entropy on class-wise
    masked features; at inference the CAM is computed with the element-wise product of the
    two classifiers:

        M_c = ReLU( sum_k (w_ck * w'_ck) A_k )

    (``model.cam_weight(reactivate=True)``). The model must carry ``recam_predictor``.
    """

    name = "recam"
    reactivate = True
