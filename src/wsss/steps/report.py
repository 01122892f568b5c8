"""Step ``report``: the headline table "method x {seed, pseudo-mask, segmentation mIoU}" with
deltas against ``cam``, the fully supervised upper bound, and the figures reported in the
literature (../shared/SEEDS.md), each labelled "reported". Writes ``outputs/report.md``,
``outputs/report.png`` (bar chart) and ``outputs/metrics/report.json``; logs all to MLflow.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ..config import Params
from ..io import atomic_path, write_json, write_text
from ..tracking import step_run
from .common import out_dir, summary

STAGES = (("seed", "eval_seeds"), ("mask", "crf"), ("seg", "eval_seg"))
#: Seed mIoU at the best threshold of ``threshold_sweep`` for each method: chosen on the
#: scored images themselves (an oracle), so it separates how well a method localises from how
#: its scores are calibrated against the one shared ``threshold``.
ORACLE = "seed_best"
SPREAD_KEYS = tuple(k for k, _ in STAGES) + (ORACLE,)

#: Published PASCAL VOC 2012 figures (mIoU %, seed/mask on train, seg on val), from SEEDS.md.
REPORTED = [
    {"method": "IRN (R50)", "seed": 48.3, "mask": 66.5, "seg": 63.5, "note": "DeepLabv2-R50 val"},
    {"method": "ReCAM (R50)", "seed": 54.8, "mask": 70.5, "seg": 68.5, "note": "seed/mask unverified"},
    {"method": "Puzzle-CAM (R50)", "seed": 51.5, "mask": None, "seg": 66.9, "note": "seg with ResNeSt-101"},
    {"method": "SIPE (R50)", "seed": 58.6, "mask": None, "seg": 68.8, "note": "seg with R101"},
    {"method": "Grad-CAM + dense CRF (lecture)", "seed": None, "mask": None, "seg": 44.57, "note": ""},
    {"method": "student CAM (30 images)", "seed": 22.0, "mask": 28.0, "seg": None,
     "note": "'segmentation' = IRN pseudo-mask on ~30 train images"},
    {"method": "student ReCAM+Score-CAM (30 images)", "seed": 29.0, "mask": 30.0, "seg": None,
     "note": "same protocol"},
]


def _read(stage_dir: str, method: str) -> dict:
    p = out_dir("metrics", stage_dir, f"{method}.json")
    return json.loads(p.read_text()) if p.is_file() else {}


def collect(methods: list[str]) -> list[dict]:
    rows = []
    for m in methods:
        scores = {k: _read(d, m) for k, d in STAGES}
        rows.append({"method": m, **{k: v.get("miou") for k, v in scores.items()},
                     ORACLE: scores["seed"].get("best_miou")})
    gt = _read("eval_seg", "gt").get("miou")
    if gt is not None:
        rows.append({"method": "upper bound (seg on GT masks)", "seed": None, "mask": None, "seg": gt,
                     ORACLE: None})
    return rows


def _fmt(v, pct=True) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{100 * v:.1f}" if pct else f"{v:.1f}"


def _fmt_spread(mean, std) -> str:
    return "-" if mean is None else f"{100 * mean:.1f} ± {100 * std:.1f}"


def _delta(method: str, value, base) -> str:
    """Δ vs cam in points, or "-" for cam itself, the upper bound and missing values."""
    if method == "cam" or method.startswith("upper") or value is None or base is None:
        return "-"
    return f"{100 * (value - base):+.1f}"


def _single_table(rows: list[dict]) -> list[str]:
    base = next((r for r in rows if r["method"] == "cam"), {})
    lines = ["| method | seed mIoU | Δ vs cam | pseudo-mask mIoU | Δ vs cam | segmentation mIoU | Δ vs cam "
             "| seed mIoU, oracle threshold |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [r["method"]]
        for k, _ in STAGES:
            cells += [_fmt(r[k]), _delta(r["method"], r[k], base.get(k))]
        cells.append(_fmt(r.get(ORACLE)))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _spread_table(spread: dict) -> list[str]:
    cam = spread["methods"].get("cam", {})
    lines = ["| method | seed mIoU | pseudo-mask mIoU | segmentation mIoU | seed mIoU, oracle threshold "
             "| Δ vs cam (seed / mask / seg, of the means) |",
             "|---|---|---|---|---|---|"]
    for m, st in spread["methods"].items():
        deltas = [_delta(m, st.get(k, (None,))[0], cam.get(k, (None,))[0]) for k, _ in STAGES]
        lines.append(f"| {m} | " + " | ".join(_fmt_spread(*st.get(k, (None, None))) for k in SPREAD_KEYS)
                     + " | " + " / ".join(deltas) + " |")
    return lines


def markdown(rows: list[dict], params: Params, spread: dict | None = None) -> str:
    world = "synthetic VOC world" if params.dataset == "synth" else "PASCAL VOC 2012"
    which = (f"mean ± population std over random seeds {spread['seeds']}" if spread
             else f"random seed {params.seed}")
    lines = [f"# WSSS comparison on the {world}", "",
             f"Measured here: seed mIoU on `{params.seed_split}` (threshold {params.threshold}), "
             f"pseudo-mask mIoU on `{params.seed_split}` (dense CRF, conf_fg {params.conf_fg} / conf_bg "
             f"{params.conf_bg}, void counts as a miss), segmentation mIoU on `{params.val_split}`; "
             f"backbone {params.backbone}, {which}. Numbers are mIoU in %.", ""]
    lines += _spread_table(spread) if spread else _single_table(rows)
    lines += ["", f"The oracle column is the best seed mIoU over threshold_sweep {list(params.threshold_sweep)}, "
              "picked on the scored images themselves: an upper bound on what tuning the threshold per "
              "method could give, not a fair score.",
              "", "## Reported on PASCAL VOC 2012 (not measured here)", "",
              "| method | seed | pseudo-mask | segmentation (val) | note |", "|---|---|---|---|---|"]
    for r in REPORTED:
        lines.append(f"| {r['method']} (reported) | {_fmt(r['seed'], False)} | {_fmt(r['mask'], False)} | "
                     f"{_fmt(r['seg'], False)} | {r['note']} |")
    lines += ["", "Reported figures come from ../shared/SEEDS.md; the synthetic world is not VOC, so "
              "compare the ordering of methods and the deltas, not the absolute values."]
    return "\n".join(lines) + "\n"


def spread_rows(spread: dict) -> list[dict]:
    """Rows (as :func:`collect` returns them) holding the means of a spread."""
    return [{"method": m, **{k: st[k][0] if k in st else None for k in SPREAD_KEYS}}
            for m, st in spread["methods"].items()]


def bar_chart(rows: list[dict], path: Path, spread: dict | None = None) -> None:
    """Grouped bars per method (seed, pseudo-mask, segmentation); with a spread, the means
    with ± std error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(rows)), 3.8))
    width = 0.27
    x = np.arange(len(rows))
    for i, (k, _) in enumerate(STAGES):
        vals = [100 * r[k] if r[k] is not None else 0 for r in rows]
        err = ([100 * spread["methods"][r["method"]].get(k, (0, 0))[1] for r in rows] if spread else None)
        ax.bar(x + (i - 1) * width, vals, width, yerr=err, capsize=2 if spread else 0,
               label={"seed": "seed", "mask": "pseudo-mask", "seg": "segmentation"}[k])
    ax.set_xticks(x, [r["method"].replace(" (seg on GT masks)", "\n(GT masks)") for r in rows], rotation=30, ha="right")
    ax.set_ylabel("mIoU (%)")
    ax.legend()
    fig.tight_layout()
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def params_fingerprint(params: Params) -> str:
    """Fingerprint of every param but ``methods``: ``spread`` reuses a finished run only when it
    matches and the run covered every method asked for (each method's stages read cls.pt and
    their own inputs only, so the other methods listed beside it do not change its rows)."""
    from ..trainer import fingerprint

    return fingerprint({k: v for k, v in params.to_dict().items() if k != "methods"})


def run(params: Params, spread: dict | None = None, until: str = "seg") -> dict:
    rows = collect(list(params.methods)) if not spread else spread_rows(spread)
    text = markdown(rows, params, spread)
    write_text(out_dir("report.md"), text)
    bar_chart(rows, out_dir("report.png"), spread)
    result = {"rows": rows, "params_fingerprint": params_fingerprint(params), "until": until,
              **({"spread": spread} if spread else {})}
    write_json(out_dir("metrics", "report.json"), result)
    with step_run("report", params) as tracker:
        tracker.log_table([{k: (v if v is not None else float("nan")) for k, v in r.items()} for r in rows],
                          "report_table.json")
        tracker.log_artifact(out_dir("report.md"))
        tracker.log_artifact(out_dir("report.png"))
        for r in rows:
            name = r["method"].split(" ")[0]
            tracker.log_metrics({f"{name}.{k}_miou": r[k] for k in SPREAD_KEYS if r.get(k) is not None})
    print(text)
    summary("report", f"{len(rows)} rows -> {out_dir('report.md')}")
    return result


def aggregate(per_seed: dict[int, list[dict]]) -> dict:
    """mean ± std (population std over seeds) of each method's three mIoUs."""
    methods: dict[str, dict[str, list[float]]] = {}
    for rows in per_seed.values():
        for r in rows:
            for k in SPREAD_KEYS:
                if r.get(k) is not None:
                    methods.setdefault(r["method"], {}).setdefault(k, []).append(r[k])
    return {"seeds": sorted(per_seed),
            "methods": {m: {k: (float(np.mean(v)), float(np.std(v))) for k, v in d.items()} for m, d in methods.items()}}
