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
    params = Params(methods={"cam": "cls", "recam-scorecam": "recam-scorecam"})
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
