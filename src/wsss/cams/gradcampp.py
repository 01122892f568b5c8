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

    Alpha normalisation (``params.gradcampp_alpha_norm``, default true): the author's code
    (adityac94/Grad_CAM_plus_plus misc/utils.py:117-119) divides each channel's alphas by
    their sum over positions before weighting, alpha_kij <- alpha_kij / sum_ab alpha_kab
    (channels whose alphas sum to 0 keep weight 0); the paper's Eq. 19 does not. On the last
    feature map of a GAP + linear classifier g_k is constant over positions, so the
    normalised weight is w_ck = ReLU(g_k) (Grad-CAM's, up to the ReLU), while Eq. 19 gives
    w_ck = h w alpha_k ReLU(g_k) with alpha_k = 1 / (2 + g_k sum A_k): a channel's weight
    then shrinks with its total activation. ``false`` keeps the paper's formula.
    """

    name = "gradcampp"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.alpha_norm = bool(self.params.gradcampp_alpha_norm)

    def channel_weights(self, A: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        g2 = grads.pow(2)
        g3 = grads.pow(3)
        denom = 2 * g2 + A.sum(dim=(1, 2), keepdim=True) * g3
        alpha = torch.where(denom != 0, g2 / torch.where(denom != 0, denom, torch.ones_like(denom)),
                            torch.zeros_like(denom))
        if self.alpha_norm:
            total = alpha.sum(dim=(1, 2), keepdim=True)
            alpha = torch.where(total != 0, alpha / torch.where(total != 0, total, torch.ones_like(total)),
                                torch.zeros_like(alpha))
        return (alpha * grads.clamp_min(0)).sum(dim=(1, 2))
