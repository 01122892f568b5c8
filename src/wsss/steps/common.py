"""Helpers shared by the step modules: output locations and dataset opening."""

from __future__ import annotations

import os
from pathlib import Path

from ..config import METHOD_CHECKPOINTS, Params
from ..errors import UserError
from ..paths import workspace_root

OUTPUTS = "outputs"


def out_dir(*parts: str) -> Path:
    p = Path(os.environ["WSSS_OUTPUTS"]) if os.environ.get("WSSS_OUTPUTS") else workspace_root() / OUTPUTS
    for part in parts:
        p = p / part
    return p


def checkpoint_path(name: str) -> Path:
    return out_dir("checkpoints", f"{name}.pt")


def method_checkpoint(method: str) -> Path:
    if method not in METHOD_CHECKPOINTS:
        raise UserError(f"unknown method {method!r}; choose from {', '.join(METHOD_CHECKPOINTS)}")
    return checkpoint_path(METHOD_CHECKPOINTS[method])


def open_split(params: Params, split: str, validate: bool = True):
    """Open one split of the dataset at params.data_dir (first ``subset`` ids when set)."""
    from ..voc import VOCDataset, validate as validate_tree

    root = params.data_path()
    if not root.exists():
        hint = "python cli.py data synth" if params.dataset == "synth" else "python cli.py data voc --root PATH"
        raise UserError(f"{root}: dataset folder missing; create it with `{hint}`")
    if validate:
        validate_tree(root, [split])
    return VOCDataset(root, split, params.subset)


def summary(step: str, text: str) -> None:
    """The one-line summary every step ends with."""
    print(f"[{step}] {text}", flush=True)
