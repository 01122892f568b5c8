"""MLflow tracking for every pipeline step.

Each step is one run in the experiment ``wsss`` holding the resolved params, metrics per epoch
and final, artifacts (overlays, charts, tables) and tags: git commit, DVC stage, DVC experiment
name, method, and ``wsss.pipeline``, an id shared by all steps of one pipeline run (the DVC
experiment name inside ``dvc exp run``, else the short git commit and a hash of params.yaml), so
the runs of one ``dvc repro`` can be grouped in the UI. The store is ``sqlite:///<repo>/mlflow.db``
(MLflow 3 refuses a plain ``./mlruns`` file store); artifacts go under ``<repo>/mlruns``.

What the UI shows first (MLflow 3 opens an experiment on its GenAI "Overview": traces, tokens)
is set on the experiment by :func:`ensure_experiment`:

* the tag ``mlflow.experimentKind = custom_model_development`` marks it as model training, for
  the MLflow UIs that read it (the API and experiment list show it too). MLflow 3.17's UI
  ignores it: there a global "GenAI | Model training" switch, kept in the browser and defaulting
  to GenAI, decides; the query ``workflowType=machine_learning`` sets it for one visit;
* a saved view ``pipelines`` (tag ``mlflow.sharedViewState.pipelines``, the format the UI's
  "Views" menu writes): runs grouped by ``wsss.pipeline``, with the key metrics and tags as
  columns.

:func:`ui_url` is the link that opens both at once; ``python cli.py ui`` prints it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .paths import artifact_root, repo_root, tracking_uri, workspace_root

EXPERIMENT = "wsss"


def _git_commit(root: Path) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def pipeline_id(params_path: Path | None = None) -> str:
    """The id every step of one pipeline run shares, readable as a group title in the UI.

    Each stage is its own process, so the id is derived, not handed over: ``WSSS_PIPELINE``
    if set, else DVC's experiment name (``DVC_EXP_NAME``, set inside ``dvc exp run``), else
    ``<short git commit>-<hash of params.yaml>``: the steps of one ``dvc repro`` share commit
    and params, a run with other params or at another commit gets another id."""
    for key in ("WSSS_PIPELINE", "DVC_EXP_NAME"):
        if os.environ.get(key):
            return os.environ[key]
    commit = _git_commit(repo_root())
    p = params_path or (workspace_root() / "params.yaml")
    digest = hashlib.sha1(p.read_bytes() if p.exists() else b"").hexdigest()[:6]
    return f"{commit[:7] if commit != 'unknown' else 'nogit'}-{digest}"


#: Marks the experiment as model training (``ExperimentKind`` in MLflow's UI code).
KIND_TAG, KIND = "mlflow.experimentKind", "custom_model_development"
#: The saved view ``python cli.py ui`` opens: its id, tag and the table it shows.
VIEW_ID = "pipelines"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_ID}"
#: Key metrics (eval-seeds, crf / eval-seg, train-cls) and the method as columns; the stage is
#: the run's name, the pipeline the group's title.
VIEW_COLUMNS = ("metrics.`seed_miou`", "metrics.`miou`", "metrics.`final_val_map`", "tags.`wsss.method`")


def view_state() -> dict[str, Any]:
    """The runs table of the ``pipelines`` view, in the UI's own state keys: grouped by the
    ``wsss.pipeline`` tag (a group's row shows the average of its runs), newest first."""
    return {"searchFilter": "", "orderByKey": "attributes.start_time", "orderByAsc": False,
            "lifecycleFilter": "Active", "selectedColumns": list(VIEW_COLUMNS),
            "groupBy": {"aggregateFunction": "average",
                        "groupByKeys": [{"mode": "tag", "groupByData": "wsss.pipeline"}]},
            "groupsExpanded": {}}


def _view_is_current(value: str | None) -> bool:
    try:
        env = json.loads(value or "")
        return env["name"] == VIEW_ID and json.loads(env["state"]) == view_state()
    except (ValueError, KeyError, TypeError):
        return False


def _quiet_mlflow() -> None:
    logging.getLogger("mlflow").setLevel(logging.ERROR)
    logging.getLogger("alembic").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="mlflow")


def ensure_experiment(client=None) -> str:
    """Create the experiment ``wsss`` if missing; (re)set its kind and saved view, also on a
    store made before they existed. Returns the experiment id."""
    _quiet_mlflow()
    if client is None:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri())
    exp = client.get_experiment_by_name(EXPERIMENT)
    exp_id = exp.experiment_id if exp else client.create_experiment(EXPERIMENT, artifact_location=artifact_root())
    tags = exp.tags if exp else {}
    if tags.get(KIND_TAG) != KIND:
        client.set_experiment_tag(exp_id, KIND_TAG, KIND)
    if not _view_is_current(tags.get(VIEW_TAG)):
        now = int(time.time() * 1000)
        client.set_experiment_tag(exp_id, VIEW_TAG, json.dumps(
            {"name": VIEW_ID, "createdAt": now, "updatedAt": now, "state": json.dumps(view_state())}))
    return exp_id


def ui_url(host: str, port: int, experiment_id: str) -> str:
    """The experiment's runs, in the UI's model-training mode, through the ``pipelines`` view."""
    return (f"http://{host}:{port}/#/experiments/{experiment_id}/runs"
            f"?workflowType=machine_learning&viewStateShareKey={VIEW_ID}")


def _flat_params(params: dict[str, Any]) -> dict[str, str]:
    return {k: (json.dumps(v) if isinstance(v, (list, dict)) else str(v))[:500] for k, v in params.items()}


class Tracker:
    """Thin wrapper over an active MLflow run; every call is a no-op when tracking is off."""

    def __init__(self, mlflow_mod, run_id: str | None):
        self._mlflow = mlflow_mod
        self.run_id = run_id

    @property
    def active(self) -> bool:
        return self._mlflow is not None

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self.active:
            clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and np.isfinite(v)}
            self._mlflow.log_metrics(clean, step=step)

    def log_figure(self, fig, name: str) -> None:
        if self.active:
            self._mlflow.log_figure(fig, name)

    def log_image(self, image: np.ndarray, name: str) -> None:
        if self.active:
            self._mlflow.log_image(image, name)

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        if self.active and Path(path).exists():
            self._mlflow.log_artifact(str(path), folder)

    def log_table(self, rows: list[dict[str, Any]], name: str) -> None:
        if self.active and rows:
            cols = {k: [r.get(k) for r in rows] for k in rows[0]}
            self._mlflow.log_table(cols, name)

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.active:
            self._mlflow.set_tags(tags)


@contextmanager
def step_run(step: str, params, method: str | None = None) -> Iterator[Tracker]:
    """Open an MLflow run for one pipeline step. ``WSSS_TRACKING=0`` turns tracking off."""
    from .distributed import is_main

    if os.environ.get("WSSS_TRACKING", "1") == "0" or not is_main():  # under torchrun rank 0 logs
        yield Tracker(None, None)
        return
    _quiet_mlflow()
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_experiment(experiment_id=ensure_experiment(mlflow.MlflowClient()))
    stage = f"{step}@{method}" if method else step
    root = repo_root()
    tags = {
        "wsss.step": step,
        "wsss.pipeline": pipeline_id(),
        "dvc.stage": stage,
        "dvc.exp_name": os.environ.get("DVC_EXP_NAME", ""),
        "mlflow.source.git.commit": _git_commit(root),
    }
    if method:
        tags["wsss.method"] = method
    with mlflow.start_run(run_name=stage, tags=tags) as run:
        mlflow.log_params(_flat_params(params.to_dict()))
        try:
            yield Tracker(mlflow, run.info.run_id)
        except BaseException:
            mlflow.set_tag("wsss.status", "failed")
            raise

