"""benchmarks/world_tradeoff.py: its variants file and its bad-input errors (the measurement
itself is the CLI's steps, tested elsewhere)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("world_tradeoff", REPO / "benchmarks" / "world_tradeoff.py")
wt = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(wt)


def test_variants_file_gives_names_and_yaml_typed_overrides(tmp_path):
    f = tmp_path / "v.txt"
    f.write_text("# a comment\n\nbase\nbig synth_extent=[0.3,0.75] synth_body_tint=0.5 seed=2 cam_flip=false\n")
    assert wt.parse_variants(f) == [("base", {}),
                                    ("big", {"synth_extent": [0.3, 0.75], "synth_body_tint": 0.5, "seed": 2,
                                             "cam_flip": False})]


def test_a_word_without_equals_is_one_error_naming_the_file(tmp_path):
    f = tmp_path / "v.txt"
    f.write_text("big synth_body_tint\n")
    with pytest.raises(SystemExit, match=r"v\.txt: 'synth_body_tint' is not key=value"):
        wt.parse_variants(f)


def test_an_unknown_params_key_is_one_error_before_anything_runs(tmp_path):
    with pytest.raises(SystemExit, match=r"variant typo: unknown params \['synth_tint'\]"):
        wt.run_variant("typo", {"synth_tint": 0.5}, tmp_path, "cpu", crf_only=False)
    assert not (tmp_path / "typo" / "data").exists()
