"""The report: deltas against cam, the upper-bound row, reported figures labelled, and the
mean ± std aggregation over random seeds (values by hand)."""

import json
import os
import subprocess

import pytest

from wsss.config import Params
from wsss.steps import report


def test_aggregate_mean_and_population_std_by_hand():
    per_seed = {
        0: [{"method": "cam", "seed": 0.20, "mask": 0.30, "seg": None}],
        1: [{"method": "cam", "seed": 0.30, "mask": 0.40, "seg": None}],
        2: [{"method": "cam", "seed": 0.25, "mask": 0.35, "seg": None}],
    }
    agg = report.aggregate(per_seed)
    assert agg["seeds"] == [0, 1, 2]
    mean, std = agg["methods"]["cam"]["seed"]
    assert mean == pytest.approx(0.25)
    assert std == pytest.approx(((0.05**2 + 0.05**2 + 0) / 3) ** 0.5)
    assert "seg" not in agg["methods"]["cam"]  # never measured: no fake zero


def test_report_table_from_metrics_files(tmp_path, monkeypatch):
    monkeypatch.setenv("WSSS_OUTPUTS", str(tmp_path))
    monkeypatch.setenv("WSSS_TRACKING", "0")
    values = {"cam": (0.20, 0.30, 0.35, 0.25), "recam-scorecam": (0.29, 0.33, 0.31, 0.27)}
    for m, (seed, mask, irn, seg) in values.items():
        for stage, v in (("eval_seeds", seed), ("crf", mask), ("irn", irn), ("eval_seg", seg)):
            (tmp_path / "metrics" / stage).mkdir(parents=True, exist_ok=True)
            extra = ({"best_miou": v + 0.05, "best_threshold": 0.5, "official_miou": v - 0.01}
                     if stage == "eval_seeds" else {})
            (tmp_path / "metrics" / stage / f"{m}.json").write_text(json.dumps({"miou": v, **extra}))
    (tmp_path / "metrics" / "eval_seg" / "gt.json").write_text(json.dumps({"miou": 0.6}))
    (tmp_path / "metrics" / "eval_dsrg").mkdir()  # DSRG trained for recam-scorecam only
    (tmp_path / "metrics" / "eval_dsrg" / "recam-scorecam.json").write_text(json.dumps({"miou": 0.31}))
    params = Params(methods={"cam": "cls", "recam-scorecam": "recam-scorecam"}, recam_scorecam_mask="online",
                    pseudo_masks="irn")
    result = report.run(params)
    text = (tmp_path / "report.md").read_text()
    # the three seed columns: shared threshold (29.0), oracle (34.0), official with its rule; both
    # pseudo-mask columns (CRF 33.0, IRN 31.0: 31 - 35 = -4.0 vs cam); the segmentation column
    # names the masks it was trained on; the DSRG segmentation (31.0) after it
    assert "| segmentation mIoU (on IRN masks) |" in text
    assert "| DSRG segmentation mIoU |" in text
    assert ("| recam-scorecam | 29.0 | +9.0 | 33.0 | +3.0 | 31.0 | -4.0 | 27.0 | +2.0 | 31.0 | 34.0 "
            "| 28.0 (threshold 0.21) |") in text
    assert "| cam | 20.0 | - | 30.0 | - | 35.0 | - | 25.0 | - | - | 25.0 | 19.0 (threshold 0.15) |" in text
    assert "| upper bound (seg on GT masks) | - | - | - | - | - | - | 60.0 | - | - | - | - |" in text
    # the regime block: IRN mask / seed = 0.35 / 0.20 = 1.75
    assert "| CAM IRN pseudo-mask / CAM seed | 1.75 | 1.38 (reported; 66.5 / 48.3) |" in text
    # which column the papers' figures correspond to
    assert "| recam-scorecam | threshold 0.21 | zhaozhengChen/ReCAM run_sample.py:43" in text
    assert "the oracle column (its author" in text
    assert "student ReCAM+Score-CAM (30 images) (reported) | 29.0 | 30.0" in text
    assert (tmp_path / "report.png").stat().st_size > 0
    assert [r["method"] for r in result["rows"]][-1].startswith("upper bound")


def test_aggregate_includes_oracle_threshold_column():
    per_seed = {s: [{"method": "cam", "seed": 0.2, "mask": None, "seg": None, "seed_best": v}]
                for s, v in ((0, 0.30), (1, 0.34))}
    agg = report.aggregate(per_seed)
    mean, std = agg["methods"]["cam"]["seed_best"]
    assert (mean, std) == (pytest.approx(0.32), pytest.approx(0.02))


def _exp(name, seed, metrics):
    """One experiment as `dvc exp show --json` lists it (the parts spread reads)."""
    return {"rev": "abc", "name": name, "data": {
        "params": {"params.yaml": {"data": {"seed": seed, "methods": {"cam": "cls"}}}},
        "metrics": {f"outputs/metrics/{k}": {"data": v} for k, v in metrics.items()}}}


SHOW = [{"rev": "workspace", "data": {}},
        {"rev": "HEAD", "experiments": [
            {"revs": [_exp("exp-a", 0, {"eval_seeds/cam.json": {"miou": 0.20, "best_miou": 0.3},
                                        "crf/cam.json": {"miou": 0.30}, "train_cls.json": {"val_map": 0.40},
                                        "eval_seg/gt.json": {"miou": 0.50}})]},
            {"revs": [_exp("exp-b", 1, {"eval_seeds/cam.json": {"miou": 0.40, "best_miou": 0.5},
                                        "crf/cam.json": {"miou": 0.50},
                                        "train_cls.json": {"val_map": 0.60},
                                        "report.json": {"regime": {"val_map": 0.99}}})]},
            {"revs": [_exp("other", 2, {"eval_seeds/cam.json": {"miou": 0.9}})]}]}]


def test_spread_queues_runs_and_reads_dvc_experiments(tmp_path, monkeypatch):
    """spread = `dvc exp run --queue` (one sweep over the seeds, the unlisted methods dropped),
    `dvc exp run --run-all --jobs 1`, then the scores of exactly the queued experiments from
    `dvc exp show --json`: mean ± std by hand, from the metrics the runs made themselves (up
    to --until; the rest of an experiment's commit is the baseline's, another seed's)."""
    from wsss import spread

    monkeypatch.setenv("WSSS_OUTPUTS", str(tmp_path / "outputs"))
    monkeypatch.setenv("WSSS_TRACKING", "0")
    (tmp_path / "params.yaml").write_text("methods: {cam: cls, gradcam: cls}\n")
    calls = []

    def fake(args, cwd, stdout_only=False):
        calls.append(args)
        if args[:3] == ["exp", "run", "--queue"]:
            return "Queued experiment 'exp-a' for future execution.\nQueued experiment 'exp-b' for future execution.\n"
        return json.dumps(SHOW) if args[:2] == ["exp", "show"] else ""

    monkeypatch.setattr(spread, "_call", fake)
    monkeypatch.setattr(spread, "baseline_commit", lambda root: "abc123")
    agg = spread.spread(Params(methods={"cam": "cls"}), [0, 1], until="crf", root=tmp_path)
    assert calls[0] == ["exp", "run", "--queue", "-S", "seed=0,1", "-S", "~methods.gradcam", "eval-seeds", "crf"]
    assert calls[1] == ["exp", "run", "--run-all", "--jobs", "1"]
    assert calls[2] == ["exp", "show", "--json", "--rev", "abc123"]  # the queued runs' commit, not HEAD
    assert agg["seeds"] == [0, 1]
    assert agg["methods"]["cam"]["seed"] == (pytest.approx(0.3), pytest.approx(0.1))
    assert agg["methods"]["cam"]["mask"] == (pytest.approx(0.4), pytest.approx(0.1))
    assert "upper bound (seg on GT masks)" not in agg["methods"]  # not made --until crf: the baseline's
    assert agg["methods"]["cam"]["seed_best"] == (pytest.approx(0.4), pytest.approx(0.1))
    # val mAP 0.40 and 0.60 (train_cls.json; report.json is the baseline's with --until crf) -> 0.50 ± 0.10
    assert agg["regime"]["val_map"] == (pytest.approx(0.5), pytest.approx(0.1))
    text = (tmp_path / "outputs" / "spread" / "report.md").read_text()
    assert "| cam | 30.0 ± 10.0 | 40.0 ± 10.0 |" in text
    assert "| classifier val mAP | 0.500 ± 0.100 |" in text


def test_spread_runs_dvc_with_the_interpreters_bin_first_on_path(tmp_path, monkeypatch):
    """`dvc exp run --run-all` spawns its queue worker as a bare `dvc` from PATH: run without the
    environment activated, the dvc beside the interpreter must still be the one found there."""
    from wsss import spread

    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    fake = bin_dir / "dvc"
    fake.write_text("#!/bin/sh\ncommand -v dvc || echo none\n")
    fake.chmod(0o755)
    monkeypatch.setattr(spread.sys, "executable", str(bin_dir / "python"))
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # not activated
    assert spread._call(["queue", "start"], tmp_path).strip() == str(fake)


def test_spread_reports_an_experiment_without_results(tmp_path, monkeypatch):
    from wsss import spread
    from wsss.errors import UserError

    (tmp_path / "params.yaml").write_text("methods: {cam: cls}\n")
    monkeypatch.setattr(spread, "_call", lambda args, cwd, stdout_only=False: (
        "Queued experiment 'lost' for future execution.\n" if "--queue" in args else
        json.dumps(SHOW) if "show" in args else ""))
    with pytest.raises(UserError, match="experiment lost left no results; see `dvc queue logs lost`"):
        spread.spread(Params(methods={"cam": "cls"}), [0], root=tmp_path)


#: `dvc exp list --all-commits` as dvc 3 prints it: experiments of two baseline commits
LISTING = "9b6ed5c:\n\ta70e796 [exp-a]\n\t5589b7f [other]\n61e9aa5:\n\t74e7264 [exp-b]\n"


def _show_of(*names):
    """`dvc exp show --json --rev X`: only the experiments of X (SHOW's, kept by name)."""
    revs = [e for e in SHOW[1]["experiments"] if e["revs"][0]["name"] in names]
    return json.dumps([SHOW[0], {"rev": "X", "experiments": revs}])


def spread_mod():
    from wsss import spread
    return spread


def test_baselines_parse_dvc_exp_list():
    assert spread_mod().baselines(LISTING) == {"exp-a": "9b6ed5c", "other": "9b6ed5c", "exp-b": "61e9aa5"}


def test_collect_aggregates_experiments_of_several_baselines(tmp_path, monkeypatch):
    """--collect runs nothing: it finds each named experiment's baseline commit in `dvc exp list
    --all-commits`, reads it from `dvc exp show --json --rev <baseline>` and aggregates as spread
    does (the same hand-computed mean ± std as the queued test)."""
    spread = spread_mod()
    monkeypatch.setenv("WSSS_OUTPUTS", str(tmp_path / "outputs"))
    monkeypatch.setenv("WSSS_TRACKING", "0")
    calls = []

    def fake(args, cwd, stdout_only=False):
        calls.append(args)
        if args == ["exp", "list", "--all-commits"]:
            return LISTING
        if args[:3] == ["exp", "show", "--json"]:
            return _show_of({"9b6ed5c": "exp-a", "61e9aa5": "exp-b"}[args[4]], "other")
        raise AssertionError(f"unexpected dvc call {args}")

    monkeypatch.setattr(spread, "_call", fake)
    agg = spread.collect(Params(methods={"cam": "cls"}), ["exp-b", "exp-a"], until="crf", root=tmp_path)
    assert calls == [["exp", "list", "--all-commits"], ["exp", "show", "--json", "--rev", "61e9aa5"],
                     ["exp", "show", "--json", "--rev", "9b6ed5c"]]
    assert agg["seeds"] == [0, 1] and agg["experiments"] == {0: "exp-a", 1: "exp-b"}
    assert agg["methods"]["cam"]["seed"] == (pytest.approx(0.3), pytest.approx(0.1))
    assert agg["methods"]["cam"]["mask"] == (pytest.approx(0.4), pytest.approx(0.1))
    assert "| cam | 30.0 ± 10.0 | 40.0 ± 10.0 |" in (tmp_path / "outputs" / "spread" / "report.md").read_text()


def test_collect_names_a_missing_experiment_and_a_repeated_seed(tmp_path, monkeypatch):
    from wsss.errors import UserError

    spread = spread_mod()
    monkeypatch.setenv("WSSS_OUTPUTS", str(tmp_path / "outputs"))
    monkeypatch.setenv("WSSS_TRACKING", "0")
    monkeypatch.setattr(spread, "_call", lambda args, cwd, stdout_only=False: (
        LISTING if args[1] == "list" else _show_of("exp-a", "exp-b", "other")))
    monkeypatch.setattr(spread, "commit_of", lambda rev, root: None)
    with pytest.raises(UserError, match="'nope' is neither an experiment .* nor a git revision"):
        spread.collect(Params(methods={"cam": "cls"}), ["exp-a", "nope"], root=tmp_path)
    twin = [SHOW[0], {"rev": "X", "experiments": [{"revs": [_exp("exp-a", 0, {"eval_seeds/cam.json": {"miou": 0.2}})]},
                                                  {"revs": [_exp("other", 0, {"eval_seeds/cam.json": {"miou": 0.3}})]}]}]
    monkeypatch.setattr(spread, "_call", lambda args, cwd, stdout_only=False: (
        LISTING if args[1] == "list" else json.dumps(twin)))
    with pytest.raises(UserError, match="experiments exp-a and other both ran seed 0 with different results for "
                                        "cam; give one run per seed and method"):
        spread.collect(Params(methods={"cam": "cls"}), ["exp-a", "other"], root=tmp_path)
    assert not (tmp_path / "outputs" / "spread").exists()  # nothing written


def test_collect_merges_runs_of_one_seed_that_ran_different_methods(tmp_path, monkeypatch):
    """`spread --methods cam,gradcam` and `--methods cam,sipe` at the same seeds: each seed's rows
    come from both runs, CAM once (the same figures in both), and each run counts only for the
    methods in its own params: exp-a's commit still holds a sipe metrics file from its baseline
    (another seed, 0.99) that must not be read. By hand: cam seed (0.2 + 0.4) / 2 = 0.3 ± 0.1,
    gradcam (0.25 + 0.45) / 2 = 0.35 ± 0.1, sipe (0.1 + 0.3) / 2 = 0.2 ± 0.1."""
    spread = spread_mod()
    monkeypatch.setenv("WSSS_OUTPUTS", str(tmp_path / "outputs"))
    monkeypatch.setenv("WSSS_TRACKING", "0")

    def run(name, seed, methods, scores):
        row = _exp(name, seed, {f"eval_seeds/{m}.json": {"miou": v} for m, v in scores.items()})
        row["data"]["params"]["params.yaml"]["data"]["methods"] = dict.fromkeys(methods, "cls")
        return {"revs": [row]}

    exps = [run("g0", 0, ["cam", "gradcam"], {"cam": 0.2, "gradcam": 0.25, "sipe": 0.99}),
            run("g1", 1, ["cam", "gradcam"], {"cam": 0.4, "gradcam": 0.45}),
            run("s0", 0, ["cam", "sipe"], {"cam": 0.2, "sipe": 0.1}),
            run("s1", 1, ["cam", "sipe"], {"cam": 0.4, "sipe": 0.3, "gradcam": 0.99})]
    listing = "9b6ed5c:\n" + "".join(f"\t{i}{i}{i} [{n}]\n" for i, n in enumerate(["g0", "g1", "s0", "s1"]))
    monkeypatch.setattr(spread, "_call", lambda args, cwd, stdout_only=False: (
        listing if args[1] == "list" else json.dumps([SHOW[0], {"rev": "X", "experiments": exps}])))
    params = Params(methods={"cam": "cls", "gradcam": "cls", "sipe": "sipe"})
    agg = spread.collect(params, ["g0", "g1", "s0", "s1"], until="seeds", root=tmp_path)
    assert agg["seeds"] == [0, 1] and agg["experiments"] == {0: "g0, s0", 1: "g1, s1"}
    for m, mean in (("cam", 0.3), ("gradcam", 0.35), ("sipe", 0.2)):
        assert agg["methods"][m]["seed"] == (pytest.approx(mean), pytest.approx(0.1)), m
        assert agg["n"][m]["seed"] == 2, m


SHA = "f" * 40


def _commit_show(seed, metrics):
    """`dvc exp show --json --rev SHA`: the workspace, then the commit's own row (its dvc.lock run)."""
    row = _exp("main", seed, metrics)
    row["rev"] = SHA
    return json.dumps([SHOW[0], dict(row, experiments=None)])


def test_collect_takes_a_committed_run_beside_an_experiment(tmp_path, monkeypatch):
    """A name that is no experiment but a git revision (HEAD after `dvc repro` and a commit) is
    that commit's own run: its row of `dvc exp show --rev <sha>`, aggregated with the
    experiments (exp-a seed 0: seed 0.20, CRF 0.30; the commit seed 1: 0.40, 0.50 -> 0.3 ± 0.1,
    0.4 ± 0.1)."""
    spread = spread_mod()
    monkeypatch.setenv("WSSS_OUTPUTS", str(tmp_path / "outputs"))
    monkeypatch.setenv("WSSS_TRACKING", "0")
    monkeypatch.setattr(spread, "commit_of", lambda rev, root: SHA if rev in ("HEAD", "main") else None)
    calls = []

    def fake(args, cwd, stdout_only=False):
        calls.append(args)
        if args == ["exp", "list", "--all-commits"]:
            return LISTING
        if args == ["exp", "show", "--json", "--rev", "9b6ed5c"]:
            return _show_of("exp-a", "other")
        if args == ["exp", "show", "--json", "--rev", SHA]:
            return _commit_show(1, {"eval_seeds/cam.json": {"miou": 0.40}, "crf/cam.json": {"miou": 0.50}})
        raise AssertionError(f"unexpected dvc call {args}")

    monkeypatch.setattr(spread, "_call", fake)
    agg = spread.collect(Params(methods={"cam": "cls"}), ["exp-a", "HEAD"], until="crf", root=tmp_path)
    assert ["exp", "show", "--json", "--rev", SHA] in calls
    assert agg["seeds"] == [0, 1] and agg["experiments"] == {0: "exp-a", 1: "HEAD"}
    assert agg["methods"]["cam"]["seed"] == (pytest.approx(0.3), pytest.approx(0.1))
    assert agg["methods"]["cam"]["mask"] == (pytest.approx(0.4), pytest.approx(0.1))


def test_collect_refuses_one_commit_twice_and_a_run_without_metrics(tmp_path, monkeypatch):
    from wsss.errors import UserError

    spread = spread_mod()
    monkeypatch.setenv("WSSS_OUTPUTS", str(tmp_path / "outputs"))
    monkeypatch.setenv("WSSS_TRACKING", "0")
    monkeypatch.setattr(spread, "commit_of", lambda rev, root: SHA if rev in ("HEAD", "main") else None)
    # metrics that `dvc exp show` could not read (outputs not in the cache) come as errors, no data;
    # git-tracked ones (train_<method>.json) still come with data, and are no scores
    missing = {"outputs/metrics/eval_seeds/cam.json": {"error": {"type": "FileNotFoundError"}},
               "outputs/metrics/train_cam.json": {"data": {"checkpoint": "cls", "trained": False}}}

    def fake(args, cwd, stdout_only=False):
        if args[1] == "list":
            return LISTING
        if args[-1] == SHA:
            show = json.loads(_commit_show(1, {}))
            show[1]["data"]["metrics"] = missing
            return json.dumps(show)
        return _show_of("exp-a", "other")

    monkeypatch.setattr(spread, "_call", fake)
    with pytest.raises(UserError, match="'main' and 'HEAD' are the same commit"):
        spread.collect(Params(methods={"cam": "cls"}), ["HEAD", "main"], root=tmp_path)
    with pytest.raises(UserError, match="'HEAD' has no metrics up to --until crf in the dvc cache; `dvc pull`"):
        spread.collect(Params(methods={"cam": "cls"}), ["exp-a", "HEAD"], until="crf", root=tmp_path)
    with pytest.raises(UserError, match="'HEAD' has no metrics up to --until seg in the dvc cache"):
        spread.collect(Params(methods={"cam": "cls"}), ["exp-a", "HEAD"], until="seg", root=tmp_path)
    assert not (tmp_path / "outputs" / "spread").exists()  # nothing written


def test_commit_of_resolves_revisions_of_a_git_repo(tmp_path):
    spread = spread_mod()
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t")
    for cmd in (["git", "init", "-q"], ["git", "commit", "-q", "--allow-empty", "-m", "x"]):
        subprocess.run(cmd, cwd=tmp_path, env=env, check=True)
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    assert len(sha) == 40
    assert spread.commit_of("HEAD", tmp_path) == sha and spread.commit_of(sha[:7], tmp_path) == sha
    assert spread.commit_of("no-such-branch", tmp_path) is None


def test_spread_report_shows_means_deltas_and_no_empty_single_run_table(tmp_path, monkeypatch):
    """The spread folder has no per-method metrics of its own: its report is the mean ± std
    table, with the deltas of the means against cam (by hand), and its rows are the means. A Δ
    is starred when it exceeds twice the larger std, and only when both sides have 2 seeds."""
    monkeypatch.setenv("WSSS_OUTPUTS", str(tmp_path))
    monkeypatch.setenv("WSSS_TRACKING", "0")
    per_seed = {0: [{"method": "cam", "seed": 0.20, "mask": 0.22, "irn": 0.30, "seg": 0.10, "seed_best": 0.21,
                     "seed_official": 0.23, "dsrg": 0.30},
                    {"method": "gradcam", "seed": 0.14, "mask": 0.19, "irn": 0.22, "seg": 0.05, "seed_best": 0.19,
                     "seed_official": 0.15, "dsrg": 0.10}],
                1: [{"method": "cam", "seed": 0.18, "mask": 0.20, "irn": 0.28, "seg": 0.12, "seed_best": 0.19,
                     "seed_official": 0.21},
                    {"method": "gradcam", "seed": 0.12, "mask": 0.21, "irn": 0.28, "seg": 0.07, "seed_best": 0.17,
                     "seed_official": 0.17}]}
    agg = report.aggregate(per_seed)
    assert agg["n"]["gradcam"]["dsrg"] == 1 and agg["n"]["gradcam"]["seed"] == 2
    result = report.run(Params(methods={"cam": "cls", "gradcam": "cls"}), spread=agg)
    text = (tmp_path / "report.md").read_text()
    # gradcam vs cam: seed 13 ± 1 vs 19 ± 1 (|-6| > 2: *), CRF 20 vs 21 (-1: none), IRN 25 ± 3 vs
    # 29 ± 1 (|-4| < 2 x the larger std 3: none), seg 6 vs 11 (-5: *); DSRG one seed each: 10 vs
    # 30, -20 but no star (no std to test against)
    assert ("| gradcam | 13.0 ± 1.0 | 20.0 ± 1.0 | 25.0 ± 3.0 | 6.0 ± 1.0 | 10.0 ± 0.0 (n=1) | 18.0 ± 1.0 "
            "| 16.0 ± 1.0 (threshold 0.15) | -6.0* / -1.0 / -4.0 / -5.0* / -20.0 |") in text
    assert ("| cam | 19.0 ± 1.0 | 21.0 ± 1.0 | 29.0 ± 1.0 | 11.0 ± 1.0 | 30.0 ± 0.0 (n=1) | 20.0 ± 1.0 "
            "| 22.0 ± 1.0 (threshold 0.15) | - / - / - / - / - |") in text
    assert "Δ vs cam | pseudo-mask" not in text  # no single-run table (its cells would be empty)
    assert result["rows"][0]["seed"] == pytest.approx(0.19)
    assert (tmp_path / "report.png").stat().st_size > 0


def _write_metrics(root, files: dict) -> None:
    for rel, obj in files.items():
        path = root / "metrics" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(obj))


def test_regime_block_from_metrics_files(tmp_path, monkeypatch):
    """The regime block: measured values beside the reported VOC ones (ratios by hand), and the
    per-method role table where eval-seeds measured it ("-" where it did not)."""
    monkeypatch.setenv("WSSS_OUTPUTS", str(tmp_path))
    monkeypatch.setenv("WSSS_TRACKING", "0")
    _write_metrics(tmp_path, {
        "train_cls.json": {"val_map": 0.46, "val_f1": 0.3},
        "eval_seg/gt.json": {"miou": 0.25},
        "eval_seeds/cam.json": {"miou": 0.20, "best_miou": 0.21, "part_recall": 0.6, "body_recall": 0.15,
                                "cooccur_fp": 0.05, "context_fp": 0.12},
        "crf/cam.json": {"miou": 0.22},
        "eval_seeds/gradcam.json": {"miou": 0.18, "best_miou": 0.19},  # no roles measured
    })
    result = report.run(Params(methods={"cam": "cls", "gradcam": "cls"}))
    text = (tmp_path / "report.md").read_text()
    assert "| classifier val mAP | 0.460 | > 0.9 (reported; ImageNet ResNet-50) |" in text
    assert ("| upper bound: segmentation mIoU, DeepLab on GT masks (val) | 25.0 "
            "| about 76-80 (reported; fully supervised DeepLab) |") in text
    assert "| CAM seed mIoU | 20.0 | 48.3 (reported; CAM seeds, train) |" in text
    assert "| CAM pseudo-mask mIoU | 22.0 | 66.5 (reported; IRN pseudo-masks, train) |" in text
    # seed / upper bound = 0.20 / 0.25 = 0.80; pseudo-mask / seed = 0.22 / 0.20 = 1.10
    assert "| CAM seed / upper bound | 0.80 | about 0.6 (reported; 48.3 / 76-80) |" in text
    assert "| CAM pseudo-mask / CAM seed | 1.10 | 1.38 (reported; 66.5 / 48.3) |" in text
    # part / body = 0.6 / 0.15 = 4.00
    assert "| method | part recall | body recall | part / body | co-occurrence FP | context FP |" in text
    assert "| cam | 60.0 | 15.0 | 4.00 | 5.0 | 12.0 |" in text
    assert "| gradcam | - | - | - | - | - |" in text
    assert "| upper bound (seg on GT masks) | - | - |" not in text.split("part recall")[1]
    assert result["regime"] == {"val_map": 0.46, "upper": 0.25, "cam_seed": 0.20, "cam_mask": 0.22,
                                "seed_over_upper": pytest.approx(0.8), "mask_over_seed": pytest.approx(1.1),
                                "cam_irn": None, "irn_over_seed": None}  # no IRN metrics here
    saved = json.loads((tmp_path / "metrics" / "report.json").read_text())
    assert saved["rows"][0]["part_body"] == pytest.approx(4.0)


def test_regime_block_with_missing_files_shows_dashes_and_no_role_table(tmp_path, monkeypatch):
    """No train_cls.json, no upper bound, no crf, no role metrics (real VOC): "-" cells, the
    reported column intact, no role table."""
    monkeypatch.setenv("WSSS_OUTPUTS", str(tmp_path))
    monkeypatch.setenv("WSSS_TRACKING", "0")
    _write_metrics(tmp_path, {"eval_seeds/cam.json": {"miou": 0.2, "best_miou": 0.2}})
    result = report.run(Params(methods={"cam": "cls"}))
    text = (tmp_path / "report.md").read_text()
    assert "| classifier val mAP | - | > 0.9 (reported; ImageNet ResNet-50) |" in text
    assert "| CAM seed mIoU | 20.0 | 48.3 (reported; CAM seeds, train) |" in text
    assert "| CAM seed / upper bound | - | about 0.6 (reported; 48.3 / 76-80) |" in text
    assert "| CAM pseudo-mask / CAM seed | - | 1.38 (reported; 66.5 / 48.3) |" in text
    assert "part recall" not in text
    assert result["regime"]["val_map"] is None


@pytest.mark.filterwarnings("ignore:No artists with labels")  # Axes.bar is replaced: no artists
def test_bar_chart_has_a_bar_per_stage_and_per_seg_trainer(tmp_path, monkeypatch):
    """Each method gets the seed, CRF, IRN and segmentation bars and the DSRG one, at its value
    in % (a missing value draws 0, not someone else's)."""
    import matplotlib.axes

    drawn = {}

    def record(self, x, height, width, **kw):
        drawn[kw["label"]] = [round(float(h), 6) for h in height]

    monkeypatch.setattr(matplotlib.axes.Axes, "bar", record)
    rows = [{"method": "cam", "seed": 0.44, "mask": 0.60, "irn": 0.46, "seg": 0.53, "dsrg": 0.41},
            {"method": "sipe", "seed": 0.21, "mask": 0.31, "irn": None, "seg": 0.20, "dsrg": 0.25}]
    report.bar_chart(rows, tmp_path / "r.png")
    assert drawn == {"seed": [44.0, 21.0], "pseudo-mask (CRF)": [60.0, 31.0], "pseudo-mask (IRN)": [46.0, 0.0],
                     "segmentation": [53.0, 20.0], "segmentation (DSRG)": [41.0, 25.0]}
