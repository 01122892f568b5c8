"""Step ``report``: the headline table "method x {seed, pseudo-mask, segmentation mIoU}" with
deltas against ``cam``, the fully supervised upper bound, and the figures reported in the
literature (../shared/SEEDS.md), each labelled "reported". A regime block sets the ratios that
say how hard this world is (classifier mAP, CAM seed / upper bound, pseudo-mask / seed) beside
the published VOC ones and, on the synthetic world, shows where each method's seeds land (part
vs body, co-occurring partner, class-correlated background; measured by ``eval-seeds``).
Writes ``outputs/report.md``, ``outputs/report.png`` (bar chart) and
``outputs/metrics/report.json``; logs all to MLflow.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from .. import methods
from ..config import Params
from ..io import atomic_path, write_json, write_text
from ..tracking import step_run
from .common import out_dir, summary

#: (row key, metrics folder): seed mIoU, pseudo-mask mIoU of the dense CRF and of IRN's random
#: walk (make-sem-seg, Ahn et al. 2019), segmentation mIoU (trained on the masks ``pseudo_masks`` names)
STAGES = (("seed", "eval_seeds"), ("mask", "crf"), ("irn", "irn"), ("seg", "eval_seg"))
LABELS = {"seed": "seed", "mask": "pseudo-mask (CRF)", "irn": "pseudo-mask (IRN)", "seg": "segmentation"}
#: Seed mIoU at the best threshold of ``threshold_sweep`` for each method: chosen on the
#: scored images themselves (an oracle), so it separates how well a method localises from how
#: its scores are calibrated against the one shared ``threshold``.
ORACLE = "seed_best"
#: Seed mIoU as the method's official code scores its maps (eval-seeds' ``official_miou``:
#: IRN's threshold 0.15, ReCAM's 0.21, Puzzle-CAM's best of 0.05-0.75, SIPE's argmax over its
#: own background map; see wsss.methods.Scoring).
OFFICIAL = "seed_official"
#: Other ways to train the segmentation network from a method's seeds, each one column beside the
#: CRF-mask segmentation ("seg"): row key, metrics folder (outputs/metrics/<folder>/<method>.json,
#: its ``miou``) and column header. One entry per trainer (IRN's random-walk masks go here too).
SEG_TRAINERS = (("dsrg", "eval_dsrg", "DSRG segmentation mIoU"),)
SPREAD_KEYS = tuple(k for k, _ in STAGES) + (ORACLE, OFFICIAL) + tuple(k for k, _, _ in SEG_TRAINERS)
#: Where the seeds land, per method (eval_seeds/<method>.json on the synthetic world; see
#: wsss.regime), plus ``part_body`` = part_recall / body_recall. Aggregated by ``spread`` too.
ROLE_KEYS = ("part_recall", "body_recall", "part_body", "cooccur_fp", "context_fp")
ROLE_HEADERS = ("part recall", "body recall", "part / body", "co-occurrence FP", "context FP")

#: The regime block: key in report.json's ``regime``, quantity, format (frac, pct or ratio) and
#: the published PASCAL VOC 2012 figure it stands beside. The ratios travel between worlds
#: better than absolute mIoUs: IRN's CAM seeds reach 48.3 / ~78 = 0.6 of full supervision and
#: its pseudo-masks 66.5 / 48.3 = 1.38 times the seeds.
REGIME = (
    ("val_map", "classifier val mAP", "frac", "> 0.9 (reported; ImageNet ResNet-50)"),
    ("upper", "upper bound: segmentation mIoU, DeepLab on GT masks (val)", "pct",
     "about 76-80 (reported; fully supervised DeepLab)"),
    ("cam_seed", "CAM seed mIoU", "pct", "48.3 (reported; CAM seeds, train)"),
    ("cam_mask", "CAM pseudo-mask mIoU", "pct", "66.5 (reported; IRN pseudo-masks, train)"),
    ("seed_over_upper", "CAM seed / upper bound", "ratio", "about 0.6 (reported; 48.3 / 76-80)"),
    ("mask_over_seed", "CAM pseudo-mask / CAM seed", "ratio", "1.38 (reported; 66.5 / 48.3)"),
    ("cam_irn", "CAM pseudo-mask mIoU, IRN random walk", "pct", "66.5 (reported; IRN pseudo-masks, train)"),
    ("irn_over_seed", "CAM IRN pseudo-mask / CAM seed", "ratio", "1.38 (reported; 66.5 / 48.3)"),
)

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


def _read(*parts: str) -> dict:
    """The metrics file outputs/metrics/<parts> ({} when missing)."""
    p = out_dir("metrics", *parts)
    return json.loads(p.read_text()) if p.is_file() else {}


def _ratio(a, b):
    return a / b if a is not None and b else None


def collect(methods: list[str], read=_read) -> list[dict]:
    """One row per method (and the upper bound) from the metrics files; ``read(*parts)`` gives
    the dict of outputs/metrics/<parts> (by default from this run's outputs)."""
    rows = []
    for m in methods:
        scores = {k: read(d, f"{m}.json") for k, d in STAGES}
        seed_scores = scores["seed"]
        roles = {k: seed_scores.get(k) for k in ROLE_KEYS}
        roles["part_body"] = _ratio(seed_scores.get("part_recall"), seed_scores.get("body_recall"))
        rows.append({"method": m, **{k: v.get("miou") for k, v in scores.items()},
                     **{k: read(d, f"{m}.json").get("miou") for k, d, _ in SEG_TRAINERS},
                     ORACLE: seed_scores.get("best_miou"), OFFICIAL: seed_scores.get("official_miou"), **roles})
    gt = read("eval_seg", "gt.json").get("miou")
    if gt is not None:
        rows.append({"method": "upper bound (seg on GT masks)", "seed": None, "mask": None, "irn": None, "seg": gt,
                     ORACLE: None, OFFICIAL: None, **dict.fromkeys(k for k, _, _ in SEG_TRAINERS),
                     **dict.fromkeys(ROLE_KEYS)})
    return rows


def training_warnings(methods: list[str], read=_read) -> list[str]:
    """One line per method whose training stage left a warning in its metrics
    (``train_<method>.json``): ReCAM's predictor W' at chance (:func:`wsss.metrics.predictor_warning`).
    The files are not dvc deps of this stage (a method's may not exist); a retrained method
    changes its eval_seeds metrics, which are."""
    from ..metrics import predictor_warning

    lines = []
    for m in methods:
        warning = predictor_warning(read(f"train_{m}.json").get("predictor_acc"))
        if warning:
            lines.append(f"**{m}: {warning}**")
    return lines


def regime_values(rows: list[dict], val_map: float | None) -> dict:
    """The measured side of the regime block, from the rows and the classifier's val mAP."""
    cam = next((r for r in rows if r["method"] == "cam"), {})
    upper = next((r["seg"] for r in rows if r["method"].startswith("upper")), None)
    seed_miou, mask_miou, irn_miou = cam.get("seed"), cam.get("mask"), cam.get("irn")
    return {"val_map": val_map, "upper": upper, "cam_seed": seed_miou, "cam_mask": mask_miou,
            "seed_over_upper": _ratio(seed_miou, upper), "mask_over_seed": _ratio(mask_miou, seed_miou),
            "cam_irn": irn_miou, "irn_over_seed": _ratio(irn_miou, seed_miou)}


def _cell(kind: str, value, std=None) -> str:
    """``value`` (± ``std`` when given) as a fraction (frac), a fraction in % (pct), a number
    already in points (points) or a ratio; "-" when missing."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    scale, digits = {"frac": (1, 3), "pct": (100, 1), "points": (1, 1), "ratio": (1, 2)}[kind]
    text = f"{scale * value:.{digits}f}"
    return text if std is None else f"{text} ± {scale * std:.{digits}f}"


def _delta(method: str, value, base) -> str:
    """Δ vs cam in points, or "-" for cam itself, the upper bound and missing values."""
    if method == "cam" or method.startswith("upper") or value is None or base is None:
        return "-"
    return f"{100 * (value - base):+.1f}"


def _spread_delta(method: str, stats, base, n: int, n_base: int) -> str:
    """Δ of the means vs cam in points, with ``*`` when it exceeds twice the larger of the two
    population stds (issue 8's test of a difference), which needs two seeds on each side."""
    text = _delta(method, stats[0] if stats else None, base[0] if base else None)
    if text == "-" or min(n, n_base) < 2:
        return text
    return text + ("*" if abs(stats[0] - base[0]) > 2 * max(stats[1], base[1]) else "")


def _n_note(n: int | None, n_seeds: int) -> str:
    """`` (n=K)`` after a mean that fewer seeds than the spread's measured; "" otherwise."""
    return f" (n={n})" if n is not None and n != n_seeds else ""


def _single_table(rows: list[dict], seg_masks: str = "crf") -> list[str]:
    base = next((r for r in rows if r["method"] == "cam"), {})
    lines = ["| method | seed mIoU | Δ vs cam | pseudo-mask mIoU (CRF) | Δ vs cam | pseudo-mask mIoU (IRN) | Δ vs cam "
             f"| segmentation mIoU (on {seg_masks.upper()} masks) | Δ vs cam "
             + "".join(f"| {h} " for _, _, h in SEG_TRAINERS)
             + "| seed mIoU, oracle threshold | seed mIoU, official scoring |",
             "|---|---|---|---|---|---|---|---|---|" + "---|" * len(SEG_TRAINERS) + "---|---|"]
    for r in rows:
        cells = [r["method"]]
        for k, _ in STAGES:
            cells += [_cell("pct", r.get(k)), _delta(r["method"], r.get(k), base.get(k))]
        cells += [_cell("pct", r.get(k)) for k, _, _ in SEG_TRAINERS]
        cells += [_cell("pct", r.get(ORACLE)), _official_cell(r["method"], r.get(OFFICIAL))]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _official_cell(method: str, value, std=None) -> str:
    """The official column's value with its rule, e.g. ``45.1 (threshold 0.15)``."""
    spec = methods.BY_NAME.get(method)
    if spec is None:
        return "-"
    return f"{_cell('pct', value, std)} ({spec.scoring.label})"


def scoring_notes(names: list[str]) -> list[str]:
    """For each method: its official scoring rule, the file it comes from and which column its
    paper's seed figure corresponds to."""
    paper = {"shared": "the shared-threshold column", "official": "the official column",
             "oracle": "the oracle column (its author: the paper's numbers come from a threshold sweep)",
             "none": "no column (the paper reports no seed mIoU)"}
    lines = ["| method | official scoring | official code | the paper's seed figure corresponds to |",
             "|---|---|---|---|"]
    for m in names:
        spec = methods.BY_NAME.get(m)
        if spec is not None:
            lines.append(f"| {m} | {spec.scoring.label} | {spec.scoring.source} | {paper[spec.scoring.paper]} |")
    return lines


def _spread_table(spread: dict, seg_masks: str = "crf") -> list[str]:
    cam = spread["methods"].get("cam", {})
    n_seeds = len(spread["seeds"])
    counts = spread.get("n", {})
    compared = [k for k, _ in STAGES] + [k for k, _, _ in SEG_TRAINERS]
    lines = ["| method | seed mIoU | pseudo-mask mIoU (CRF) | pseudo-mask mIoU (IRN) "
             f"| segmentation mIoU (on {seg_masks.upper()} masks) "
             + "".join(f"| {h} " for _, _, h in SEG_TRAINERS)
             + "| seed mIoU, oracle threshold | seed mIoU, official scoring "
             "| Δ vs cam (seed / CRF mask / IRN mask / seg"
             + "".join(f" / {k.upper()}" for k, _, _ in SEG_TRAINERS) + ", of the means) |",
             "|---|---|---|---|---|" + "---|" * len(SEG_TRAINERS) + "---|---|---|"]
    for m, st in spread["methods"].items():
        n = counts.get(m, {})

        def cell(k):
            return _cell("pct", *st.get(k, (None, None))) + (_n_note(n.get(k), n_seeds) if k in st else "")

        deltas = [_spread_delta(m, st.get(k), cam.get(k), n.get(k, n_seeds), counts.get("cam", {}).get(k, n_seeds))
                  for k in compared]
        cells = [cell(k) for k, _ in STAGES] + [cell(k) for k, _, _ in SEG_TRAINERS] + [cell(ORACLE)]
        cells.append(_official_cell(m, *st.get(OFFICIAL, (None, None))) + _n_note(n.get(OFFICIAL), n_seeds))
        lines.append(f"| {m} | " + " | ".join(cells) + " | " + " / ".join(deltas) + " |")
    lines += ["", "Δ marked * exceeds twice the larger of the two population stds (the method's and cam's); "
              "a Δ is marked only where each side has two seeds or more. (n=K): that mean is over K seeds."]
    return lines


def _regime_block(rows: list[dict], params: Params, spread: dict | None, values: dict) -> list[str]:
    """The regime table (measured beside reported), then, where the seeds carry role metrics
    (the synthetic world), the per-method table of where they land."""
    stats = spread.get("regime", {}) if spread else {k: (v, None) for k, v in values.items()}
    lines = ["## Regime: this run beside PASCAL VOC 2012", "",
             "How hard the task is here: the classifier, the upper bound and the CAM ratios next to the "
             f"published ones (seed and pseudo-mask on `{params.seed_split}`, upper bound on `{params.val_split}`"
             f"{'; mean ± std over seeds' if spread else ''}).", "",
             "| quantity | measured here | PASCAL VOC 2012 |", "|---|---|---|"]
    for key, label, kind, reported in REGIME:
        lines.append(f"| {label} | {_cell(kind, *stats.get(key, (None, None)))} | {reported} |")
    methods = [r for r in rows if not r["method"].startswith("upper")]
    if not any(r.get(k) is not None for r in methods for k in ROLE_KEYS):
        return lines
    lines += ["", f"Where the seeds land at threshold {params.threshold} (synthetic world: its role maps mark "
              "each object's discriminative part and its body):", "",
              "| method | " + " | ".join(ROLE_HEADERS) + " |", "|---|" + "---|" * len(ROLE_KEYS)]
    for r in methods:
        if spread:
            st = spread["methods"].get(r["method"], {})
            cells = [_cell("ratio" if k == "part_body" else "pct", *st.get(k, (None, None))) for k in ROLE_KEYS]
        else:
            cells = [_cell("ratio" if k == "part_body" else "pct", r.get(k)) for k in ROLE_KEYS]
        lines.append(f"| {r['method']} | " + " | ".join(cells) + " |")
    lines += ["", "Part / body recall: % of the ground truth's part / body pixels that the seed labels with "
              "their class. Co-occurrence FP: in images holding two partner classes (person + horse, chair + "
              "diningtable, ...), % of one partner's pixels labelled as the other (pooled over both orders). "
              "Context FP: in images whose background is the correlated context of one of their classes "
              "(sky for boats, ...), % of background pixels labelled as any class. Void counts nowhere."]
    return lines


def markdown(rows: list[dict], params: Params, spread: dict | None = None, regime: dict | None = None,
             warnings: list[str] | None = None) -> str:
    world = "synthetic VOC world" if params.dataset == "synth" else "PASCAL VOC 2012"
    which = (f"mean ± population std over random seeds {spread['seeds']}" if spread
             else f"random seed {params.seed}")
    lines = [f"# WSSS comparison on the {world}", "",
             f"Measured here: seed mIoU on `{params.seed_split}` (threshold {params.threshold}), "
             f"pseudo-mask mIoU on `{params.seed_split}` (dense CRF, conf_fg {params.conf_fg} / conf_bg "
             f"{params.conf_bg}, void counts as a miss; and IRN's random walk, background score "
             f"{params.sem_seg_bg_thres}), segmentation mIoU on `{params.val_split}` of the network trained on "
             f"the {params.pseudo_masks.upper()} masks (`pseudo_masks`); "
             f"backbone {params.backbone}, {which}. Numbers are mIoU in %.", ""]
    if warnings:
        lines += [*warnings, ""]
    lines += _spread_table(spread, params.pseudo_masks) if spread else _single_table(rows, params.pseudo_masks)
    lines += ["", f"Three seed columns: the headline at the shared threshold {params.threshold} (one rule for "
              "every method); the official scoring, as each method's official code scores its maps (rule in "
              "brackets, table below); and the oracle, the best seed mIoU over threshold_sweep "
              f"{list(params.threshold_sweep)}, picked on the scored images themselves: an upper bound on what "
              "tuning the threshold per method could give, not a fair score. A sweep in the official column "
              "(Puzzle-CAM) is an oracle too, on its own grid.", ""]
    names = [r["method"] for r in rows if not r["method"].startswith("upper")]
    lines += scoring_notes(names) + [""]
    lines += _regime_block(rows, params, spread, regime or {})
    lines += ["", "## Reported on PASCAL VOC 2012 (not measured here)", "",
              "| method | seed | pseudo-mask | segmentation (val) | note |", "|---|---|---|---|---|"]
    for r in REPORTED:
        lines.append(f"| {r['method']} (reported) | {_cell('points', r['seed'])} | {_cell('points', r['mask'])} | "
                     f"{_cell('points', r['seg'])} | {r['note']} |")
    lines += ["", "Reported figures come from ../shared/SEEDS.md; the synthetic world is not VOC, so "
              "compare the ordering of methods and the deltas, not the absolute values."]
    return "\n".join(lines) + "\n"


def spread_rows(spread: dict) -> list[dict]:
    """Rows (as :func:`collect` returns them) holding the means of a spread."""
    return [{"method": m, **{k: st[k][0] if k in st else None for k in SPREAD_KEYS + ROLE_KEYS}}
            for m, st in spread["methods"].items()]


def bar_chart(rows: list[dict], path: Path, spread: dict | None = None) -> None:
    """Grouped bars per method (seed, CRF and IRN pseudo-masks, segmentation, then one bar per
    entry of :data:`SEG_TRAINERS`); with a spread, the means with ± std error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [(k, LABELS[k]) for k, _ in STAGES] + [(k, f"segmentation ({k.upper()})") for k, _, _ in SEG_TRAINERS]
    fig, ax = plt.subplots(figsize=(max(6, 1.5 * len(rows)), 3.8))
    width = 0.8 / len(bars)
    x = np.arange(len(rows))
    for i, (k, label) in enumerate(bars):
        vals = [100 * r[k] if r.get(k) is not None else 0 for r in rows]
        err = ([100 * spread["methods"].get(r["method"], {}).get(k, (0, 0))[1] for r in rows] if spread else None)
        ax.bar(x + (i - (len(bars) - 1) / 2) * width, vals, width, yerr=err, capsize=2 if spread else 0,
               label=label)
    ax.set_xticks(x, [r["method"].replace(" (seg on GT masks)", "\n(GT masks)") for r in rows], rotation=30, ha="right")
    ax.set_ylabel("mIoU (%)")
    ax.legend()
    fig.tight_layout()
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def run(params: Params, spread: dict | None = None) -> dict:
    rows = collect(list(params.methods)) if not spread else spread_rows(spread)
    if spread:
        regime = {k: mean for k, (mean, _) in spread.get("regime", {}).items()}
    else:
        regime = regime_values(rows, _read("train_cls.json").get("val_map"))
    warnings = training_warnings(list(params.methods)) if not spread else []
    for w in warnings:
        print(w)
    text = markdown(rows, params, spread, regime, warnings)
    write_text(out_dir("report.md"), text)
    bar_chart(rows, out_dir("report.png"), spread)
    result = {"rows": rows, "regime": regime, "warnings": warnings, **({"spread": spread} if spread else {})}
    write_json(out_dir("metrics", "report.json"), result)
    with step_run("report", params) as tracker:
        tracker.log_table([{k: (v if v is not None else float("nan")) for k, v in r.items()} for r in rows],
                          "report_table.json")
        tracker.log_artifact(out_dir("report.md"))
        tracker.log_artifact(out_dir("report.png"))
        for r in rows:
            name = r["method"].split(" ")[0]
            tracker.log_metrics({f"{name}.{k}_miou": r[k] for k in SPREAD_KEYS if r.get(k) is not None})
            tracker.log_metrics({f"{name}.{k}": r[k] for k in ROLE_KEYS if r.get(k) is not None})
        tracker.log_metrics({f"regime.{k}": v for k, v in regime.items() if v is not None})
    print(text)
    summary("report", f"{len(rows)} rows -> {out_dir('report.md')}")
    return result


def aggregate(per_seed: dict[int, list[dict]], regimes: dict[int, dict] | None = None) -> dict:
    """mean ± std (population std over seeds) of each method's mIoUs and role metrics and, given
    each seed's report.json ``regime``, of the regime block (over the seeds that measured it);
    ``n``: how many seeds each method's mean is over (a stage some seeds did not run has fewer)."""
    def stats(values: list[float]) -> tuple[float, float]:
        return float(np.mean(values)), float(np.std(values))

    methods: dict[str, dict[str, list[float]]] = {}
    for rows in per_seed.values():
        for r in rows:
            for k in SPREAD_KEYS + ROLE_KEYS:
                if r.get(k) is not None:
                    methods.setdefault(r["method"], {}).setdefault(k, []).append(r[k])
    regime: dict[str, list[float]] = {}
    for values in (regimes or {}).values():
        for k, v in values.items():
            if v is not None:
                regime.setdefault(k, []).append(v)
    return {"seeds": sorted(per_seed),
            "methods": {m: {k: stats(v) for k, v in d.items()} for m, d in methods.items()},
            "n": {m: {k: len(v) for k, v in d.items()} for m, d in methods.items()},
            "regime": {k: stats(v) for k, v in regime.items()}}
