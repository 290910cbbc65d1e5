"""Loader of the compiled C++/CUDA extension ``dfm_fused._C``.

Importing :mod:`dfm_fused` never fails because of the extension: it is loaded lazily,
once (thread-safely), the first time the ``extension`` backend is asked for. If it
is missing or was built against another torch, the backend is reported unavailable with
the reason and how to rebuild, on every device; if it lacks the CUDA kernels (or there is no
GPU), on ``cuda`` tensors only. Forcing it there raises :class:`dfm_fused.BackendUnavailable`
with that message.

Test hooks: the library reads ``DFM_FUSED_POISON`` and ``DFM_FUSED_CPU_TARGET`` once, when it is
loaded; :func:`set_poison` and :func:`set_cpu_target` change them afterwards.
"""
from __future__ import annotations

import importlib
import re
import threading
from pathlib import Path

import torch

from dfm_fused._errors import BackendUnavailable

__all__ = ["build_info", "memory_format_of", "require", "set_cpu_target", "set_poison"]

_REBUILD = "run `pip install --no-build-isolation -e .` (or `python setup.py build_ext --inplace`)"
_lock = threading.Lock()
_loaded: tuple | None = None  # (module or None, reason or None)


def _library_files() -> list[Path]:
    return sorted(Path(__file__).parent.glob("_C*.so")) + sorted(Path(__file__).parent.glob("_C*.pyd"))


def _built_against(path: Path) -> str | None:
    """The torch version recorded in a built library (csrc/ops.cpp embeds it as plain text)."""
    match = re.search(rb"DFM_FUSED_TORCH_VERSION=([^;\x00]+);", path.read_bytes())
    return match.group(1).decode() if match else None


def _try_load():
    files = _library_files()
    if not files:
        return None, f"the C++ extension dfm_fused._C is not built ({_REBUILD})"
    try:
        module = importlib.import_module("dfm_fused._C")
    except ImportError as exc:
        built = _built_against(files[0])
        if built is not None and built != torch.__version__:
            return None, f"dfm_fused._C was built against torch {built}, running {torch.__version__}: rebuild ({_REBUILD})"
        return None, f"dfm_fused._C failed to load ({exc}): rebuild ({_REBUILD})"
    built = module.build_info()["torch_version"]
    if built != torch.__version__:
        return None, f"dfm_fused._C was built against torch {built}, running {torch.__version__}: rebuild ({_REBUILD})"
    return module, None


def _load():
    global _loaded
    with _lock:
        if _loaded is None:
            _loaded = _try_load()
    return _loaded


def require(device_type: str) -> None:
    """Raise :class:`BackendUnavailable` unless the extension's kernels can run on ``device_type``."""
    module, reason = _load()
    if module is None:
        raise BackendUnavailable(reason)
    if device_type == "cpu":
        return
    if device_type != "cuda":
        raise BackendUnavailable(f"the C++ extension has no kernels for {device_type!r} tensors")
    reasons = []
    if not torch.cuda.is_available():
        reasons.append("no CUDA device is available")
    if not module.build_info()["cuda"]:
        reasons.append(
            "dfm_fused._C was built without CUDA kernels: rebuild with a CUDA toolkit and a CUDA build of torch "
            f"(DFM_FUSED_BUILD_CUDA=1; {_REBUILD})"
        )
    if reasons:
        raise BackendUnavailable("; ".join(reasons))


def build_info() -> dict:
    """What was built: ``available`` and ``reason``, then (if loaded) the torch and CUDA versions it was
    built against, ``cuda_arch_list``, ``cpu_targets`` (``baseline``, plus ``avx2`` on x86-64),
    ``cpu_target`` (the one CPU kernels run now: :func:`set_cpu_target`, ``DFM_FUSED_CPU_TARGET``
    at load, or the best this CPU supports), ``openmp`` and ATen's ``parallel_info``.

    Raises ``RuntimeError`` when ``DFM_FUSED_CPU_TARGET`` named at load a target that is not built
    or not supported here.
    """
    module, reason = _load()
    if module is None:
        return {"available": False, "reason": reason}
    return {"available": True, "reason": None, **module.build_info(), "cpu_target": module.cpu_target()}


def _loaded_module():
    module, reason = _load()
    if module is None:
        raise BackendUnavailable(reason)
    return module


def set_poison(enabled: bool) -> bool:
    """Test hook: fill the outputs of every later extension kernel with NaN before the kernel writes
    them (``enabled``), so that an element it fails to write shows up; returns the previous setting.
    Starts as ``DFM_FUSED_POISON=1`` was at load."""
    module = _loaded_module()
    previous = module.poison_enabled()
    module.set_poison(bool(enabled))
    return previous


def set_cpu_target(name: str | None) -> str | None:
    """Test hook: run the CPU kernels built per target for ``name`` (``"baseline"`` or ``"avx2"``;
    ``None``: the best this CPU supports) from now on; returns the previous request (``None``: the
    best). Starts as ``DFM_FUSED_CPU_TARGET`` was at load.

    Raises ``RuntimeError`` for a name that is not a target, or a target not built or not
    supported here (the setting is then unchanged).
    """
    return _loaded_module().set_cpu_target(name or "") or None


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """The layout the kernels read ``x`` in and write their outputs in (csrc/common.h applies the same rule)."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format
