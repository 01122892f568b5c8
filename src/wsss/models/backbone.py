"""ResNet trunks from torchvision with a chosen output stride.

ResNet-50 reaches output stride 16/8 with dilation, as DeepLab does; ResNet-18/34
(BasicBlock, which torchvision cannot dilate) by setting the last stage's stride to 1, as
IRN/ReCAM do for ResNet-50 (``strides=(2, 2, 2, 1)``). Weights: ``none`` (random),
``imagenet`` (torchvision's weights enum; downloads where internet exists) or a path to a
torchvision-format state dict.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import nn

from ..errors import UserError
from ..io import load_torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_WEIGHTS = {
    "resnet18": "ResNet18_Weights",
    "resnet34": "ResNet34_Weights",
    "resnet50": "ResNet50_Weights",
}


def _set_stage_stride(stage: nn.Sequential, stride: int) -> None:
    block = stage[0]
    conv = block.conv2 if isinstance(block, torchvision.models.resnet.Bottleneck) else block.conv1
    conv.stride = (stride, stride)
    if block.downsample is not None:
        block.downsample[0].stride = (stride, stride)


def load_backbone_weights(net: nn.Module, arch: str, pretrained: str) -> None:
    if pretrained == "none":
        return
    if pretrained == "imagenet":
        enum = getattr(torchvision.models, _WEIGHTS[arch])
        try:
            state = enum.IMAGENET1K_V1.get_state_dict(progress=False)
        except Exception as e:  # no internet: say how to bring the file
            raise UserError(
                f"params.yaml: key 'pretrained' is 'imagenet' but the weights could not be "
                f"downloaded ({type(e).__name__}); download {enum.IMAGENET1K_V1.url} elsewhere "
                f"and set pretrained: /path/to/file.pth"
            ) from None
    else:
        path = Path(pretrained)
        fix = "fix key 'pretrained' in params.yaml" if not path.is_file() else "re-download it"
        state = load_torch(path, "pretrained weights file (torch state dict)", fix)
        if "state_dict" in state:
            state = state["state_dict"]
        if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
            raise UserError(f"{path}: not a torchvision {arch} state dict (parameter name -> tensor); "
                            f"fix key 'pretrained' in params.yaml")
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    own = net.state_dict()
    wrong = [k for k, v in state.items() if k in own and v.shape != own[k].shape]
    if wrong:  # load_state_dict raises on these even with strict=False
        k = wrong[0]
        raise UserError(f"{pretrained}: does not match torchvision {arch} ({k} has shape {list(state[k].shape)}, "
                        f"{arch} needs {list(own[k].shape)}); use weights for {arch}")
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise UserError(
            f"{pretrained}: does not match torchvision {arch} "
            f"(missing {missing[:2]}, unexpected {unexpected[:2]}); use weights for {arch}"
        )


class ResNetTrunk(nn.Module):
    """The convolutional stages of a torchvision ResNet; ``forward`` returns all four stages."""

    def __init__(self, arch: str = "resnet18", output_stride: int = 16, pretrained: str = "none"):
        super().__init__()
        if arch not in _WEIGHTS:
            raise UserError(f"params.yaml: backbone {arch!r} unknown; choose from {', '.join(_WEIGHTS)}")
        ctor = getattr(torchvision.models, arch)
        if arch == "resnet50":
            dil = {32: [False, False, False], 16: [False, False, True], 8: [False, True, True]}
            net = ctor(weights=None, replace_stride_with_dilation=dil[output_stride])
        else:
            net = ctor(weights=None)
            if output_stride <= 16:
                _set_stage_stride(net.layer4, 1)
            if output_stride <= 8:
                _set_stage_stride(net.layer3, 1)
        load_backbone_weights(net, arch, pretrained)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.channels = [_out_ch(s)
                         for s in (net.layer1, net.layer2, net.layer3, net.layer4)]
        self.out_channels = self.channels[-1]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x1 = self.layer1(self.stem(x))
        x2 = self.layer2(x1)
        x3 = self.layer3(x2)
        x4 = self.layer4(x3)
        return [x1, x2, x3, x4]


def _out_ch(stage: nn.Sequential) -> int:
    last = stage[-1]
    return (last.conv3 if hasattr(last, "conv3") else last.conv2).out_channels


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8-range or [0,1] RGB (B,3,H,W) float -> ImageNet-normalised input."""
    mean = images.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images - mean) / std
