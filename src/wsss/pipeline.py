"""The whole pipeline in-process, in DAG order (the same order as dvc.yaml), and the
multi-seed spread built on it. ``dvc repro`` is the tracked way to run the pipeline; this
module exists for ``python cli.py spread`` (N random seeds into separate output folders).
The order is written twice (here and in dvc.yaml); tests/test_report.py checks that
:func:`run_all` calls exactly dvc.yaml's stage commands, each after the stages it reads."""

from __future__ import annotations

import dataclasses
import os
from contextlib import contextmanager

from .config import METHOD_CHECKPOINTS, Params

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
    return report.run(params, until=until)


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


def finished_run(params: Params, until: str, roots: list) -> tuple[list[dict], object] | None:
    """Rows of a finished run with these params (``methods`` aside) and ``until`` that covered
    every method of ``params.methods``, from one of ``roots`` (their ``metrics/report.json``),
    or None. Rows of methods not asked for are dropped; the upper-bound row is kept."""
    import json

    from .steps.report import params_fingerprint

    fp = params_fingerprint(params)
    wanted = set(params.methods)
    for root in roots:
        path = root / "metrics" / "report.json"
        try:
            done = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        ran = {r["method"] for r in done.get("rows", [])}
        if done.get("params_fingerprint") == fp and done.get("until", "seg") == until and wanted <= ran:
            rows = [r for r in done["rows"] if r["method"] in wanted or r["method"] not in METHOD_CHECKPOINTS]
            return rows, path
    return None


def spread(params: Params, seeds: list[int], until: str = "seg") -> dict:
    """Run the pipeline once per random seed (outputs/spread/seed-N/) and report mean ± std.

    A seed whose run already finished with the same params (and at least these methods) is
    not run again: its rows are read back from ``outputs/spread/seed-N/`` or, for the seed of
    params.yaml, from the main ``outputs/`` that ``dvc repro`` wrote (so ``bash run.sh``
    counts as seed 0, also for ``--methods`` subsets).
    Delete the folder's ``metrics/report.json`` to force a rerun (e.g. after a code change)."""
    import json

    from .steps import report
    from .steps.common import out_dir

    per_seed, regimes = {}, {}
    for s in seeds:
        root = out_dir("spread", f"seed-{s}")
        p = dataclasses.replace(params, seed=s)
        done = finished_run(p, until, [root, out_dir()])
        if done is not None:
            per_seed[s] = done[0]
            regimes[s] = json.loads(done[1].read_text()).get("regime") or {}
            print(f"[spread] seed {s}: reusing the finished run in {done[1]} (same params)", flush=True)
            continue
        with _env(WSSS_OUTPUTS=str(root), WSSS_PIPELINE=f"spread-seed-{s}"):
            result = run_all(p, until=until)
        per_seed[s], regimes[s] = result["rows"], result.get("regime") or {}
    agg = report.aggregate(per_seed, regimes)
    with _env(WSSS_OUTPUTS=str(out_dir("spread"))):
        report.run(params, spread=agg)
    return agg
