"""Crash safety, shown: ``kill -9`` in the middle of train-cls, crf and train-seg, then
``dvc repro`` of the same stage.

What the code guarantees, and what is checked here against an uninterrupted run of the same
params on a copy of the same world:

* train-cls and train-seg write ``<name>.resume.pt`` (model, optimiser, epoch, step) after
  every epoch; the rerun continues from the last one (its log says so, with an epoch > 0)
  and ends with **bit-identical** weights and metrics JSON. The data order and augmentation
  of an epoch depend only on (seed, epoch), the learning rate only on the step, torch's
  global random state (DeepLab's dropout draws from it) is saved with the checkpoint, and
  ``threads`` is pinned, so there is no tolerance to state. (Before the random state was
  saved, a resumed train-seg ended with other weights: the test below and
  test_resume_restores_the_random_state_that_dropout_draws_from caught it.)
* crf is not resumable (a few seconds per method); it writes its masks into a temporary folder
  swapped in at the end, so a kill leaves no partial ``pseudo_masks/<method>``; the rerun makes
  byte-identical masks and metrics.
* no temporary (``.<name>.tmp-*``) and no resume file is left under ``outputs/`` at the end:
  a rerun removes what a killed run left.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from conftest import isolate_outputs

REPO = Path(__file__).resolve().parents[1]

# tiny world, tiny recipe: a few epochs of a few steps, long enough to be killed in the middle
TINY = {
    "threads": 1, "num_workers": 1, "synth_n_train": 12, "synth_n_val": 3, "synth_n_extra": 0,
    "synth_size": 48, "train_split": "train", "methods": {"cam": "cls"},
    "cls_epochs": 4, "cls_batch_size": 4, "recipe_list_size": 0, "cls_crop": 48, "cam_scales": [1.0], "cam_flip": False,
    "crf_iters": 60, "seg_epochs": 4, "seg_batch_size": 4, "seg_crop": 48, "seg_init": "cls",
}


def _env() -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # `python` = this venv
    env["WSSS_TRACKING"] = "0"  # MLflow is not what is tested here (and costs seconds per stage)
    for key in ("MLFLOW_TRACKING_URI", "WSSS_OUTPUTS", "DVC_ROOT", "DVC_STAGE"):
        env.pop(key, None)
    env.update(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    return env


def _run(cmd: list[str], cwd: Path, env: dict) -> str:
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout + out.stderr


def _kill_when(cmd: list[str], cwd: Path, env: dict, ready, what: str) -> None:
    """Start ``cmd`` in its own process group and SIGKILL the whole group (dvc, the stage
    command, its workers) as soon as ``ready()`` holds."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    try:
        while not ready():
            if proc.poll() is not None:
                pytest.fail(f"{what} ended (status {proc.returncode}) before it could be killed; make it "
                            f"slower in TINY:\n{proc.stdout.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"{what}: nothing to kill it after within 120 s")
            time.sleep(0.005)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"{what} was not killed (status {proc.returncode})"


def _resumed_epoch(log: str, name: str) -> int:
    m = re.search(rf"\[{re.escape(name)}\] resuming from epoch (\d+) \(step (\d+)\)", log)
    assert m, f"no resume of {name} in the rerun's log:\n{log[-3000:]}"
    return int(m.group(1))


def _same_weights(a: Path, b: Path) -> None:
    import torch

    sa = torch.load(a, map_location="cpu", weights_only=True)
    sb = torch.load(b, map_location="cpu", weights_only=True)
    assert sa["model"].keys() == sb["model"].keys()
    differ = [k for k in sa["model"] if not torch.equal(sa["model"][k], sb["model"][k])]
    assert not differ, f"{a.name}: {len(differ)} tensors differ from the uninterrupted run, e.g. {differ[:3]}"
    assert sa["steps"] == sb["steps"]
    # and the same bytes, so DVC sees a resumed stage's output as the uninterrupted one's
    assert a.read_bytes() == b.read_bytes(), f"{a.name}: same tensors, other bytes"


def _same_json(a: Path, b: Path) -> None:
    assert json.loads(a.read_text()) == json.loads(b.read_text()), f"{a} differs from the uninterrupted run"


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    """(killed, reference): two copies of one tiny world with the same params; ``killed`` is a
    git + dvc repository with data/ tracked, ``reference`` a plain folder."""
    from wsss.config import params_from_dict
    from wsss.synth import generate

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw.update(TINY)
    killed = tmp_path_factory.mktemp("killed")
    reference = tmp_path_factory.mktemp("reference")
    generate(killed / "data" / "VOC2012", params_from_dict(raw))
    shutil.copytree(killed / "data", reference / "data")
    for root in (killed, reference):
        (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    for name in ("cli.py", "dvc.yaml", "src"):
        src = REPO / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, killed / name)
    (killed / ".gitignore").write_text("/outputs\n__pycache__/\n")
    env = _env()
    _run(["git", "init", "-q"], killed, env)
    _run(["dvc", "init", "-q"], killed, env)
    _run(["dvc", "config", "core.analytics", "false"], killed, env)
    _run(["dvc", "add", "-q", "data"], killed, env)
    _run(["git", "add", "-A"], killed, env)
    _run(["git", "commit", "-qm", "tiny"], killed, env)
    return killed, reference


def _reference_run(root: Path, monkeypatch) -> None:
    """The uninterrupted run, in this process (no interpreter start-up per stage)."""
    import torch

    from wsss.config import load_params
    from wsss.steps import crf, seeds, train_cls, train_seg

    isolate_outputs(monkeypatch, root)
    params = load_params(root / "params.yaml")
    threads = torch.get_num_threads()
    try:
        train_cls.run(params)
        seeds.run(params, "cam")
        crf.run(params, "cam")
        train_seg.run(params, "cam")
    finally:
        torch.set_num_threads(threads)


class _Interrupt(Exception):
    pass


class _NoTracker:
    def log_metrics(self, *args, **kwargs):
        pass


class _DropoutToy(nn.Module):
    """A trunk, dropout (as DeepLab's ASPP has) and a head, always built with the same weights."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.body = nn.Parameter(torch.randn(3, 8, generator=g))
        self.classifier = nn.Parameter(torch.randn(8, 2, generator=g))
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.drop(torch.tanh(x @ self.body)) @ self.classifier

    def spec(self):
        return {"kind": "toy"}


def test_resume_restores_the_random_state_that_dropout_draws_from(tmp_path):
    """8 items, batch 2, 3 epochs = 12 steps; a run interrupted at step 9 resumes at step 8 in a
    'new process' (global random state reseeded as seed_everything does) and must draw the
    dropout masks of the uninterrupted run: same weights, bit for bit."""
    from torch.utils.data import TensorDataset

    from wsss.trainer import LoopSpec, train_loop

    spec = LoopSpec("toy", epochs=3, lr=0.05, batch_size=2, weight_decay=0.0, max_steps=0, fingerprint_keys={})
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(8, 3, generator=g), torch.randn(8, 2, generator=g))
    cpu = torch.device("cpu")

    def step_fn(fail_at=None):
        def step(m, batch, i):
            if i == fail_at:
                raise _Interrupt
            loss = F.mse_loss(m(batch[0]), batch[1])
            return loss, {"loss": loss.item()}
        return step

    torch.manual_seed(0)
    full = _DropoutToy()
    train_loop(spec, full, data, step_fn(), tmp_path / "full", cpu, _NoTracker(), rng_seed=0)
    torch.manual_seed(0)
    with pytest.raises(_Interrupt):
        train_loop(spec, _DropoutToy(), data, step_fn(fail_at=9), tmp_path / "cut", cpu, _NoTracker(), rng_seed=0)
    torch.manual_seed(0)  # the rerun is a new process: seed_everything puts the state back at step 0
    resumed = _DropoutToy()
    logs = train_loop(spec, resumed, data, step_fn(), tmp_path / "cut", cpu, _NoTracker(), rng_seed=0)
    assert logs["steps"] == 12
    for name, p in full.named_parameters():
        assert torch.equal(p, dict(resumed.named_parameters())[name]), name


def test_a_write_removes_the_temporaries_a_dead_writer_left(tmp_path):
    """A killed writer leaves .<name>.tmp-<pid>-*; the next write of <name> removes those of
    dead processes (files and folders), keeps those of live ones and other names' ones."""
    from wsss.io import write_json

    dead = subprocess.Popen(["true"])
    dead.wait()
    # a killed writer nobody has reaped yet (in a container whose init never reaps: for good)
    zombie = subprocess.Popen(["true"])
    stat = Path(f"/proc/{zombie.pid}/stat")
    deadline = time.monotonic() + 30
    while stat.exists() and stat.read_text().rsplit(")", 1)[-1].split()[0] != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    stale_file = tmp_path / f".m.json.tmp-{dead.pid}-abc.json"
    stale_dir = tmp_path / f".m.json.tmp-{dead.pid}-def"
    stale_zombie = tmp_path / f".m.json.tmp-{zombie.pid}-xyz.json"
    live = tmp_path / f".m.json.tmp-{os.getpid()}-ghi.json"
    other = tmp_path / f".n.json.tmp-{dead.pid}-jkl.json"
    for p in (stale_file, stale_zombie, live, other):
        p.write_text("{")
    stale_dir.mkdir()
    (stale_dir / "x.png").write_bytes(b"")
    try:
        write_json(tmp_path / "m.json", {"a": 1})
    finally:
        zombie.wait()
    assert json.loads((tmp_path / "m.json").read_text()) == {"a": 1}
    assert not stale_file.exists() and not stale_dir.exists() and not stale_zombie.exists()
    assert live.exists() and other.exists()


def test_the_same_checkpoint_saved_twice_is_the_same_bytes(tmp_path):
    """DVC compares outputs by md5: a stage rerun that computes the same weights must write the
    same bytes, or every stage below it reruns. The two writes differ in what used to leak into
    the file: the destination's name (torch named the archive's inner folder after the
    pid-and-random temporary)."""
    layer = nn.Linear(3, 2)
    ckpt = {"spec": {"backbone": "x"}, "model": layer.state_dict(), "steps": 5}
    from wsss.io import save_torch

    save_torch(tmp_path / "cls.pt", ckpt)
    save_torch(tmp_path / "other" / "seg-cam.pt", ckpt)
    assert (tmp_path / "cls.pt").read_bytes() == (tmp_path / "other" / "seg-cam.pt").read_bytes()
    back = torch.load(tmp_path / "cls.pt", weights_only=True)
    assert back["steps"] == 5 and torch.equal(back["model"]["weight"], layer.weight.detach())


def test_an_unreadable_resume_file_is_a_fresh_start(tmp_path, capsys):
    """A truncated resume file (killed while written by an older version) is reported in one
    line and training starts over, instead of a traceback."""
    from torch.utils.data import TensorDataset

    from wsss.trainer import LoopSpec, train_loop

    spec = LoopSpec("toy", epochs=1, lr=0.05, batch_size=2, weight_decay=0.0, max_steps=0, fingerprint_keys={})
    data = TensorDataset(torch.randn(4, 3), torch.randn(4, 2))
    (tmp_path / "toy.resume.pt").write_bytes(b"PK\x03\x04 truncated")
    seen = []

    def step(m, batch, i):
        seen.append(i)
        loss = F.mse_loss(m(batch[0]), batch[1])
        return loss, {"loss": loss.item()}

    logs = train_loop(spec, _DropoutToy(), data, step, tmp_path, torch.device("cpu"), _NoTracker(), rng_seed=0)
    assert seen == [0, 1] and logs["steps"] == 2
    assert "toy.resume.pt: not a readable resume checkpoint" in capsys.readouterr().out
    assert not (tmp_path / "toy.resume.pt").exists() and (tmp_path / "toy.pt").exists()


def test_kill_9_then_dvc_repro_resumes_and_ends_as_an_uninterrupted_run(worlds, monkeypatch):
    killed, reference = worlds
    _reference_run(reference, monkeypatch)
    env = _env()
    out, ref = killed / "outputs", reference / "outputs"

    # train-cls: killed once its first epoch checkpoint exists
    resume = out / "checkpoints" / "cls.resume.pt"
    _kill_when(["dvc", "repro", "train-cls"], killed, env, resume.exists, "train-cls")
    assert not (out / "checkpoints" / "cls.pt").exists()
    assert _resumed_epoch(_run(["dvc", "repro", "train-cls"], killed, env), "cls") >= 1
    _same_weights(out / "checkpoints" / "cls.pt", ref / "checkpoints" / "cls.pt")
    _same_json(out / "metrics" / "train_cls.json", ref / "metrics" / "train_cls.json")

    _run(["dvc", "repro", "seeds@cam"], killed, env)

    # crf: killed once some masks exist in its temporary folder
    masks = out / "pseudo_masks"
    _kill_when(["dvc", "repro", "crf@cam"], killed, env,
               lambda: any(masks.glob(".cam.tmp-*/*.png")), "crf")
    assert not (masks / "cam").exists()  # no partial set of masks under the final name
    _run(["dvc", "repro", "crf@cam"], killed, env)
    ours, theirs = sorted((masks / "cam").iterdir()), sorted((ref / "pseudo_masks" / "cam").iterdir())
    assert [p.name for p in ours] == [p.name for p in theirs] and len(ours) == TINY["synth_n_train"]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(ours, theirs))
    _same_json(out / "metrics" / "crf" / "cam.json", ref / "metrics" / "crf" / "cam.json")

    # train-seg: killed once its first epoch checkpoint exists
    resume = out / "checkpoints" / "seg-cam.resume.pt"
    _kill_when(["dvc", "repro", "train-seg@cam"], killed, env, resume.exists, "train-seg")
    assert not (out / "checkpoints" / "seg-cam.pt").exists()
    assert _resumed_epoch(_run(["dvc", "repro", "train-seg@cam"], killed, env), "seg-cam") >= 1
    _same_weights(out / "checkpoints" / "seg-cam.pt", ref / "checkpoints" / "seg-cam.pt")
    _same_json(out / "metrics" / "train_seg" / "cam.json", ref / "metrics" / "train_seg" / "cam.json")

    # nothing half-written, no resume file left behind
    left = [str(p.relative_to(out)) for p in out.rglob("*")
            if p.name.startswith(".") or ".tmp-" in p.name or p.name.endswith(".resume.pt")]
    assert not left, f"left under outputs/: {left}"
    # and dvc agrees that the stages ran to the end: nothing to rerun up to train-seg@cam
    assert "changed" not in _run(["dvc", "status", "--with-deps", "train-seg@cam"], killed, env)


def test_mask_fingerprint_follows_the_masks_bytes_not_their_mtimes(tmp_path):
    """The fingerprint is saved in train-seg's and train-irn's checkpoints, so a checkout that
    only rewrites mtimes (dvc checkout, a fresh clone) must keep it; a changed mask, a renamed
    one or one more must not. Expected: sha1 over "name:" + sha1(bytes) per file, in name order."""
    import hashlib
    import os

    from wsss.steps.common import mask_fingerprint

    (tmp_path / "b.png").write_bytes(b"\x89PNG second")
    (tmp_path / "a.png").write_bytes(b"\x89PNG first")
    (tmp_path / "notes.txt").write_text("not a mask")
    h = hashlib.sha1()
    for name, data in (("a.png", b"\x89PNG first"), ("b.png", b"\x89PNG second")):
        h.update(f"{name}:".encode())
        h.update(hashlib.sha1(data).digest())
    first = mask_fingerprint(tmp_path)
    assert first == h.hexdigest()[:16]

    os.utime(tmp_path / "a.png", ns=(1, 1))  # same bytes, another mtime
    assert mask_fingerprint(tmp_path) == first
    (tmp_path / "a.png").write_bytes(b"\x89PNG first, changed")
    changed = mask_fingerprint(tmp_path)
    assert changed != first
    (tmp_path / "a.png").rename(tmp_path / "c.png")
    assert mask_fingerprint(tmp_path) not in (first, changed)
