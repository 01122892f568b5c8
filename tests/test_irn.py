"""IRN (Ahn et al. 2019): affinity labels, affinities from boundaries, the affinity loss, the
random walk (by hand on a 3-pixel map, sparse vs dense on small maps) and the train-irn /
make-sem-seg steps (bad input: one clear error line; a short run on a tiny world)."""

from __future__ import annotations

import hashlib
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import isolate_outputs

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from wsss.models.irn import affinity_labels, affinity_loss, edge_to_affinity, offsets, path  # noqa: E402
from wsss.randomwalk import random_walk, random_walk_dense  # noqa: E402

# radius 2: directions (0, 1), (1, -1), (1, 0), (1, 1), in this order
RIGHT, DOWN_LEFT, DOWN, DOWN_RIGHT = range(4)


def test_offsets_and_paths_by_hand():
    assert offsets(2) == ((0, 1), (1, -1), (1, 0), (1, 1))
    # radius 3: dx 1, 2 on the row; rows dy = 1, 2 with dy² + dx² < 9: dx in -2..2 for both (4 + 4 = 8)
    assert len(offsets(3)) == 2 + 5 + 5
    # radius 4: 3 on the row; dy = 1, 2: |dx| <= 3 (4 + 9 = 13 < 16); dy = 3: |dx| <= 2 (9 + 4 = 13)
    assert len(offsets(4)) == 3 + 7 + 7 + 5
    assert set(path(1, 1)) == {(0, 0), (0, 1), (1, 0), (1, 1)}  # the 2x2 box: every cell within 1 of the diagonal
    assert set(path(0, 2)) == {(0, 0), (0, 1), (0, 2)}
    # (2, 3): distance |2x - 3y| / sqrt(13) < 1, i.e. (2x - 3y)² < 13; (0, 2) has 16, (2, 1) has 16
    assert set(path(2, 3)) == {(0, 0), (0, 1), (1, 0), (1, 1), (1, 2), (1, 3), (2, 2), (2, 3)}
    # (3, 4): cell (1, 3) lies at distance exactly 1 ((3*3 - 4*1)² = 25 = 3² + 4²): out (strict <, as the official)
    assert (1, 3) not in path(3, 4) and (1, 2) in path(3, 4)
    with pytest.raises(ValueError):
        offsets(1)


def test_affinity_labels_of_a_hand_made_map():
    """Map (255 = ignored)      pairs at radius 2 (source -> partner):
        0   0   1               right: (0,0)-(0,1) bg+; (0,1)-(0,2) neg; (1,0)-(1,1) ignored; (1,1)-(1,2) fg+
      255   1   1               down-left: (0,1)-(1,0) ignored; (0,2)-(1,1) fg+
                                down: (0,0)-(1,0) ignored; (0,1)-(1,1) neg; (0,2)-(1,2) fg+
                                down-right: (0,0)-(1,1) neg; (0,1)-(1,2) neg
    Partners outside the map belong to no set. Totals: 1 bg+, 3 fg+, 4 neg."""
    lab = torch.tensor([[[0, 0, 1], [255, 1, 1]]])
    bg, fg, neg = affinity_labels(lab, 2)
    assert bg.shape == (1, 4, 2, 3)
    assert (bg.sum(), fg.sum(), neg.sum()) == (1, 3, 4)
    assert bg[0, RIGHT, 0, 0] == 1
    assert fg[0, RIGHT, 1, 1] == 1 and fg[0, DOWN_LEFT, 0, 2] == 1 and fg[0, DOWN, 0, 2] == 1
    assert neg[0, RIGHT, 0, 1] == 1 and neg[0, DOWN, 0, 1] == 1
    assert neg[0, DOWN_RIGHT, 0, 0] == 1 and neg[0, DOWN_RIGHT, 0, 1] == 1


def test_affinity_loss_averages_each_term_over_its_own_pairs():
    """Affinities chosen per pair of the map above; each term is the mean -log over its own
    pairs (official train_irn.py), pos = (bg + fg) / 2, total = (pos + neg) / 2."""
    lab = torch.tensor([[[0, 0, 1], [255, 1, 1]]])
    bg, fg, neg = affinity_labels(lab, 2)
    aff = torch.full((1, 4, 2, 3), 0.5)
    aff[0, RIGHT, 0, 0] = 0.9  # bg+
    aff[0, RIGHT, 1, 1], aff[0, DOWN_LEFT, 0, 2], aff[0, DOWN, 0, 2] = 0.8, 0.6, 0.4  # fg+
    aff[0, RIGHT, 0, 1], aff[0, DOWN, 0, 1], aff[0, DOWN_RIGHT, 0, 0], aff[0, DOWN_RIGHT, 0, 1] = 0.1, 0.2, 0.3, 0.5
    got = affinity_loss(aff, bg, fg, neg)
    e = 1e-5  # the official guards: log(a + e), log(1 + e - a), count + e

    def term(values):
        return -sum(math.log(v + e) for v in values) / (len(values) + e)

    l_bg = term([0.9])
    l_fg = term([0.8, 0.6, 0.4])
    l_neg = term([1 - 0.1, 1 - 0.2, 1 - 0.3, 1 - 0.5])
    assert got["bg_pos"].item() == pytest.approx(l_bg, rel=1e-5)
    assert got["fg_pos"].item() == pytest.approx(l_fg, rel=1e-5)
    assert got["neg"].item() == pytest.approx(l_neg, rel=1e-5)
    assert got["total"].item() == pytest.approx(((l_bg + l_fg) / 2 + l_neg) / 2, rel=1e-5)
    # one mean over all 8 pairs would differ: (0.105 + 3 x 0.550 + 4 x 0.345) / 8 = 0.391, not 0.336
    assert got["total"].item() == pytest.approx(0.33613, abs=1e-4)


def test_affinity_is_one_minus_the_strongest_boundary_on_the_segment():
    edge = torch.tensor([[[0.0, 0.5, 0.0], [0.0, 0.0, 0.0], [0.9, 0.0, 0.2]]])
    aff = edge_to_affinity(edge, 2)[0]
    assert aff[RIGHT, 0, 0] == pytest.approx(0.5)  # cells (0,0), (0,1)
    assert aff[DOWN_RIGHT, 1, 1] == pytest.approx(0.8)  # box (1..2, 1..2): max 0.2
    assert aff[DOWN_LEFT, 1, 1] == pytest.approx(0.1)  # box (1..2, 0..1): max 0.9
    assert aff[DOWN, 0, 0] == pytest.approx(1.0)  # (0,0), (1,0): no boundary
    assert aff[RIGHT, 0, 2] == pytest.approx(0.0)  # the partner lies outside: boundary 1


def test_random_walk_on_three_pixels_by_hand():
    """A 1x3 map a b c, radius 2 (only the right-hand pairs stay inside), boundary (0, 0, 0.5),
    beta 2, exp_times 1 (2 steps). a(a,b) = 1, a(b,c) = 1 - 0.5 = 0.5 -> 0.25 after beta;
    A = [[1, 1, 0], [1, 1, .25], [0, .25, 1]], column sums (2, 2.25, 1.25),
    T = [[.5, 4/9, 0], [.5, 4/9, .2], [0, 1/9, .8]]. CAM (1, 0, 1) * (1 - boundary) = (1, 0, .5);
    v T = (.5, .5, .4); v T T = (.5, 4/9 + .4/9, .1 + .32) = (.5, .48889, .42)."""
    edge = torch.tensor([[[0.0, 0.0, 0.5]]])
    aff = edge_to_affinity(edge, 2)[0].numpy()
    x = np.array([[[1.0, 0.0, 1.0]]]) * (1 - edge.numpy())
    want = np.array([0.5, 4.4 / 9, 0.42])
    np.testing.assert_allclose(random_walk(x, aff, 2, 2.0, 1)[0, 0], want, rtol=1e-6)
    np.testing.assert_allclose(random_walk_dense(x, aff, 2, 2.0, 1)[0, 0], want, rtol=1e-6)
    # exp_times 0: one step, v T = (.5, .5, .4)
    np.testing.assert_allclose(random_walk(x, aff, 2, 2.0, 0)[0, 0], [0.5, 0.5, 0.4], rtol=1e-6)


@pytest.mark.parametrize("shape,radius", [((12, 10), 3), ((9, 16), 5), ((24, 24), 2)])
def test_sparse_walk_equals_the_dense_reference(shape, radius):
    """IRN's defaults (beta 10, 2^8 steps) on small maps: the sparse walk equals the dense
    matrix squared 8 times to 1e-4 of the largest value."""
    rng = np.random.default_rng(sum(shape) + radius)
    edge = torch.from_numpy(rng.random(shape) ** 3)
    aff = edge_to_affinity(edge[None], radius)[0].numpy()
    x = rng.random((2, *shape)) * (1 - edge.numpy())
    sparse = random_walk(x, aff, radius, 10.0, 8)
    dense = random_walk_dense(x, aff, radius, 10.0, 8)
    assert np.abs(sparse - dense).max() <= 1e-4 * np.abs(dense).max()


# --------------------------------------------------------------------------- the steps
MICRO = dict(synth_n_train=6, synth_n_val=2, synth_n_extra=0, synth_size=32, irn_crop=32, irn_batch_size=2,
             max_steps=2, threads=1, num_workers=1, crf_iters=1, cam_scales=[1.0], cam_flip=False)


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory, one_thread):
    """A 6-image world with a random-init classifier, its CAM seeds and CRF masks (IR labels)."""
    from wsss import synth
    from wsss.config import Params
    from wsss.io import save_torch
    from wsss.models.classifier import Classifier
    from wsss.steps import crf, seeds

    root = tmp_path_factory.mktemp("irn")
    mp = pytest.MonkeyPatch()
    isolate_outputs(mp, root)
    mp.setenv("WSSS_TRACKING", "0")
    params = Params(**MICRO)
    synth.generate(params.data_path(), params)
    torch.manual_seed(0)
    model = Classifier("resnet18", 16, "none")
    save_torch(root / "outputs" / "checkpoints" / "cls.pt",
               {"spec": model.spec(), "model": model.state_dict(), "steps": 0, "fingerprint": "test"})
    seeds.run(params, "cam")
    crf.run(params, "cam")
    yield params, root / "outputs"
    mp.undo()


def _cli(args: list[str], params):
    from typer.testing import CliRunner

    import test_dvc_stages as t

    mp = pytest.MonkeyPatch()
    mp.setattr(t.cli, "_params", lambda path: params)
    try:
        return CliRunner().invoke(t.cli.app, args)
    finally:
        mp.undo()


def test_train_irn_and_make_sem_seg_on_a_tiny_world(tiny_world):
    from wsss.steps import make_sem_seg, train_irn
    from wsss.voc import VOCDataset

    params, out = tiny_world
    metrics = train_irn.run(params, "cam")
    assert metrics["steps"] == 2 and metrics["planned_steps"] == 2  # max_steps caps the 3 x 10582 // 2
    assert np.isfinite(metrics["loss"])
    assert (out / "checkpoints" / "irn-cam.pt").is_file()
    m = make_sem_seg.run(params, "cam")
    masks = sorted((out / "irn_masks" / "cam").glob("*.png"))
    ids = VOCDataset(params.data_path(), params.seed_split).ids
    assert [p.stem for p in masks] == sorted(ids)
    assert 0.0 <= m["miou"] <= 1.0
    # the digest names the masks on disk: sha1 over "name:" + sha1(bytes), by file name
    h = hashlib.sha1()
    for p in masks:
        h.update(f"{p.name}:".encode() + hashlib.sha1(p.read_bytes()).digest())
    assert m["masks_sha1"] == h.hexdigest()
    from PIL import Image

    vals = set(np.unique(np.concatenate([np.asarray(Image.open(p)).ravel() for p in masks])).tolist())
    assert vals <= set(range(21))  # no 255: the walk labels every pixel


def test_missing_ir_labels_is_one_error_line(tiny_world):
    params, out = tiny_world
    from dataclasses import replace

    res = _cli(["train-irn", "--method", "gradcam"], replace(params))
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and "IR labels missing" in lines[0] and "python cli.py crf --method gradcam" in lines[0]


def test_checkpoint_of_the_wrong_kind_is_one_error_line(tiny_world):
    params, out = tiny_world
    ckpt = out / "checkpoints" / "irn-scorecam.pt"
    shutil.copy(out / "checkpoints" / "cls.pt", ckpt)  # a classifier where the IRN one belongs
    shutil.copytree(out / "seeds" / "cam", out / "seeds" / "scorecam", dirs_exist_ok=True)
    res = _cli(["make-sem-seg", "--method", "scorecam"], params)
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and "is not an IRN checkpoint (kind 'classifier')" in lines[0]
    assert "python cli.py train-irn --method scorecam" in lines[0]
    assert not (out / "irn_masks" / "scorecam").exists()


def test_train_seg_reads_the_masks_pseudo_masks_names(tiny_world):
    from dataclasses import replace

    from wsss.steps.train_seg import pseudo_mask_dir

    params, out = tiny_world
    assert pseudo_mask_dir(params, "cam") == out / "pseudo_masks" / "cam"
    assert pseudo_mask_dir(replace(params, pseudo_masks="irn"), "cam") == out / "irn_masks" / "cam"
