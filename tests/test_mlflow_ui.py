"""What a user sees first in the MLflow UI: the experiment marked as model training, a saved
view grouping the runs per pipeline with the key metrics as columns, and `cli.py ui` printing
the link that opens it. The last test opens that link in headless Chromium (skipped when none
is installed: `apt-get install chromium`)."""

import hashlib
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import isolate_outputs
from wsss.config import Params
from wsss.tracking import step_run

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("wsss_cli_ui", REPO / "cli.py")
cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cli)

VIEW_TAG = "mlflow.sharedViewState.pipelines"


@pytest.fixture()
def store(tmp_path, monkeypatch):
    """An empty workspace at ``tmp_path`` with tracking on; returns an MlflowClient on it."""
    from mlflow import MlflowClient

    isolate_outputs(monkeypatch, tmp_path)
    monkeypatch.setenv("WSSS_TRACKING", "1")
    for key in ("MLFLOW_TRACKING_URI", "WSSS_PIPELINE", "DVC_EXP_NAME"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("seed: 0\n")
    return MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")


def _log(step, method, metrics):
    with step_run(step, Params(), method=method) as tracker:
        tracker.log_metrics(metrics)
    return tracker.run_id


def _experiment(client):
    return client.get_experiment_by_name("wsss")


def test_experiment_is_marked_as_model_training(store):
    _log("eval-seeds", "cam", {"seed_miou": 0.4})
    assert _experiment(store).tags["mlflow.experimentKind"] == "custom_model_development"


def test_an_existing_experiment_gets_the_kind_and_the_view(store, tmp_path):
    """A store made before the tags existed (or with a stale view) is brought up to date by the
    next step run."""
    exp_id = store.create_experiment("wsss", artifact_location=(tmp_path / "mlruns").as_uri())
    store.set_experiment_tag(exp_id, VIEW_TAG, json.dumps({"name": "pipelines", "createdAt": 1, "state": "{}"}))
    _log("eval-seg", "cam", {"miou": 0.5})
    tags = _experiment(store).tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    assert json.loads(json.loads(tags[VIEW_TAG])["state"])["groupBy"] is not None


def test_saved_view_groups_by_pipeline_with_metric_columns(store):
    """The tag is read by the UI's "Views" menu: an envelope {name, createdAt, state} whose state
    holds the runs-table keys; columns are `metrics.\\`key\\`` / `tags.\\`key\\``."""
    _log("eval-seeds", "cam", {"seed_miou": 0.4})
    envelope = json.loads(_experiment(store).tags[VIEW_TAG])
    assert envelope["name"] == "pipelines" and isinstance(envelope["createdAt"], int)
    state = json.loads(envelope["state"])
    assert state["groupBy"]["groupByKeys"] == [{"mode": "tag", "groupByData": "wsss.pipeline"}]
    assert {"metrics.`seed_miou`", "metrics.`miou`", "tags.`wsss.method`"} <= set(state["selectedColumns"])


def test_steps_of_one_pipeline_share_a_group_id(store, tmp_path, monkeypatch):
    """Separate processes (here: separate runs) agree on the id: <commit[:7]>-<sha1(params)[:6]>
    outside DVC experiments, the experiment's name inside them."""
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t")
    for cmd in (["git", "init", "-q"], ["git", "add", "params.yaml"], ["git", "commit", "-qm", "p"]):
        subprocess.run(cmd, cwd=tmp_path, env=env, check=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout
    expected = f"{commit[:7]}-{hashlib.sha1(b'seed: 0' + bytes([10])).hexdigest()[:6]}"
    a = _log("eval-seeds", "cam", {"seed_miou": 0.4})
    b = _log("eval-seg", "cam", {"miou": 0.5})
    (tmp_path / "params.yaml").write_text("seed: 1\n")
    c = _log("eval-seeds", "cam", {"seed_miou": 0.3})
    monkeypatch.setenv("DVC_EXP_NAME", "sweep-1")
    d = _log("eval-seeds", "cam", {"seed_miou": 0.2})
    group = {r: store.get_run(r).data.tags["wsss.pipeline"] for r in (a, b, c, d)}
    assert group[a] == group[b] == expected
    assert group[c] not in (expected, "sweep-1") and group[c].startswith(commit[:7])
    assert group[d] == "sweep-1"


def test_ui_prints_the_link_to_the_grouped_runs(store, tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(subprocess, "call", lambda cmd: seen.setdefault("cmd", cmd) and 0)
    res = CliRunner().invoke(cli.app, ["ui", "--port", "5998"])
    assert res.exit_code == 0, res.output
    exp = _experiment(store)  # made by `ui` on a fresh store, tags included
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development" and VIEW_TAG in exp.tags
    link = (f"http://127.0.0.1:5998/#/experiments/{exp.experiment_id}/runs"
            "?workflowType=machine_learning&viewStateShareKey=pipelines")
    assert link in res.output
    assert f"sqlite:///{tmp_path / 'mlflow.db'}" in seen["cmd"]


def _chromium():
    return next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(_chromium() is None, reason="no headless browser (apt-get install chromium)")
def test_browser_opens_on_the_runs_grouped_per_pipeline(store, tmp_path, monkeypatch):
    """End to end: runs of two pipelines, `cli.py ui` in its own process, the printed link in
    headless Chromium. The page must be the runs table (not the GenAI overview), one group per
    pipeline, the key metric as a column. ``WSSS_UI_SCREENSHOT=docs/mlflow_ui.png`` (relative to
    the repo root) also saves a screenshot there."""
    for exp_name, value in (("pipeline-a", 0.41), ("pipeline-b", 0.37)):
        monkeypatch.setenv("DVC_EXP_NAME", exp_name)
        _log("eval-seeds", "cam", {"seed_miou": value})
        _log("eval-seg", "scorecam", {"miou": 0.52})
    monkeypatch.delenv("DVC_EXP_NAME")
    port = _free_port()
    server = subprocess.Popen([sys.executable, str(REPO / "cli.py"), "ui", "--port", str(port)], cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        link = None
        deadline = time.monotonic() + 120
        while link is None and time.monotonic() < deadline:
            line = server.stdout.readline()
            assert line or server.poll() is None, "cli.py ui exited"
            found = re.search(r"(http://\S+viewStateShareKey=\S+)", line)
            link = found.group(1) if found else None
        assert link, "cli.py ui printed no link"
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                time.sleep(1)
        browser = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                   f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1500,800", "--virtual-time-budget=30000"]
        dom = subprocess.run(browser + ["--dump-dom", link], capture_output=True, text=True, timeout=180).stdout
        shot = os.environ.get("WSSS_UI_SCREENSHOT")
        if shot:
            subprocess.run(browser + [f"--screenshot={REPO / shot}", link], capture_output=True, timeout=180)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    text = re.sub(r"<[^>]+>", " ", dom)
    assert "eval-seeds@cam" in text and "eval-seg@scorecam" in text, text[-2000:]
    assert re.search(r"Group:\s*pipeline-a", text) and re.search(r"Group:\s*pipeline-b", text)
    assert "seed_miou" in text and "0.41" in text  # the metric column and a value in it
    assert "Detect Issues" not in text and "Tool calls" not in text  # not the GenAI overview
    # the "Model training" side of the UI's GenAI | Model training switch: its sidebar, not GenAI's
    assert "Model registry" in text and "Judges" not in text and "Playground" not in text
