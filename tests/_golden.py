"""Locating ``shared/golden/resnet18_dfm.pt`` beside the repository (or ``DFM_FUSED_GOLDEN``)."""
from __future__ import annotations

import os
import pathlib

import pytest
import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
ENV = "DFM_FUSED_GOLDEN"


def golden_path() -> pathlib.Path:
    override = os.environ.get(ENV)
    if override:
        return pathlib.Path(override)
    return REPO.parent / "shared" / "golden" / "resnet18_dfm.pt"


def load_golden():
    """The golden dict; a skip where the file is missing, a failure where ``CI=true`` (CI must run
    the parity tests, not skip them)."""
    path = golden_path()
    if not path.exists():
        message = f"golden reference data not found at {path} (set {ENV} to the resnet18_dfm.pt file)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message}; CI=true requires it", pytrace=False)
        pytest.skip(message)
    return torch.load(path, weights_only=True)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Relative error in the 2-norm; absolute where the expected tensor is zero."""
    actual, expected = actual.detach().double(), expected.detach().double()
    scale = expected.norm().item()
    return (actual - expected).norm().item() / (scale if scale > 0 else 1.0)
