"""The report: deltas against cam, the upper-bound row, reported figures labelled, and the
mean ± std aggregation over random seeds (values by hand)."""

import json

import pytest

from wsss.config import Params
from wsss.steps import report


def test_aggregate_mean_and_population_std_by_hand():
    per_seed = {
        0: [{"method": "cam", "seed": 0.20, "mask": 0.30, "seg": None}],
        1: [{"method": "cam", "seed": 0.30, "mask": 0.40, "seg": None}],
        2: [{"method": "cam", "seed": 0.25, "mask": 0.35, "seg": None}],
    }
    agg = report.aggregate(per_seed)
    assert agg["seeds"] == [0, 1, 2]
    mean, std = agg["methods"]["cam"]["seed"]
    assert mean == pytest.approx(0.25)
    assert std == pytest.approx(((0.05**2 + 0.05**2 + 0) / 3) ** 0.5)
    assert "seg" not in agg["methods"]["cam"]  # never measured: no fake zero


def test_report_table_from_metrics_files(tmp_path, monkeypatch):
    monkeypatch.setenv("WSSS_OUTPUTS", str(tmp_path))
    monkeypatch.setenv("WSSS_TRACKING", "0")
    values = {"cam": (0.20, 0.30, 0.25), "recam-scorecam": (0.29, 0.33, 0.27)}
    for m, (seed, mask, seg) in values.items():
        for stage, v in (("eval_seeds", seed), ("crf", mask), ("eval_seg", seg)):
            (tmp_path / "metrics" / stage).mkdir(parents=True, exist_ok=True)
            extra = {"best_miou": v + 0.05, "best_threshold": 0.5} if stage == "eval_seeds" else {}
            (tmp_path / "metrics" / stage / f"{m}.json").write_text(json.dumps({"miou": v, **extra}))
    (tmp_path / "metrics" / "eval_seg" / "gt.json").write_text(json.dumps({"miou": 0.6}))
    params = Params(methods={"cam": "cls", "recam-scorecam": "recam-scorecam"}, recam_scorecam_mask="online")
    result = report.run(params)
    text = (tmp_path / "report.md").read_text()
    assert "| recam-scorecam | 29.0 | +9.0 | 33.0 | +3.0 | 27.0 | +2.0 | 34.0 |" in text
    assert "| upper bound (seg on GT masks) | - | - | - | - | 60.0 | - | - |" in text
    assert "student ReCAM+Score-CAM (30 images) (reported) | 29.0 | 30.0" in text
    assert (tmp_path / "report.png").stat().st_size > 0
    assert [r["method"] for r in result["rows"]][-1].startswith("upper bound")


def test_aggregate_includes_oracle_threshold_column():
    per_seed = {s: [{"method": "cam", "seed": 0.2, "mask": None, "seg": None, "seed_best": v}]
                for s, v in ((0, 0.30), (1, 0.34))}
    agg = report.aggregate(per_seed)
    mean, std = agg["methods"]["cam"]["seed_best"]
    assert (mean, std) == (pytest.approx(0.32), pytest.approx(0.02))


def test_spread_reuses_a_finished_run_with_the_same_params_only(tmp_path, monkeypatch):
    """A seed whose report.json carries the same params fingerprint is read back, not rerun."""
    from wsss import pipeline

    monkeypatch.setenv("WSSS_OUTPUTS", str(tmp_path))
    monkeypatch.setenv("WSSS_TRACKING", "0")
    params = Params(methods={"cam": "cls"})
    (tmp_path / "metrics" / "eval_seeds").mkdir(parents=True)
    (tmp_path / "metrics" / "eval_seeds" / "cam.json").write_text(json.dumps({"miou": 0.2, "best_miou": 0.3}))
    report.run(params)  # the "main" run, seed 0
    spread_root = tmp_path / "spread" / "seed-1" / "metrics"
    spread_root.mkdir(parents=True)
    (spread_root / "report.json").write_text(json.dumps({
        "rows": [{"method": "cam", "seed": 0.4, "mask": None, "seg": None, "seed_best": 0.5}],
        "params_fingerprint": report.params_fingerprint(Params(methods={"cam": "cls"}, seed=1)),
        "until": "seg"}))

    ran = []
    monkeypatch.setattr(pipeline, "run_all", lambda p, until: ran.append(p.seed) or {"rows": []})
    agg = pipeline.spread(params, [0, 1], until="seg")
    assert ran == []  # both seeds were finished
    assert agg["methods"]["cam"]["seed"] == (pytest.approx(0.3), pytest.approx(0.1))

    ran.clear()
    pipeline.spread(params, [0, 1], until="crf")  # another stopping point: both rerun
    assert ran == [0, 1]
    ran.clear()
    pipeline.spread(Params(methods={"cam": "cls"}, threshold=0.3), [0], until="seg")  # other params
    assert ran == [0]
    ran.clear()  # a method the finished run did not cover: rerun
    pipeline.spread(Params(methods={"cam": "cls", "gradcam": "cls"}), [0], until="seg")
    assert ran == [0]


def test_spread_reuses_a_run_that_covered_more_methods(tmp_path, monkeypatch):
    """A finished run over cam + gradcam serves a spread over cam alone (its gradcam row dropped,
    the upper bound kept); the fingerprint leaves ``methods`` out."""
    from wsss import pipeline

    monkeypatch.setenv("WSSS_OUTPUTS", str(tmp_path))
    monkeypatch.setenv("WSSS_TRACKING", "0")
    both = Params(methods={"cam": "cls", "gradcam": "cls"})
    assert report.params_fingerprint(both) == report.params_fingerprint(Params(methods={"cam": "cls"}))
    assert report.params_fingerprint(both) != report.params_fingerprint(Params(methods={"cam": "cls"}, seed=1))
    (tmp_path / "metrics").mkdir(parents=True)
    (tmp_path / "metrics" / "report.json").write_text(json.dumps({
        "rows": [{"method": "cam", "seed": 0.2}, {"method": "gradcam", "seed": 0.1},
                 {"method": "upper bound (seg on GT masks)", "seg": 0.5}],
        "params_fingerprint": report.params_fingerprint(both), "until": "seg"}))
    rows, _ = pipeline.finished_run(Params(methods={"cam": "cls"}), "seg", [tmp_path])
    assert [r["method"] for r in rows] == ["cam", "upper bound (seg on GT masks)"]


def test_in_process_pipeline_runs_every_dvc_stage_after_its_inputs(monkeypatch):
    """``pipeline.run_all`` (used by ``spread``) repeats the DAG of dvc.yaml in code. Record the
    steps it calls (their run functions stubbed) and check they are exactly dvc.yaml's stage
    commands, each after the stages that write its deps."""
    from pathlib import Path

    import yaml

    from wsss import pipeline
    from wsss.config import load_params
    from wsss.steps import (crf, eval_seeds, eval_seg, report, seeds, train_cls, train_puzzle, train_recam,
                            train_seg, train_sipe)

    repo = Path(__file__).resolve().parents[1]
    params = load_params(repo / "params.yaml")
    calls = []

    def record(command, by_method=False):
        def run(p, *args, **kw):
            arg = (args[0] if args else kw.get("method")) if by_method else None
            variant = kw.get("variant")
            calls.append(command + (f" --method {arg}" if arg else "") + (f" --variant {variant}" if variant else ""))
            return {"rows": []}
        return run

    for mod, cmd in ((train_cls, "train-cls"), (train_puzzle, "train-puzzle"), (train_sipe, "train-sipe"),
                     (train_recam, "train-recam"), (report, "report")):
        monkeypatch.setattr(mod, "run", record(cmd))
    for mod, cmd in ((seeds, "seeds"), (eval_seeds, "eval-seeds"), (crf, "crf"), (train_seg, "train-seg"),
                     (eval_seg, "eval-seg")):
        monkeypatch.setattr(mod, "run", record(cmd, by_method=True))
    pipeline.run_all(params)

    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    expanded = []  # (command, deps, outs)
    for stage in stages.values():
        for key, item in (params.methods.items() if "foreach" in stage else [(None, None)]):
            body = stage.get("do", stage)
            sub = (lambda s: s.replace("${key}", key).replace("${item}", item)) if key else (lambda s: s)
            outs = [sub(o) for o in body.get("outs", []) + body.get("metrics", []) + body.get("plots", [])
                    if isinstance(o, str)]
            expanded.append((sub(body["cmd"]).removeprefix("python cli.py "),
                             [sub(d) for d in body.get("deps", [])], outs))
    assert sorted(calls) == sorted(c for c, _, _ in expanded)
    assert len(set(calls)) == len(calls)
    for cmd, deps, _ in expanded:
        for other, _, outs in expanded:
            if other != cmd and any(o == d or o.startswith(d.rstrip("/") + "/") for o in outs for d in deps):
                assert calls.index(other) < calls.index(cmd), f"{other} must run before {cmd}"


def test_spread_report_shows_means_deltas_and_no_empty_single_run_table(tmp_path, monkeypatch):
    """The spread folder has no per-method metrics of its own: its report is the mean ± std
    table, with the deltas of the means against cam (by hand), and its rows are the means."""
    monkeypatch.setenv("WSSS_OUTPUTS", str(tmp_path))
    monkeypatch.setenv("WSSS_TRACKING", "0")
    per_seed = {0: [{"method": "cam", "seed": 0.20, "mask": 0.22, "seg": 0.10, "seed_best": 0.21},
                    {"method": "gradcam", "seed": 0.18, "mask": 0.19, "seg": 0.08, "seed_best": 0.19}],
                1: [{"method": "cam", "seed": 0.18, "mask": 0.20, "seg": 0.12, "seed_best": 0.19},
                    {"method": "gradcam", "seed": 0.16, "mask": 0.21, "seg": 0.10, "seed_best": 0.17}]}
    agg = report.aggregate(per_seed)
    result = report.run(Params(methods={"cam": "cls", "gradcam": "cls"}), spread=agg)
    text = (tmp_path / "report.md").read_text()
    assert "| gradcam | 17.0 ± 1.0 | 20.0 ± 1.0 | 9.0 ± 1.0 | 18.0 ± 1.0 | -2.0 / -1.0 / -2.0 |" in text
    assert "| cam | 19.0 ± 1.0 | 21.0 ± 1.0 | 11.0 ± 1.0 | 20.0 ± 1.0 | - / - / - |" in text
    assert "Δ vs cam | pseudo-mask" not in text  # no single-run table (its cells would be empty)
    assert result["rows"][0]["seed"] == pytest.approx(0.19)
    assert (tmp_path / "report.png").stat().st_size > 0


def _write_metrics(root, files: dict) -> None:
    for rel, obj in files.items():
        path = root / "metrics" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(obj))


def test_regime_block_from_metrics_files(tmp_path, monkeypatch):
    """The regime block: measured values beside the reported VOC ones (ratios by hand), and the
    per-method role table where eval-seeds measured it ("-" where it did not)."""
    monkeypatch.setenv("WSSS_OUTPUTS", str(tmp_path))
    monkeypatch.setenv("WSSS_TRACKING", "0")
    _write_metrics(tmp_path, {
        "train_cls.json": {"val_map": 0.46, "val_f1": 0.3},
        "eval_seg/gt.json": {"miou": 0.25},
        "eval_seeds/cam.json": {"miou": 0.20, "best_miou": 0.21, "part_recall": 0.6, "body_recall": 0.15,
                                "cooccur_fp": 0.05, "context_fp": 0.12},
        "crf/cam.json": {"miou": 0.22},
        "eval_seeds/gradcam.json": {"miou": 0.18, "best_miou": 0.19},  # no roles measured
    })
    result = report.run(Params(methods={"cam": "cls", "gradcam": "cls"}))
    text = (tmp_path / "report.md").read_text()
    assert "| classifier val mAP | 0.460 | > 0.9 (reported; ImageNet ResNet-50) |" in text
    assert ("| upper bound: segmentation mIoU, DeepLab on GT masks (val) | 25.0 "
            "| about 76-80 (reported; fully supervised DeepLab) |") in text
    assert "| CAM seed mIoU | 20.0 | 48.3 (reported; CAM seeds, train) |" in text
    assert "| CAM pseudo-mask mIoU | 22.0 | 66.5 (reported; IRN pseudo-masks, train) |" in text
    # seed / upper bound = 0.20 / 0.25 = 0.80; pseudo-mask / seed = 0.22 / 0.20 = 1.10
    assert "| CAM seed / upper bound | 0.80 | about 0.6 (reported; 48.3 / 76-80) |" in text
    assert "| CAM pseudo-mask / CAM seed | 1.10 | 1.38 (reported; 66.5 / 48.3) |" in text
    # part / body = 0.6 / 0.15 = 4.00
    assert "| method | part recall | body recall | part / body | co-occurrence FP | context FP |" in text
    assert "| cam | 60.0 | 15.0 | 4.00 | 5.0 | 12.0 |" in text
    assert "| gradcam | - | - | - | - | - |" in text
    assert "| upper bound (seg on GT masks) | - | - |" not in text.split("part recall")[1]
    assert result["regime"] == {"val_map": 0.46, "upper": 0.25, "cam_seed": 0.20, "cam_mask": 0.22,
                                "seed_over_upper": pytest.approx(0.8), "mask_over_seed": pytest.approx(1.1)}
    saved = json.loads((tmp_path / "metrics" / "report.json").read_text())
    assert saved["rows"][0]["part_body"] == pytest.approx(4.0)


def test_regime_block_with_missing_files_shows_dashes_and_no_role_table(tmp_path, monkeypatch):
    """No train_cls.json, no upper bound, no crf, no role metrics (real VOC): "-" cells, the
    reported column intact, no role table."""
    monkeypatch.setenv("WSSS_OUTPUTS", str(tmp_path))
    monkeypatch.setenv("WSSS_TRACKING", "0")
    _write_metrics(tmp_path, {"eval_seeds/cam.json": {"miou": 0.2, "best_miou": 0.2}})
    result = report.run(Params(methods={"cam": "cls"}))
    text = (tmp_path / "report.md").read_text()
    assert "| classifier val mAP | - | > 0.9 (reported; ImageNet ResNet-50) |" in text
    assert "| CAM seed mIoU | 20.0 | 48.3 (reported; CAM seeds, train) |" in text
    assert "| CAM seed / upper bound | - | about 0.6 (reported; 48.3 / 76-80) |" in text
    assert "| CAM pseudo-mask / CAM seed | - | 1.38 (reported; 66.5 / 48.3) |" in text
    assert "part recall" not in text
    assert result["regime"]["val_map"] is None


def test_spread_carries_the_regime_as_mean_and_std(tmp_path, monkeypatch):
    """``spread`` averages each seed's regime (from its report.json, also a reused one) and the
    role metrics of its rows; the spread report shows them as mean ± std (by hand)."""
    from wsss import pipeline

    monkeypatch.setenv("WSSS_OUTPUTS", str(tmp_path))
    monkeypatch.setenv("WSSS_TRACKING", "0")
    params = Params(methods={"cam": "cls"})
    _write_metrics(tmp_path, {  # seed 0: the main run
        "train_cls.json": {"val_map": 0.40},
        "eval_seeds/cam.json": {"miou": 0.20, "best_miou": 0.2, "part_recall": 0.6, "body_recall": 0.2},
        "crf/cam.json": {"miou": 0.24}})
    report.run(params)
    # seed 1: a finished run of the same params, with its own regime
    _write_metrics(tmp_path / "spread" / "seed-1", {"report.json": {
        "rows": [{"method": "cam", "seed": 0.30, "mask": 0.30, "seg": None, "seed_best": 0.3,
                  "part_recall": 0.7, "body_recall": 0.1, "part_body": 7.0}],
        "regime": {"val_map": 0.50, "cam_seed": 0.30, "cam_mask": 0.30, "mask_over_seed": 1.0, "upper": None},
        "params_fingerprint": report.params_fingerprint(Params(methods={"cam": "cls"}, seed=1)), "until": "seg"}})
    monkeypatch.setattr(pipeline, "run_all", lambda p, until: pytest.fail("both seeds are finished"))
    agg = pipeline.spread(params, [0, 1])
    # val mAP 0.40, 0.50 -> 0.45 ± 0.05; pseudo-mask / seed 0.24 / 0.20 = 1.2 and 1.0 -> 1.10 ± 0.10
    assert agg["regime"]["val_map"] == (pytest.approx(0.45), pytest.approx(0.05))
    assert agg["regime"]["mask_over_seed"] == (pytest.approx(1.1), pytest.approx(0.1))
    assert "upper" not in agg["regime"]  # measured by neither seed
    text = (tmp_path / "spread" / "report.md").read_text()
    assert "| classifier val mAP | 0.450 ± 0.050 | > 0.9 (reported; ImageNet ResNet-50) |" in text
    assert "| CAM pseudo-mask / CAM seed | 1.10 ± 0.10 | 1.38 (reported; 66.5 / 48.3) |" in text
    assert "| CAM seed / upper bound | - |" in text
    # part recall 0.6, 0.7 -> 65.0 ± 5.0; body 0.2, 0.1 -> 15.0 ± 5.0; part / body 3, 7 -> 5.00 ± 2.00
    assert "| cam | 65.0 ± 5.0 | 15.0 ± 5.0 | 5.00 ± 2.00 | - | - |" in text
