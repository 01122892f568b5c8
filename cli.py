"""Command line of the WSSS harness: one command per pipeline step (each a DVC stage).

    python cli.py data synth | data voc --root PATH | data check | data preview
    python cli.py train-cls
    python cli.py train --method recam           (a method's own training; see src/wsss/methods.py)
    python cli.py seeds --method recam-scorecam
    python cli.py eval-seeds --method cam        (threshold from params.yaml)
    python cli.py crf --method cam
    python cli.py train-irn --method cam         (IRN boundary network on the crf masks as IR labels)
    python cli.py make-sem-seg --method cam      (IRN random-walk pseudo-masks)
    python cli.py train-seg --method cam         (--method gt: fully supervised upper bound)
    python cli.py eval-seg --method cam
    python cli.py train-dsrg --method cam        (DSRG: seeds -> region growing in the loop)
    python cli.py eval-dsrg --method cam
    python cli.py report
    python cli.py eval --pred DIR --gt DIR --out FILE.json
    python cli.py ui
    python cli.py bench scorecam | bench randomwalk
    python cli.py bench dsrg

Every command reads params.yaml (``--params`` to choose another file). Errors the user can fix
print one line and exit with status 2.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

import typer  # noqa: E402

from wsss import methods as declared  # noqa: E402
from wsss.config import load_params  # noqa: E402
from wsss.errors import UserError  # noqa: E402

# the --method choices, from the one declaration of the methods (src/wsss/methods.py)
Method = declared.enum("Method")
SegSource = declared.enum("SegSource", extra=(declared.GT,))


app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Weakly-supervised semantic segmentation harness.")
data_app = typer.Typer(no_args_is_help=True, help="Datasets: synthetic world, PASCAL VOC, checks.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks (ratios against a reference in one run).")
app.add_typer(data_app, name="data")
app.add_typer(bench_app, name="bench")

ParamsOpt = typer.Option(Path("params.yaml"), "--params", help="params file")


def _clear_progress_bars() -> None:
    """Erase the progress bars a failing step left open, so that its error starts a clean line
    (an open bar is otherwise finished, or erased, only after the message is printed)."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.leave = False
        bar.close()


def friendly(fn):
    """Turn UserError into one line on stderr and exit status 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            _clear_progress_bars()
            from wsss.distributed import is_main

            if is_main():  # under torchrun every rank meets the same error: say it once
                typer.echo(f"error: {e}", err=True)
            raise typer.Exit(UserError.exit_code)
        except KeyboardInterrupt:
            _clear_progress_bars()
            typer.echo("interrupted", err=True)
            raise typer.Exit(130)

    return wrapper


def _params(path: Path):
    return load_params(path)


def _step_params(path: Path):
    """Params of a step that can run on several processes (training, seeds, eval-seg). With
    ``nproc`` > 1 and not yet under torchrun, start this same command under torchrun on
    ``nproc`` local processes and exit with its status; under torchrun, join the process group."""
    from wsss import distributed

    p = _params(path)
    args = distributed.torchrun_args(p.nproc, sys.argv)
    if args is not None:
        _torchrun(args, p.nproc)
    distributed.init(p.device)
    import atexit

    atexit.register(distributed.shutdown)
    return p


def _torchrun(args: list[str], nproc: int) -> None:
    """torch.distributed.run in this process: a failed rank becomes one error line (its own
    message is above it) and exit status 2, not the launcher's traceback."""
    import logging

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    logging.getLogger("torch.distributed.elastic").setLevel(logging.ERROR)
    try:
        run(parse_args(args))
    except ChildFailedError as e:
        codes = sorted({f.exitcode for f in e.failures.values()})
        raise UserError(f"{len(e.failures)} of {nproc} torchrun processes failed (exit status "
                        f"{', '.join(map(str, codes))}); their messages are above") from None
    raise typer.Exit(0)


# ------------------------------------------------------------------------------------ data
@data_app.command("synth")
@friendly
def data_synth(params: Path = ParamsOpt, preview: bool = typer.Option(True, help="also write docs/synth_world.png")):
    """Generate the synthetic VOC-format world into data_dir (byte-identical per seed)."""
    from wsss import synth

    p = _params(params)
    root = p.data_path()
    summary = synth.generate(root, p)
    if preview:
        from wsss.paths import workspace_root

        synth.preview(root, workspace_root() / "docs" / "synth_world.png")
    counts = ", ".join(f"{k} {v}" for k, v in summary.get("splits", summary).items() if isinstance(v, int))
    typer.echo(f"[data synth] wrote {root} ({counts})")


@data_app.command("voc")
@friendly
def data_voc(root: Path = typer.Option(..., "--root", help="VOCdevkit or VOC2012 folder"), params: Path = ParamsOpt):
    """Link a PASCAL VOC 2012 tree (optionally with SegmentationClassAug) into data_dir and validate it."""
    from wsss import voc

    p = _params(params)
    report = voc.link_voc(root, p.data_path())
    _print_check(report)
    if report["problems"]:
        raise typer.Exit(1)


def _print_check(report: dict) -> None:
    for split, n in report["splits"].items():
        counts = report["class_counts"].get(split, {})
        typer.echo(f"{split}: {n} images; " + ", ".join(f"{c} {k}" for c, k in counts.items() if k))
    for prob in report["problems"]:
        typer.echo(f"problem: {prob}")
    typer.echo(f"[data check] {len(report['problems'])} problems")


@data_app.command("check")
@friendly
def data_check(params: Path = ParamsOpt):
    """Count images per split and class and list every problem found (exit 1 if any)."""
    from wsss import voc

    p = _params(params)
    report = voc.check(p.data_path())
    _print_check(report)
    if report["problems"]:
        raise typer.Exit(1)


@data_app.command("preview")
@friendly
def data_preview(out: Path = typer.Option(Path("docs/synth_world.png")), params: Path = ParamsOpt):
    """Write an image/mask grid of the first train images."""
    from wsss import synth

    synth.preview(_params(params).data_path(), out)
    typer.echo(f"[data preview] {out}")


# ------------------------------------------------------------------------------- pipeline
@app.command("train-cls")
@friendly
def train_cls(params: Path = ParamsOpt):
    """Train the multi-label classifier (outputs/checkpoints/cls.pt)."""
    from wsss.steps import train_cls as step

    step.run(_step_params(params))


@app.command("train")
@friendly
def train(method: Method = typer.Option(..., help="the method whose checkpoint to make"), params: Path = ParamsOpt):
    """The checkpoint a method's seeds use (outputs/checkpoints/<method>.pt): its own training
    stage (ReCAM, Puzzle-CAM, SIPE, ...) or, for a method without one, an alias of cls.pt."""
    from wsss.steps import train as step

    step.run(_step_params(params), method.value)


@app.command("seeds")
@friendly
def seeds(method: Method = typer.Option(..., help="seed method"), params: Path = ParamsOpt):
    """Seeds (normalised CAMs of present classes) for every image of seed_split."""
    from wsss.steps import seeds as step

    step.run(_step_params(params), method.value)


@app.command("eval-seeds")
@friendly
def eval_seeds(method: Method = typer.Option(...), params: Path = ParamsOpt):
    """Seed mIoU at params threshold, plus the threshold sweep plot."""
    from wsss.steps import eval_seeds as step

    step.run(_params(params), method.value)


@app.command("crf")
@friendly
def crf(method: Method = typer.Option(...), params: Path = ParamsOpt):
    """Dense-CRF pseudo-masks from seeds (uncertain pixels 255) and their mIoU."""
    from wsss.steps import crf as step

    step.run(_params(params), method.value)


@app.command("train-irn")
@friendly
def train_irn(method: Method = typer.Option(..., help="the method whose IR labels (crf pseudo-masks) to learn from"),
              params: Path = ParamsOpt):
    """Train IRN's boundary network on a method's IR labels (outputs/checkpoints/irn-<method>.pt)."""
    from wsss.steps import train_irn as step

    step.run(_step_params(params), method.value)


@app.command("make-sem-seg")
@friendly
def make_sem_seg(method: Method = typer.Option(...), params: Path = ParamsOpt):
    """IRN pseudo-masks by a random walk over the boundary map (outputs/irn_masks/<method>/) and their mIoU."""
    from wsss.steps import make_sem_seg as step

    step.run(_params(params), method.value)


@app.command("train-seg")
@friendly
def train_seg(method: SegSource = typer.Option(..., help="pseudo-masks of this method, or gt"),
              params: Path = ParamsOpt):
    """Train the DeepLab network on a method's pseudo-masks (or ground truth: upper bound)."""
    from wsss.steps import train_seg as step

    step.run(_step_params(params), method.value)


@app.command("eval-seg")
@friendly
def eval_seg(method: SegSource = typer.Option(...), params: Path = ParamsOpt):
    """Segmentation mIoU on val_split (optional dense-CRF post-processing)."""
    from wsss.steps import eval_seg as step

    step.run(_step_params(params), method.value)


@app.command("train-dsrg")
@friendly
def train_dsrg(method: Method = typer.Option(..., help="train from this method's seeds"), params: Path = ParamsOpt):
    """DSRG: train the DeepLab network from a method's seeds with seeded region growing and the
    CRF boundary loss, then retrain on its predictions (outputs/checkpoints/seg-dsrg-<method>.pt)."""
    from wsss.steps import train_dsrg as step

    step.run(_step_params(params), method.value)


@app.command("eval-dsrg")
@friendly
def eval_dsrg(method: Method = typer.Option(...), params: Path = ParamsOpt):
    """Segmentation mIoU on val_split of the DSRG-trained network (as eval-seg)."""
    from wsss.steps import eval_dsrg as step

    step.run(_step_params(params), method.value)


@app.command("report")
@friendly
def report(params: Path = ParamsOpt):
    """Comparison table (outputs/report.md, report.png, MLflow) beside the reported figures."""
    from wsss.steps import report as step

    step.run(_params(params))


def _method_list(text: str) -> list[str]:
    """``--methods a,b`` -> ["a", "b"], each a known method."""
    chosen = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in declared.BY_NAME]
    if unknown:
        raise UserError(f"--methods: unknown method {unknown[0]!r}; choose from {', '.join(declared.names())}")
    return chosen


@app.command("compare")
@friendly
def compare(methods: str = typer.Option("cam,scorecam,recam,recam-scorecam", help="comma-separated methods"),
            n: int = typer.Option(6, help="number of images (rows)"),
            start: int = typer.Option(0, help="index of the first image in seed_split"),
            out: Path = typer.Option(Path("outputs/compare_seeds.png"), help="PNG to write"),
            params: Path = ParamsOpt):
    """Seeds of several methods side by side on the same images (heatmap + labels at threshold)."""
    from wsss.compare import seed_panel, write_panel

    chosen = _method_list(methods)
    write_panel(seed_panel(_params(params), chosen, n, start), out)
    typer.echo(f"[compare] {len(chosen)} methods x {n} images -> {out}")


@app.command("spread")
@friendly
def spread(seeds: str = typer.Option("0,1,2", help="comma-separated random seeds"),
           methods: str = typer.Option("", help="comma-separated subset of params methods (default: all)"),
           until: str = typer.Option("seg", help="last stage per method: seeds | crf | irn | seg"),
           collect: str = typer.Option("", help="comma-separated experiments that already ran: aggregate them "
                                                "instead of running --seeds; runs of one seed that ran "
                                                "different methods merge (a method both ran must agree)"),
           params: Path = ParamsOpt):
    """The pipeline once per random seed as DVC experiments (dvc exp show lists them), then
    mean ± std per method (outputs/spread/)."""
    import dataclasses

    from wsss.config import params_source
    from wsss.spread import TARGETS, collect as collect_runs, spread as run_spread

    try:
        values = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--seeds {seeds!r}: give integers separated by commas, e.g. 0,1,2") from None
    if not values:
        raise UserError("--seeds: give at least one seed, e.g. 0,1,2")
    if until not in TARGETS:
        raise UserError(f"--until {until!r}: choose one of {', '.join(TARGETS)}")
    p = _params(params)
    if methods:
        chosen = _method_list(methods)
        missing = [m for m in chosen if m not in p.methods]
        if missing:
            raise UserError(f"--methods: {missing[0]!r} is not listed in {params} key 'methods'; add it there first")
        with params_source("--methods"):
            p = dataclasses.replace(p, methods={m: p.methods[m] for m in chosen})
    names = [n.strip() for n in collect.split(",") if n.strip()]
    if names:
        collect_runs(p, names, until)
    else:
        run_spread(p, values, until)


@app.command("eval")
@friendly
def evaluate(pred: Path = typer.Option(..., help="folder of predicted label PNGs"),
             gt: Path = typer.Option(..., help="folder of ground-truth label PNGs"),
             out: Optional[Path] = typer.Option(None, help="write scores as JSON here")):
    """Score two folders of label PNGs with the same ids (canonical mIoU)."""
    from wsss.steps import evaluate as step

    step.run(pred, gt, out)


@app.command("ui")
@friendly
def ui(port: int = typer.Option(5000), host: str = typer.Option("127.0.0.1")):
    """Start the MLflow UI on the project's tracking store; prints the link to the runs,
    grouped per pipeline with the key metrics as columns."""
    import subprocess

    from wsss.paths import artifact_root, tracking_uri
    from wsss.tracking import ensure_experiment, ui_url

    uri = tracking_uri()
    link = ui_url(host, port, ensure_experiment())
    typer.echo(f"MLflow UI on http://{host}:{port} (store {uri})\nRuns of experiment wsss, per pipeline: {link}")
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    cmd = [str(mlflow_bin) if mlflow_bin.exists() else "mlflow", "ui", "--backend-store-uri", uri,
           "--default-artifact-root", artifact_root(), "--host", host, "--port", str(port)]
    raise typer.Exit(subprocess.call(cmd))


# -------------------------------------------------------------------------------- bench
@bench_app.command("scorecam")
@friendly
def bench_scorecam(images: int = typer.Option(4), size: int = typer.Option(96),
                   backbone: str = typer.Option("resnet18"), device: str = typer.Option("cpu"),
                   out: Optional[Path] = typer.Option(Path("outputs/bench/scorecam.json"))):
    """Our fast Score-CAM vs the grad-cam package's ScoreCAM (speed-up ratio, peak memory)."""
    from wsss import bench
    from wsss.io import write_json

    result = bench.run_scorecam_bench(n_images=images, size=size, backbone=backbone, device=device)
    if out is not None:
        write_json(out, result)
    typer.echo(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))


@bench_app.command("randomwalk")
@friendly
def bench_randomwalk(sizes: str = typer.Option("64,96,128,256", help="square image sides, px (stride-4 maps)"),
                     voc: bool = typer.Option(True, help="also VOC's 500x375"),
                     radius: int = typer.Option(5, help="walk radius at stride 4 (IRN's 5)"),
                     dense_max_nodes: int = typer.Option(4096, help="largest map (pixels) the dense reference runs on"),
                     out: Optional[Path] = typer.Option(Path("outputs/bench/randomwalk.json"))):
    """IRN's random walk, sparse vs the official dense matrix: time and peak memory ratios (benchmarks/README.md)."""
    from wsss import bench_randomwalk as br
    from wsss.io import write_json

    try:
        side = tuple(int(s) for s in sizes.split(",") if s.strip())
    except ValueError:
        raise UserError(f"--sizes {sizes!r}: give integers separated by commas, e.g. 64,96") from None
    if not side or min(side) < 8 or radius < 2:
        raise UserError("bench randomwalk: --sizes must list sides >= 8 px and --radius must be >= 2")
    result = br.run_randomwalk_bench(side, voc, radius, dense_max_nodes=dense_max_nodes)
    if out is not None:
        write_json(out, result)
    typer.echo(br.table(result))


@bench_app.command("dsrg")
@friendly
def bench_dsrg(steps: int = typer.Option(10, help="timed steps of each"), batch: int = typer.Option(16),
               size: int = typer.Option(96), workers: int = typer.Option(0, help="CRF pool (0 = all cores)"),
               out: Optional[Path] = typer.Option(Path("outputs/bench/dsrg.json"))):
    """A train-dsrg step (CRF + region growing in the loop) vs a plain train-seg step, as a ratio."""
    from wsss import bench_dsrg
    from wsss.io import write_json

    result = bench_dsrg.run(steps=steps, batch=batch, size=size, workers=workers)
    if out is not None:
        write_json(out, result)
    typer.echo(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))


@bench_app.command("train")
@friendly
def bench_train(mode: str = typer.Option("cpu", help="cpu: 2 DDP processes x 1 thread vs 1 process x 2 threads; "
                                                      "gpu: fp32 vs AMP + channels_last, and Score-CAM s/image"),
                backbone: Optional[str] = typer.Option(None, help="default: resnet18 (cpu), resnet50 (gpu)"),
                size: Optional[int] = typer.Option(None, help="image side; default: 96 (cpu), 512 (gpu)"),
                batch: int = typer.Option(16, help="global batch"), steps: int = typer.Option(0, help="timed steps"),
                out: Optional[Path] = typer.Option(None, help="JSON (default outputs/bench/train-<mode>.json)")):
    """Training throughput and memory as ratios of two configurations in one run (benchmarks/README.md)."""
    from wsss import bench_train as bt
    from wsss.io import write_json

    if mode == "cpu":
        result = bt.run_cpu(backbone or "resnet18", size or 96, batch, steps or 30)
    elif mode == "gpu":
        import torch

        if not torch.cuda.is_available():
            raise UserError("bench train --mode gpu: no GPU is visible; use --mode cpu")
        result = bt.run_gpu(backbone or "resnet50", size or 512, batch, steps or 20)
    else:
        raise UserError(f"bench train: --mode must be cpu or gpu (got {mode!r})")
    write_json(out or Path(f"outputs/bench/train-{mode}.json"), result)
    typer.echo(json.dumps(result, indent=1))


if __name__ == "__main__":
    app()
