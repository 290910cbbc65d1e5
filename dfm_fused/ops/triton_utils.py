"""Deprecated: moved to :mod:`dfm_fused.ops._triton.host` (this module will be removed)."""
from __future__ import annotations

import warnings

from dfm_fused._testing import AUTOTUNE_ENV, POISON_ENV
from dfm_fused.ops._triton.host import (
    autotune_configs,
    check_dtype,
    dot_dtype,
    dot_precision,
    interpreting,
    new_output,
    prune_configs,
)

__all__ = [
    "AUTOTUNE_ENV",
    "POISON_ENV",
    "autotune_configs", "check_dtype",
    "dot_dtype",
    "dot_precision",
    "interpreting",
    "new_output",
    "prune_configs",
]

warnings.warn(
    "dfm_fused.ops.triton_utils is deprecated: import from dfm_fused.ops._triton.host",
    DeprecationWarning,
    stacklevel=2,
)
