"""Bad input through the CLI: each case must end in one clear ``error: ...`` line on stderr,
exit status 2 and no traceback (wsss.errors.UserError caught by cli.friendly).

Cases: malformed seed files (eval-seeds, crf), malformed checkpoints (classifier, SIPE,
DeepLab), ``eval --pred --gt`` with colour PNGs, size mismatches and labels out of range,
``device: cuda`` without a GPU, and a ``pretrained`` file that is missing or not a ResNet of
the configured architecture. All on a 2-image VOC tree of 8x8 px: every error is raised
before any network is trained or run.
"""

from __future__ import annotations

import importlib.util
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import isolate_outputs
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from test_planted_bugs import tiny_voc
from wsss.io import save_npz, save_torch

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("wsss_cli_bad_input", REPO / "cli.py")
cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cli)

runner = CliRunner()
IDS = ("a", "b")


@pytest.fixture(scope="module", autouse=True)
def keep_thread_count():
    """Every step sets torch's thread count (``threads: 1`` here): put it back afterwards."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad")
    mask_a = np.zeros((8, 8), np.uint8)
    mask_a[2:6, 2:6] = 8  # cat
    mask_b = np.zeros((8, 8), np.uint8)
    mask_b[:, 4:] = 15  # person
    tiny_voc(root / "data" / "VOC2012", {"train": {"a": mask_a}, "val": {"b": mask_b}})
    return root


@pytest.fixture()
def world(root, monkeypatch) -> Path:
    """The tree at <root>/data/VOC2012, an empty outputs/, params.yaml with ``threads: 1``."""
    isolate_outputs(monkeypatch, root)
    shutil.rmtree(root / "outputs", ignore_errors=True)
    write_params(root)
    return root


def write_params(root: Path, **overrides) -> Path:
    params = {"data_dir": "data/VOC2012", "train_split": "train", "threads": 1, "num_workers": 1, "threshold_sweep": [0.5],
              "methods": {"cam": "cls"}, **overrides}
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def invoke(root: Path, *args: str):
    return runner.invoke(cli.app, [*args, "--params", str(root / "params.yaml")])


def terminal_lines(text: str) -> list[str]:
    """The non-empty lines a terminal shows for ``text``: a carriage return moves back to the
    start of the line and what follows overwrites it (how a progress bar with ``leave=False``
    erases itself before the error line is printed)."""
    shown = []
    for raw in text.split("\n"):
        buf: list[str] = []
        pos = 0
        for part_i, part in enumerate(raw.split("\r")):
            if part_i:
                pos = 0
            for ch in part:
                if pos < len(buf):
                    buf[pos] = ch
                else:
                    buf.append(ch)
                pos += 1
        line = "".join(buf).rstrip()
        if line:
            shown.append(line)
    return shown


def assert_one_error(res, *needles: str) -> str:
    """Exit 2 through cli.friendly (no exception escaped), exactly one non-empty line on stderr
    as a terminal shows it, 'error: ...' naming every needle, and no traceback anywhere."""
    assert res.exit_code == 2, res.output
    assert isinstance(res.exception, SystemExit), repr(res.exception)
    lines = terminal_lines(res.stderr)
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert "Traceback" not in res.output
    return lines[0]


def checkpoint(root: Path, name: str) -> Path:
    return root / "outputs" / "checkpoints" / f"{name}.pt"


# ---------------------------------------------------------------------------- seed files
def _seed(root: Path, method: str = "cam", image_id: str = "a") -> Path:
    return root / "outputs" / "seeds" / method / f"{image_id}.npz"


SEEDS = {
    "not a zip": lambda p: p.write_bytes(b"this is not an npz file"),
    "truncated": lambda p: (save_npz(p, keys=np.array([7]), cams=np.ones((1, 8, 8), np.float32)),
                            p.write_bytes(p.read_bytes()[:40])),
    "no cams": lambda p: save_npz(p, keys=np.array([7])),
    "pickled objects": lambda p: np.savez(p.with_suffix(""), keys=np.array([7]),
                                          cams=np.array([{"x": 1}], dtype=object)),
    "wrong map size": lambda p: save_npz(p, keys=np.array([7]), cams=np.ones((1, 4, 4), np.float32)),
    "maps without a class axis": lambda p: save_npz(p, keys=np.array([7]), cams=np.ones((8, 8), np.float32)),
}


@pytest.mark.parametrize("case", list(SEEDS))
@pytest.mark.parametrize("command", ["eval-seeds", "crf"])
def test_malformed_seed_file(world, command, case):
    path = _seed(world)
    path.parent.mkdir(parents=True, exist_ok=True)
    SEEDS[case](path)
    assert path.is_file()
    assert_one_error(invoke(world, command, "--method", "cam"), "a.npz", "seeds --method cam")


@pytest.mark.parametrize("keys, n_maps", [([7], 2), ([7, 14], 1), ([25], 1), ([-1], 1)])
def test_seed_keys_that_do_not_fit_the_maps(world, keys, n_maps):
    """keys and maps disagree (2 maps for 1 key, 1 map for 2 keys) or a key is no class index
    (0..19): the crf step says so, and eval-seeds reads seeds through the same reader."""
    save_npz(_seed(world), keys=np.array(keys, np.int64), cams=np.full((n_maps, 8, 8), 0.5, np.float32))
    assert_one_error(invoke(world, "crf", "--method", "cam"), "a.npz", "seeds --method cam")


@pytest.mark.parametrize("keys, n_maps", [([7], 2), ([25], 1)])
def test_eval_seeds_checks_keys_against_maps(world, keys, n_maps):
    cams = np.linspace(0.4, 0.6, n_maps, dtype=np.float32)[:, None, None] * np.ones((1, 8, 8), np.float32)
    save_npz(_seed(world), keys=np.array(keys, np.int64), cams=cams)
    assert_one_error(invoke(world, "eval-seeds", "--method", "cam"), "a.npz", "seeds --method cam")


# ---------------------------------------------------------------------------- checkpoints
def _classifier_spec() -> dict:
    return {"backbone": "resnet18", "output_stride": 16, "num_classes": 20, "recam": False}


CHECKPOINTS = {
    "not a torch file": lambda p: p.write_bytes(b"garbage"),
    "empty file": lambda p: p.write_bytes(b""),
    "a bare tensor": lambda p: save_torch(p, torch.zeros(3)),
    "no spec": lambda p: save_torch(p, {"model": {}}),
    "spec not a mapping": lambda p: save_torch(p, {"spec": "resnet18", "model": {}}),
    "weights missing": lambda p: save_torch(p, {"spec": _classifier_spec(), "model": {}}),
    "pickled object": lambda p: torch.save({"spec": _classifier_spec(), "model": {}, "x": Path("x")}, p),
}


@pytest.mark.parametrize("case", list(CHECKPOINTS))
def test_malformed_classifier_checkpoint(world, case):
    """seeds reads cls.pt through models.sipe.load_any (read_checkpoint + load_classifier)."""
    path = checkpoint(world, "cls")
    path.parent.mkdir(parents=True, exist_ok=True)
    CHECKPOINTS[case](path)
    assert_one_error(invoke(world, "seeds", "--method", "cam"), "cls.pt")


def test_malformed_sipe_checkpoint(world):
    write_params(world, methods={"sipe": "sipe"})
    save_torch(checkpoint(world, "sipe"), {"spec": {**_classifier_spec(), "kind": "sipe"}, "model": {}})
    assert_one_error(invoke(world, "seeds", "--method", "sipe"), "sipe.pt")


@pytest.mark.parametrize("case", [*CHECKPOINTS, "a classifier checkpoint"])
def test_malformed_segmentation_checkpoint(world, case):
    """eval-seg reads seg-cam.pt through models.deeplab.load_deeplab."""
    path = checkpoint(world, "seg-cam")
    path.parent.mkdir(parents=True, exist_ok=True)
    if case == "a classifier checkpoint":
        save_torch(path, {"spec": _classifier_spec(), "model": {}})
    else:
        CHECKPOINTS[case](path)
    with warnings.catch_warnings(record=True) as caught:  # the error line is the whole output: no torch warning first
        warnings.simplefilter("always")
        result = invoke(world, "eval-seg", "--method", "cam")
    assert_one_error(result, "seg-cam.pt", "train-seg --method cam")
    assert [str(w.message) for w in caught] == []


def test_malformed_cls_checkpoint_as_a_start(world):
    """train --method puzzlecam (puzzle_init: cls) continues from cls.pt: a broken one is one clear error."""
    path = checkpoint(world, "cls")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"garbage")
    assert_one_error(invoke(world, "train", "--method", "puzzlecam"), "cls.pt")


# ---------------------------------------------------------------------------- eval --pred --gt
def _eval(tmp_path: Path, pred: Image.Image, gt: Image.Image):
    (tmp_path / "pred").mkdir()
    (tmp_path / "gt").mkdir()
    pred.save(tmp_path / "pred" / "x.png")
    gt.save(tmp_path / "gt" / "x.png")
    return runner.invoke(cli.app, ["eval", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt")])


def _labels(values, mode: str = "L") -> Image.Image:
    return Image.fromarray(np.array(values, np.uint8)).convert(mode) if mode != "L" else \
        Image.fromarray(np.array(values, np.uint8))


GOOD = [[0, 1], [1, 255]]


@pytest.mark.parametrize("side", ["pred", "gt"])
def test_eval_rgb_png(tmp_path, side):
    rgb = Image.fromarray(np.zeros((2, 2, 3), np.uint8))
    pred, gt = (rgb, _labels(GOOD)) if side == "pred" else (_labels(GOOD), rgb)
    assert_one_error(_eval(tmp_path, pred, gt), f"{side}/x.png", "mode RGB")


def test_eval_size_mismatch(tmp_path):
    assert_one_error(_eval(tmp_path, _labels([[0, 1, 1]]), _labels(GOOD)), "x.png", "(3, 1)", "(2, 2)")


@pytest.mark.parametrize("side", ["pred", "gt"])
def test_eval_label_out_of_range(tmp_path, side):
    bad = _labels([[0, 1], [30, 255]])
    pred, gt = (bad, _labels(GOOD)) if side == "pred" else (_labels(GOOD), bad)
    assert_one_error(_eval(tmp_path, pred, gt), f"{side}/x.png", "label 30", "0..20 and 255")


def test_eval_not_a_png(tmp_path):
    (tmp_path / "pred").mkdir()
    (tmp_path / "gt").mkdir()
    (tmp_path / "pred" / "x.png").write_bytes(b"nope")
    _labels(GOOD).save(tmp_path / "gt" / "x.png")
    res = runner.invoke(cli.app, ["eval", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt")])
    assert_one_error(res, "pred/x.png", "not a readable PNG")


# ---------------------------------------------------------------------------- device, pretrained
@pytest.mark.parametrize("command", [["train-cls"], ["seeds", "--method", "cam"], ["train-seg", "--method", "gt"],
                                     ["eval-seg", "--method", "cam"]])
def test_device_cuda_without_a_gpu(world, monkeypatch, command):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    write_params(world, device="cuda")
    assert_one_error(invoke(world, *command), "'device'", "cuda", "device: cpu")


def _resnet_file(path: Path, arch: str) -> Path:
    """A torchvision ``arch`` state dict of zeros (expanded views: a few bytes on disk)."""
    import torchvision

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in getattr(torchvision.models, arch)().state_dict().items()}
    torch.save({k: torch.zeros(()).expand(s) for k, s in shapes.items()}, path)
    return path


@pytest.mark.parametrize("key, backbone, command", [("backbone", "resnet18", ["train-cls"]),
                                                    ("seg_backbone", "resnet18", ["train-seg", "--method", "gt"])])
def test_pretrained_missing(world, key, backbone, command):
    write_params(world, pretrained=str(world / "nowhere.pth"), seg_batch_size=1, **{key: backbone})
    assert_one_error(invoke(world, *command), "nowhere.pth", "'pretrained'")


@pytest.mark.parametrize("weights, backbone", [("resnet18", "resnet34"),  # missing blocks
                                               ("resnet50", "resnet18"),  # other shapes
                                               ("resnet34", "resnet18")])  # extra blocks
def test_pretrained_of_another_architecture(world, tmp_path, weights, backbone):
    path = _resnet_file(tmp_path / f"{weights}.pth", weights)
    write_params(world, pretrained=str(path), backbone=backbone)
    assert_one_error(invoke(world, "train-cls"), f"{weights}.pth", backbone)


@pytest.mark.parametrize("content", ["tensor", "list", "garbage", "wsss checkpoint"])
def test_pretrained_not_a_state_dict(world, tmp_path, content):
    path = tmp_path / "weights.pth"
    if content == "tensor":
        torch.save(torch.zeros(3), path)
    elif content == "list":
        torch.save([torch.zeros(3)], path)
    elif content == "garbage":
        path.write_bytes(b"garbage")
    else:
        torch.save({"spec": _classifier_spec(), "model": {"classifier.weight": torch.zeros(1)}}, path)
    write_params(world, pretrained=str(path))
    assert_one_error(invoke(world, "train-cls"), "weights.pth")
