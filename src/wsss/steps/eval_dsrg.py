"""Step ``eval-dsrg``: the DSRG-trained network of one method (``seg-dsrg-<method>.pt``, made by
train-dsrg) scored on ``params.val_split`` exactly as eval-seg scores CRF-mask training (the same
code, :func:`wsss.steps.eval_seg.evaluate`: full image, flip, optional dense CRF with
``seg_crf``). Predictions go to ``outputs/predictions/dsrg-<method>/``, scores to
``outputs/metrics/eval_dsrg/<method>.json`` (the report's "DSRG segmentation" column) and MLflow.
"""

from __future__ import annotations

from .. import methods
from ..config import Params
from .common import out_dir
from .eval_seg import evaluate


def run(params: Params, method: str) -> dict:
    methods.get(method)
    return evaluate(params, method, f"seg-dsrg-{method}", f"dsrg-{method}",
                    out_dir("metrics", "eval_dsrg", f"{method}.json"), "eval-dsrg",
                    f"python cli.py train-dsrg --method {method}")
