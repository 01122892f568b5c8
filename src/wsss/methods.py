"""The seed methods, declared once. Everything else derives from :data:`METHODS`: the CAM
registry (:mod:`wsss.cams.registry`), the CLI's ``--method`` choices, the validation of
``methods`` in params.yaml, and the DVC pipeline (its per-method stages are ``foreach`` over
``methods``; ``train@M`` runs the training of M below).

A method is a name, the CAM class that computes its seeds (``module:Class`` under
``wsss.cams``, imported when first used) and, when it has a training stage of its own, the
step that trains it (``module:function`` under ``wsss.steps``, called as ``function(params,
**train_args)``; it writes ``outputs/checkpoints/<name>.pt``). A method without training reads
the classifier of ``train-cls`` (``cls.pt``). See docs/methods.md, "Adding a method".

This module imports nothing heavy (no torch): config.py and the CLI read it on every start.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from .errors import UserError

#: The checkpoint of ``train-cls``, read by every method without a training stage of its own.
CLASSIFIER = "cls"
#: ``train-seg`` / ``eval-seg`` also accept this source: the ground-truth masks (upper bound).
GT = "gt"


@dataclass(frozen=True)
class MethodSpec:
    name: str
    cam: str  # "module:Class" under wsss.cams
    train: str | None = None  # "module:function" under wsss.steps, or None (seeds read cls.pt)
    train_args: dict = field(default_factory=dict)

    @property
    def checkpoint(self) -> str:
        """Stem of the checkpoint its seeds read (outputs/checkpoints/<stem>.pt)."""
        return self.name if self.train else CLASSIFIER


METHODS: tuple[MethodSpec, ...] = (
    MethodSpec("cam", "cam:CAM"),
    MethodSpec("gradcam", "gradcam:GradCAM"),
    MethodSpec("gradcampp", "gradcampp:GradCAMPlusPlus"),
    MethodSpec("scorecam", "scorecam:ScoreCAM"),
    MethodSpec("recam", "cam:ReCAM", train="train_recam:run", train_args={"variant": "cam"}),
    MethodSpec("recam-scorecam", "cam:ReCAM", train="train_recam:run", train_args={"variant": "scorecam"}),
    MethodSpec("puzzlecam", "cam:CAM", train="train_puzzle:run"),
    MethodSpec("sipe", "sipe:ISCAM", train="train_sipe:run"),
)

BY_NAME: dict[str, MethodSpec] = {m.name: m for m in METHODS}
#: method -> checkpoint stem its seeds read; params.yaml ``methods`` must spell these pairs.
METHOD_CHECKPOINTS: dict[str, str] = {m.name: m.checkpoint for m in METHODS}


def names() -> list[str]:
    return list(BY_NAME)


def get(name: str, allow_gt: bool = False) -> MethodSpec | None:
    """The declaration of ``name`` (None for ``gt`` when allowed); unknown names are one clear
    error listing the choices."""
    if allow_gt and name == GT:
        return None
    if name not in BY_NAME:
        choices = ([GT] if allow_gt else []) + names()
        raise UserError(f"unknown method {name!r}; choose from {', '.join(choices)}")
    return BY_NAME[name]


def enum(name: str, extra: tuple[str, ...] = ()) -> type[Enum]:
    """A str Enum of every method name (plus ``extra``): the CLI's choices."""
    values = names() + list(extra)
    return Enum(name, {v.upper().replace("-", "_"): v for v in values}, type=str)


def validate(methods: dict[str, str], bad) -> None:
    """Check params.yaml ``methods`` (method -> checkpoint); ``bad(key, why)`` makes the error."""
    if not methods:
        raise bad("methods", "must list at least one method")
    for m, ckpt in methods.items():
        if m not in BY_NAME:
            raise bad("methods", f"has unknown method {m!r}; choose from {', '.join(BY_NAME)}")
        if ckpt != BY_NAME[m].checkpoint:
            raise bad(f"methods.{m}", f"must be {BY_NAME[m].checkpoint!r} (the checkpoint its seeds use), got {ckpt!r}")
