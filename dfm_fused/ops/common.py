"""Deprecated: the contents of this module moved (it will be removed).

- :mod:`dfm_fused.ops._decay`: ``compute_dtype``, ``decay_vector``, ``decay_matrix``, ``decay_grad_Q``.
- :mod:`dfm_fused.ops._autograd`: ``as_dtype``, ``autocast_off``, ``concat_grad_x``.
- :mod:`dfm_fused.ops._torch.channel`: ``apply_channel_matrix``; ``channel_outer`` is now
  ``outer_over_pixels`` (the Triton ``channel_outer`` of :mod:`dfm_fused.ops._triton.channel`
  takes other arguments).
- :mod:`dfm_fused.ops._torch.decay`: ``decay_forward``, ``decay_backward``; ``channel_scale``
  is now ``scale_channels``.
"""
from __future__ import annotations

import warnings

from dfm_fused.ops._autograd import as_dtype, autocast_off, concat_grad_x
from dfm_fused.ops._decay import compute_dtype, decay_grad_Q, decay_matrix, decay_vector
from dfm_fused.ops._torch.channel import apply_channel_matrix
from dfm_fused.ops._torch.channel import outer_over_pixels as channel_outer
from dfm_fused.ops._torch.decay import decay_backward, decay_forward
from dfm_fused.ops._torch.decay import scale_channels as channel_scale

__all__ = [
    "apply_channel_matrix",
    "as_dtype",
    "autocast_off",
    "channel_outer",
    "channel_scale",
    "compute_dtype",
    "concat_grad_x",
    "decay_backward",
    "decay_forward",
    "decay_grad_Q",
    "decay_matrix",
    "decay_vector",
]

warnings.warn(
    "dfm_fused.ops.common is deprecated: import from dfm_fused.ops._decay, dfm_fused.ops._autograd "
    "or dfm_fused.ops._torch",
    DeprecationWarning,
    stacklevel=2,
)
