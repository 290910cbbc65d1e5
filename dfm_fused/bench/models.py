"""Deprecated: the small benchmark DFM moved to :mod:`dfm_fused.models.small` (fused) and
:mod:`dfm_fused.models.reference` (``ReferenceSmallDFM``); this module will be removed."""
from __future__ import annotations

import warnings

from torch import nn

__all__ = ["SmallDFM"]


def SmallDFM(fused: bool, checkpoint: bool | str = True, **kwargs) -> nn.Module:  # noqa: N802 (was a class)
    """``dfm_fused.models.small.SmallDFM(checkpoint, **kwargs)`` when ``fused``, else
    ``dfm_fused.models.reference.ReferenceSmallDFM(**kwargs)``."""
    warnings.warn(
        "dfm_fused.bench.models.SmallDFM is deprecated: use dfm_fused.models.small.SmallDFM or "
        "dfm_fused.models.reference.ReferenceSmallDFM",
        DeprecationWarning,
        stacklevel=2,
    )
    from dfm_fused.models.reference import ReferenceSmallDFM
    from dfm_fused.models.small import SmallDFM as Fused

    return Fused(checkpoint=checkpoint, **kwargs) if fused else ReferenceSmallDFM(**kwargs)
