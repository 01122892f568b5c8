"""dvc.yaml lists, for every stage, exactly the package modules its command imports and the
params keys it reads (README: "each stage lists exactly the params keys it reads").

Modules (static): the command's Typer callback in cli.py plus cli.py's module-level imports,
then every ``import`` of every reached module of src/wsss (function bodies included: lazy
imports run too), transitively, plus the modules wsss.methods names by string for the method
(its CAM class for ``seeds``, its training step for ``train``). A package's ``__init__.py``
counts when it holds imports (``wsss.cams``), since importing a submodule runs it.

Params (dynamic): every stage command runs in-process on a micro synthetic world with a
:class:`Params` that records each field read outside Params' own bookkeeping (validation,
``to_dict``, ``dataclasses.replace``), once with the branch-selecting keys at their params.yaml
values and once flipped (``seg_crf``, ``*_init``, ``recam_scorecam_mask``,
``scorecam_variant``, ``pseudo_masks``), since a stage must rerun when a key it reads in either branch changes.

A ``foreach`` stage has one list for all its members (DVC cannot vary a list per member), so it
must list the union over every declared method: a list that is right for any ``methods``.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import shlex
import sys
from pathlib import Path

import pytest
import yaml

from conftest import isolate_outputs

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"

from wsss import config, methods as declared  # noqa: E402

_spec = importlib.util.spec_from_file_location("wsss_cli_stages", REPO / "cli.py")
cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cli)


# ------------------------------------------------------------------------ dvc.yaml
def stage_members(dvc_yaml: dict) -> dict[str, list[tuple[str, str | None]]]:
    """stage (family) name -> [(command line, method)] over every declared method."""
    out = {}
    for name, stage in dvc_yaml["stages"].items():
        if "foreach" in stage:
            assert stage["foreach"] == "${methods}", f"{name}: foreach over something else than methods"
            out[name] = [(stage["do"]["cmd"].replace("${key}", m.name).replace("${item}", m.checkpoint), m.name)
                         for m in declared.METHODS]
        else:
            out[name] = [(stage["cmd"], None)]
    return out


def body(dvc_yaml: dict, name: str) -> dict:
    stage = dvc_yaml["stages"][name]
    return stage.get("do", stage)


def parse_cmd(cmd: str) -> tuple[str, dict[str, str]]:
    words = shlex.split(cmd)
    assert words[:2] == ["python", "cli.py"], f"{cmd}: not a cli.py command"
    command, rest = words[2], words[3:]
    opts = {rest[i].lstrip("-"): rest[i + 1] for i in range(0, len(rest), 2)}
    return command, opts


# ------------------------------------------------------------------------ modules
def _module_file(name: str) -> Path | None:
    parts = name.split(".")
    if parts[0] != "wsss":
        return None
    base = SRC.joinpath(*parts)
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return base.with_suffix(".py") if base.with_suffix(".py").is_file() else None


def _imports(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Absolute names of every module an AST imports (``from x import y``: x.y when that is a
    module, else x)."""
    pkg = module if is_package else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            found.add(target)
            found.update(f"{target}.{a.name}" for a in node.names if _module_file(f"{target}.{a.name}"))
    return found


def _has_imports(path: Path) -> bool:
    return any(isinstance(n, (ast.Import, ast.ImportFrom)) and getattr(n, "module", None) != "__future__"
               for n in ast.walk(ast.parse(path.read_text())))


def _with_packages(name: str) -> set[str]:
    """``name`` and its parent packages whose ``__init__`` holds code worth a dependency."""
    out = {name}
    parts = name.split(".")
    for i in range(1, len(parts)):
        pkg = ".".join(parts[:i])
        init = _module_file(pkg)
        if init is not None and init.name == "__init__.py" and _has_imports(init):
            out.add(pkg)
    return out


def module_closure(start: set[str]) -> set[Path]:
    """Files of src/wsss reached from the modules ``start`` by imports, transitively."""
    todo, seen = set().union(*(_with_packages(s) for s in start)), set()
    while todo:
        name = todo.pop()
        path = _module_file(name)
        if name in seen or path is None:
            continue
        seen.add(name)
        tree = ast.parse(path.read_text())
        for imp in _imports(tree, name, path.name == "__init__.py"):
            if _module_file(imp) is not None:
                todo |= _with_packages(imp)
    return {_module_file(n) for n in seen}


def _callback(command: str):
    for c in cli.app.registered_commands:
        if (c.name or c.callback.__name__) == command:
            return inspect.unwrap(c.callback)
    raise AssertionError(f"cli.py has no command {command!r}")


def command_modules(cmd: str, method: str | None) -> set[Path]:
    """The src/wsss files a stage command imports (cli.py itself aside)."""
    command, opts = parse_cmd(cmd)
    cli_tree = ast.parse((REPO / "cli.py").read_text())
    top = {n for stmt in cli_tree.body if isinstance(stmt, (ast.Import, ast.ImportFrom))
           for n in _imports(stmt, "cli", False)}
    fn_tree = ast.parse(inspect.getsource(_callback(command)).strip())
    start = top | _imports(fn_tree, "cli", False)
    spec = declared.BY_NAME.get(opts.get("method", ""))
    if spec is not None and command == "seeds":
        start.add(f"wsss.cams.{spec.cam.split(':')[0]}")
    if spec is not None and command == "train" and spec.train:
        start.add(f"wsss.steps.{spec.train.split(':')[0]}")
    return module_closure({s for s in start if s.startswith("wsss")})


def code_deps_problems(dvc_yaml: dict) -> list[str]:
    problems = []
    for name, members in stage_members(dvc_yaml).items():
        want = {REPO / "cli.py"} | set().union(*(command_modules(cmd, m) for cmd, m in members))
        deps = [d for d in body(dvc_yaml, name).get("deps", []) if d == "cli.py" or d.startswith("src/")]
        covered = set()
        for d in deps:
            p = REPO / d
            files = {f for f in p.rglob("*.py") if "__pycache__" not in f.parts} if p.is_dir() else {p}
            if not files <= want:
                extra = sorted(str(f.relative_to(REPO)) for f in files - want)
                problems.append(f"stage {name}: dep {d} is not imported by its command ({', '.join(extra)})")
            covered |= files
        for f in sorted(want - covered):
            problems.append(f"stage {name}: missing dep {f.relative_to(REPO)} (imported by its command)")
    return problems


# ------------------------------------------------------------------------ params
FIELDS = {f.name for f in config.dataclasses.fields(config.Params)}
_BOOKKEEPING = {"validate", "to_dict", "__init__", "__post_init__", "_check_ranges", "positive", "unit", "choice", "__repr__", "__eq__", "__hash__",
                "__setattr__", "__getstate__", "__reduce__", "__reduce_ex__", "__copy__", "__deepcopy__"}
READS: set[str] = set()
_DATACLASSES = config.dataclasses.__file__


class RecordingParams(config.Params):
    """Params that add the name of every field read by pipeline code to :data:`READS`."""

    def __getattribute__(self, name):
        if name in FIELDS:
            caller = sys._getframe(1).f_code
            if not (caller.co_filename in (_DATACLASSES, __file__)
                    or (caller.co_filename == config.__file__ and caller.co_name in _BOOKKEEPING)):
                READS.add(name)
        return object.__getattribute__(self, name)


MICRO = {"synth_n_train": 4, "synth_n_val": 2, "synth_n_extra": 0, "synth_size": 32, "cls_epochs": 1,
         "cls_batch_size": 2, "cls_crop": 32, "recam_epochs": 1, "puzzle_epochs": 1, "sipe_epochs": 1,
         "seg_epochs": 1, "seg_batch_size": 2, "seg_crop": 32, "cam_scales": [1.0], "cam_flip": False,
         "num_workers": 1, "crf_iters": 1, "threshold_sweep": [0.1, 0.3], "scorecam_chunk": 256, "max_steps": 1,
         "threads": 1, "subset": 0, "train_split": "train", "device": "cpu", "pretrained": "none",
         "irn_crop": 32, "irn_batch_size": 2}
FLIPPED = {"seg_crf": True, "seg_init": "pretrained", "puzzle_init": "pretrained", "sipe_init": "pretrained",
           "recam_scorecam_mask": "online", "scorecam_variant": "study", "pseudo_masks": "irn"}
#: commands whose reads do not depend on the method: run for one method only
METHOD_BLIND = {"eval-seeds", "crf", "train-irn", "make-sem-seg", "train-seg", "eval-seg", "train-dsrg", "eval-dsrg"}


def _params(variant: dict) -> RecordingParams:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw.update(MICRO)
    raw.update(variant)
    raw["methods"] = dict(declared.METHOD_CHECKPOINTS)
    plain = config.params_from_dict(raw)
    return RecordingParams(**{f: getattr(plain, f) for f in FIELDS})


@pytest.fixture(scope="module")
def params_read(tmp_path_factory, one_thread):
    """stage -> params keys its members read, over both branch settings."""
    return collect_reads(tmp_path_factory.mktemp("stages"))


def collect_reads(root: Path) -> dict[str, set[str]]:
    from typer.testing import CliRunner

    from wsss import synth

    mp = pytest.MonkeyPatch()
    isolate_outputs(mp, root)
    dvc_yaml = yaml.safe_load((REPO / "dvc.yaml").read_text())
    members = stage_members(dvc_yaml)
    base = _params({})
    synth.generate(base.data_path(), base)
    order = ["train-cls", "train", "seeds", "eval-seeds", "crf", "train-irn", "make-sem-seg", "train-seg", "eval-seg",
             "train-dsrg", "eval-dsrg", "train-seg-gt", "eval-seg-gt", "report"]
    assert set(order) == set(members), "a stage was added or renamed: add it to this order"
    reads: dict[str, set[str]] = {name: set() for name in members}
    runner = CliRunner()
    try:
        for variant in ({}, FLIPPED):
            p = _params(variant)
            mp.setattr(cli, "_params", lambda path, p=p: p)
            for name in order:
                done_blind = False
                for cmd, method in members[name]:
                    command, _ = parse_cmd(cmd)
                    if command in METHOD_BLIND and method is not None:
                        if done_blind:
                            continue
                        done_blind = True
                    READS.clear()
                    res = runner.invoke(cli.app, shlex.split(cmd)[2:])
                    assert res.exit_code == 0, f"{cmd}: {res.output}\n{res.exception!r}"
                    reads[name] |= READS
    finally:
        mp.undo()
    return reads


def params_problems(dvc_yaml: dict, reads: dict[str, set[str]]) -> list[str]:
    problems = []
    for name, keys in reads.items():
        listed = body(dvc_yaml, name).get("params", [])
        for k in sorted(keys - set(listed)):
            problems.append(f"stage {name}: reads param {k} that dvc.yaml does not list")
        for k in sorted(set(listed) - keys):
            problems.append(f"stage {name}: lists param {k} that it never reads")
    return problems


# ------------------------------------------------------------------------ tests
def test_every_stage_depends_on_exactly_the_modules_its_command_imports():
    problems = code_deps_problems(yaml.safe_load((REPO / "dvc.yaml").read_text()))
    assert not problems, "\n".join(problems)


def test_every_stage_lists_exactly_the_params_it_reads(params_read):
    problems = params_problems(yaml.safe_load((REPO / "dvc.yaml").read_text()), params_read)
    assert not problems, "\n".join(problems)


def test_the_checks_name_a_missing_or_extra_dep_and_param(params_read):
    """The comparison itself: a dep or key removed from dvc.yaml, or one added, is named."""
    dvc_yaml = yaml.safe_load((REPO / "dvc.yaml").read_text())
    body(dvc_yaml, "eval-seg")["deps"].remove("src/wsss/models/deeplab.py")
    body(dvc_yaml, "crf")["deps"].append("src/wsss/trainer.py")
    body(dvc_yaml, "report")["params"].remove("threshold")
    body(dvc_yaml, "seeds")["params"].append("seg_lr")
    code = code_deps_problems(dvc_yaml)
    assert "stage eval-seg: missing dep src/wsss/models/deeplab.py (imported by its command)" in code
    assert any(p.startswith("stage crf: dep src/wsss/trainer.py is not imported") for p in code)
    par = params_problems(dvc_yaml, params_read)
    assert "stage report: reads param threshold that dvc.yaml does not list" in par
    assert "stage seeds: lists param seg_lr that it never reads" in par
