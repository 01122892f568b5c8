"""Grad-CAM: channel weights from the spatially averaged gradient of the class score."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import CAMMethod


class GradCAM(CAMMethod):
    """Gradient-weighted Class Activation Mapping.

    Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based
    Localization", ICCV 2017.

    With y_c the (pre-sigmoid) logit of class c and A (C, h, w) the target-layer
    activations:

        a_ck = 1/(h w) sum_ij dy_c / dA_kij,        M_c = ReLU( sum_k a_ck A_k )

    The gradients come from autograd (one backward per requested class, the graph kept in
    between), so the method works on any hooked layer. For the GAP + linear head of the
    classifier on the last feature map, dy_c/dA_kij = w_ck / (h w), hence
    M_c = CAM_c / (h w): Grad-CAM reduces to CAM up to a constant.
    """

    name = "gradcam"
    needs_grad = True

    def channel_weights(self, A: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        """Weights (C,) of one class from A (C,h,w) and dy_c/dA (C,h,w)."""
        return grads.mean(dim=(1, 2))

    def maps(self, x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        with self.grad_enabled():
            x = x.detach().clone()  # a normal tensor even if made under inference mode
            A, logits = self.activations_and_logits(x, grad=True)
            cls = classes.tolist()
            out = []
            for i, c in enumerate(cls):
                (g,) = torch.autograd.grad(logits[0, c], A, retain_graph=i < len(cls) - 1)
                a, g0 = A[0].detach().float(), g[0].float()
                w = self.channel_weights(a, g0)
                out.append(F.relu(torch.einsum("k,khw->hw", w, a)))
        if not out:
            return A.new_zeros((0, *A.shape[2:])).detach()
        return torch.stack(out)
