"""Where seeds land (wsss.regime): part vs body recall, co-occurrence and context false
positives on hand-made 4x4 arrays (expected values worked out by hand), and the eval-seeds
step writing them on a tiny synthetic world (and leaving them out without role maps)."""

import json
import shutil

import numpy as np
import pytest
from conftest import isolate_outputs

from wsss import regime
from wsss.config import Params
from wsss.errors import UserError

V = 255  # void
HORSE, AEROPLANE, COW, PERSON, SHEEP = 13, 1, 10, 15, 17  # mask labels (class index + 1)

# image 1: one horse, its part on top, body below; two void pixels on its right edge
GT1 = np.array([[0, 0, 0, 0],
                [0, HORSE, HORSE, V],
                [0, HORSE, HORSE, V],
                [0, HORSE, HORSE, HORSE]], np.uint8)
ROLE1 = np.array([[0, 0, 0, 0],
                  [0, 2, 2, V],
                  [0, 1, 1, V],
                  [0, 1, 1, 1]], np.uint8)
SEED1 = np.array([[HORSE, 0, 0, 0],         # (0,0): background labelled horse
                  [0, HORSE, HORSE, HORSE],  # both part pixels right; (1,3) is void
                  [0, HORSE, 0, HORSE],      # one body pixel right; (2,3) is void
                  [0, 0, 0, 0]], np.uint8)   # three body pixels missed

# image 2: aeroplane + person (the table lists aeroplane -> person only) and a cow (no
# partner of either), one void pixel; every object pixel is body
A, P, C = AEROPLANE, PERSON, COW
GT2 = np.array([[A, A, 0, P],
                [A, A, 0, P],
                [C, C, C, P],
                [V, P, P, P]], np.uint8)
ROLE2 = np.where(GT2 == V, V, (GT2 > 0).astype(np.uint8)).astype(np.uint8)
SEED2 = np.array([[A, A, A, A],   # (0,2): background labelled aeroplane; (0,3): person labelled aeroplane
                  [P, A, 0, P],   # (1,0): aeroplane labelled person
                  [C, 0, 0, P],   # cow: one of three right
                  [A, C, P, P]], np.uint8)  # (3,0): void; (3,1): person labelled cow (not a partner)


def test_partner_pairs_both_orders_and_only_partners():
    # aeroplane lists person, person does not list aeroplane: both orders count
    assert regime.partner_pairs([0, AEROPLANE, PERSON, V]) == [(AEROPLANE, PERSON), (PERSON, AEROPLANE)]
    assert regime.partner_pairs([COW, PERSON, SHEEP]) == [(COW, SHEEP), (SHEEP, COW)]
    assert regime.partner_pairs([AEROPLANE, COW]) == []  # not partners
    assert regime.partner_pairs([HORSE]) == []


def test_part_body_recall_and_context_fp_by_hand():
    c = regime.image_counts(SEED1, GT1, ROLE1, regime.partner_pairs(np.unique(GT1)), class_context=True)
    # part: (1,1), (1,2), both labelled horse -> 2 / 2
    assert (c.part_hit, c.part_total) == (2, 2)
    # body: (2,1), (2,2), (3,1), (3,2), (3,3); only (2,1) labelled horse -> 1 / 5.
    # The void pixels (1,3), (2,3) are labelled horse but count nowhere (else 3 / 7).
    assert (c.body_hit, c.body_total) == (1, 5)
    # background (GT 0): the first row (4) and the first column below it (3) = 7 pixels; only
    # (0,0) labelled a class -> 1 / 7 (void labelled horse would make it 3 / 9)
    assert (c.context_hit, c.context_total) == (1, 7)
    assert (c.cooccur_hit, c.cooccur_total) == (0, 0)  # one class: no pair
    r = c.rates()
    assert r == {"part_recall": 1.0, "body_recall": pytest.approx(0.2), "cooccur_fp": None,
                 "context_fp": pytest.approx(1 / 7)}


def test_context_fp_only_on_class_context_images():
    c = regime.image_counts(SEED1, GT1, ROLE1, [], class_context=False)
    assert (c.context_hit, c.context_total) == (0, 0)
    assert c.rates()["context_fp"] is None


def test_cooccur_fp_pooled_over_both_orders_by_hand():
    pairs = regime.partner_pairs(np.unique(GT2))
    c = regime.image_counts(SEED2, GT2, ROLE2, pairs, class_context=False)
    assert pairs == [(A, P), (P, A)]  # the cow has no partner here
    # (aeroplane, person): person pixels (4 in the last column, (3,1), (3,2)) = 6; labelled
    # aeroplane: (0,3) -> 1. (person, aeroplane): the 4 aeroplane pixels; labelled person: (1,0)
    # -> 1. Pooled: 2 / 10. Not counted: background (0,2) and void (3,0) labelled aeroplane,
    # person (3,1) labelled cow (counting any other class would give 3 / 10).
    assert (c.cooccur_hit, c.cooccur_total) == (2, 10)
    # no part pixels; body = the 13 object pixels; right: aeroplane 3 of 4, person 4 of 6, cow 1 of 3
    assert (c.part_hit, c.part_total, c.body_hit, c.body_total) == (0, 0, 8, 13)


def test_counts_pool_pixels_over_images():
    c1 = regime.image_counts(SEED1, GT1, ROLE1, [], True)
    c2 = regime.image_counts(SEED2, GT2, ROLE2, regime.partner_pairs(np.unique(GT2)), False)
    r = (regime.Counts() + c1 + c2).rates()
    # part 2/2 + 0/0; body (1 + 8) / (5 + 13) = 0.5 (pixel-pooled; the mean of the two rates,
    # (1/5 + 8/13) / 2, is 0.41); co-occurrence 2/10 from image 2; context 1/7 from image 1 only
    assert r == {"part_recall": 1.0, "body_recall": pytest.approx(0.5), "cooccur_fp": pytest.approx(0.2),
                 "context_fp": pytest.approx(1 / 7)}
    assert regime.Counts().rates() == dict.fromkeys(regime.KEYS)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError):
        regime.image_counts(SEED1[:3], GT1, ROLE1, [], False)


# ----------------------------------------------------------------------------- eval-seeds step
@pytest.fixture
def world(tmp_path, monkeypatch):
    from wsss.synth import generate

    isolate_outputs(monkeypatch, tmp_path)
    root = tmp_path / "data" / "VOC2012"
    params = Params(data_dir=str(root), synth_n_train=6, synth_n_val=2, synth_n_extra=0, synth_size=48,
                    threshold_sweep=[0.3])
    generate(root, params)
    return tmp_path, params


def _part_seeds(tmp_path, params) -> None:
    """Seeds that are 0.25 exactly on each class's part pixels (from the role maps), 0 elsewhere:
    labelled at ``threshold`` 0.21, background at the sweep's 0.3, so the rates must come from
    ``threshold``."""
    from PIL import Image

    from wsss.io import save_npz
    from wsss.steps.common import open_split
    from wsss.synth import ROLE_DIR, ROLE_PART

    voc = open_split(params, params.seed_split)
    for image_id in voc.ids:
        gt = voc.mask(image_id)
        role = np.array(Image.open(voc.root / ROLE_DIR / f"{image_id}.png"))
        keys = np.array(sorted({int(v) - 1 for v in np.unique(gt) if 1 <= v <= 20}), np.int64)
        cams = np.stack([0.25 * ((gt == k + 1) & (role == ROLE_PART)).astype(np.float32) for k in keys])
        save_npz(tmp_path / "outputs" / "seeds" / "cam" / f"{image_id}.npz", keys=keys, cams=cams)


def test_eval_seeds_writes_role_metrics_on_the_synthetic_world(world):
    from wsss.steps import eval_seeds

    tmp_path, params = world
    _part_seeds(tmp_path, params)
    metrics = eval_seeds.run(params, "cam")
    saved = json.loads((tmp_path / "outputs" / "metrics" / "eval_seeds" / "cam.json").read_text())
    # the seeds cover the parts exactly: every part pixel right, every body pixel missed, no
    # pixel of a partner or of the background labelled
    assert saved["part_recall"] == 1.0 and saved["body_recall"] == 0.0
    # (this tiny world's 6 train images hold partner pairs and class-context backgrounds, so
    # both rates are measured)
    assert saved["cooccur_fp"] == 0.0 and saved["context_fp"] == 0.0
    assert metrics["part_recall"] == 1.0


def test_eval_seeds_without_role_maps_leaves_them_out(world):
    from wsss.steps import eval_seeds
    from wsss.synth import ROLE_DIR

    tmp_path, params = world
    _part_seeds(tmp_path, params)
    shutil.rmtree(params.data_path() / ROLE_DIR)  # as real VOC
    eval_seeds.run(params, "cam")
    saved = json.loads((tmp_path / "outputs" / "metrics" / "eval_seeds" / "cam.json").read_text())
    assert "miou" in saved and not set(regime.KEYS) & set(saved)


def test_eval_seeds_role_maps_without_contexts_is_a_clear_error(world):
    from wsss.steps import eval_seeds
    from wsss.synth import CONTEXTS_FILE

    tmp_path, params = world
    _part_seeds(tmp_path, params)
    (params.data_path() / CONTEXTS_FILE).unlink()
    with pytest.raises(UserError, match="contexts.json.*python cli.py data synth"):
        eval_seeds.run(params, "cam")
