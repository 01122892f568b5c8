"""Helpers shared by the step modules: output locations and dataset opening."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from .. import methods
from ..config import Params
from ..errors import UserError
from ..paths import workspace_root

if TYPE_CHECKING:
    import numpy as np

OUTPUTS = "outputs"


def out_dir(*parts: str) -> Path:
    p = Path(os.environ["WSSS_OUTPUTS"]) if os.environ.get("WSSS_OUTPUTS") else workspace_root() / OUTPUTS
    for part in parts:
        p = p / part
    return p


@contextlib.contextmanager
def outputs_at(path: Path) -> Iterator[None]:
    """Every :func:`out_dir` inside the block resolves under ``path`` (the spread writes its
    report beside, not over, the workspace's)."""
    old = os.environ.get("WSSS_OUTPUTS")
    os.environ["WSSS_OUTPUTS"] = str(path)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("WSSS_OUTPUTS", None)
        else:
            os.environ["WSSS_OUTPUTS"] = old


def checkpoint_path(name: str) -> Path:
    return out_dir("checkpoints", f"{name}.pt")


def method_checkpoint(method: str) -> Path:
    return checkpoint_path(methods.get(method).checkpoint)


def open_split(params: Params, split: str, validate: bool = True):
    """Open one split of the dataset at params.data_dir (first ``subset`` ids when set)."""
    from ..voc import VOCDataset, validate as validate_tree

    root = params.data_path()
    if not root.exists():
        hint = "python cli.py data synth" if params.dataset == "synth" else "python cli.py data voc --root PATH"
        raise UserError(f"{root}: dataset folder missing; create it with `{hint}`")
    if validate:
        validate_tree(root, [split])
    return VOCDataset(root, split, params.subset)


def mask_fingerprint(mask_dir: Path, chars: int = 16) -> str:
    """sha1 (its first ``chars`` hex digits) of the names and bytes of the label PNGs in
    ``mask_dir``: a resume never mixes two sets of masks, and make-sem-seg's metrics name the
    masks they scored. The bytes, not the mtimes: a ``dvc checkout`` or a fresh clone rewrites
    the mtimes, and the fingerprint is saved in the checkpoint, whose bytes must then not change."""
    import hashlib

    h = hashlib.sha1()
    for p in sorted(mask_dir.glob("*.png")):
        h.update(f"{p.name}:".encode())
        h.update(hashlib.sha1(p.read_bytes()).digest())
    return h.hexdigest()[:chars]


def summary(step: str, text: str) -> None:
    """The one-line summary every step ends with (rank 0's, under torchrun)."""
    from ..distributed import is_main

    if is_main():
        print(f"[{step}] {text}", flush=True)


def read_seed(path: Path, method: str, shape: tuple[int, int], with_bg: bool = False):
    """Read and check one seed file, the one reader of every step (eval-seeds, crf, compare);
    returns (keys int64 (n,): class indices 0..19, cams float32 (n, H, W) clipped to [0, 1]).

    With ``with_bg`` a third item: the file's optional ``bg`` array, the method's own
    background score (float32 (H, W) clipped to [0, 1]; SIPE's background IS-CAM), or None
    when the file has none."""
    import numpy as np

    from ..io import load_npz
    from ..voc import CLASSES

    rerun = f"re-run `python cli.py seeds --method {method}`"
    if not path.is_file():
        raise UserError(f"{path}: seed file missing; run `python cli.py seeds --method {method}` first")
    try:
        z = load_npz(path)
    except Exception as e:
        raise UserError(f"{path}: unreadable seed file ({type(e).__name__}); {rerun}") from None
    if "keys" not in z or "cams" not in z:
        raise UserError(f"{path}: needs arrays 'keys' and 'cams' (has {', '.join(z) or 'none'}); {rerun}")
    keys = z["keys"].astype(np.int64).reshape(-1)
    cams = z["cams"].astype(np.float32)
    bg = None
    if with_bg and "bg" in z:
        bg = z["bg"].astype(np.float32)
        if bg.shape != tuple(shape):
            raise UserError(f"{path}: 'bg' has shape {bg.shape}, expected {tuple(shape)} (one background map "
                            f"at image size); {rerun}")
        bg = np.clip(np.nan_to_num(bg), 0.0, 1.0)
    if keys.size == 0:
        empty = np.zeros((0,) + tuple(shape), np.float32)
        return (keys, empty, bg) if with_bg else (keys, empty)
    if keys.min() < 0 or keys.max() >= len(CLASSES):
        raise UserError(f"{path}: 'keys' must be class indices 0..{len(CLASSES) - 1} (got {keys.tolist()}); {rerun}")
    if cams.shape != (keys.size,) + tuple(shape):
        raise UserError(f"{path}: 'cams' has shape {cams.shape}, expected {(keys.size,) + tuple(shape)} "
                        f"(one map per key at image size); {rerun}")
    cams = np.clip(np.nan_to_num(cams), 0.0, 1.0)
    return (keys, cams, bg) if with_bg else (keys, cams)
