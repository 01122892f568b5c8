"""A DeepLab-v3-style segmentation network (Chen, Papandreou, Schroff & Adam, "Rethinking
Atrous Convolution for Semantic Image Segmentation", arXiv:1706.05587, 2017).

ResNet trunk at ``output_stride`` 16 or 8 (:class:`~wsss.models.backbone.ResNetTrunk`), then
Atrous Spatial Pyramid Pooling on its last stage: a 1x1 conv, three 3x3 atrous convs (rates
6/12/18 at output stride 16, doubled at 8, halved at 32) and image-level pooling, each with
256 channels; the five branches are concatenated, projected by a 1x1 conv (BN, ReLU),
dropped out and classified by a 1x1 conv into 21 labels (background + 20 classes); the
logits are bilinearly upsampled to the input size.

With ``seg_decoder: v3plus`` the head adds DeepLab-v3+'s decoder (Chen, Zhu, Papandreou,
Schroff & Adam, "Encoder-Decoder with Atrous Separable Convolution for Semantic Image
Segmentation", ECCV 2018): the trunk's stride-4 features projected to 48 channels, concatenated
with the ASPP output upsampled to stride 4, two 3x3 convs, then the classifier. It is what lets
a small image keep its boundaries: at 96 px and output stride 16 the ASPP map is 6x6, and even
a perfect 6x6 label map upsampled scores only 72% mIoU on the synthetic world (24x24: 99.9%).
Departure: the decoder's convs have ``DECODER_CHANNELS`` = 128 channels (paper: 256), and are
plain rather than depthwise-separable; on 96 px images the paper's width would cost more than
the whole ResNet-18 trunk.

One deliberate difference from the paper: the image-pooling branch has a biased 1x1 conv and
ReLU without BatchNorm, because BN over a 1x1 map is undefined for a training batch of one
image (``seg_batch_size: 1``). All new layers live under ``head`` (10x learning rate).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..io import load_torch
from .backbone import ResNetTrunk

NUM_LABELS = 21  # background + 20 VOC classes
ASPP_CHANNELS = 256
DECODER_LOW_CHANNELS = 48  # v3+: the stride-4 features are reduced to 48 channels (paper)
DECODER_CHANNELS = 128  # paper: 256 (see the module docstring)
DECODERS = ("none", "v3plus")


def aspp_rates(output_stride: int) -> tuple[int, int, int]:
    """Atrous rates (6, 12, 18) at output stride 16, scaled by 16 / output_stride."""
    scale = 16 / output_stride
    return tuple(max(1, int(round(r * scale))) for r in (6, 12, 18))  # type: ignore[return-value]


class AtrousConv2d(nn.Conv2d):
    """3x3 atrous conv (padding = rate) that skips the taps that can only see zero padding.

    When the rate is at least the feature map's height (width), every off-centre row (column)
    of the kernel falls into the padding, so the filter degenerates to its centre row
    (column) - the effect Chen et al. (2017, Sec. 3.3) point out for large rates. Computing
    only the remaining taps gives the same output and gradients, and is much cheaper on the
    small maps of small images.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (dh, dw), (h, w) = self.dilation, x.shape[-2:]
        rows = slice(1, 2) if h <= dh else slice(0, 3)
        cols = slice(1, 2) if w <= dw else slice(0, 3)
        if rows.start == 0 and cols.start == 0:
            return super().forward(x)
        pad = (0 if rows.start else dh, 0 if cols.start else dw)
        return F.conv2d(x, self.weight[:, :, rows, cols], self.bias, 1, pad, self.dilation, self.groups)


def _conv_bn_relu(cin: int, cout: int, k: int, dilation: int = 1) -> nn.Sequential:
    conv = (nn.Conv2d(cin, cout, 1, bias=False) if k == 1 else
            AtrousConv2d(cin, cout, 3, padding=dilation, dilation=dilation, bias=False))
    return nn.Sequential(conv, nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ImagePooling(nn.Module):
    """Global average pooling -> 1x1 conv -> ReLU, broadcast back to the feature map size."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.conv(x.mean(dim=(2, 3), keepdim=True)))
        return y.expand(-1, -1, x.shape[2], x.shape[3])


class ASPP(nn.Module):
    def __init__(self, cin: int, cout: int = ASPP_CHANNELS, rates: tuple[int, ...] = (6, 12, 18),
                 dropout: float = 0.5):
        super().__init__()
        self.branches = nn.ModuleList(
            [_conv_bn_relu(cin, cout, 1)] + [_conv_bn_relu(cin, cout, 3, r) for r in rates]
            + [ImagePooling(cin, cout)]
        )
        self.project = _conv_bn_relu(cout * (len(rates) + 2), cout, 1)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([b(x) for b in self.branches], dim=1)
        return self.dropout(self.project(y))


class SegHead(nn.Module):
    """ASPP on the last stage, optionally the v3+ decoder over the stride-4 features, then a
    1x1 classifier. Takes the trunk's list of stage outputs."""

    def __init__(self, channels: list[int], num_classes: int, rates: tuple[int, ...], decoder: str = "none"):
        super().__init__()
        self.aspp = ASPP(channels[-1], ASPP_CHANNELS, rates)
        self.decoder = decoder
        out = ASPP_CHANNELS
        if decoder == "v3plus":
            self.low = _conv_bn_relu(channels[0], DECODER_LOW_CHANNELS, 1)
            self.fuse = nn.Sequential(_conv_bn_relu(ASPP_CHANNELS + DECODER_LOW_CHANNELS, DECODER_CHANNELS, 3),
                                      _conv_bn_relu(DECODER_CHANNELS, DECODER_CHANNELS, 3))
            out = DECODER_CHANNELS
        self.classifier = nn.Conv2d(out, num_classes, 1)

    def forward(self, stages: list[torch.Tensor]) -> torch.Tensor:
        y = self.aspp(stages[-1])
        if self.decoder == "v3plus":
            low = self.low(stages[0])
            y = F.interpolate(y, size=low.shape[-2:], mode="bilinear", align_corners=False)
            y = self.fuse(torch.cat([y, low], dim=1))
        return self.classifier(y)


class DeepLab(nn.Module):
    def __init__(self, backbone: str = "resnet18", output_stride: int = 16, pretrained: str = "none",
                 num_classes: int = NUM_LABELS, decoder: str = "none"):
        super().__init__()
        if decoder not in DECODERS:
            raise UserError(f"unknown decoder {decoder!r}; key 'seg_decoder' must be one of {', '.join(DECODERS)}")
        self.arch, self.output_stride, self.num_classes, self.decoder = backbone, output_stride, num_classes, decoder
        self.backbone = ResNetTrunk(backbone, output_stride, pretrained)
        self.head = SegHead(self.backbone.channels, num_classes, aspp_rates(output_stride), decoder)
        self._init_head()

    def _init_head(self) -> None:
        for m in self.head.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.head.classifier.weight, std=0.01)
        nn.init.zeros_(self.head.classifier.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images (B, 3, H, W) -> logits (B, num_classes, H, W)."""
        logits = self.head(self.backbone(x))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)

    def spec(self) -> dict[str, Any]:
        return {"kind": "deeplab", "backbone": self.arch, "output_stride": self.output_stride,
                "num_classes": self.num_classes, "decoder": self.decoder}


def build_deeplab(params) -> DeepLab:
    return DeepLab(params.seg_backbone, params.output_stride, params.pretrained, decoder=params.seg_decoder)


def load_deeplab(path: str | Path, device: torch.device | str = "cpu",
                 trainer: str | None = None) -> tuple[DeepLab, dict]:
    """Load a ``seg-<method>.pt`` checkpoint; returns the model (eval mode) and the dict.
    ``trainer``: the command that makes it, named in errors (default: train-seg's)."""
    path = Path(path)
    method = path.stem[4:] if path.stem.startswith("seg-") else "<method>"
    trainer = trainer or f"python cli.py train-seg --method {method}"
    ckpt = load_torch(path, "segmentation checkpoint", f"run `{trainer}`" + (" first" if not path.is_file() else " again"))
    try:
        spec = ckpt["spec"]
        if spec.get("kind") != "deeplab":
            raise UserError(f"{path}: is not a segmentation (deeplab) checkpoint; rerun `{trainer}`")
        model = DeepLab(spec["backbone"], spec["output_stride"], "none", spec["num_classes"],
                        spec.get("decoder", "none"))
        model.load_state_dict(ckpt["model"])
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{path}: not a valid segmentation checkpoint ({type(e).__name__}); delete it and "
                        f"rerun `{trainer}`") from None
    return model.to(device).eval(), ckpt


@torch.no_grad()
def predict_probs(model: nn.Module, image: np.ndarray, device: torch.device | str = "cpu",
                  flip: bool = True) -> np.ndarray:
    """Softmax (num_classes, H, W) float32 of one uint8 HxWx3 image at full size; with
    ``flip`` the average of the image's and its mirror's softmax (single scale)."""
    from ..datasets import to_tensor

    model.eval()
    x = to_tensor(image)[None].to(device)
    if flip:
        x = torch.cat([x, x.flip(-1)])
    p = model(x).float().softmax(1)
    p = (p[0] + p[1].flip(-1)) / 2 if flip else p[0]
    return p.cpu().numpy()
