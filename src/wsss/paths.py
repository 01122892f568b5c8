"""Where things live.

Two roots, which differ only inside ``dvc exp run --temp`` / ``--queue``: dvc runs each stage
command in a temporary copy of the repository and sets ``DVC_ROOT`` to the *parent*
repository. The experiment's data and outputs belong to the copy (dvc collects its outs
there), while the MLflow store belongs to the parent, so that every run lands in one store.

* :func:`workspace_root` (``data/``, ``outputs/``): the directory dvc runs the stage in
  (``DVC_STAGE`` is set for every stage command), else ``DVC_ROOT``, else the current one.
* :func:`repo_root` (``mlflow.db``, ``mlruns/``): ``DVC_ROOT``, else the current directory.
"""

from __future__ import annotations

import os
from pathlib import Path


def repo_root() -> Path:
    root = os.environ.get("DVC_ROOT")
    return Path(root).resolve() if root else Path.cwd().resolve()


def workspace_root() -> Path:
    if os.environ.get("DVC_STAGE"):
        return Path.cwd().resolve()
    return repo_root()


def tracking_uri() -> str:
    """MLflow 3 refuses a plain file store, so runs go to sqlite at the repo root."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{repo_root() / 'mlflow.db'}"


def artifact_root() -> str:
    return (repo_root() / "mlruns").as_uri()
