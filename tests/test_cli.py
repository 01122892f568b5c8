"""Every CLI command through Typer's CliRunner on a tiny synthetic world (DVC_ROOT = tmp)."""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

import importlib.util

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("wsss_cli", REPO / "cli.py")
cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cli)

TINY = {"synth_n_train": 6, "synth_n_val": 3, "synth_n_extra": 6, "synth_size": 48, "cls_epochs": 1, "cls_batch_size": 3,
        "recipe_list_size": 0, "cls_crop": 48, "seg_epochs": 1, "seg_batch_size": 3, "seg_crop": 48, "cam_scales": [1.0],
        "cam_flip": False, "num_workers": 1, "crf_iters": 2, "threshold_sweep": [0.1, 0.3],
        "methods": {"cam": "cls", "gradcam": "cls"}}

runner = CliRunner()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params.update(TINY)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    mp = pytest.MonkeyPatch()
    mp.setenv("DVC_ROOT", str(root))
    mp.setenv("WSSS_TRACKING", "0")
    mp.delenv("WSSS_OUTPUTS", raising=False)
    res = runner.invoke(cli.app, ["data", "synth", "--params", str(root / "params.yaml")])
    assert res.exit_code == 0, res.output
    yield root
    mp.undo()


def invoke(world, *args):
    res = runner.invoke(cli.app, [*args, "--params", str(world / "params.yaml")])
    return res


def test_data_commands(world):
    assert (world / "data/VOC2012/JPEGImages").is_dir()
    assert (world / "docs/synth_world.png").is_file()
    res = invoke(world, "data", "check")
    assert res.exit_code == 0, res.output
    assert "train: 6 images" in res.output and "0 problems" in res.output


def test_pipeline_commands_in_order(world):
    for args in (["train-cls"], ["seeds", "--method", "cam"], ["eval-seeds", "--method", "cam"],
                 ["crf", "--method", "cam"], ["train-seg", "--method", "cam"], ["eval-seg", "--method", "cam"],
                 ["seeds", "--method", "gradcam"], ["eval-seeds", "--method", "gradcam"], ["report"]):
        res = invoke(world, *args)
        assert res.exit_code == 0, f"{args}: {res.output}"
    seed = np.load(world / "outputs/seeds/cam" / next(iter(sorted(p.name for p in (world / "outputs/seeds/cam").iterdir()))))
    assert seed["cams"].dtype == np.float32 and seed["keys"].dtype == np.int64
    assert 0.0 <= seed["cams"].min() and seed["cams"].max() <= 1.0
    m = json.loads((world / "outputs/metrics/eval_seeds/cam.json").read_text())
    assert m["threshold"] == 0.21 and 0 <= m["miou"] <= 1
    assert "| cam |" in (world / "outputs/report.md").read_text()


def test_compare_panel_size_and_missing_seeds(world):
    """2 images x (image, truth, 2 methods x (heatmap, labels)) tiles of 48 px, 2 px apart,
    under a 14 px title strip; a method without seeds is one clear error."""
    out = world / "outputs" / "compare.png"
    res = invoke(world, "compare", "--methods", "cam,gradcam", "--n", "2", "--out", str(out))
    assert res.exit_code == 0, res.output
    with Image.open(out) as im:
        assert im.size == (6 * 48 + 7 * 2, 14 + 2 * 48 + 3 * 2)
    res = invoke(world, "compare", "--methods", "cam,scorecam", "--out", str(world / "x.png"))
    assert res.exit_code == 2 and "seeds --method scorecam" in res.output
    assert not (world / "x.png").exists()


def test_unknown_method_lists_choices(world):
    res = invoke(world, "seeds", "--method", "magic")
    assert res.exit_code == 2
    assert "recam-scorecam" in res.output


def test_bad_params_one_line_exit_2(world):
    bad = world / "bad.yaml"
    raw = yaml.safe_load((world / "params.yaml").read_text())
    raw["cls_lr"] = "fast"
    bad.write_text(yaml.safe_dump(raw))
    res = runner.invoke(cli.app, ["train-cls", "--params", str(bad)])
    assert res.exit_code == 2
    lines = [l for l in res.output.splitlines() if l.strip()]
    assert len(lines) == 1 and "cls_lr" in lines[0] and "Traceback" not in res.output


def test_missing_seed_folder_is_clear(world):
    res = invoke(world, "crf", "--method", "gradcampp")
    assert res.exit_code == 2 and "seeds --method gradcampp" in res.output


def test_eval_command_scores_folders(world, tmp_path):
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    gt.mkdir(), pred.mkdir()
    Image.fromarray(np.array([[0, 1], [1, 255]], np.uint8)).save(gt / "a.png")
    Image.fromarray(np.array([[0, 1], [0, 1]], np.uint8)).save(pred / "a.png")
    out = tmp_path / "s.json"
    res = runner.invoke(cli.app, ["eval", "--pred", str(pred), "--gt", str(gt), "--out", str(out)])
    assert res.exit_code == 0, res.output
    scores = json.loads(out.read_text())
    # background: TP1 FP1 FN0 -> 0.5; aeroplane: TP1 FP0 FN1 -> 0.5
    assert scores["miou"] == pytest.approx(0.5)
    assert set(scores["per_class_iou"]) == {"background", "aeroplane"}
    (pred / "a.png").unlink()
    res = runner.invoke(cli.app, ["eval", "--pred", str(pred), "--gt", str(gt)])
    assert res.exit_code == 2 and "a.png" in res.output


def test_ui_starts_mlflow_on_the_sqlite_store(world, monkeypatch):
    import subprocess

    seen = {}
    monkeypatch.setattr(subprocess, "call", lambda cmd: seen.setdefault("cmd", cmd) and 0)
    res = runner.invoke(cli.app, ["ui", "--port", "5999"])
    assert res.exit_code == 0, res.output
    assert f"sqlite:///{world / 'mlflow.db'}" in seen["cmd"] and "127.0.0.1" in seen["cmd"]


def test_spread_collect_aggregates_named_experiments(world, monkeypatch):
    """`spread --collect a,b` hands the names (trimmed) to wsss.spread.collect and queues nothing."""
    from wsss import spread

    seen = {}
    monkeypatch.setattr(spread, "collect", lambda p, names, until: seen.update(names=names, until=until))
    monkeypatch.setattr(spread, "spread", lambda *a: pytest.fail("--collect must not queue runs"))
    res = invoke(world, "spread", "--collect", "all-s0, all-s1", "--until", "irn")
    assert res.exit_code == 0, res.output
    assert seen == {"names": ["all-s0", "all-s1"], "until": "irn"}
