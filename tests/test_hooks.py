"""dfm_fused._testing: the Python test hooks are read from the environment once, and tests
switch them with ``override`` (restored afterwards) or re-read them with ``reload``."""
import importlib.util

import pytest
import torch

from dfm_fused import _testing

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")


def test_environment_read_once(monkeypatch):
    before = (_testing.hooks.poison, _testing.hooks.autotune)
    monkeypatch.setenv(_testing.POISON_ENV, "0" if before[0] else "1")
    monkeypatch.setenv(_testing.AUTOTUNE_ENV, "1" if not before[1] else "0")
    assert (_testing.hooks.poison, _testing.hooks.autotune) == before
    try:
        fresh = _testing.reload()
        assert (fresh.poison, fresh.autotune) == (not before[0], not before[1])
    finally:
        monkeypatch.undo()
        assert (_testing.reload().poison, _testing.hooks.autotune) == before


def test_override_restores():
    before = (_testing.hooks.poison, _testing.hooks.autotune)
    with _testing.override(poison=not before[0]) as hooks:
        assert (hooks.poison, hooks.autotune) == (not before[0], before[1])
        with _testing.override(autotune=not before[1]):
            assert (_testing.hooks.poison, _testing.hooks.autotune) == (not before[0], not before[1])
        assert _testing.hooks.autotune == before[1]
    assert (_testing.hooks.poison, _testing.hooks.autotune) == before


def test_override_restores_after_error():
    before = _testing.hooks.poison
    with pytest.raises(RuntimeError), _testing.override(poison=not before):
        raise RuntimeError
    assert _testing.hooks.poison == before


@needs_triton
def test_new_output_follows_poison_hook(monkeypatch):
    from dfm_fused.ops._triton.host import new_output

    # Uninitialised memory may hold anything: zeros stand in for it, so only the hook adds NaN.
    monkeypatch.setattr(torch, "empty", torch.zeros)
    with _testing.override(poison=True):
        assert torch.isnan(new_output((64,), torch.float32, "cpu")).all()
    with _testing.override(poison=False):
        assert not torch.isnan(new_output((64,), torch.float32, "cpu")).any()


def test_override_switches_the_extension_poison_too():
    """One switch for every backend: with the extension loaded, override(poison=...) sets its
    poison as well (an unwritten statistic of an empty state reads NaN) and restores it."""
    from dfm_fused import _extension

    info = _extension.build_info()  # loads the library when it can
    if not info["available"]:
        pytest.skip(f"extension: {info['reason']}")
    state = torch.zeros(2, 4, 0, 3)
    before = _extension.set_poison(False)
    try:
        with _testing.override(poison=True):
            mean = torch.ops.dfm_fused.state_update(state, state, torch.eye(4), torch.ones(4), 2, 1e-5)[1]
            assert mean.isnan().all()
        assert _extension.set_poison(False) is False
    finally:
        _extension.set_poison(before)
