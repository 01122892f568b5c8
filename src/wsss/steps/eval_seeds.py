"""Step ``eval-seeds``: seed mIoU on ``seed_split``, in three labelled columns.

A seed becomes a label map by putting a constant background score equal to a threshold
beside the present classes' maps and taking the argmax (IRN/ReCAM's ``cam_eval_thres``).
The metrics JSON holds three columns (issue 13, §3):

* ``miou`` at the shared ``threshold``: the headline, the same rule for every method;
* ``official_miou``: as the method's official code scores its maps (its
  :class:`~wsss.methods.Scoring` in wsss.methods): a fixed threshold (IRN 0.15, ReCAM 0.21),
  the best of a sweep (Puzzle-CAM 0.05-0.75), or the argmax over the method's own background
  map (SIPE: the seed file's ``bg`` array; without it the column is NaN and
  ``official_note`` says why, never a silent fall-back), labelled by ``official_rule``;
* ``best_miou`` / ``best_threshold``: the oracle, the best over ``threshold_sweep``, picked on
  the scored images themselves.

It writes the curve over ``threshold_sweep`` as a DVC plot
(``outputs/plots/threshold/<method>.csv``) and an MLflow figure. On the synthetic world
(its ``SegmentationRole`` maps) it also measures where the seeds at ``threshold`` land: part vs
body recall, co-occurrence and context false positives (:mod:`wsss.regime`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from .. import methods as method_specs
from .. import regime
from ..config import Params, seed_everything
from ..errors import UserError
from ..io import write_json, write_text
from ..metrics import ConfusionMatrix
from ..synth import CONTEXTS_FILE, ROLE_DIR
from ..tracking import step_run
from ..voc import LABEL_NAMES, NUM_LABELS
from .common import open_split, out_dir, read_seed, summary


def seed_to_label(keys: np.ndarray, cams: np.ndarray, threshold: float, shape: tuple[int, int]) -> np.ndarray:
    """argmax over [threshold (background), cams...] -> 0 or class index + 1."""
    if len(keys) == 0:
        return np.zeros(shape, dtype=np.uint8)
    scores = np.concatenate([np.full((1, *cams.shape[1:]), threshold, np.float32), cams], axis=0)
    labels = np.concatenate([[0], keys + 1]).astype(np.uint8)
    return labels[np.argmax(scores, axis=0)]


def seed_to_label_bg(keys: np.ndarray, cams: np.ndarray, bg: np.ndarray) -> np.ndarray:
    """argmax over [bg (the method's own background map), cams...] -> 0 or class index + 1."""
    if len(keys) == 0:
        return np.zeros(bg.shape, dtype=np.uint8)
    labels = np.concatenate([[0], keys + 1]).astype(np.uint8)
    return labels[np.argmax(np.concatenate([bg[None], cams], axis=0), axis=0)]


def official_column(scoring, miou_at: dict[float, float], bg_miou: float | None, missing_bg: int) -> dict:
    """The official column from the mIoU at each threshold (``miou_at``), and for a
    "background argmax" method the mIoU over [bg, cams] (``bg_miou``) and the number of seed
    files without ``bg`` (``missing_bg``): official_miou, official_threshold (None when the rule
    has none), official_rule (the column's label) and official_note."""
    out = {"official_rule": scoring.label, "official_threshold": None, "official_note": ""}
    if scoring.rule == method_specs.THRESHOLD:
        t = scoring.thresholds[0]
        out.update(official_miou=miou_at[t], official_threshold=t)
    elif scoring.rule == method_specs.SWEEP:
        t = max(scoring.thresholds, key=lambda v: (miou_at[v], -v))
        out.update(official_miou=miou_at[t], official_threshold=t,
                   official_note="threshold chosen on the scored ground truth, as the official code does")
    elif missing_bg or bg_miou is None:
        out.update(official_miou=float("nan"),
                   official_note=f"{missing_bg} seed file(s) carry no 'bg' map: not scored (no fall-back)")
    else:
        out["official_miou"] = bg_miou
    return out


def open_roles(root: Path) -> dict[str, bool] | None:
    """id -> class_context of a tree with role maps (the synthetic world), None without (VOC)."""
    if not (root / ROLE_DIR).is_dir():
        return None
    path = root / CONTEXTS_FILE
    try:
        return {i: bool(c["class_context"]) for i, c in json.loads(path.read_text()).items()}
    except (OSError, ValueError, TypeError, KeyError):
        raise UserError(f"{path}: missing or unreadable beside {ROLE_DIR}/; regenerate with "
                        f"`python cli.py data synth`") from None


def read_roles(root: Path, image_id: str, shape: tuple[int, int]) -> np.ndarray:
    """The role map of one image (0 background, 1 body, 2 part, 255 void)."""
    path = root / ROLE_DIR / f"{image_id}.png"
    try:
        with Image.open(path) as img:
            role = np.array(img)
    except (OSError, ValueError):
        raise UserError(f"{path}: role map missing or unreadable; regenerate with `python cli.py data synth`") from None
    if role.shape != tuple(shape):
        raise UserError(f"{path}: role map is {role.shape} but the mask is {tuple(shape)}; "
                        f"regenerate with `python cli.py data synth`")
    return role


def run(params: Params, method: str) -> dict:
    seed_everything(params.seed, params.threads)
    voc = open_split(params, params.seed_split)
    names = LABEL_NAMES
    scoring = method_specs.get(method).scoring
    swept = sorted(set(params.threshold_sweep) | {params.threshold})  # the curve and the oracle
    thresholds = sorted(set(swept) | set(scoring.thresholds))
    cms = {t: ConfusionMatrix(NUM_LABELS) for t in thresholds}
    bg_cm = ConfusionMatrix(NUM_LABELS) if scoring.rule == method_specs.BACKGROUND else None
    missing_bg = 0
    seed_dir = out_dir("seeds", method)
    contexts = open_roles(voc.root)
    counts = regime.Counts()
    samples = []
    for id_ in tqdm(voc.ids, desc=f"eval-seeds {method}", dynamic_ncols=True, leave=False):
        gt = voc.mask(id_)
        keys, cams, bg = read_seed(seed_dir / f"{id_}.npz", method, gt.shape, with_bg=True)
        labels = {t: seed_to_label(keys, cams, t, gt.shape) for t in thresholds}
        for t in thresholds:
            cms[t].update(labels[t], gt)
        if bg_cm is not None:
            if bg is None:
                missing_bg += 1
            else:
                bg_cm.update(seed_to_label_bg(keys, cams, bg), gt)
        if contexts is not None:
            if id_ not in contexts:
                raise UserError(f"{voc.root / CONTEXTS_FILE}: no entry for {id_}; regenerate with "
                                f"`python cli.py data synth`")
            counts += regime.image_counts(labels[params.threshold], gt,
                                          read_roles(voc.root, id_, gt.shape), regime.partner_pairs(np.unique(gt)),
                                          contexts[id_])
        if len(samples) < 4:
            samples.append((id_, keys, cams, gt))
    scores = cms[params.threshold].scores(names)
    miou_at = {t: cms[t].scores(names)["miou"] for t in thresholds}
    curve = [(t, miou_at[t]) for t in swept]
    best_t, best_miou = max(curve, key=lambda r: r[1])
    official = official_column(scoring, miou_at, bg_cm.scores(names)["miou"] if bg_cm is not None and not missing_bg
                               else None, missing_bg)
    metrics = {"miou": scores["miou"], "threshold": params.threshold, **official, "best_threshold": best_t,
               "best_miou": best_miou, "paper_column": scoring.paper, "per_class_iou": scores["per_class_iou"],
               "precision": scores["precision"], "recall": scores["recall"]}
    rates = counts.rates() if contexts is not None else {}
    metrics.update({k: v for k, v in rates.items() if v is not None})  # unmeasured: left out
    plot_path = out_dir("plots", "threshold", f"{method}.csv")
    write_text(plot_path, "threshold,miou\n" + "".join(f"{t},{m:.6f}\n" for t, m in curve))
    write_json(out_dir("metrics", "eval_seeds", f"{method}.json"), metrics)
    with step_run("eval-seeds", params, method=method) as tracker:
        tracker.log_metrics({"seed_miou": scores["miou"], "best_threshold": best_t, "best_seed_miou": best_miou,
                             "official_seed_miou": official["official_miou"]})
        tracker.log_metrics({k: v for k, v in rates.items() if v is not None})
        for t, m in curve:
            tracker.log_metrics({"seed_miou_sweep": m}, step=int(round(t * 100)))
        tracker.log_artifact(plot_path, "plots")
        _log_pictures(tracker, method, curve, params.threshold, scores, samples, voc)
    where = (f"; part / body recall {_pct(rates['part_recall'])} / {_pct(rates['body_recall'])}, "
             f"co-occurrence FP {_pct(rates['cooccur_fp'])}, context FP {_pct(rates['context_fp'])}"
             if rates else "")
    note = f", {official['official_note']}" if official["official_note"] else ""
    summary("eval-seeds", f"{method}: seed mIoU {scores['miou']:.4f} at threshold {params.threshold}; official "
                          f"({official['official_rule']}) {official['official_miou']:.4f}{note}; oracle "
                          f"{best_miou:.4f} at {best_t}{where}")
    return metrics


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _log_pictures(tracker, method, curve, threshold, scores, samples, voc) -> None:
    if not tracker.active:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..overlays import cam_heatmap, colorize, panel

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([t for t, _ in curve], [m for _, m in curve], marker="o")
    ax.axvline(threshold, color="grey", ls="--", lw=1)
    ax.set(xlabel="background threshold", ylabel="seed mIoU", title=f"{method}: threshold sweep")
    tracker.log_figure(fig, "plots/threshold_sweep.png")
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(8, 3.2))
    names = list(scores["per_class_iou"])
    ax.bar(names, [scores["per_class_iou"][n] for n in names])
    ax.set(ylabel="IoU", title=f"{method}: seed per-class IoU")
    ax.tick_params(axis="x", rotation=75)
    tracker.log_figure(fig, "plots/per_class_iou.png")
    plt.close(fig)
    rows = []
    for id_, keys, cams, gt in samples:
        image = voc.image(id_)
        heat = cam_heatmap(image, cams.max(axis=0) if len(keys) else np.zeros(gt.shape, np.float32))
        rows.append([image, heat, colorize(seed_to_label(keys, cams, threshold, gt.shape)), colorize(gt)])
    if rows:
        tracker.log_image(panel(rows, ["image", "seed (max over classes)", "seed labels", "ground truth"]),
                          "overlays/seeds.png")
