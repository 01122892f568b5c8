"""Grad-CAM++: pixel-wise weighting of positive gradients (closed form)."""

from __future__ import annotations

import torch

from .gradcam import GradCAM


class GradCAMPlusPlus(GradCAM):
    """Grad-CAM++.

    Chattopadhay et al., "Grad-CAM++: Generalized Gradient-based Visual Explanations for
    Deep Convolutional Networks", WACV 2018.

    The class score is taken as Y_c = exp(y_c) (y_c the logit). For a network that is
    piece-wise linear in A (ReLU), the second and third derivatives of Y_c follow from the
    first-order gradient g = dy_c/dA: d^nY_c/dA^n = exp(y_c) g^n, and the exp factors
    cancel in the coefficients (paper, Eq. 19):

        alpha_kij = g_kij^2 / ( 2 g_kij^2 + sum_ab A_kab g_kij^3 )     (0 where the denominator is 0)

        w_ck = sum_ij alpha_kij ReLU(g_kij),        M_c = ReLU( sum_k w_ck A_k )

    The remaining common factor exp(y_c) of the weights (dY_c/dA = exp(y_c) g) is dropped:
    it scales the whole map of class c by a positive constant, which the per-class max
    normalisation removes, and it would overflow for large logits.
    """

    name = "gradcampp"

    def channel_weights(self, A: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        g2 = grads.pow(2)
        g3 = grads.pow(3)
        denom = 2 * g2 + A.sum(dim=(1, 2), keepdim=True) * g3
        alpha = torch.where(denom != 0, g2 / torch.where(denom != 0, denom, torch.ones_like(denom)),
                            torch.zeros_like(denom))
        return (alpha * grads.clamp_min(0)).sum(dim=(1, 2))
