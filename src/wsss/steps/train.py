"""Step ``train --method M`` (DVC stage ``train@M``, one per method listed in params.yaml):
makes ``outputs/checkpoints/<M>.pt``, the checkpoint M's seeds come from.

A method with a training stage of its own (``train`` in :mod:`wsss.methods`) runs it. A method
without one reads the classifier of ``train-cls``; its checkpoint is then a small alias that
names ``cls.pt`` and holds its fingerprint (:func:`wsss.models.classifier.read_checkpoint`
follows it), so that every listed method has a stage of the same shape in dvc.yaml.
"""

from __future__ import annotations

import importlib

from .. import methods
from ..config import Params
from ..io import write_json
from .common import checkpoint_path, out_dir, summary


def run(params: Params, method: str) -> dict:
    spec = methods.get(method)
    if spec.train:
        module, fn = spec.train.split(":")
        return getattr(importlib.import_module(f"{__package__}.{module}"), fn)(params, **spec.train_args)
    from ..models.classifier import write_alias

    target = checkpoint_path(spec.checkpoint)
    write_alias(checkpoint_path(method), target)
    metrics = {"method": method, "trained": False, "checkpoint": spec.checkpoint}
    write_json(out_dir("metrics", f"train_{method}.json"), metrics)
    summary("train", f"{method}: no training of its own; {checkpoint_path(method).name} names {target.name}")
    return metrics
