"""``python cli.py spread``: the pipeline once per random seed, as DVC experiments, and the
mean ± std of every method's scores (outputs/spread/report.md, report.png, report.json).

The runs are DVC's own: ``dvc exp run --queue -S seed=0,1,2`` queues one experiment per seed
(``-S ~methods.M`` drops the methods not asked for), ``dvc exp run --run-all --jobs 1`` runs the
queue with one worker (every stage logs to the one sqlite MLflow store, which takes one writer at
a time) and waits for it, and the scores are read back from ``dvc exp show --json``, so the same
experiments show in ``dvc exp show`` and in MLflow (``dvc.exp_name``). A seed whose stages ran
before with the same params and code is restored from DVC's run cache instead of rerun.
``--collect NAME,...`` aggregates runs that already happened instead: experiments, or git
revisions whose committed ``dvc.lock`` is a run (the workspace's own ``dvc repro``, seed 0, beside
seeds 1 and 2 run as experiments); one per seed, or one per seed and group of methods.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from .config import Params, load_params
from .errors import UserError

#: last stage per method -> the dvc.yaml targets that reach it
TARGETS = {"seeds": ["eval-seeds"], "crf": ["eval-seeds", "crf"], "irn": ["eval-seeds", "crf", "make-sem-seg"],
           "seg": ["report"]}
METRICS = "outputs/metrics/"


def _dvc() -> str:
    exe = Path(sys.executable).with_name("dvc")
    return str(exe) if exe.exists() else "dvc"


def _env() -> dict[str, str]:
    """The environment for dvc with this interpreter's bin folder first on PATH: ``dvc exp run
    --run-all`` starts its queue worker as a bare ``dvc`` looked up on PATH, and without the
    environment activated (``.venv/bin/python cli.py spread``) none is found, no worker starts and
    the run waits forever without a word."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def _call(args: list[str], cwd: Path, stdout_only: bool = False) -> str:
    try:
        out = subprocess.run([_dvc(), *args], cwd=cwd, capture_output=True, text=True, env=_env())
    except OSError as e:
        raise UserError(f"cannot run dvc ({e.strerror}); install the requirements (bash run.sh --install-only)") from None
    if out.returncode != 0:
        last = (out.stderr.strip() or out.stdout.strip() or "no output").splitlines()[-1]
        raise UserError(f"`dvc {' '.join(args)}` failed: {last}")
    return out.stdout if stdout_only else out.stdout + out.stderr


def queue_args(seeds: list[int], drop: list[str], until: str) -> list[str]:
    args = ["exp", "run", "--queue", "-S", "seed=" + ",".join(str(s) for s in seeds)]
    for m in drop:
        args += ["-S", f"~methods.{m}"]
    return args + TARGETS[until]


def queued_names(log: str) -> list[str]:
    """Names from dvc's "Queued experiment 'NAME' for future execution." lines."""
    return [line.split("'")[1] for line in log.splitlines() if line.startswith("Queued experiment '")]


def results(show: list, names: list[str]) -> dict[str, dict]:
    """name -> {"params": params.yaml values, "metrics": {path under outputs/metrics: dict}} of
    the experiments ``names`` in ``dvc exp show --json`` output. A commit is found by its full
    sha (the ``rev`` of its row) as well as by its branch name."""
    found = {}

    def visit(node):
        if isinstance(node, dict):
            key = node.get("name") if node.get("name") in names else node.get("rev")
            if key in names and isinstance(node.get("data"), dict):
                data = node["data"]
                params = ((data.get("params") or {}).get("params.yaml") or {}).get("data") or {}
                metrics = {path.removeprefix(METRICS): (m or {}).get("data") or {}
                           for path, m in (data.get("metrics") or {}).items()}
                found[key] = {"params": params, "metrics": metrics}
            for v in node.values():
                visit(v)
        elif isinstance(node, list):
            for v in node:
                visit(v)

    visit(show)
    return found


#: last stage -> the metrics an experiment ran up to it made itself; the others in its commit
#: are the baseline's (dvc restores every tracked output), from another seed: never read them
FRESH = {"seeds": ("train_cls.json", "eval_seeds/"), "crf": ("train_cls.json", "eval_seeds/", "crf/"),
         "irn": ("train_cls.json", "eval_seeds/", "crf/", "irn/"), "seg": ("",)}


def fresh_metrics(run: dict, until: str) -> dict[str, dict]:
    """The metrics of ``run`` that it made itself up to stage ``until`` (FRESH)."""
    return {k: v for k, v in run["metrics"].items() if k.startswith(FRESH[until])}


def rows_of(run: dict, methods: list[str], until: str = "seg") -> tuple[list[dict], dict]:
    """The report rows and regime of one experiment, from the metrics it made."""
    from .steps import report

    metrics = fresh_metrics(run, until)
    rows = report.collect(methods, read=lambda *parts: metrics.get("/".join(parts), {}))
    saved = metrics.get("report.json", {})
    regime = saved.get("regime") or report.regime_values(rows, metrics.get("train_cls.json", {}).get("val_map"))
    return rows, regime


def commit_of(rev: str, root: Path) -> str | None:
    """The full sha of git revision ``rev`` (a sha, branch, tag, ``HEAD``), or ``None``."""
    out = subprocess.run(["git", "rev-parse", "--verify", "--quiet", rev + "^{commit}"], cwd=root,
                         capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def baseline_commit(root: Path) -> str | None:
    """The commit the queued experiments derive from (``None`` outside a git repository)."""
    return commit_of("HEAD", root)


def spread(params: Params, seeds: list[int], until: str = "seg", root: Path | None = None) -> dict:
    """Queue, run and aggregate one experiment per seed; writes outputs/spread/."""
    from .paths import workspace_root

    root = root or workspace_root()
    listed = list(params.methods)
    drop = [m for m in load_params(root / "params.yaml").methods if m not in listed]
    # `dvc exp show` lists only the experiments of HEAD: a commit made while the queue runs would
    # hide them, so results are read from the commit they were queued on
    base = baseline_commit(root)
    names = queued_names(_call(queue_args(seeds, drop, until), root))
    if len(names) != len(seeds):
        raise UserError(f"dvc queued {len(names)} experiments for {len(seeds)} seeds; see `dvc queue status`")
    print(f"[spread] queued {', '.join(names)}; running them with one worker", flush=True)
    _call(["exp", "run", "--run-all", "--jobs", "1"], root)
    found = _show(root, base, names)
    failed = [n for n in names if n not in found]
    if failed:
        raise UserError(f"experiment {failed[0]} left no results; see `dvc queue logs {failed[0]}`")
    return _report(params, names, found, until)


def _show(root: Path, base: str | None, names: list[str]) -> dict[str, dict]:
    show = ["exp", "show", "--json"] + (["--rev", base] if base else [])
    return results(json.loads(_call(show, root, stdout_only=True).strip() or "[]"), names)


def ran_methods(run: dict, listed: list[str]) -> list[str]:
    """The methods of ``listed`` that ``run`` ran: those in its own params (``-S ~methods.M``
    drops a method from an experiment, but the metrics files its baseline committed for M stay in
    the experiment's commit, from another seed, so they must not be read as this run's)."""
    ran = run["params"].get("methods")
    return [m for m in listed if m in ran] if isinstance(ran, dict) and ran else listed


def merge_rows(rows: list[dict], more: list[dict], listed: list[str], what: str) -> list[dict]:
    """One seed's report rows from two runs of that seed, each method once, in ``listed`` order
    (the upper bound last). Runs that share a method (CAM beside each method's own spread) must
    agree on it to the bit, as runs restored from DVC's run cache do: different figures for one
    method and seed mean two different runs, and neither may be picked silently."""
    by_method = {r["method"]: r for r in rows}
    for r in more:
        have = by_method.setdefault(r["method"], r)
        if have != r:
            raise UserError(f"{what} with different results for {r['method']}; give one run per seed and method")
    order = {m: i for i, m in enumerate(listed)}
    return sorted(by_method.values(), key=lambda r: order.get(r["method"], len(order)))


def _report(params: Params, names: list[str], found: dict[str, dict], until: str) -> dict:
    """Aggregate the runs ``names`` (one per seed, or several per seed: :func:`merge_rows`) and
    write outputs/spread/."""
    from .steps import report
    from .steps.common import out_dir, outputs_at

    listed = list(params.methods)
    per_seed, regimes, source = {}, {}, {}
    for name in names:
        seed = int(found[name]["params"].get("seed"))
        rows, regime = rows_of(found[name], ran_methods(found[name], listed), until)
        if seed in per_seed:
            per_seed[seed] = merge_rows(per_seed[seed], rows, listed, f"experiments {source[seed]} and {name} "
                                        f"both ran seed {seed}")
            # the regime is CAM's: a run without CAM has None there, so take the other run's values
            regimes[seed] = {**regime, **{k: v for k, v in regimes[seed].items() if v is not None}}
            source[seed] += f", {name}"
        else:
            per_seed[seed], regimes[seed], source[seed] = rows, regime, name
    agg = report.aggregate(per_seed, regimes)
    agg["experiments"] = {seed: source[seed] for seed in sorted(source)}
    with outputs_at(out_dir("spread")):
        report.run(params, spread=agg)
    return agg


def baselines(listing: str) -> dict[str, str]:
    """experiment name -> its baseline commit, from ``dvc exp list --all-commits`` output
    ("<baseline>:" lines, then one tab-indented "<sha> [<name>]" line per experiment)."""
    found, base = {}, None
    for line in listing.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith(":"):
            base = line.strip()[:-1]
        elif base and "[" in line and line.rstrip().endswith("]"):
            found[line[line.index("[") + 1:line.rindex("]")]] = base
    return found


def collect(params: Params, names: list[str], until: str = "seg", root: Path | None = None) -> dict:
    """Aggregate runs that already happened: the same report as :func:`spread` without queueing
    anything. One run per seed, or several per seed that ran different methods (``spread
    --methods cam,M`` for each M): their rows are merged, and a method two of them ran must have
    the same figures in both (:func:`merge_rows`); each run counts only for the methods in its own
    params (:func:`ran_methods`). A name is an experiment (``dvc exp run --temp -S seed=N``, ``dvc
    exp save`` in a worktree where the seed ran, on another machine and pulled, ...; the
    experiments may derive from different commits, ``dvc exp list --all-commits`` finds each
    one's) or, failing that, a git revision whose committed dvc.lock is the run (``HEAD`` after
    ``dvc repro`` and a commit). A revision's metrics are read whole: every stage in its dvc.lock
    is its own run, so give one whose dvc.lock reaches --until."""
    from .paths import workspace_root

    root = root or workspace_root()
    base_of = baselines(_call(["exp", "list", "--all-commits"], root, stdout_only=True))
    commits = {n: commit_of(n, root) for n in names if n not in base_of}
    missing = [n for n, sha in commits.items() if sha is None]
    if missing:
        raise UserError(f"--collect: {missing[0]!r} is neither an experiment (`dvc exp list --all-commits` "
                        "lists them) nor a git revision")
    given: dict[str, str] = {}
    for name, sha in commits.items():
        if sha in given:
            raise UserError(f"--collect: {name!r} and {given[sha]!r} are the same commit; give each run once")
        given[sha] = name
    found: dict[str, dict] = {}
    for base in dict.fromkeys(base_of[n] for n in names if n in base_of):
        found.update(_show(root, base, [n for n in names if base_of.get(n) == base]))
    for sha, name in given.items():
        row = _show(root, sha, [sha]).get(sha)
        if row is not None:
            found[name] = row
    lost = [n for n in names if n not in found]
    if lost:
        raise UserError(f"--collect: `dvc exp show` gives no results for {lost[0]!r}")
    # seed scores, not any metrics file: a revision whose dvc outputs are not in this cache still
    # shows the git-tracked train_<method>.json files, and would count as a seed of empty rows
    empty = [n for n in names if not any(v for k, v in fresh_metrics(found[n], until).items()
                                         if k.startswith("eval_seeds/"))]
    if empty:
        raise UserError(f"--collect: {empty[0]!r} has no metrics up to --until {until} in the dvc cache; "
                        "`dvc pull` its outputs or give a run that reached that stage")
    return _report(params, names, found, until)
