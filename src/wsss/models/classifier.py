"""The multi-label classifier whose class activation maps become seeds.

Global average pooling over the last feature map A, a bias-free 1x1 classifier W, trained
with the multilabel soft-margin loss (Zhou et al. 2016, "Learning Deep Features for
Discriminative Localization"; IRN/ReCAM setup). ``recam_predictor`` is the second 1x1
classifier of ReCAM (Chen et al., CVPR 2022), added by the ReCAM training stage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..io import load_torch
from ..voc import NUM_CLASSES
from .backbone import ResNetTrunk


class Classifier(nn.Module):
    def __init__(self, backbone: str = "resnet18", output_stride: int = 16,
                 pretrained: str = "none", num_classes: int = NUM_CLASSES, recam: bool = False):
        super().__init__()
        self.arch, self.output_stride, self.num_classes = backbone, output_stride, num_classes
        self.backbone = ResNetTrunk(backbone, output_stride, pretrained)
        c = self.backbone.out_channels
        self.classifier = nn.Conv2d(c, num_classes, 1, bias=False)
        self.recam_predictor: nn.Conv2d | None = None
        self.frozen_bn = False
        if recam:
            self.add_recam_predictor()

    def freeze_stem_bn(self) -> None:
        """Freeze as IRN and ReCAM freeze their ImageNet ResNet-50 (Ahn et al. CVPR 2019; Chen
        et al. CVPR 2022): conv1 and bn1 get no gradient (ReCAM net/resnet50_cam.py:43-48, IRN
        net/resnet50_cam.py:39-43) and every BatchNorm normalises with its running statistics,
        which never update (``FixedBatchNorm``, net/resnet50.py:10-13 of both); the affine
        weights of the other BatchNorms still train. Kept across :meth:`train` calls."""
        for p in (*self.backbone.stem[0].parameters(), *self.backbone.stem[1].parameters()):
            p.requires_grad_(False)
        self.frozen_bn = True
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen_bn:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def add_recam_predictor(self) -> None:
        self.recam_predictor = nn.Conv2d(self.backbone.out_channels, self.num_classes, 1, bias=False)

    # ----------------------------------------------------------------- forward paths
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Last feature map A (B, C, h, w) of a normalised image batch."""
        return self.backbone(x)[-1]

    def hierarchical_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.backbone(x)

    def head(self, feats: torch.Tensor) -> torch.Tensor:
        """Class logits (B, K) from a feature map: GAP then the 1x1 classifier."""
        return self.classifier(feats.mean(dim=(2, 3), keepdim=True)).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def cam_weight(self, reactivate: bool = False) -> torch.Tensor:
        """(K, C, 1, 1) weights of the CAM; ReCAM re-activation multiplies the predictor in."""
        w = self.classifier.weight
        if reactivate:
            if self.recam_predictor is None:
                raise UserError("checkpoint has no ReCAM predictor; run `python cli.py train-recam` first")
            w = w * self.recam_predictor.weight
        return w

    def raw_cams(self, feats: torch.Tensor, reactivate: bool = False) -> torch.Tensor:
        """ReLU(sum_k w_ck A_k): un-normalised CAMs (B, K, h, w)."""
        return F.relu(F.conv2d(feats, self.cam_weight(reactivate)))

    # ----------------------------------------------------------------- (de)serialisation
    def spec(self) -> dict[str, Any]:
        return {"backbone": self.arch, "output_stride": self.output_stride,
                "num_classes": self.num_classes, "recam": self.recam_predictor is not None}


def build_classifier(params) -> Classifier:
    return Classifier(params.backbone, params.output_stride, params.pretrained)


def read_checkpoint(path: str | Path) -> dict:
    """The dict of a training-stage checkpoint (on the CPU), or one clear error."""
    path = Path(path)
    fix = "delete it and retrain" if path.is_file() else "run its training stage first (e.g. `python cli.py train-cls`)"
    ckpt = load_torch(path, "checkpoint", fix)
    try:
        if isinstance(ckpt.get("alias"), str):  # written by `train --method M` for a method without training
            return read_checkpoint(path.with_name(f"{ckpt['alias']}.pt"))
        ckpt["spec"]["backbone"]
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{path}: not a valid checkpoint ({type(e).__name__}); delete it and retrain") from None
    return ckpt


def write_alias(path: str | Path, target: str | Path) -> None:
    """A checkpoint at ``path`` that :func:`read_checkpoint` reads as the one at ``target`` (same
    folder); it holds the target's fingerprint, so it changes whenever the target does."""
    from ..io import save_torch

    target = Path(target)
    save_torch(path, {"alias": target.stem, "fingerprint": str(read_checkpoint(target).get("fingerprint"))})


def load_classifier(path: str | Path, device: torch.device | str = "cpu",
                    ckpt: dict | None = None) -> tuple[Classifier, dict]:
    """Load a checkpoint written by a training stage; returns the model (eval mode) and the dict.
    ``ckpt``: the checkpoint's dict when the caller has read it already."""
    ckpt = ckpt if ckpt is not None else read_checkpoint(path)
    try:
        spec = ckpt["spec"]
        model = Classifier(spec["backbone"], spec["output_stride"], "none", spec["num_classes"], spec["recam"])
        model.load_state_dict(ckpt["model"])
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{path}: not a valid classifier checkpoint ({type(e).__name__}); delete it and retrain") from None
    return model.to(device).eval(), ckpt


def start_from_classifier(model: nn.Module, path: str | Path, arch: str, setting: str, head: bool = True) -> str:
    """Copy the trunk (and with ``head`` the 1x1 classifier) of the ``train-cls`` checkpoint at
    ``path`` into ``model``; returns that checkpoint's fingerprint, so a retrained cls.pt
    invalidates a resume file. ``setting`` names the params key that chose this start
    (``seg_init``, ``puzzle_init``, ...) for the error message.

    This is the offline stand-in for ImageNet initialisation: every method that needs its own
    training starts from the same image-label classifier as CAM, as the papers start from
    the same ImageNet weights."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: classifier checkpoint missing ({setting}: cls); run `python cli.py train-cls` "
                        f"first or set {setting}: pretrained")
    cls_model, ckpt = load_classifier(path, "cpu")
    if cls_model.arch != arch:
        raise UserError(f"{path}: classifier backbone {cls_model.arch} differs from {arch}; use the same "
                        f"backbone or set {setting}: pretrained")
    # strides and dilations are not weights: an OS16 trunk loads into an OS8 one
    model.backbone.load_state_dict(cls_model.backbone.state_dict())
    if head:
        model.classifier.load_state_dict(cls_model.classifier.state_dict())
    return str(ckpt.get("fingerprint"))
