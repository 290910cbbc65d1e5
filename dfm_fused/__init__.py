"""dfm_fused: fused kernels and a memory-saving T-step loop for Deep Feedback Models.

Public API:

- ops: :func:`exp_decay`, :func:`feedback_input`, :func:`state_update`
  (also in :mod:`dfm_fused.functional`); the literal oracle is :mod:`dfm_fused.reference`;
- modules: :class:`StateExpDecay` (drop-in for the reference), :class:`FeedbackInput`,
  :class:`StateUpdate`;
- :func:`unroll`: the T-step loop with memory-saving backward;
- :func:`capture_train_step`, :func:`capture_inference`: a whole training iteration or
  forward as CUDA graphs (:mod:`dfm_fused.capture`; CUDA only), :class:`CaptureError`;
- whole models: :class:`FeedbackModel` (any network as a DFM), :mod:`dfm_fused.models`
  (ResNet and segmentation DFMs), :func:`patch` (swap reference modules for fused ones where exact, else
  :class:`NotExactError`);
- backends: :func:`available_backends`, :func:`set_backend`, :func:`get_backend`,
  :func:`use_backend`, :func:`backend_status`, environment variable ``DFM_FUSED_BACKEND``.
"""
from dfm_fused._dispatch import (
    BackendUnavailable,
    available_backends,
    backend_status,
    get_backend,
    set_backend,
    use_backend,
)
from dfm_fused._recompute import is_recomputing
from dfm_fused.feedback_model import FeedbackModel
from dfm_fused.functional import exp_decay, feedback_input, state_update
from dfm_fused.modules import FeedbackInput, StateExpDecay, StateUpdate
from dfm_fused.patch import NotExactError, patch
from dfm_fused.unroll import unroll
from dfm_fused import models  # noqa: E402  (after the modules it builds on)
from dfm_fused.capture import CaptureError, capture_inference, capture_train_step  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailable",
    "CaptureError",
    "FeedbackInput",
    "FeedbackModel",
    "NotExactError",
    "StateExpDecay",
    "StateUpdate",
    "available_backends",
    "backend_status",
    "capture_inference",
    "capture_train_step",
    "exp_decay",
    "feedback_input",
    "get_backend",
    "is_recomputing",
    "models",
    "patch",
    "set_backend",
    "state_update",
    "unroll",
    "use_backend",
]
