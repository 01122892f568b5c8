"""End to end: `dvc repro` on a micro synthetic world in a temporary git repo, then
`dvc exp run -S threshold=...` re-runs only the threshold-dependent stages; metrics files
and MLflow runs are checked."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

MICRO = {
    "synth_n_train": 6, "synth_n_val": 4, "synth_n_extra": 6, "synth_size": 48, "cls_epochs": 1, "cls_batch_size": 3,
    "recipe_list_size": 0, "cls_crop": 48, "recam_epochs": 1, "puzzle_epochs": 1, "sipe_epochs": 1, "seg_epochs": 1,
    "seg_batch_size": 3, "seg_crop": 48, "cam_scales": [1.0], "num_workers": 1, "crf_iters": 2,
    "threshold_sweep": [0.1, 0.3], "scorecam_chunk": 128,
    # one method on an alias of cls.pt and one with its own training (which also runs Score-CAM)
    "methods": {"cam": "cls", "recam-scorecam": "recam-scorecam"},
}


def _run(cmd, cwd, env):
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout + out.stderr


@pytest.fixture(scope="module")
def micro_repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("micro")
    for name in ("cli.py", "dvc.yaml", "src"):
        src = REPO / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, root / name)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params.update(MICRO)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (root / ".gitignore").write_text("/outputs\n/mlruns\n/mlflow.db\n__pycache__/\n")
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # `python` = this venv
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("WSSS_TRACKING", None)
    env.pop("WSSS_OUTPUTS", None)
    env.pop("DVC_ROOT", None)
    env.update(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    _run(["git", "init", "-q"], root, env)
    _run(["dvc", "init", "-q"], root, env)
    _run(["dvc", "config", "core.analytics", "false"], root, env)
    _run([sys.executable, "cli.py", "data", "synth", "--no-preview"], root, env)
    _run(["dvc", "add", "-q", "data"], root, env)
    _run(["git", "add", "-A"], root, env)
    _run(["git", "commit", "-qm", "micro"], root, env)
    log = _run(["dvc", "repro"], root, env)
    return root, env, log


def test_repro_writes_metrics_report_and_mlflow_runs(micro_repo):
    root, env, log = micro_repo
    for m in MICRO["methods"]:
        for stage in ("eval_seeds", "crf", "eval_seg"):
            metrics = json.loads((root / "outputs/metrics" / stage / f"{m}.json").read_text())
            assert 0.0 <= metrics["miou"] <= 1.0
        assert len(list((root / "outputs/seeds" / m).glob("*.npz"))) == 6
        assert len(list((root / "outputs/pseudo_masks" / m).glob("*.png"))) == 6
    assert (root / "outputs/metrics/eval_seg/gt.json").exists()
    report = (root / "outputs/report.md").read_text()
    assert "recam-scorecam" in report and "(reported)" in report
    # MLflow: one run per step (and method), all tagged with one pipeline id
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["wsss"])
    stages = set(runs["tags.dvc.stage"])
    assert {"train-cls", "seeds@cam", "eval-seeds@recam-scorecam", "crf@recam-scorecam",
            "train-seg@gt", "eval-seg@cam", "report"} <= stages
    assert runs["tags.wsss.pipeline"].nunique() == 1
    assert runs["tags.mlflow.source.git.commit"].str.len().eq(40).all()
    status = _run(["dvc", "status"], root, env)
    assert "changed" not in status


def test_exp_run_threshold_reruns_only_dependent_stages(micro_repo):
    root, env, _ = micro_repo
    _run(["git", "add", "-A"], root, env)
    _run(["git", "commit", "-qm", "lock"], root, env)
    log = _run(["dvc", "exp", "run", "-S", "threshold=0.3"], root, env)
    ran = {line.split("'")[1] for line in log.splitlines() if line.startswith("Running stage")}
    assert ran == {"eval-seeds@cam", "eval-seeds@recam-scorecam", "report"}
    assert json.loads((root / "outputs/metrics/eval_seeds/cam.json").read_text())["threshold"] == 0.3
    shown = _run(["dvc", "exp", "show", "--json"], root, env)
    assert "miou" in shown


def test_exp_run_temp_runs_in_its_copy_and_tracks_to_the_parent(micro_repo):
    """`dvc exp run --temp` (and `--queue`, same executor) runs in a temporary copy whose
    DVC_ROOT names the parent repo: outputs must land in the copy (dvc collects them there and
    the workspace stays as it was), MLflow runs in the parent's store, and only the
    threshold-dependent stages rerun (every output is in the shared dvc cache)."""
    import mlflow

    root, env, _ = micro_repo
    _run(["git", "add", "-A"], root, env)
    _run(["git", "commit", "-qm", "lock", "--allow-empty"], root, env)
    before = (root / "outputs/metrics/eval_seeds/cam.json").read_text()
    log = _run(["dvc", "exp", "run", "--temp", "-n", "tmpexp", "-S", "threshold=0.15"], root, env)
    ran = {line.split("'")[1] for line in log.splitlines() if line.startswith("Running stage")}
    assert ran == {"eval-seeds@cam", "eval-seeds@recam-scorecam", "report"}
    assert (root / "outputs/metrics/eval_seeds/cam.json").read_text() == before  # workspace untouched
    shown = _run(["dvc", "exp", "show", "--json"], root, env)
    assert "tmpexp" in shown and "0.15" in shown
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["wsss"], filter_string="tags.`dvc.exp_name` = 'tmpexp'")
    assert set(runs["tags.dvc.stage"]) == ran


def test_spread_runs_seeds_as_queued_dvc_experiments(micro_repo):
    """`cli.py spread` queues one experiment per seed (the other methods dropped with -S
    ~methods.M), runs the queue with one worker and reads the scores back from `dvc exp show`."""
    root, env, _ = micro_repo
    _run(["git", "add", "-A"], root, env)
    _run(["git", "commit", "-qm", "lock", "--allow-empty"], root, env)
    log = _run([sys.executable, "cli.py", "spread", "--seeds", "1", "--methods", "cam", "--until", "seeds"], root, env)
    assert "queued" in log
    saved = json.loads((root / "outputs/spread/metrics/report.json").read_text())
    # until seeds: only its own seed scores; the baseline's crf / upper bound are not mixed in
    assert saved["spread"]["seeds"] == [1] and list(saved["spread"]["methods"]) == ["cam"]
    assert set(saved["spread"]["methods"]["cam"]) >= {"seed", "seed_best"}
    assert "mask" not in saved["spread"]["methods"]["cam"]
    shown = subprocess.run(["dvc", "exp", "show", "--json"], cwd=root, env=env, capture_output=True, text=True)
    assert '"seed": 1' in shown.stdout
    # --collect reads the same experiment back after HEAD moved on (its baseline is now an older
    # commit, found through `dvc exp list --all-commits`) and writes the same means
    name = log.split("[spread] queued ")[1].split(";")[0]
    _run(["git", "commit", "-qm", "later", "--allow-empty"], root, env)
    _run([sys.executable, "cli.py", "spread", "--collect", name, "--methods", "cam", "--until", "seeds"], root, env)
    again = json.loads((root / "outputs/spread/metrics/report.json").read_text())
    assert again["spread"]["methods"] == saved["spread"]["methods"]
    assert again["spread"]["experiments"] == {"1": name}
    # a committed `dvc repro` (HEAD: seed 0, its dvc.lock) counts as a seed beside the experiment:
    # the mean of the workspace's own metrics file and the experiment's score
    workspace = json.loads((root / "outputs/metrics/eval_seeds/cam.json").read_text())["miou"]
    _run([sys.executable, "cli.py", "spread", "--collect", f"HEAD,{name}", "--methods", "cam", "--until", "seeds"],
         root, env)
    both = json.loads((root / "outputs/spread/metrics/report.json").read_text())["spread"]
    assert both["seeds"] == [0, 1] and both["experiments"] == {"0": "HEAD", "1": name}
    mean, std = both["methods"]["cam"]["seed"]
    one = saved["spread"]["methods"]["cam"]["seed"][0]
    assert mean == pytest.approx((workspace + one) / 2) and std == pytest.approx(abs(workspace - one) / 2)


def test_only_listed_methods_have_stages_and_cam_alone_reproduces(micro_repo):
    """With `methods: {cam: cls}` (Params' default) dvc.yaml has no stage of another method and
    `dvc repro` runs: no stage reads an unlisted method's outputs."""
    root, env, _ = micro_repo
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["methods"] = {"cam": "cls"}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    stages = _run(["dvc", "stage", "list", "--name-only"], root, env).split()
    assert "train@cam" in stages and not [s for s in stages if "scorecam" in s or "recam" in s]
    log = _run(["dvc", "repro"], root, env)
    ran = {line.split("'")[1] for line in log.splitlines() if line.startswith("Running stage")}
    assert ran <= {"train@cam", "report"}  # everything else of cam is unchanged
    assert "| cam |" in (root / "outputs/report.md").read_text()


def test_exp_run_nproc_starts_the_training_stage_under_torchrun(micro_repo):
    """`dvc exp run -S nproc=2` (issue 12): the unchanged dvc.yaml command starts torchrun with
    2 gloo processes; rank 0 alone prints, writes the metrics and logs the MLflow run."""
    import mlflow

    root, env, _ = micro_repo
    _run(["git", "add", "-A"], root, env)
    _run(["git", "commit", "-qm", "lock", "--allow-empty"], root, env)
    log = _run(["dvc", "exp", "run", "-n", "twoproc", "train-cls", "-S", "nproc=2", "-S", "threads=1",
                "-S", "cls_batch_size=2", "-S", "seg_batch_size=2"], root, env)
    assert log.count("[train-cls]") == 1, log
    assert json.loads((root / "outputs/metrics/train_cls.json").read_text())["steps"] == 6  # train_aug: 6 + 6 images / batch 2
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["wsss"], filter_string="tags.`dvc.exp_name` = 'twoproc'")
    assert list(runs["tags.dvc.stage"]) == ["train-cls"] and set(runs["params.nproc"]) == {"2"}
