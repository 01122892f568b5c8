"""params.yaml loading: types, ranges and unknown keys give one clear error naming the key."""

from pathlib import Path

import pytest

from wsss.config import Params, load_params, params_from_dict
from wsss.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def test_repo_params_load_and_cover_every_key():
    p = load_params(REPO / "params.yaml")
    import yaml

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    assert set(raw) == set(Params().to_dict()), "params.yaml must spell out every key"
    assert p.threshold == raw["threshold"]


@pytest.mark.parametrize(
    "raw, key",
    [
        ({"threshold": 1.5}, "threshold"),
        ({"threshold": "high"}, "threshold"),
        ({"cls_epochs": 2.5}, "cls_epochs"),
        ({"cls_epochs": 0}, "cls_epochs"),
        ({"cam_flip": "yes"}, "cam_flip"),
        ({"backbone": "vgg"}, "backbone"),
        ({"methods": {"foo": "cls"}}, "methods"),
        ({"methods": {"recam": "cls"}}, "methods.recam"),
        ({"conf_fg": 0.1, "conf_bg": 0.3}, "conf_bg"),
        ({"cam_scales": []}, "cam_scales"),
        ({"thresold": 0.3}, "thresold"),
        ({"threads": -1}, "threads"),
        ({"puzzle_init": "imagenet"}, "puzzle_init"),
        ({"sipe_init": "scratch"}, "sipe_init"),
    ],
)
def test_bad_values_name_the_key(raw, key):
    with pytest.raises(UserError) as e:
        params_from_dict(raw, "params.yaml")
    msg = str(e.value)
    assert f"'{key}'" in msg and msg.startswith("params.yaml") and "\n" not in msg


def test_int_accepted_for_float():
    assert params_from_dict({"threshold": 0}).threshold == 0.0


def test_missing_and_invalid_yaml_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "p.yaml"
    bad.write_text("threshold: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_params(bad)


def test_seed_everything_fixes_the_thread_count():
    """threads > 0 pins torch's intra-op threads (float sums are split per thread); 0 leaves
    the current setting alone."""
    import torch

    from wsss.config import seed_everything

    before = torch.get_num_threads()
    try:
        seed_everything(0, 1)
        assert torch.get_num_threads() == 1
        seed_everything(0, 0)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_recam_scorecam_alone_is_valid():
    """train@recam-scorecam makes its own Score-CAM masks: it needs no scorecam listed."""
    assert params_from_dict({"methods": {"recam-scorecam": "recam-scorecam"}}).methods == {
        "recam-scorecam": "recam-scorecam"}
