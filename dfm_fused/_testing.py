"""Test hooks, read from the environment once, when dfm_fused is imported.

- ``DFM_FUSED_POISON=1``: :attr:`hooks.poison`, Triton kernel outputs are allocated NaN-filled
  so that an element a kernel fails to write shows as NaN (:func:`dfm_fused.ops._triton.host.new_output`).
  The C++/CUDA extension reads the same variable once, when it is loaded (``csrc/test_hooks.cpp``).
- ``DFM_FUSED_AUTOTUNE=0``: :attr:`hooks.autotune` is False, the Triton autotuners keep one config
  each (no benchmarking; a GPU test run compiles one config per kernel).

Tests switch them with :func:`override` (a context manager), not through the environment,
which is not read again; :func:`reload` reads it again (the Python side only). ``override(poison=...)``
switches the extension's poison too when the extension is loaded
(:func:`dfm_fused._extension.set_poison`). The extension's other hook, the CPU target
(``DFM_FUSED_CPU_TARGET``), is :func:`dfm_fused._extension.set_cpu_target`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import sys

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


def _loaded_extension():
    """:mod:`dfm_fused._extension` when its library is loaded, else None (nothing is loaded here)."""
    if "dfm_fused._C" not in sys.modules:
        return None
    from dfm_fused import _extension

    return _extension


@contextlib.contextmanager
def override(*, poison: bool | None = None, autotune: bool | None = None):
    """Set the given hooks for the ``with`` block (``None`` leaves one as it is), then restore them."""
    saved = dataclasses.replace(hooks)
    extension = _loaded_extension() if poison is not None else None
    extension_poison = None
    try:
        if poison is not None:
            hooks.poison = poison
            if extension is not None:
                extension_poison = extension.set_poison(poison)
        if autotune is not None:
            hooks.autotune = autotune
        yield hooks
    finally:
        hooks.poison, hooks.autotune = saved.poison, saved.autotune
        if extension_poison is not None:
            extension.set_poison(extension_poison)
