"""SIPE: the classifier with hierarchical side features, and the math of image-specific
prototypes shared by training (``steps/train_sipe.py``) and inference (``cams/sipe.py``).

Chen, Yang, Lai and Xie, "Self-supervised Image-specific Prototype Exploration for Weakly
Supervised Semantic Segmentation", CVPR 2022. Conventions follow the authors' code
(chenqi1126/SIPE; file:line in docs/methods.md, "Conventions against the official code").

Notation for one image with last feature map A (C, h, w), N = h*w pixels, K = 20 classes.
Channel 0 of every (B, K+1, ...) tensor here is the background, channel k+1 class k (VOC
label order).

* **Trunk.** Stem, layer1 and layer2 receive no gradient: layer2's output is detached before
  layer3 (the official trunk does the same), so SIPE trains layers 3-4, the classifier and the
  side branches. BatchNorm runs on its running statistics (the official ResNet-50 uses a
  fixed BatchNorm everywhere) and conv1/bn1 of the stem have no gradient.
* **Hierarchical features.** F = concat_s( up(n(side_s(A_s))) ) for the four stages s = 1..4:
  a bias-free 1x1 projection of the *detached* stage output, L2-normalised over channels per
  pixel (n(v) = v / (|v| + 1e-5)), resized (bilinear) to layer3's size. Each stage weighs the
  same in a cosine whatever its width.
* **Normalised CAMs.** M_k = ReLU(w_k^T A) / (max ReLU(w_k^T A) + 1e-5) for all 20 classes;
  **background** M_0 = 1 - max_k M_k over *all* 20 maps (present or not). In training the
  maps are then multiplied by the valid mask V (B, K+1, h, w): the crop mask (0 on padding)
  for every channel, times the image label for the class channels, so absent classes are 0.
* **Structure-aware seeds.** From a feature map G (training: the semantic features A;
  inference: the flip-fused F), S_ij = ReLU(g_i . g_j) with g = G / (|G| + 1e-5), and

      IoU_k(i) = sum_j S_ij M_kj / (sum_j S_ij + sum_j M_kj - sum_j S_ij M_kj),

  the background's halved (IoU_0 *= 0.5: 1 - max_k M_k is large almost everywhere). The
  argmax over *all* K+1 channels picks each pixel's label, and the one-hot seed is then
  multiplied by the valid mask: a pixel whose winner is an absent class (possible at
  inference, where absent maps are not zeroed) or padding seeds nothing.
* **Image-specific prototypes.** p_k = sum_i seed_k(i) f_i / N (the mean over all N pixels
  of the seed-masked features, as the official average pooling; a positive factor away from
  the region mean, which the cosine below ignores). Zero for an empty region.
* **IS-CAM.** M^_k(i) = ReLU(cos(f_i, p_k)) (0 for a zero prototype).
* **General-specific consistency (GSC) loss.** The IS-CAM divided by its own max per channel
  (+1e-5), then L_gsc = mean over all B * (K+1) * h * w entries of |M_k(i) - M^_k(i)/max|:
  absent classes (both 0) and padding count in the mean. L = L_cls + lambda * L_gsc
  (``sipe_lambda``, the official 1).

Seeds are an argmax (no gradient); prototypes and IS-CAMs keep the gradient of F, and the
normalised CAMs (the target side of L_gsc) are not detached either.
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
BG_IOU_SCALE = 0.5  # the official factor on the background's IoU (network/resnet50_SIPE.py:46)
#: Width of each side branch as a divisor of its stage's channels: the official ResNet-50
#: projects 256/512/1024/2048 channels to 128/128/256/256 (network/resnet50_SIPE.py:23-26).
SIDE_DIVISORS = (2, 4, 4, 8)


class SIPEClassifier(Classifier):
    """:class:`Classifier` plus the 1x1 side projections of layers 1-4 (``side``).

    The trunk and the classifier are built first, in the same order as
    :func:`~wsss.models.classifier.build_classifier`, so with the same torch seed they start
    from the same weights as ``train-cls``; a SIPE model is a drop-in Classifier for
    ``features``/``head``/``raw_cams``. ``train()`` keeps every BatchNorm in eval mode
    (running statistics, the official fixed BatchNorm).
    """

    def __init__(self, backbone: str = "resnet18", output_stride: int = 16, pretrained: str = "none",
                 num_classes: int = NUM_CLASSES, side_dims: list[int] | None = None):
        super().__init__(backbone, output_stride, pretrained, num_classes)
        chans = self.backbone.channels  # layers 1..4
        self.side_dims = (list(side_dims) if side_dims is not None
                          else [max(1, c // d) for c, d in zip(chans, SIDE_DIVISORS)])
        if len(self.side_dims) != len(chans):
            raise UserError(f"SIPE spec has {len(self.side_dims)} side dims, the trunk has {len(chans)} stages 1-4; "
                            f"retrain with `python cli.py train-sipe`")
        self.side = nn.ModuleList(nn.Conv2d(c, d, 1, bias=False) for c, d in zip(chans, self.side_dims))

    def train(self, mode: bool = True) -> SIPEClassifier:
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self

    def freeze_stem(self) -> None:
        """conv1 and bn1 without gradient (the official ``Net.train``)."""
        for p in self.backbone.stem.parameters():
            p.requires_grad_(False)

    def stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The four stage outputs; layer2's output is detached before layer3, so stem and
        layers 1-2 get no gradient (official ``x2 = self.stage2(x1).detach()``)."""
        b = self.backbone
        x1 = b.layer1(b.stem(x))
        x2 = b.layer2(x1).detach()
        x3 = b.layer3(x2)
        return [x1, x2, x3, b.layer4(x3)]

    def hie_features(self, stages: list[torch.Tensor]) -> torch.Tensor:
        """F (B, sum(side_dims), h3, w3): L2-normalised side projections of the detached stage
        outputs, at layer3's size."""
        size = stages[2].shape[-2:]
        outs = []
        for conv, a in zip(self.side, stages):
            s = conv(a.detach())
            s = s / (s.norm(dim=1, keepdim=True) + EPS)
            if s.shape[-2:] != size:
                s = F.interpolate(s, size=size, mode="bilinear", align_corners=False)
            outs.append(s)
        return torch.cat(outs, dim=1)

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "kind": KIND, "side_dims": list(self.side_dims)}


def build_sipe(params) -> SIPEClassifier:
    return SIPEClassifier(params.backbone, params.output_stride, params.pretrained)


# ---------------------------------------------------------------------------- the math
def normalised_cams(raw: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    """(B, K+1, h, w): background 1 - max over all K normalised maps, then the K maps
    ReLU(raw) / (max + 1e-5). ``raw`` (B, K, h, w) are class scores before the ReLU (or
    already non-negative CAMs); ``size`` resizes the result (bilinear, corners aligned, as
    the official code) when it differs."""
    cam = F.relu(raw)
    fg = cam / (cam.flatten(2).amax(-1)[:, :, None, None] + EPS)
    bg = 1.0 - fg.amax(1, keepdim=True) if fg.shape[1] else torch.ones_like(raw[:, :1])
    out = torch.cat([bg, fg], dim=1)
    if size is not None and tuple(out.shape[-2:]) != tuple(size):
        out = F.interpolate(out, size=size, mode="bilinear", align_corners=True)
    return out


def valid_mask(labels: torch.Tensor, size: tuple[int, int], crop: torch.Tensor | None = None) -> torch.Tensor:
    """(B, K+1, h, w) float: 1 for the background and the present classes (``labels`` (B, K)
    multi-hot), times the crop mask ``crop`` (B, H, W) (1 on image pixels, 0 on padding),
    resized to ``size`` by nearest neighbour (official train_resnet50_SIPE.py:140-142)."""
    ch = torch.cat([torch.ones_like(labels[:, :1]), labels], dim=1).float()[:, :, None, None]
    mask = ch.expand(-1, -1, *size)
    if crop is not None:
        c = F.interpolate(crop[:, None].float(), size=size, mode="nearest")
        mask = mask * c
    return mask


def correlation(feats: torch.Tensor) -> torch.Tensor:
    """S (B, N, N) = ReLU(g_i . g_j), g = feats / (|feats| + 1e-5) per pixel (B, D, h, w)."""
    f = feats.flatten(2)
    f = f / (f.norm(dim=1, keepdim=True) + EPS)
    return F.relu(f.transpose(1, 2) @ f)


def structure_seeds(feats: torch.Tensor, maps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One-hot seeds (B, K+1, h, w): argmax over all K+1 channels of IoU(S_i, M_k) (the
    background's halved), times ``mask`` (B, K+1, h, w).

    ``feats`` (B, D, h, w) the features whose correlation S is used; ``maps`` (B, K+1, h, w)
    in [0, 1], background first."""
    with torch.no_grad():
        B, K1, h, w = maps.shape
        S = correlation(feats.detach().float())  # (B, N, N)
        M = maps.detach().float().flatten(2)  # (B, K1, N)
        inter = M @ S.transpose(1, 2)  # (B, K1, N): sum_j S_ij M_kj
        union = S.sum(-1)[:, None, :] + M.sum(-1, keepdim=True) - inter
        iou = inter / union.clamp_min(EPS)  # official: no clamp (0/0 only for an all-zero pixel and map)
        iou[:, 0] *= BG_IOU_SCALE
        seeds = F.one_hot(iou.argmax(1), K1).transpose(1, 2).reshape(B, K1, h, w).to(maps.dtype)
        return seeds * mask.to(maps.dtype)


def prototypes(hie: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """p (B, K+1, D) = sum_i seed_k(i) f_i / N: the average pooling of the seed-masked
    features over all N pixels (official ``get_prototype``)."""
    n = hie.shape[-2] * hie.shape[-1]
    return seeds.flatten(2).to(hie.dtype) @ hie.flatten(2).transpose(1, 2) / n


def is_cams(hie: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
    """IS-CAM (B, K+1, h, w) = ReLU(cos(f_i, p_k)); an all-zero prototype gives 0."""
    return F.relu(F.cosine_similarity(hie[:, None], protos[:, :, :, None, None], dim=2))


def gsc_loss(maps: torch.Tensor, iscams: torch.Tensor) -> torch.Tensor:
    """Official GSC: IS-CAM / (its max per channel + 1e-5), then the mean absolute difference
    to the (masked) normalised CAMs over every entry (B, K+1, h, w): absent classes and
    padding included (train_resnet50_SIPE.py:151-152)."""
    norm = iscams / (iscams.flatten(2).amax(-1)[:, :, None, None] + EPS)
    return (maps - norm).abs().mean()


def sipe_outputs(model: SIPEClassifier, x: torch.Tensor, labels: torch.Tensor,
                 crop: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The training forward (official ``Net.forward``) of a normalised batch ``x`` with
    multi-hot ``labels`` (B, K) and optional crop mask ``crop`` (B, H, W): ``logits`` (B, K),
    ``maps`` (B, K+1, h, w) masked normalised CAMs, background first, ``seeds`` one-hot
    (B, K+1, h, w) from the semantic features, ``iscam`` (B, K+1, h, w), ``mask``."""
    stages = model.stages(x)
    hie = model.hie_features(stages)
    feats = stages[-1]
    size = tuple(hie.shape[-2:])
    logits = model.head(feats)
    mask = valid_mask(labels, size, crop)
    maps = normalised_cams(F.conv2d(feats, model.cam_weight()), size) * mask
    if tuple(feats.shape[-2:]) != size:
        feats = F.interpolate(feats, size=size, mode="bilinear", align_corners=False)
    seeds = structure_seeds(feats, maps, mask)
    iscam = is_cams(hie, prototypes(hie, seeds))
    return {"logits": logits, "maps": maps, "seeds": seeds, "iscam": iscam, "mask": mask}


@torch.no_grad()
def inference_iscams(model: SIPEClassifier, x: torch.Tensor, labels: torch.Tensor, flip: bool = True) -> torch.Tensor:
    """IS-CAMs (B, K+1, h, w) at inference (official ``CAM.forward``): with ``flip`` the class
    scores and the hierarchical features of ``x`` and of its mirror are summed (mirror flipped
    back) *before* the CAMs are normalised and the seeds computed; the seeds come from the
    fused hierarchical features, with absent classes' maps competing in the argmax and their
    seeds then dropped (``labels`` (B, K) multi-hot; the background is always kept)."""
    B = x.shape[0]
    xx = torch.cat([x, x.flip(-1)]) if flip else x
    stages = model.stages(xx)
    hie = model.hie_features(stages)
    cam = F.conv2d(stages[-1], model.cam_weight())
    if flip:
        cam = cam[:B] + cam[B:].flip(-1)
        hie = hie[:B] + hie[B:].flip(-1)
    size = tuple(hie.shape[-2:])
    maps = normalised_cams(cam, size)
    mask = valid_mask(labels, size)
    seeds = structure_seeds(hie, maps, mask)
    return is_cams(hie, prototypes(hie, seeds))


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
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
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
