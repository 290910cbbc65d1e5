"""Host-side helpers shared by the Triton backends of every op.

- :func:`interpreting`: whether kernels run under ``TRITON_INTERPRET=1`` (CPU testing).
- :func:`autotune_configs`: the sm_90 config list, or one small config under the
  interpreter so the CPU test suite stays fast; :func:`prune_configs` narrows it per call.
- :func:`new_output`: ``torch.empty``, NaN-filled under the poison test hook
  (``DFM_FUSED_POISON=1``, :mod:`dfm_fused._testing`) so that an element a kernel forgets to
  write fails the tests.
- :func:`dot_dtype`, :func:`dot_precision`: operand type and float32 precision of ``tl.dot``.
"""
from __future__ import annotations

import os

import torch
import triton

from dfm_fused._testing import hooks

__all__ = [
    "autotune_configs",
    "check_dtype",
    "dot_dtype",
    "dot_precision",
    "interpreting",
    "new_output",
    "prune_configs",
]

_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def autotune_configs(configs: list[triton.Config], interpreter: triton.Config) -> list[triton.Config]:
    """``configs`` when compiling for a GPU; ``[interpreter]`` under the interpreter (read at import)."""
    return [interpreter] if interpreting() else configs


def prune_configs(k_block: str | None = None):
    """``early_config_prune`` for the kernels' autotuners.

    With ``k_block``, keeps for IEEE float32 dots (``INPUT_PRECISION="ieee"``) the configs whose
    reduction tile ``k_block`` is 16 and, for tensor-core dots, the others: an IEEE float32
    ``tl.dot`` runs on FMA units with both operand tiles in registers, and with a 32-deep
    reduction tile it spills heavily on sm_90. With the autotune test hook off
    (``DFM_FUSED_AUTOTUNE=0``, :mod:`dfm_fused._testing`) only the first remaining config is
    kept (no benchmarking; fast test runs that compile one config).
    """

    def prune(configs, named_args, **kwargs):
        if k_block is not None:
            fma = kwargs.get("INPUT_PRECISION") == "ieee"
            configs = [c for c in configs if (c.kwargs[k_block] == 16) == fma] or configs
        if not hooks.autotune:
            configs = configs[:1]
        return configs

    return prune


def new_output(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """An uninitialised buffer a kernel will fully overwrite; NaN-poisoned under the poison test hook."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if hooks.poison:
        out.fill_(float("nan"))
    return out


def check_dtype(name: str, t: torch.Tensor) -> None:
    if t.dtype not in _SUPPORTED:
        raise TypeError(
            f"{name}: the triton backend takes float16, bfloat16 or float32; got {t.dtype} "
            f"(use backend='torch' for {t.dtype})"
        )


def dot_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """Operand type of a ``tl.dot`` fed by ``tensors``: their half type when they share one
    (tensor cores, float32 accumulation), else float32. The interpreter's bfloat16 dot is
    wrong, so it gets float32 there."""
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) == 1:
        (dtype,) = dtypes
        if dtype == torch.float16 or (dtype == torch.bfloat16 and not interpreting()):
            return dtype
    return torch.float32


def dot_precision() -> str:
    """``"tf32"`` or ``"ieee"`` for float32 ``tl.dot``, following PyTorch's matmul setting."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", "none")
    if precision in ("ieee", "tf32"):
        return precision
    return "tf32" if matmul.allow_tf32 else "ieee"
