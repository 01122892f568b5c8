"""IRN's class-boundary branch and its inter-pixel affinity loss.

Ahn, Cho and Kwak, "Weakly Supervised Learning of Instance Segmentation with Inter-pixel
Relations", CVPR 2019 (IRN). The network predicts a class-boundary map B (stride 4, values in
[0, 1]) from five levels of a frozen ResNet trunk; the affinity of two pixels i, j within a
radius is a_ij = 1 - max_{k on the segment ij} B_k (Eq. 1 of the paper). It is trained from
the IR labels (confident foreground / background / 255 between: the ``crf`` step's output) with

    L = (L_pos + L_neg) / 2,  L_pos = L_bg+ / 2 + L_fg+ / 2,
    L_bg+ = -sum_{bg+ pairs} log(a + 1e-5) / (#bg+ + 1e-5)   (L_fg+ the same over fg+ pairs),
    L_neg = -sum_{neg pairs} log(1 + 1e-5 - a) / (#neg + 1e-5),

each term a mean over its pairs in the whole batch (official step/train_irn.py; the affinity
half of its total loss). Pairs: both labels in 0..20 (255 ignored); positive when equal, split
into background (label 0) and foreground; negative when different.

Conventions (official jiwoon-ahn/irn; file:line in docs/methods.md, "IRN"):

* Trunk: the classifier's ResNet (``outputs/checkpoints/cls.pt``, the offline stand-in for
  IRN's ImageNet ResNet-50), frozen: no gradient, BatchNorm on running statistics, features
  computed without a graph (net/resnet50_irn.py ``forward`` detaches every stage and
  ``train`` keeps the backbone in eval mode).
* Edge branch: per level (stem output, layers 1-4) a bias-free 1x1 conv to 32 channels,
  GroupNorm(4, 32), bilinear upsampling to stride 4 (levels below it), ReLU; the five
  concatenated (160 channels) go through a 1x1 conv with bias to one logit. Upsampling factor
  = the ratio of the level's stride to 4, then cropped to the stride-4 size, as the official.
* Directions: the pairs (i, i + d) for d in :func:`offsets` (a half-plane: each unordered pair
  once) and the segment pixels of :func:`path` (cells of the bounding box within distance 1 of
  the line), the definition of the official misc/indexing.py ``PathIndex``.
* Departure: the official code takes the source pixels from one fixed window (rows 0..H-r,
  columns r-1..W-r) so that every direction stays inside the map; here every pair whose two
  pixels lie in the map counts (pixels outside are padded with label 255 and boundary 1).
  On a 24x24 map that window would drop about a tenth of the pairs at the borders.
* Left out: the displacement-field (instance) branch of IRN and its two losses. Semantic
  pseudo-masks use only the boundary map; the instance masks are not part of this harness.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .backbone import ResNetTrunk

KIND = "irn"
EPS = 1e-5
#: Output stride of the boundary map.
STRIDE = 4
#: Channels of each level's projection (official: 32).
EDGE_CH = 32


@functools.lru_cache(maxsize=None)
def offsets(radius: int) -> tuple[tuple[int, int], ...]:
    """The directions d = (dy, dx) of the pairs (i, i + d) within ``radius``: (0, dx) for
    1 <= dx < radius, and (dy, dx) for 1 <= dy < radius, |dx| < radius, dy² + dx² < radius²
    (one of each pair of opposite directions). Radius 2 gives the 4 directions of the
    8-neighbourhood's half; radius 1 gives none."""
    if radius < 2:
        raise ValueError(f"radius must be >= 2 (got {radius})")
    out = [(0, dx) for dx in range(1, radius)]
    out += [(dy, dx) for dy in range(1, radius) for dx in range(-radius + 1, radius) if dy * dy + dx * dx < radius * radius]
    return tuple(out)


@functools.lru_cache(maxsize=None)
def path(dy: int, dx: int) -> tuple[tuple[int, int], ...]:
    """The cells (y, x) relative to i that the segment from i to i + (dy, dx) passes: those of
    the bounding box whose distance to the line through both is below 1 (both ends included)."""
    n2 = dy * dy + dx * dx
    cells = []
    for y in range(min(0, dy), max(0, dy) + 1):
        for x in range(min(0, dx), max(0, dx) + 1):
            if (dy * x - dx * y) ** 2 < n2:
                cells.append((y, x))
    return tuple(cells)


def edge_to_affinity(edge: torch.Tensor, radius: int) -> torch.Tensor:
    """Affinities (B, K, H, W) from boundary maps ``edge`` (B, H, W) in [0, 1]: entry k at i is
    a(i, i + d_k) = 1 - max of ``edge`` over :func:`path` (d_k); cells outside the map count as
    boundary (1), so a pair leaving the map gets affinity 0."""
    r = radius
    b, h, w = edge.shape
    pad = F.pad(edge, (r, r, r, r), value=1.0)
    out = []
    for dy, dx in offsets(r):
        cells = [pad[:, r + y:r + y + h, r + x:r + x + w] for y, x in path(dy, dx)]
        out.append(1.0 - torch.stack(cells, 0).amax(0))
    return torch.stack(out, 1)


def affinity_labels(labels: torch.Tensor, radius: int, n_labels: int = 21):
    """The pair labels of IR label maps ``labels`` (B, H, W) int (0 background, 1..20 classes,
    anything >= ``n_labels`` ignored: 255): three float masks (B, K, H, W) over the directions
    of :func:`offsets`, bg_pos (both background), fg_pos (both the same class) and neg (two
    different labels); a pair with an ignored pixel or a pixel outside the map is in none."""
    r = radius
    b, h, w = labels.shape
    pad = F.pad(labels, (r, r, r, r), value=255)
    src = labels
    bg, fg, neg = [], [], []
    for dy, dx in offsets(r):
        dst = pad[:, r + dy:r + dy + h, r + dx:r + dx + w]
        valid = (src < n_labels) & (dst < n_labels)
        same = src == dst
        bg.append(valid & same & (src == 0))
        fg.append(valid & same & (src > 0))
        neg.append(valid & ~same)
    return tuple(torch.stack(m, 1).float() for m in (bg, fg, neg))


def affinity_loss(aff: torch.Tensor, bg_pos: torch.Tensor, fg_pos: torch.Tensor, neg: torch.Tensor) -> dict:
    """IRN's affinity loss (module docstring): ``total`` = (L_pos + L_neg) / 2 and its terms,
    each averaged over its pairs in the whole batch with the official +1e-5 guards."""
    bg = (-bg_pos * torch.log(aff + EPS)).sum() / (bg_pos.sum() + EPS)
    fg = (-fg_pos * torch.log(aff + EPS)).sum() / (fg_pos.sum() + EPS)
    ng = (-neg * torch.log(1.0 + EPS - aff)).sum() / (neg.sum() + EPS)
    pos = bg / 2 + fg / 2
    return {"total": (pos + ng) / 2, "pos": pos, "neg": ng, "bg_pos": bg, "fg_pos": fg}


def _branch(c_in: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, EDGE_CH, 1, bias=False), nn.GroupNorm(4, EDGE_CH))


class IRNet(nn.Module):
    """The boundary branch of IRN on a frozen :class:`~wsss.models.backbone.ResNetTrunk`."""

    def __init__(self, backbone: str = "resnet18", output_stride: int = 16):
        super().__init__()
        self.arch, self.output_stride = backbone, output_stride
        self.backbone = ResNetTrunk(backbone, output_stride, "none")
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        stem_ch = self.backbone.stem[0].out_channels
        self.edge = nn.ModuleList([_branch(c) for c in (stem_ch, *self.backbone.channels)])
        self.edge_out = nn.Conv2d(EDGE_CH * 5, 1, 1, bias=True)

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()  # BatchNorm on running statistics, always
        return self

    def levels(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Stem output and layers 1-4 of the frozen trunk, without a graph."""
        t = self.backbone
        with torch.no_grad():
            x0 = t.stem(x)
            x1 = t.layer1(x0)
            x2 = t.layer2(x1)
            x3 = t.layer3(x2)
            x4 = t.layer4(x3)
        return [x0, x1, x2, x3, x4]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Boundary logits (B, 1, h, w) at stride 4 (h = ceil(H / 4))."""
        feats = self.levels(x)
        h, w = feats[1].shape[-2:]
        outs = []
        for f, branch in zip(feats, self.edge):
            y = branch(f)
            factor = round(h / f.shape[-2])
            if factor > 1:
                y = F.interpolate(y, scale_factor=factor, mode="bilinear", align_corners=False)
            outs.append(F.relu(y[..., :h, :w]))
        return self.edge_out(torch.cat(outs, 1))

    @torch.no_grad()
    def boundary(self, x: torch.Tensor) -> torch.Tensor:
        """Inference boundary map (h, w) in [0, 1] of one image (1, 3, H, W): the sigmoid of the
        mean logit of the image and its mirror image (official EdgeDisplacement.forward)."""
        logits = self(torch.cat([x, x.flip(-1)], 0))
        return torch.sigmoid(logits[0, 0] / 2 + logits[1, 0].flip(-1) / 2)

    def spec(self) -> dict[str, Any]:
        return {"kind": KIND, "backbone": self.arch, "output_stride": self.output_stride}


def checkpoint_name(method: str) -> str:
    """Stem of the IRN checkpoint of ``method``: outputs/checkpoints/irn-<method>.pt."""
    return f"irn-{method}"


def load_irn(path: str | Path, method: str, device: torch.device | str = "cpu") -> tuple[IRNet, dict]:
    """The IRN checkpoint ``train-irn --method M`` wrote (eval mode), or one clear error: a
    missing file or a checkpoint of another kind (a classifier's, SIPE's) names the fix."""
    from .classifier import read_checkpoint

    path = Path(path)
    fix = f"run `python cli.py train-irn --method {method}`"
    if not path.is_file():
        raise UserError(f"{path}: IRN checkpoint missing; {fix} first")
    ckpt = read_checkpoint(path)
    spec = ckpt["spec"]
    if spec.get("kind") != KIND:
        raise UserError(f"{path}: is not an IRN checkpoint (kind {spec.get('kind', 'classifier')!r}); {fix}")
    try:
        model = IRNet(spec["backbone"], spec["output_stride"])
        model.load_state_dict(ckpt["model"])
    except Exception as e:
        raise UserError(f"{path}: not a valid IRN checkpoint ({type(e).__name__}); {fix}") from None
    return model.to(device).eval(), ckpt
