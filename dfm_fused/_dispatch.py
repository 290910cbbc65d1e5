"""Backend choice for the fused ops: which implementation runs for a tensor's device.

Backends ``auto`` tries, in order, for each device type:

- ``cuda`` tensors: ``extension`` (the C++/CUDA extension, when built with CUDA
  kernels), ``torch``; ``triton`` runs only when asked for (slower than both on an H200);
- ``cpu`` tensors: ``extension`` (its C++ kernels), ``torch``;
- ``reference`` (the literal pure-PyTorch oracle) runs anywhere but is only used
  when asked for.

``extension`` is one compiled library whose ops the torch dispatcher routes by
device (its CPU kernels on ``cpu`` tensors, its CUDA kernels on ``cuda`` ones).

``auto`` (the default) picks the first available backend for the tensor's
device. ``set_backend(name)`` or the environment variable ``DFM_FUSED_BACKEND``
forces one; a forced backend that cannot run raises :class:`BackendUnavailable`
with the reason, it never falls back silently. The choice is process-wide and
may be changed between calls from any thread.

A backend is a module per op (``dfm_fused/ops/<op>/<backend>_backend.py``; the
reference backend is :mod:`dfm_fused.reference`) exposing a function named like
the op with the signature of :mod:`dfm_fused.functional`, or declining it: a
module-level ``DECLINED = {op: reason}`` makes that backend raise
:class:`BackendUnavailable` with the reason for that op, and ``auto`` pass over it.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import threading
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from dfm_fused import _extension
from dfm_fused._errors import BackendUnavailable

__all__ = [
    "BackendUnavailable",
    "OPS",
    "available_backends",
    "backend_status",
    "get_backend",
    "resolve",
    "set_backend",
    "use_backend",
]

OPS = ("exp_decay", "feedback_input", "state_update", "general_exp_decay")
ENV_VAR = "DFM_FUSED_BACKEND"


def _triton_probe(device_type: str) -> None:
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        raise BackendUnavailable(f"triton is not importable ({exc}); `pip install triton`") from None
    if device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise BackendUnavailable("triton runs CPU tensors only under TRITON_INTERPRET=1")
    if device_type == "cuda":
        _cuda_device_probe()


def _cuda_device_probe() -> None:
    if not torch.cuda.is_available():
        raise BackendUnavailable("no CUDA device is available")


def _extension_probe(device_type: str) -> None:
    # require() gives every reason at once (e.g. no GPU, and a build without CUDA kernels).
    _extension.require(device_type)


def _always(device_type: str) -> None:
    return None


@dataclass(frozen=True)
class _Backend:
    name: str
    module: str  # import path, with ``{op}`` standing for the op's name
    devices: tuple[str, ...]
    probe: Callable[[str], None]
    dtypes: tuple[torch.dtype, ...] | None = None  # None: every floating dtype


_BACKENDS = {
    b.name: b
    for b in (
        _Backend(
            "triton",
            "dfm_fused.ops.{op}.triton_backend",
            ("cuda", "cpu"),
            _triton_probe,
            (torch.float16, torch.bfloat16, torch.float32),
        ),
        _Backend("extension", "dfm_fused.ops.{op}.extension_backend", ("cpu", "cuda"), _extension_probe),
        _Backend("torch", "dfm_fused.ops.{op}.torch_backend", ("cpu", "cuda"), _always),
        _Backend("reference", "dfm_fused.reference", ("cpu", "cuda"), _always),
    )
}
# Order in which ``auto`` tries backends per device type. Triton on the CPU is
# an interpreter for testing, never a fast path. On CUDA, Triton is opt-in: on an H200
# (benchmarks/results/h200_*) the torch backend beat it in 20 of the 24 op cases and the
# extension in 21, while the extension and torch split the cases (the extension ahead at the
# ResNet shapes, torch at the segmentation ones).
_AUTO_ORDER = {
    "cuda": ("extension", "torch"),
    "cpu": ("extension", "torch"),
}

_lock = threading.Lock()
_forced: str | None = None  # set by set_backend; None means "use the environment / auto"
_cache: dict[tuple[str, str], dict[str, Callable] | BackendUnavailable] = {}


def _load(name: str, device_type: str) -> dict[str, Callable]:
    """The backend's op table for ``device_type``, or raise why it cannot run there."""
    key = (name, device_type)
    # Lock-free once cached: torch.compile cannot trace through a lock.
    hit = _cache.get(key)
    if hit is None:
        with _lock:
            hit = _cache.get(key)
            if hit is None:
                hit = _try_load(_BACKENDS[name], device_type)
                _cache[key] = hit
    if isinstance(hit, BackendUnavailable):
        raise BackendUnavailable(str(hit))
    return hit


def _try_load(backend: _Backend, device_type: str):
    if device_type not in backend.devices:
        return BackendUnavailable(
            f"backend {backend.name!r} does not run on {device_type!r} tensors "
            f"(it runs on: {', '.join(backend.devices)})"
        )
    try:
        backend.probe(device_type)
        table = {}
        for op in OPS:
            module = importlib.import_module(backend.module.format(op=op))
            declined = getattr(module, "DECLINED", {}).get(op)
            table[op] = (BackendUnavailable(f"backend {backend.name!r} does not run {op}: {declined}")
                         if declined else getattr(module, op))
        return table
    except BackendUnavailable as exc:
        return BackendUnavailable(f"backend {backend.name!r} is unavailable: {exc}")
    except ImportError as exc:
        return BackendUnavailable(f"backend {backend.name!r} is unavailable: {exc}")


def _check_name(name: str, what: str) -> str:
    if not isinstance(name, str) or (name != "auto" and name not in _BACKENDS):
        known = ", ".join(["auto", *_BACKENDS])
        raise ValueError(f"{what}: expected one of {known}; got {name!r}")
    return name


def backend_status(device_type: str | None = None) -> dict[str, str | None]:
    """``{backend: None if it can run, else the reason}`` for a device type.

    ``device_type=None`` means the best device here (``cuda`` if available, else ``cpu``).
    ``extension`` runs on ``cpu`` once the library is built, and on ``cuda`` only when it was built
    with CUDA kernels and a GPU is present; its reason says which is missing.
    """
    device_type = device_type or _default_device_type()
    status = {}
    for name in _BACKENDS:
        try:
            _load(name, device_type)
            status[name] = None
        except BackendUnavailable as exc:
            status[name] = str(exc)
    return status


def available_backends(device_type: str | None = None) -> list[str]:
    """Names of the backends that can run on ``device_type`` (default: the best device here)."""
    return [name for name, reason in backend_status(device_type).items() if reason is None]


def _default_device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def set_backend(name: str | None) -> None:
    """Force a backend for every later call (``"auto"`` restores automatic choice).

    ``None`` returns control to the ``DFM_FUSED_BACKEND`` environment variable.
    Raises :class:`BackendUnavailable` if the backend cannot run on any device here.
    """
    global _forced
    if name is not None:
        _check_name(name, "set_backend(name)")
        _require_runnable(name)
    with _lock:
        _forced = name


def _require_runnable(name: str) -> None:
    """Raise :class:`BackendUnavailable` unless backend ``name`` runs on some device here."""
    if name == "auto":
        return
    reasons = []
    for device_type in _BACKENDS[name].devices:
        try:
            _load(name, device_type)
            return
        except BackendUnavailable as exc:
            reasons.append(str(exc))
    raise BackendUnavailable("; ".join(reasons))


def get_backend() -> str:
    """The backend setting in force: a backend name or ``"auto"``."""
    if _forced is not None:
        return _forced
    return _check_name(os.environ.get(ENV_VAR, "auto") or "auto", f"environment variable {ENV_VAR}")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager form of :func:`set_backend`; restores the previous setting on exit."""
    global _forced
    previous = _forced
    set_backend(name)
    try:
        yield
    finally:
        with _lock:  # back to a setting that was accepted when it was made
            _forced = previous


def resolve(
    op: str, device_type: str, backend: str | None = None, dtype: torch.dtype | None = None
) -> tuple[str, Callable]:
    """``(backend name, implementation)`` of ``op`` for tensors on ``device_type``.

    ``dtype`` (the widest input dtype) lets ``auto`` pass over backends that do not
    take it (triton has no float64); a forced backend gets the call regardless and
    raises its own error.
    """
    name = _resolve_name(op, device_type, backend, dtype)
    return name, _cache[(name, device_type)][op]


def _require_op(name: str, device_type: str, op: str) -> None:
    """Raise why backend ``name`` cannot run ``op`` on ``device_type``, if it cannot."""
    declined = _load(name, device_type).get(op)
    if isinstance(declined, BackendUnavailable):
        raise BackendUnavailable(str(declined))


@torch.compiler.assume_constant_result
def _resolve_name(op: str, device_type: str, backend: str | None, dtype: torch.dtype | None) -> str:
    # Under torch.compile this runs once at trace time and its result is baked
    # into the graph, so dispatch costs nothing per call and breaks no graph.
    if backend is not None:
        name = _check_name(backend, "backend")
    else:
        name = get_backend()
    if name != "auto":
        _require_op(name, device_type, op)
        return name
    reasons = []
    for candidate in _AUTO_ORDER.get(device_type, ("torch",)):
        supported = _BACKENDS[candidate].dtypes
        if dtype is not None and supported is not None and dtype not in supported:
            reasons.append(f"backend {candidate!r} does not take {dtype}")
            continue
        try:
            _require_op(candidate, device_type, op)
            return candidate
        except BackendUnavailable as exc:
            reasons.append(str(exc))
    raise BackendUnavailable(f"no backend runs {op} on {device_type!r}: " + "; ".join(reasons))


CPU_TARGET_VAR = "DFM_FUSED_CPU_TARGET"
CPU_TARGETS = ("baseline", "avx2")


def check_environment() -> None:
    """Reject bad ``DFM_FUSED_BACKEND`` / ``DFM_FUSED_CPU_TARGET`` values when dfm_fused is imported,
    not at the first op: the backend as :func:`set_backend` would (same messages), the CPU target's
    spelling (whether that target is built and runs on this CPU is checked per call, in csrc/)."""
    name = os.environ.get(ENV_VAR)
    if name:
        _check_name(name, f"environment variable {ENV_VAR}")
        try:
            _require_runnable(name)
        except BackendUnavailable as exc:
            raise BackendUnavailable(f"environment variable {ENV_VAR}={name}: {exc}") from None
    target = os.environ.get(CPU_TARGET_VAR)
    if target and target not in CPU_TARGETS:
        raise ValueError(f"environment variable {CPU_TARGET_VAR}: expected one of {', '.join(CPU_TARGETS)} "
                         f"(or unset: the best this CPU supports); got {target!r}")


check_environment()
