"""params.yaml loading: types, ranges and unknown keys give one clear error naming the key."""

import dataclasses
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


def test_defaults_are_params_yaml():
    """One set of defaults: Params() is exactly what params.yaml says, key by key (so a test
    that builds Params() runs the configuration the pipeline runs). Whatever params.yaml
    holds: change a value there and here together."""
    import yaml

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    defaults = Params().to_dict()
    differ = {k: (defaults[k], raw[k]) for k in raw if k in defaults and defaults[k] != raw[k]}
    assert not differ, f"Params() defaults differ from params.yaml (default, yaml): {differ}"
    # equal values of the same type (a float default 1 would print as 1 in dvc params, not 1.0)
    for k, v in raw.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            assert type(defaults[k]) is type(float(v) if isinstance(defaults[k], float) else v), k
    assert load_params(REPO / "params.yaml") == Params()


def test_params_are_frozen_and_checked_on_replace():
    p = Params()
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.threshold = 0.5  # type: ignore[misc]
    for key, bad in [("threshold", 1.5), ("cls_epochs", 0), ("scorecam_score", "softmax"), ("scorecam_weights", "sum"),
                     ("seg_weight_decay", -1.0), ("cam_flip", "yes"), ("cam_scales", [])]:
        with pytest.raises(UserError) as e:
            dataclasses.replace(p, **{key: bad})
        msg = str(e.value)
        assert f"'{key}'" in msg and "\n" not in msg
    with pytest.raises(UserError, match="'threshold'"):
        Params(threshold=-0.1)
    q = dataclasses.replace(p, threshold=0)  # an int where a float is declared: stored as float
    assert q.threshold == 0.0 and isinstance(q.threshold, float)


def test_params_share_no_mutable_value_with_the_caller():
    scales = [1.0, 2.0]
    p = Params(cam_scales=scales)
    scales.append(-1.0)  # would bypass the check if Params kept the caller's list
    assert p.cam_scales == [1.0, 2.0]


def test_replace_names_its_source():
    from wsss.config import params_source

    with params_source("--methods"), pytest.raises(UserError, match=r"^--methods: key 'methods'"):
        dataclasses.replace(Params(), methods={"nope": "cls"})


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
        ({"sipe_momentum": 1.0}, "sipe_momentum"),
        ({"sipe_grad_clip": -1.0}, "sipe_grad_clip"),
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


def test_seed_everything_turns_on_deterministic_kernels_without_loading_inductor():
    """In a fresh process (this one may have loaded anything): the deterministic flag is on, in
    warn-only mode, and torch._inductor, whose import costs every stage ~2 s, stays unloaded."""
    import os
    import subprocess
    import sys

    code = ("import sys, torch; from wsss.config import seed_everything; seed_everything(0); "
            "print(torch.are_deterministic_algorithms_enabled(), "
            "torch.is_deterministic_algorithms_warn_only_enabled(), 'torch._inductor' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert out.stdout.split() == ["True", "True", "False"]


def test_recam_scorecam_alone_is_valid():
    """train@recam-scorecam makes its own Score-CAM masks: it needs no scorecam listed."""
    assert params_from_dict({"methods": {"recam-scorecam": "recam-scorecam"}}).methods == {
        "recam-scorecam": "recam-scorecam"}


def test_voc_preset_spells_every_key_of_params_yaml_and_loads():
    """params-voc.yaml (the IRN / ReCAM recipe on GPUs) replaces params.yaml whole (`cp
    params-voc.yaml params.yaml`; DVC reads every key a stage lists), so it must carry the same
    keys in the same order and be valid; and it must differ where the recipe does."""
    import yaml

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    voc = yaml.safe_load((REPO / "params-voc.yaml").read_text())
    assert list(voc) == list(raw)
    p = load_params(REPO / "params-voc.yaml")
    assert (p.dataset, p.backbone, p.output_stride, p.cls_crop, p.cls_batch_size, p.cls_lr) == \
        ("voc", "resnet50", 16, 512, 16, 0.1)
    assert p.cam_scales == [1.0, 0.5, 1.5, 2.0] and p.cam_flip and p.device == "auto"
