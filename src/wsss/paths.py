"""Where things live. The repo root comes from ``DVC_ROOT`` inside ``dvc exp run``
(whose working directory may be a temporary copy), else from the current directory."""

from __future__ import annotations

import os
from pathlib import Path


def repo_root() -> Path:
    root = os.environ.get("DVC_ROOT")
    return Path(root).resolve() if root else Path.cwd().resolve()


def tracking_uri() -> str:
    """MLflow 3 refuses a plain file store, so runs go to sqlite at the repo root."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{repo_root() / 'mlflow.db'}"


def artifact_root() -> str:
    return (repo_root() / "mlruns").as_uri()
