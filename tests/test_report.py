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
            (tmp_path / "metrics" / stage / f"{m}.json").write_text(json.dumps({"miou": v}))
    (tmp_path / "metrics" / "eval_seg" / "gt.json").write_text(json.dumps({"miou": 0.6}))
    params = Params(methods={"cam": "cls", "recam-scorecam": "recam-scorecam"})
    result = report.run(params)
    text = (tmp_path / "report.md").read_text()
    assert "| recam-scorecam | 29.0 | +9.0 | 33.0 | +3.0 | 27.0 | +2.0 |" in text
    assert "| upper bound (seg on GT masks) | - | - | - | - | 60.0 | - |" in text
    assert "student ReCAM+Score-CAM (30 images) (reported) | 29.0 | 30.0" in text
    assert (tmp_path / "report.png").stat().st_size > 0
    assert [r["method"] for r in result["rows"]][-1].startswith("upper bound")
