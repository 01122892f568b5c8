"""SIPE: the classifier with hierarchical side features, and the math of image-specific
prototypes shared by training (``steps/train_sipe.py``) and inference (``cams/sipe.py``).

Chen, Yang, Lai and Xie, "Self-supervised Image-specific Prototype Exploration for Weakly
Supervised Semantic Segmentation", CVPR 2022.

Notation for one image with feature map A (C, h, w), N = h*w pixels, K = 20 classes and
the present classes P (image-level labels):

* **Normalised CAMs.** M_k = ReLU(w_k^T A) / (max ReLU(w_k^T A) + 1e-5) for k in P
  (0 for absent classes); **background** M_0 = 1 - max_{k in P} M_k (the paper's
  background activation; an image without classes has M_0 = 1).
  Channel 0 of every (B, K+1, ...) tensor here is the background, channel k+1 class k
  (VOC label order).
* **Hierarchical features.** F = concat(side_2(A_2), side_3(A_3), side_4(A_4)), the
  stage outputs of layers 2..4 projected by 1x1 convolutions and resized (bilinear) to
  the size of A. The side convolutions read *detached* stage outputs: F describes the
  image structure and is trained only by the GSC loss through the IS-CAM branch, so the
  GSC term cannot pull the trunk towards features that are easy to match (the trunk
  learns from the classification loss and, via the CAM side of L_gsc, from the prototypes).
* **Structure-aware seeds** come from the *semantic* features A (the last stage, the one
  the CAMs are read from), not from F. The correlation map of pixel i is
  S_ij = ReLU(cos(a_i, a_j)) over all pixels j. Its soft IoU with each activation map,

      IoU(S_i, M_k) = sum_j S_ij M_kj / sum_j (S_ij + M_kj - S_ij M_kj),

  picks the seed label of i: y_i = argmax_{k in {0} u P} C_k(i) (the class whose map has the
  shape of the region that looks like pixel i), with C_k = IoU(S_i, M_k) for the classes and
  C_0 = ``BG_IOU_SCALE`` * IoU(S_i, M_0) for the background (SIPE halves the background's
  similarity: 1 - max_k M_k is large almost everywhere, since CAMs are peaky).
  Both choices keep the loop from collapsing, as we measured with seeds from F and an unscaled
  background: the seeds then depend on the side projections that the GSC loss trains, every
  pixel became background (or one class), each foreground prototype was empty or everything,
  and the IS-CAMs were all zero or all one (seed mIoU 4.0 = background everywhere).
* **Image-specific prototypes.** p_k = mean of f_i over the seed region {i : y_i = k}
  (k in {0} u P; zero when the region is empty).
* **IS-CAM.** M^_k(i) = ReLU(cos(f_i, p_k)).
* **General-specific consistency (GSC) loss.** L_gsc = mean over (b, k in {0} u P_b) of
  mean_i |M_k(i) - M^_k(i)|, and L = L_cls + lambda * L_gsc (``sipe_lambda``).

Seeds are an argmax (no gradient); prototypes and IS-CAMs keep the gradient of F.
The seeds read A and the prototypes F: "semantic correlation" (Sec. 3.2.1) and
"background-aware prototype modeling" on hierarchical features (Sec. 3.2.2) of the paper.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .classifier import NUM_CLASSES, Classifier, load_classifier, read_checkpoint

KIND = "sipe"
EPS = 1e-5
BG_IOU_SCALE = 0.5  # the paper's factor on the background's structure similarity


class SIPEClassifier(Classifier):
    """:class:`Classifier` plus the 1x1 side projections of layers 2-4 (``side``).

    The trunk and the classifier are built first, in the same order as
    :func:`~wsss.models.classifier.build_classifier`, so with the same torch seed they start
    from the same weights as ``train-cls``; a SIPE model is a drop-in Classifier for
    ``features``/``head``/``raw_cams``.
    """

    def __init__(self, backbone: str = "resnet18", output_stride: int = 16, pretrained: str = "none",
                 num_classes: int = NUM_CLASSES, side_dims: list[int] | None = None):
        super().__init__(backbone, output_stride, pretrained, num_classes)
        chans = self.backbone.channels[1:]  # layers 2, 3, 4
        self.side_dims = list(side_dims) if side_dims is not None else [c // 2 for c in chans]
        if len(self.side_dims) != len(chans):
            raise UserError(f"SIPE spec has {len(self.side_dims)} side dims, the trunk has {len(chans)} stages 2-4")
        self.side = nn.ModuleList(nn.Conv2d(c, d, 1, bias=False) for c, d in zip(chans, self.side_dims))

    def hie_features(self, stages: list[torch.Tensor]) -> torch.Tensor:
        """F (B, sum(side_dims), h, w) from the four stage outputs, at the size of the last."""
        size = stages[-1].shape[-2:]
        outs = []
        for conv, a in zip(self.side, stages[1:]):
            s = conv(a.detach())
            if s.shape[-2:] != size:
                s = F.interpolate(s, size=size, mode="bilinear", align_corners=False)
            outs.append(s)
        return torch.cat(outs, dim=1)

    def features_and_hie(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Last feature map A and hierarchical features F of a normalised batch (one trunk pass)."""
        stages = self.hierarchical_features(x)
        return stages[-1], self.hie_features(stages)

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "kind": KIND, "side_dims": list(self.side_dims)}


def build_sipe(params) -> SIPEClassifier:
    return SIPEClassifier(params.backbone, params.output_stride, params.pretrained)


# ---------------------------------------------------------------------------- the math
def normalised_cams(raw: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, K+1, h, w): background then the max-normalised CAMs of present classes.

    ``raw`` (B, K, h, w) non-negative CAMs; ``labels`` (B, K) multi-hot."""
    present = (labels > 0).to(raw.dtype)[:, :, None, None]
    fg = raw / (raw.flatten(2).amax(-1)[:, :, None, None] + EPS) * present
    bg = 1.0 - fg.amax(1, keepdim=True) if fg.shape[1] else torch.ones_like(raw[:, :1])
    return torch.cat([bg, fg], dim=1)


def valid_channels(labels: torch.Tensor) -> torch.Tensor:
    """(B, K+1) bool: the background and the present classes."""
    bg = torch.ones_like(labels[:, :1], dtype=torch.bool)
    return torch.cat([bg, labels > 0], dim=1)


def correlation(feats: torch.Tensor) -> torch.Tensor:
    """S (B, N, N) = ReLU(cos(a_i, a_j)) between all pixels of a feature map (B, D, h, w)."""
    f = F.normalize(feats.flatten(2), dim=1, eps=EPS)
    return F.relu(f.transpose(1, 2) @ f)


def structure_seeds(feats: torch.Tensor, maps: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Seed label (B, N) in 0..K per pixel: argmax over valid k of IoU(S_i, M_k), the
    background's IoU scaled by ``BG_IOU_SCALE``.

    ``feats`` (B, C, h, w) the semantic features A; ``maps`` (B, K+1, h, w) in [0, 1]
    (background first); ``valid`` (B, K+1)."""
    with torch.no_grad():
        S = correlation(feats.detach().float())  # (B, N, N)
        M = maps.detach().float().flatten(2)  # (B, K1, N)
        inter = S @ M.transpose(1, 2)  # (B, N, K1)
        union = S.sum(-1, keepdim=True) + M.sum(-1)[:, None, :] - inter
        iou = inter / union.clamp_min(EPS)
        iou[..., 0] *= BG_IOU_SCALE
        iou = iou.masked_fill(~valid[:, None, :], float("-inf"))
        return iou.argmax(-1)


def prototypes(hie: torch.Tensor, seeds: torch.Tensor, k1: int) -> torch.Tensor:
    """p (B, K+1, D): mean of F over each seed region (zero vector for an empty region)."""
    onehot = F.one_hot(seeds, k1).transpose(1, 2).to(hie.dtype)  # (B, K1, N)
    total = onehot @ hie.flatten(2).transpose(1, 2)  # (B, K1, D)
    return total / onehot.sum(-1, keepdim=True).clamp_min(1.0)


def is_cams(hie: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
    """IS-CAM (B, K+1, h, w) = ReLU(cos(f_i, p_k)); an all-zero prototype gives 0."""
    B, _, h, w = hie.shape
    f = F.normalize(hie.flatten(2), dim=1, eps=EPS)  # (B, D, N)
    p = F.normalize(protos, dim=2, eps=EPS)  # (B, K1, D)
    return F.relu(p @ f).view(B, -1, h, w)


def gsc_loss(maps: torch.Tensor, iscams: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """L1 between normalised CAMs and IS-CAMs, averaged over pixels and valid (b, k)."""
    per = (maps - iscams).abs().flatten(2).mean(-1)  # (B, K1)
    v = valid.to(per.dtype)
    return (per * v).sum() / v.sum().clamp_min(1.0)


def sipe_outputs(model: SIPEClassifier, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Everything SIPE computes for a normalised batch ``x`` with multi-hot ``labels`` (B, K):
    ``logits`` (B, K), ``maps`` (B, K+1, h, w) normalised CAMs with background first,
    ``seeds`` (B, N), ``iscam`` (B, K+1, h, w), ``valid`` (B, K+1)."""
    feats, hie = model.features_and_hie(x)
    logits = model.head(feats)
    maps = normalised_cams(model.raw_cams(feats), labels)
    valid = valid_channels(labels)
    seeds = structure_seeds(feats, maps, valid)
    protos = prototypes(hie, seeds, maps.shape[1])
    return {"logits": logits, "maps": maps, "seeds": seeds, "iscam": is_cams(hie, protos), "valid": valid}


# ---------------------------------------------------------------------------- loading
def load_sipe(path: str | Path, device: torch.device | str = "cpu",
              ckpt: dict | None = None) -> tuple[SIPEClassifier, dict]:
    """Load a ``train-sipe`` checkpoint; returns the model (eval mode) and the dict.
    ``ckpt``: the checkpoint's dict when the caller has read it already."""
    ckpt = ckpt if ckpt is not None else read_checkpoint(path)
    spec = ckpt["spec"]
    if spec.get("kind") != KIND:
        raise UserError(f"{path}: is not a SIPE checkpoint (kind {spec.get('kind', 'classifier')!r}); "
                        f"run `python cli.py train-sipe`")
    try:
        model = SIPEClassifier(spec["backbone"], spec["output_stride"], "none", spec["num_classes"],
                               spec["side_dims"])
        model.load_state_dict(ckpt["model"])
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{path}: not a valid SIPE checkpoint ({type(e).__name__}); delete it and retrain") from None
    return model.to(device).eval(), ckpt


def load_any(path: str | Path, device: torch.device | str = "cpu") -> tuple[Classifier, dict]:
    """Load any training-stage checkpoint (read once): SIPE ones (``spec['kind'] == 'sipe'``)
    with :func:`load_sipe`, every other one with :func:`~wsss.models.classifier.load_classifier`."""
    ckpt = read_checkpoint(path)
    if ckpt["spec"].get("kind") == KIND:
        return load_sipe(path, device, ckpt)
    return load_classifier(path, device, ckpt)
