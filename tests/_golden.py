"""The real reference's golden ResNet18 DFM runs that the model tests compare against.

Two sources, one layout (described in ``shared/golden/README.md``: ``config``, ``state_dict``,
``cases``):

- ``in-repo``: ``tests/golden/resnet18_dfm_small.pt``, made by ``scripts/make_golden.py`` from
  the reference package ``dfbmodels``. It keeps the reference's outputs but not its weights:
  ``tests/golden/recipe.py`` fills them again, bit for bit, and a SHA-256 recorded in the file
  checks that. Required: a checkout without it is broken, so its absence fails.
- ``shared``: ``shared/golden/resnet18_dfm.pt`` beside the repository (or ``$DFM_FUSED_GOLDEN``),
  the reference's own initialised checkpoint and runs (60 MB, not in the repository). An optional
  cross-check: its tests skip where the file is missing, CI included.
"""
from __future__ import annotations

import copy
import functools
import os
import pathlib

import pytest
import torch

from tests.golden import recipe

REPO = pathlib.Path(__file__).resolve().parents[1]
ENV = "DFM_FUSED_GOLDEN"
SOURCES = ("in-repo", "shared")


def in_repo_path() -> pathlib.Path:
    return REPO / "tests" / "golden" / "resnet18_dfm_small.pt"


def golden_path() -> pathlib.Path:
    """The shared golden file: ``$DFM_FUSED_GOLDEN`` or ``shared/golden/resnet18_dfm.pt`` beside the repository."""
    override = os.environ.get(ENV)
    if override:
        return pathlib.Path(override)
    return REPO.parent / "shared" / "golden" / "resnet18_dfm.pt"


def read_in_repo(path: pathlib.Path) -> dict:
    """The in-repository golden file at ``path`` in the shared file's layout: the weights filled by
    the recipe (checked against the recorded SHA-256) and the stored tensors unpacked."""
    if not path.exists():
        pytest.fail(f"golden reference data not found at {path}: it is part of the repository "
                    "(scripts/make_golden.py makes it)", pytrace=False)
    stored = torch.load(path, weights_only=True)
    made = stored["recipe"]
    state_dict = recipe.fill_state_dict(made["entries"], stored["config"]["tau"], made["seed"])
    got = recipe.digest(state_dict)
    if got != made["sha256"]:
        pytest.fail(f"golden weights: the recipe in tests/golden/recipe.py made weights with SHA-256 {got}; "
                    f"{path.name} was made from weights with SHA-256 {made['sha256']}", pytrace=False)
    cases = [recipe.unpack(case, state_dict) for case in stored["cases"]]
    return {"config": stored["config"], "state_dict": state_dict, "cases": cases}


@functools.lru_cache(maxsize=None)
def _cached(source: str, path: pathlib.Path) -> dict:
    if source == "in-repo":
        return read_in_repo(path)
    return torch.load(path, weights_only=True)


def load_golden(source: str = "in-repo") -> dict:
    """The golden dict of ``source`` (a fresh copy: tests may change it). ``shared`` skips where
    its file is missing; ``in-repo`` fails there."""
    if source == "in-repo":
        path = in_repo_path()
    elif source == "shared":
        path = golden_path()
        if not path.exists():
            pytest.skip(f"shared golden reference data not found at {path} (optional cross-check; set {ENV} "
                        "to a resnet18_dfm.pt file to run it)")
    else:
        raise ValueError(f"source: expected one of {SOURCES}; got {source!r}")
    return copy.deepcopy(_cached(source, path))


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Relative error in the 2-norm; absolute where the expected tensor is zero."""
    actual, expected = actual.detach().double(), expected.detach().double()
    scale = expected.norm().item()
    return (actual - expected).norm().item() / (scale if scale > 0 else 1.0)
