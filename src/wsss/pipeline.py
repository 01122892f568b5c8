"""The whole pipeline in-process, in DAG order (the same order as dvc.yaml), and the
multi-seed spread built on it. ``dvc repro`` is the tracked way to run the pipeline; this
module exists for ``python cli.py spread`` (N random seeds into separate output folders)."""

from __future__ import annotations

import dataclasses
import os
from contextlib import contextmanager

from .config import Params

TRAINED = {"recam": ("recam", "cam"), "recam-scorecam": ("recam", "scorecam"),
           "puzzlecam": ("puzzle", None), "sipe": ("sipe", None)}


STAGE_ORDER = ("seeds", "crf", "seg")


def run_all(params: Params, until: str = "seg") -> dict:
    """Every step in DAG order; ``until='crf'`` stops each method after its pseudo-masks
    (and skips the segmentation networks and the upper bound)."""
    from .steps import crf, eval_seeds, eval_seg, report, seeds, train_cls, train_seg

    if until not in STAGE_ORDER:
        raise ValueError(f"until must be one of {STAGE_ORDER}")

    train_cls.run(params)
    methods = list(params.methods)
    # scorecam seeds first: recam-scorecam's default mask source reads them
    order = sorted(methods, key=lambda m: (m != "scorecam", methods.index(m)))
    for m in order:
        if m in TRAINED:
            kind, variant = TRAINED[m]
            if kind == "recam":
                from .steps import train_recam

                train_recam.run(params, variant=variant)
            elif kind == "puzzle":
                from .steps import train_puzzle

                train_puzzle.run(params)
            else:
                from .steps import train_sipe

                train_sipe.run(params)
        seeds.run(params, m)
        eval_seeds.run(params, m)
        if until == "seeds":
            continue
        crf.run(params, m)
        if until == "crf":
            continue
        train_seg.run(params, m)
        eval_seg.run(params, m)
    if until == "seg":
        train_seg.run(params, "gt")
        eval_seg.run(params, "gt")
    return report.run(params)


@contextmanager
def _env(**values: str):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def spread(params: Params, seeds: list[int], until: str = "seg") -> dict:
    """Run the pipeline once per random seed (outputs/spread/seed-N/) and report mean ± std."""
    from .steps import report
    from .steps.common import out_dir

    per_seed = {}
    for s in seeds:
        root = out_dir("spread", f"seed-{s}")
        with _env(WSSS_OUTPUTS=str(root), WSSS_PIPELINE=f"spread-seed-{s}"):
            per_seed[s] = run_all(dataclasses.replace(params, seed=s), until=until)["rows"]
    agg = report.aggregate(per_seed)
    with _env(WSSS_OUTPUTS=str(out_dir("spread"))):
        report.run(params, spread=agg)
    return agg
