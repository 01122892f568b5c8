"""MLflow tracking for every pipeline step.

Each step is one run in the experiment ``wsss`` holding the resolved params, metrics per epoch
and final, artifacts (overlays, charts, tables) and tags: git commit, DVC stage, DVC experiment
name, method, and ``wsss.pipeline``, an id shared by all steps of one pipeline run (the DVC
experiment name inside ``dvc exp run``, else a hash of the git commit and params.yaml), so the
runs of one ``dvc repro`` can be grouped in the UI. The store is ``sqlite:///<repo>/mlflow.db``
(MLflow 3 refuses a plain ``./mlruns`` file store); artifacts go under ``<repo>/mlruns``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
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
    for key in ("WSSS_PIPELINE", "DVC_EXP_NAME"):
        if os.environ.get(key):
            return os.environ[key]
    root = repo_root()
    h = hashlib.sha1(_git_commit(root).encode())
    p = params_path or (workspace_root() / "params.yaml")
    if p.exists():
        h.update(p.read_bytes())
    return h.hexdigest()[:12]


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
    if os.environ.get("WSSS_TRACKING", "1") == "0":
        yield Tracker(None, None)
        return
    logging.getLogger("mlflow").setLevel(logging.ERROR)
    logging.getLogger("alembic").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="mlflow")
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    if mlflow.get_experiment_by_name(EXPERIMENT) is None:
        mlflow.create_experiment(EXPERIMENT, artifact_location=artifact_root())
    mlflow.set_experiment(EXPERIMENT)
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

