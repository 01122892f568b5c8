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


#: The rules by which an official repository turns its maps into labels for its seed mIoU.
THRESHOLD, SWEEP, BACKGROUND = "threshold", "sweep", "background"


@dataclass(frozen=True)
class Scoring:
    """How a method's official code scores its seeds (issue 13, §3): eval-seeds reports this
    column beside the shared ``threshold`` (the headline) and the oracle (best of
    ``threshold_sweep``).

    ``rule``: ``threshold`` (a constant background score ``thresholds[0]`` beside the class
    maps, argmax), ``sweep`` (that for every value of ``thresholds``, keep the best mIoU: the
    threshold is chosen on the scored ground truth) or ``background`` (argmax over the method's
    own background map and its class maps, no threshold: the seed file's optional ``bg``
    array). ``source``: the official file and line. ``paper``: which of the three columns the
    paper's seed figure corresponds to (``shared``, ``official``, ``oracle``, or ``none``
    when the paper reports no seed mIoU)."""

    rule: str
    thresholds: tuple[float, ...] = ()
    source: str = ""
    paper: str = "official"

    def __post_init__(self) -> None:
        if self.rule not in (THRESHOLD, SWEEP, BACKGROUND):
            raise ValueError(f"unknown scoring rule {self.rule!r}")
        if (self.rule == BACKGROUND) != (not self.thresholds) or (self.rule == THRESHOLD and len(self.thresholds) != 1):
            raise ValueError(f"scoring rule {self.rule!r} has thresholds {self.thresholds!r}")
        if self.paper not in ("shared", "official", "oracle", "none"):
            raise ValueError(f"unknown paper column {self.paper!r}")

    @property
    def label(self) -> str:
        """The column's label, e.g. ``threshold 0.15``, ``best of 0.05-0.75``, ``background argmax``."""
        if self.rule == THRESHOLD:
            return f"threshold {self.thresholds[0]:g}"
        if self.rule == SWEEP:
            return f"best of {min(self.thresholds):g}-{max(self.thresholds):g}"
        return "background argmax"


#: IRN (jiwoon-ahn/irn run_sample.py: --cam_eval_thres 0.15; step/eval_cam.py pads the class
#: maps with it and takes the argmax). The post-hoc methods (Grad-CAM, Grad-CAM++, Score-CAM)
#: have no WSSS code of their own: they are scored as CAM is in the pipeline they plug into.
IRN = Scoring(THRESHOLD, (0.15,), "jiwoon-ahn/irn run_sample.py (--cam_eval_thres 0.15), step/eval_cam.py")
POST_HOC = Scoring(THRESHOLD, (0.15,), "no WSSS code of its own; IRN's cam_eval_thres 0.15", paper="none")
#: ReCAM run_sample.py:43 (--cam_eval_thres 0.21), step/eval_cam.py:18; the author says the
#: paper's seed figures come from a threshold sweep (ReCAM issue #3): the oracle column.
RECAM = Scoring(THRESHOLD, (0.21,), "zhaozhengChen/ReCAM run_sample.py:43, step/eval_cam.py:18", paper="oracle")
#: Puzzle-CAM evaluate.py:185-200: with no --threshold (the default, evaluate.py:13) it sweeps
#: np.arange(0.05, 0.80, 0.05) and prints the best.
PUZZLE = Scoring(SWEEP, tuple(round(0.05 * i, 2) for i in range(1, 16)),
                 "shjo-april/PuzzleCAM evaluate.py:13, 185-200")
#: SIPE keeps its background IS-CAM and takes the argmax over [background, classes], no
#: threshold (chenqi1126/SIPE make_cam.py, eval_cam.py:18-21).
SIPE = Scoring(BACKGROUND, (), "chenqi1126/SIPE make_cam.py, eval_cam.py:18-21")


@dataclass(frozen=True)
class MethodSpec:
    name: str
    cam: str  # "module:Class" under wsss.cams
    train: str | None = None  # "module:function" under wsss.steps, or None (seeds read cls.pt)
    train_args: dict = field(default_factory=dict)
    scoring: Scoring = IRN  # how its official code scores its seeds (eval-seeds' official column)

    @property
    def checkpoint(self) -> str:
        """Stem of the checkpoint its seeds read (outputs/checkpoints/<stem>.pt)."""
        return self.name if self.train else CLASSIFIER


METHODS: tuple[MethodSpec, ...] = (
    MethodSpec("cam", "cam:CAM", scoring=IRN),
    MethodSpec("gradcam", "gradcam:GradCAM", scoring=POST_HOC),
    MethodSpec("gradcampp", "gradcampp:GradCAMPlusPlus", scoring=POST_HOC),
    MethodSpec("scorecam", "scorecam:ScoreCAM", scoring=POST_HOC),
    MethodSpec("recam", "cam:ReCAM", train="train_recam:run", train_args={"variant": "cam"}, scoring=RECAM),
    MethodSpec("recam-scorecam", "cam:ReCAM", train="train_recam:run", train_args={"variant": "scorecam"},
               scoring=RECAM),
    MethodSpec("puzzlecam", "cam:CAM", train="train_puzzle:run", scoring=PUZZLE),
    MethodSpec("sipe", "sipe:ISCAM", train="train_sipe:run", scoring=SIPE),
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
