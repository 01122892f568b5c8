"""Shared test setup: import the package from <repo>/src without installing it, and the
helpers several test files use."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped where none is visible (tests/test_gpu.py)")


def isolate_outputs(monkeypatch, root: Path) -> Path:
    """Point the workspace (data/, outputs/) at ``root`` with MLflow off, as a stage run there
    would see it; returns ``root``."""
    monkeypatch.setenv("DVC_ROOT", str(root))
    monkeypatch.setenv("WSSS_TRACKING", "0")
    monkeypatch.delenv("WSSS_OUTPUTS", raising=False)
    monkeypatch.delenv("DVC_STAGE", raising=False)
    return root


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is as fast and does not stall a shared CPU."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def predictor_only(weight):
    """A stand-in model holding only ReCAM's predictor W' (K x C, a bias-free 1x1 conv set to
    ``weight``): what ``train_recam.recam_loss`` reads of the model."""
    import torch
    from torch import nn

    k, c = weight.shape
    m = nn.Module()
    m.recam_predictor = nn.Conv2d(c, k, 1, bias=False)
    with torch.no_grad():
        m.recam_predictor.weight.copy_(weight[:, :, None, None])
    return m
