"""Test hooks of the Python side, read from the environment once, when dfm_fused is imported.

- ``DFM_FUSED_POISON=1``: :attr:`hooks.poison`, Triton kernel outputs are allocated NaN-filled
  so that an element a kernel fails to write shows as NaN (:func:`dfm_fused.ops._triton.host.new_output`).
- ``DFM_FUSED_AUTOTUNE=0``: :attr:`hooks.autotune` is False, the Triton autotuners keep one config
  each (no benchmarking; a GPU test run compiles one config per kernel).

Tests switch them with :func:`override` (a context manager), not through the environment,
which is not read again; :func:`reload` reads it again.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os

__all__ = ["AUTOTUNE_ENV", "POISON_ENV", "Hooks", "hooks", "override", "reload"]

POISON_ENV = "DFM_FUSED_POISON"
AUTOTUNE_ENV = "DFM_FUSED_AUTOTUNE"


@dataclasses.dataclass
class Hooks:
    poison: bool = False
    autotune: bool = True


def _from_environment() -> Hooks:
    return Hooks(poison=os.environ.get(POISON_ENV) == "1", autotune=os.environ.get(AUTOTUNE_ENV) != "0")


hooks = _from_environment()


def reload() -> Hooks:
    """Read the environment variables again (after a change to ``os.environ``); returns the hooks."""
    fresh = _from_environment()
    hooks.poison, hooks.autotune = fresh.poison, fresh.autotune
    return hooks


@contextlib.contextmanager
def override(*, poison: bool | None = None, autotune: bool | None = None):
    """Set the given hooks for the ``with`` block (``None`` leaves one as it is), then restore them."""
    saved = dataclasses.replace(hooks)
    if poison is not None:
        hooks.poison = poison
    if autotune is not None:
        hooks.autotune = autotune
    try:
        yield hooks
    finally:
        hooks.poison, hooks.autotune = saved.poison, saved.autotune
