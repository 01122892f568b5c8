"""Where seeds land on the synthetic world, from its role maps (``SegmentationRole``).

A classifier's CAM lights up what tells classes apart; in the synthetic world that is the
small part, not the body shared by a group, and a co-occurring partner or a class-correlated
background can carry the same signal. These rates say which of the three happened:

- ``part_recall``: of the GT part pixels (role 2), the fraction the seed labels with the GT class;
- ``body_recall``: the same over the GT body pixels (role 1);
- ``cooccur_fp``: over the images holding two partner classes a, b (either lists the other in
  ``synth.COOCCUR``), the fraction of GT-b pixels the seed labels a, pooled over every ordered
  pair (a, b) and image;
- ``context_fp``: over the images whose background is the correlated context of one of their
  classes, the fraction of GT background pixels the seed labels as any class.

Void (GT 255, role 255) counts nowhere. Real VOC has no role maps: the rates are not measured.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass

import numpy as np

from .synth import COOCCUR, ROLE_BODY, ROLE_PART
from .voc import BACKGROUND, CLASSES, NUM_CLASSES

KEYS = ("part_recall", "body_recall", "cooccur_fp", "context_fp")

_LABEL = {name: i + 1 for i, name in enumerate(CLASSES)}
#: Unordered partner pairs as mask labels: the table lists some pairs one way only
#: (aeroplane -> person), but a seed can confuse them either way.
_PARTNERS = {frozenset((_LABEL[a], _LABEL[b])) for a, bs in COOCCUR.items() for b in bs}


def partner_pairs(present) -> list[tuple[int, int]]:
    """Ordered (a, b) mask labels of the present classes (labels 1..20; others ignored, so
    ``np.unique(mask)`` will do) that are partners."""
    present = sorted({int(c) for c in present if 1 <= c <= NUM_CLASSES})
    return [(a, b) for a in present for b in present if a != b and frozenset((a, b)) in _PARTNERS]


@dataclass
class Counts:
    """Pixel counts (hits, totals) behind the four rates; sums over images with ``+``."""

    part_hit: int = 0
    part_total: int = 0
    body_hit: int = 0
    body_total: int = 0
    cooccur_hit: int = 0
    cooccur_total: int = 0
    context_hit: int = 0
    context_total: int = 0

    def __add__(self, other: "Counts") -> "Counts":
        return Counts(*(a + b for a, b in zip(astuple(self), astuple(other))))

    def rates(self) -> dict[str, float | None]:
        """The four rates; None where no pixel was eligible (e.g. no partner pair in the split)."""
        def rate(hit, total):
            return hit / total if total else None

        return dict(zip(KEYS, (rate(self.part_hit, self.part_total), rate(self.body_hit, self.body_total),
                               rate(self.cooccur_hit, self.cooccur_total),
                               rate(self.context_hit, self.context_total))))


def image_counts(label: np.ndarray, gt: np.ndarray, role: np.ndarray, pairs: list[tuple[int, int]],
                 class_context: bool) -> Counts:
    """Counts of one image. ``label``: seed label map (0 background, 1..20); ``gt``: class mask
    (255 void); ``role``: role map (0, 1 body, 2 part, 255 void); ``pairs``: :func:`partner_pairs`
    of its classes; ``class_context``: its background is the context of one of its classes."""
    if not label.shape == gt.shape == role.shape:
        raise ValueError(f"shapes differ: seed {label.shape}, mask {gt.shape}, roles {role.shape}")
    obj = (gt >= 1) & (gt <= NUM_CLASSES)  # not background, not void
    correct = label == gt
    part, body = obj & (role == ROLE_PART), obj & (role == ROLE_BODY)
    out = Counts(part_hit=int((part & correct).sum()), part_total=int(part.sum()),
                 body_hit=int((body & correct).sum()), body_total=int(body.sum()))
    for a, b in pairs:
        on_b = gt == b
        out.cooccur_hit += int((on_b & (label == a)).sum())
        out.cooccur_total += int(on_b.sum())
    if class_context:
        bg = gt == BACKGROUND
        out.context_hit = int((bg & (label != BACKGROUND)).sum())
        out.context_total = int(bg.sum())
    return out

