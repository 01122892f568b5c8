"""Measure the default world's regime figures for variants of the world (issue 8).

Each variant is a name and params overrides (``key=yaml-value``), one per line of a text file,
e.g. ``tint05 synth_body_tint=0.5 seed=1``. For each, in its own copy of the repository under
``--work``, it regenerates the world (``data synth``: the world is data.dvc, not a stage, so a
``dvc exp run -S synth_*=...`` would not rebuild it), then runs CAM's path with the CLI
(train-cls, seeds, eval-seeds, crf) and the upper bound (train-seg / eval-seg on ground truth),
and prints one CSV row: classifier val mAP, CAM seed mIoU at the shared threshold, part and body
recall, CRF pseudo-mask mIoU, upper bound, context false positives.

    python benchmarks/world_tradeoff.py variants.txt --device cuda --jobs 7 > tradeoff.csv

``--jobs`` runs variants in parallel (on one GPU that is what made 7 variants take 3.5 min).
Without pydensecrf (the lent GPU machines) the crf column is left empty; run the same file
again on a CPU machine with ``--crf-only`` and ``--work`` pointing at the copies (with their
seeds) to fill it. Tracking is off (``WSSS_TRACKING=0``): these are not pipeline runs.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import csv
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
from wsss.steps.report import collect, regime_values  # noqa: E402  (the report's own readers)
STEPS = ["data synth --no-preview", "train-cls", "train --method cam", "seeds --method cam",
         "eval-seeds --method cam", "crf --method cam", "train-seg --method gt", "eval-seg --method gt"]
COLUMNS = ["variant", "overrides", "val_map", "seed_miou", "part_recall", "body_recall", "part_body",
           "crf_miou", "upper_bound", "context_fp"]


def parse_variants(path: Path) -> list[tuple[str, dict]]:
    variants = []
    for line in path.read_text().splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        overrides = {}
        for kv in words[1:]:
            key, sep, value = kv.partition("=")
            if not sep:
                sys.exit(f"error: {path}: {kv!r} is not key=value")
            overrides[key] = yaml.safe_load(value)
        variants.append((words[0], overrides))
    return variants


def checked_params(name: str, overrides: dict) -> dict:
    """params.yaml with the variant's overrides; an unknown key is one error, before any work."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    unknown = set(overrides) - set(params)
    if unknown:
        sys.exit(f"error: variant {name}: unknown params {sorted(unknown)}")
    return {**params, **overrides}


def run_variant(name: str, overrides: dict, work: Path, device: str, crf_only: bool) -> dict:
    d = work / name
    have_crf = importlib.util.find_spec("pydensecrf") is not None
    if not crf_only:
        params = checked_params(name, overrides)
        params["device"] = device
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        shutil.copy(REPO / "cli.py", d)
        shutil.copytree(REPO / "src", d / "src", ignore=shutil.ignore_patterns("__pycache__"))
        (d / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    steps = ["data synth --no-preview", "crf --method cam"] if crf_only else STEPS
    env = dict(os.environ, WSSS_TRACKING="0")
    for step in steps:
        if step.startswith("crf") and not have_crf:
            continue
        if step.startswith("data") and crf_only and (d / "data").exists():
            continue
        r = subprocess.run([sys.executable, "cli.py", *step.split()], cwd=d, env=env, capture_output=True, text=True)
        if r.returncode:
            sys.exit(f"error: variant {name}: `{step}` failed:\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
    metrics = d / "outputs" / "metrics"

    def read(*parts: str) -> dict:
        p = metrics.joinpath(*parts)
        return json.loads(p.read_text()) if p.is_file() else {}
    rows = collect(["cam"], read=read)
    cam, regime = rows[0], regime_values(rows, read("train_cls.json").get("val_map"))
    return {"variant": name, "overrides": " ".join(f"{k}={json.dumps(v)}" for k, v in overrides.items()),
            "val_map": regime["val_map"], "seed_miou": regime["cam_seed"], "crf_miou": regime["cam_mask"],
            "upper_bound": regime["upper"], **{k: cam[k] for k in ("part_recall", "body_recall", "part_body",
                                                                    "context_fp")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("variants", type=Path)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--work", type=Path, default=Path("/tmp/world_tradeoff"))
    ap.add_argument("--crf-only", action="store_true", help="only (re)run data synth and crf in existing copies")
    a = ap.parse_args()
    if not a.variants.is_file():
        sys.exit(f"error: {a.variants}: no such variants file")
    variants = parse_variants(a.variants)
    for name, overrides in variants:
        checked_params(name, overrides)
    out = csv.DictWriter(sys.stdout, COLUMNS)
    out.writeheader()
    with cf.ThreadPoolExecutor(max(1, a.jobs)) as pool:
        futures = [pool.submit(run_variant, n, o, a.work, a.device, a.crf_only) for n, o in variants]
        for f in futures:
            out.writerow(f.result())
            sys.stdout.flush()


if __name__ == "__main__":
    main()
