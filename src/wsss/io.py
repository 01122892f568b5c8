"""Atomic file output: write to a temporary name in the same folder, then rename.

A crash or a bad input half-way through a step therefore never leaves a truncated file
under the final name. Temporary names are ``.<name>.tmp-<pid>-<random>``; a ``kill -9`` can
still leave one behind, so every write of ``<name>`` first removes the temporaries of
``<name>`` whose process is gone (:func:`remove_stale_temps`): a rerun cleans up after the
killed run.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.tmp-"


def _alive(pid: int) -> bool:
    """Whether process ``pid`` still runs. A zombie (killed, not yet reaped: in a container
    whose init does not reap, for good) does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # no /proc (macOS): trust kill(0)
        return True
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary files and folders of ``path`` left by writers that no longer run
    (a killed step); returns what was removed. Temporaries of a live process are kept."""
    path = Path(path)
    removed = []
    if not path.parent.is_dir():
        return removed
    prefix = _temp_prefix(path)
    for p in path.parent.glob(f"{glob.escape(prefix)}*"):
        pid = p.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=f"{_temp_prefix(path)}{os.getpid()}-", suffix=suffix or ".tmp",
                               dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder next to ``path``; swap it in for ``path`` if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_temp_prefix(path)}{os.getpid()}-", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f"{_temp_prefix(path)}{os.getpid()}-old")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path, ".json") as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path, Path(path).suffix or ".txt") as tmp:
        tmp.write_text(text)


def save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """Save plain arrays (never pickled objects) atomically."""
    with atomic_path(path, ".npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)


def load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def save_label_png(path: str | os.PathLike, label: np.ndarray, palette: list[int]) -> None:
    """Save an HxW uint8 label map as a palette PNG (VOC style)."""
    img = Image.fromarray(np.ascontiguousarray(label.astype(np.uint8)), mode="P")
    img.putpalette(palette)
    with atomic_path(path, ".png") as tmp:
        img.save(tmp, format="PNG")


def save_torch(path: str | os.PathLike, obj: Any) -> None:
    """``torch.save`` atomically, byte for byte the same for the same object. Saved to a file
    object, not to the temporary's name: given a name, torch names the archive's inner folder
    after it, and the temporary's name holds a pid and random letters."""
    import torch

    with atomic_path(path, ".pt") as tmp:
        with open(tmp, "wb") as f:
            torch.save(obj, f)


def load_torch(path: str | os.PathLike, what: str, fix: str) -> Any:
    """The one checkpoint reader: the object :func:`save_torch` wrote at ``path`` (or a torch
    state dict file), on the CPU, tensors and plain containers only (``weights_only``: a
    checkpoint cannot run code). Every checkpoint and state dict is a mapping: a missing or
    unreadable file, or one holding anything else (a bare tensor), is one :class:`UserError`
    naming the file, ``what`` it should be and the ``fix``."""
    import torch

    from .errors import UserError

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: {what} not found; {fix}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path}: not a readable {what} ({type(e).__name__}); {fix}") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: not a readable {what} (a {type(obj).__name__}, not a mapping); {fix}")
    return obj
