"""Drop-in ``torch.nn`` modules over :mod:`dfm_fused.functional`.

``StateExpDecay`` has the reference's constructor, parameter names (so its
``state_dict`` keys are ``Q, Qinv, S, T, alpha, tau``), ``state`` attribute and
``forward(x, T=5)``, including the QR re-orthogonalisation of ``Q`` when
training at ``T == 0``. ``StateUpdate`` holds the same decay parameters and
fuses the GroupNorm and the residual add; ``FeedbackInput`` is the softmax
feedback projection plus the concat with the input.
"""
from __future__ import annotations

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from dfm_fused import _checks
from dfm_fused import functional as F
from dfm_fused._recompute import is_recomputing

__all__ = ["FeedbackInput", "StateExpDecay", "StateUpdate"]


def _step_index(name: str, T):
    """``T`` must be a non-negative whole number (Python or 0-d tensor)."""
    _checks.scalar(name, T, allow_negative=False)
    if not isinstance(T, torch.Tensor) or (T.device.type == "cpu" and not torch.compiler.is_compiling()):
        if float(T) != int(float(T)):
            raise ValueError(f"{name}: expected a whole number of steps; got {float(T)}")
    return T


def _written_state(p: torch.Tensor) -> tuple:
    """What changes whenever ``p``'s values may have: its version counter (bumped by every
    in-place write, optimizer steps included) and its storage, dtype and device."""
    return (p._version, p.data_ptr(), p.dtype, p.device)


# Optimizer steps taken so far, by any torch.optim optimizer. Fused optimizers (fused=True)
# write parameters without moving their version counters, so a QR's mark is valid only until
# the next optimizer step.
_OPTIMIZER_STEPS = [0]


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    _OPTIMIZER_STEPS[0] += 1


register_optimizer_step_post_hook(_count_optimizer_step)


def _capturing() -> bool:
    """Whether the current CUDA stream is being captured into a CUDA graph."""
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


def _is_uniform(S: torch.Tensor) -> bool:
    """Whether ``|S|`` (so ``|S|**alpha``) is one value."""
    with torch.no_grad():
        magnitude = S.detach().abs()
        return bool((magnitude == magnitude[:1]).all())


class _DecayParameters(torch.nn.Module):
    """The parameters of the exponential decay, registered as the reference registers them."""

    # False while the caller re-orthogonalises Q itself before each training forward:
    # dfm_fused.capture does, when the QR cannot be captured into a CUDA graph.
    qr_in_forward = True

    def __init__(self, filters: int, tau: float, alpha: float):
        super().__init__()
        filters = _checks.integer("filters", filters, 1)
        _checks.scalar("tau", tau, positive=True)
        _checks.scalar("alpha", alpha)
        self.filters = filters
        self.tau = torch.nn.Parameter(tau * torch.ones(()), requires_grad=False)
        self.T = torch.nn.Parameter(torch.ones(()), requires_grad=False)
        self.alpha = torch.nn.Parameter(alpha * torch.ones(()), requires_grad=False)
        self.S = torch.nn.Parameter(torch.ones((filters,), dtype=torch.float32), requires_grad=False)
        self.Q = torch.nn.Parameter(torch.empty((filters, filters), dtype=torch.float32))
        # The output map with output_map="Qinv". Unused with "QT" (Q^T is Q's inverse there),
        # but kept so reference checkpoints load.
        self.Qinv = torch.nn.Parameter(torch.empty((filters, filters), dtype=torch.float32))
        torch.nn.init.orthogonal_(self.Q)
        torch.nn.init.orthogonal_(self.Qinv)
        self._uniform_S = (_written_state(self.S), True)

    def _apply(self, fn, *args, **kwargs):
        # A move or cast maps equal values to equal ones: a uniform S stays uniform, and Q stays
        # the QR's output when its dtype is kept (a cast rounds it to another precision).
        uniform = self._known_uniform_S()
        mark = getattr(self, "_orthonormal_Q", None)
        orthonormal = mark is not None and mark[0] == _written_state(self.Q)
        dtype = self.Q.dtype
        module = super()._apply(fn, *args, **kwargs)
        if uniform is not None:
            self._uniform_S = (_written_state(self.S), uniform)
        if orthonormal and self.Q.dtype == dtype:
            self._orthonormal_Q = (_written_state(self.Q), *mark[1:])
        return module

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        source = state_dict.get(prefix + "S")
        if isinstance(source, torch.Tensor) and source.shape == self.S.shape:
            # Judged on the checkpoint's copy (usually on the CPU): no device sync.
            self._uniform_S = (_written_state(self.S), _is_uniform(source))

    def _known_uniform_S(self) -> bool | None:
        cached = getattr(self, "_uniform_S", None)
        return cached[1] if cached is not None and cached[0] == _written_state(self.S) else None

    @staticmethod
    def reorthogonalize(p: torch.Tensor) -> None:
        """Replace ``p`` in place by the Q factor of its complete QR decomposition."""
        with torch.no_grad():
            p.copy_(torch.linalg.qr(p, mode="complete")[0])

    def _begin_step(self, T) -> bool:
        """Re-orthogonalise ``Q`` where the reference does; return whether the step may take
        the scalar-decay path (``M = exp(t * Delta) I``, SPEC section 7)."""
        # The reference re-orthogonalises at the first step of every training
        # forward. A recomputation inside ``unroll``'s backward replays that step
        # and must not do it a second time.
        if self.training and T == 0 and self.qr_in_forward and not is_recomputing():
            self.orthogonalize_Q()
        return self._scalar_decay()

    def orthogonalize_Q(self) -> None:
        """The reference's re-orthogonalisation, done by a training forward at ``T == 0``:
        ``Q`` replaced in place by the Q factor of its complete QR decomposition."""
        self.reorthogonalize(self.Q)
        # A QR captured into a CUDA graph is evidence only inside that capture: replays of
        # the graph change Q (its optimizer step) without moving its version counter.
        self._orthonormal_Q = (_written_state(self.Q), _capturing(), _OPTIMIZER_STEPS[0])

    def _scalar_decay(self) -> bool:
        """True in training mode while ``Q`` is the output of this module's own QR, unwritten
        since (``load_state_dict``, ``.to()`` or an in-place write changes its version or
        storage; a ``torch.optim`` step, fused ones included, ends it too), and ``|S|`` is
        uniform. Then ``Q^T Q = I`` to rounding and the decay is one number per step. In eval
        mode the module did no QR of its own in this forward: the general path runs.

        A replayed step inside ``unroll``'s backward sees the same ``Q`` and ``S`` as its
        forward, so it decides the same. Under ``torch.compile`` the general path runs.
        Writes through ``Q.data`` and optimizers outside ``torch.optim`` that write memory
        directly move no version counter and are not seen between a training forward's QR
        and a later step of a training forward without one (every training forward starting
        at ``t = 0`` re-orthogonalises first).

        CUDA graphs: a replay writes tensors without moving version counters, so a decision
        baked into a graph must hold for every replay. While capturing, only a training-mode
        step whose QR was captured too takes the scalar path (every replay re-runs that QR);
        an eval graph always runs the general path. Outside a capture, a QR made during one
        is no evidence (the graph's replays may have changed ``Q`` since).
        """
        if torch.compiler.is_compiling() or not self.training:
            return False
        if getattr(self, "_orthonormal_Q", None) != (_written_state(self.Q), _capturing(), _OPTIMIZER_STEPS[0]):
            return False
        uniform = self._known_uniform_S()
        if uniform is None:
            # S written in place since construction, load_state_dict or a move: read once
            # (one host sync for a device S), then cached until S changes again.
            uniform = _is_uniform(self.S)
            self._uniform_S = (_written_state(self.S), uniform)
        return uniform

    def extra_repr(self) -> str:
        return f"filters={self.filters}"


class StateExpDecay(_DecayParameters):
    """Drop-in for ``dfbmodels.state.StateExpDecay``: ``Q^T diag(exp(self.T * T * Delta)) Q x``;
    with ``output_map="Qinv"``, for ``feedback_segmentation``'s: ``Qinv diag(...) Q x``.

    Args:
        filters: channels C. shape: spatial shape of the ``state`` attribute.
        tau: decay time constant (> 0). alpha: exponent of ``|S|``.
        output_map: ``"QT"`` (dfbmodels): map back by ``Q^T``, ``Qinv`` unused, ``Q``
            re-orthogonalised by QR when training at ``T == 0``; ``x`` and ``Q`` get
            gradients, ``S`` none. ``"Qinv"`` (feedback_segmentation): map back by the
            ``Qinv`` parameter, a general channel mix (initialised to ``Q^T``, then free);
            no QR; ``x``, ``Q``, ``Qinv`` and ``S`` get gradients (``S`` trainable by default).
        backward: ``"exact"`` (the derivative) or, only with ``output_map="Qinv"``,
            ``"neumann"``: feedback_segmentation's Neumann-series surrogate, which is not
            the derivative (see :func:`dfm_fused.functional.general_exp_decay`).
    Shapes: ``x`` (B, C, H, W) -> (B, C, H, W), in ``x``'s dtype.
    """

    def __init__(self, filters: int, shape, tau: float = 0.1, alpha: float = 1.0, *,
                 output_map: str = "QT", backward: str = "exact"):
        super().__init__(filters, tau, alpha)
        if output_map not in ("QT", "Qinv"):
            raise ValueError(f"output_map: expected 'QT' or 'Qinv'; got {output_map!r}")
        if backward not in ("exact", "neumann"):
            raise ValueError(f"backward: expected 'exact' or 'neumann'; got {backward!r}")
        if backward == "neumann" and output_map != "Qinv":
            raise ValueError("backward: 'neumann' is feedback_segmentation's surrogate and needs output_map='Qinv'; "
                             f"got output_map={output_map!r}")
        self.output_map = output_map
        self.backward = backward
        if output_map == "Qinv":
            with torch.no_grad():
                self.Qinv.copy_(self.Q.t())
            self.S.requires_grad_(True)
        self.state = torch.zeros((1, self.filters, *shape), requires_grad=False)

    def forward(self, x: torch.Tensor, T=5) -> torch.Tensor:
        t = self.T * _step_index("T", T)
        if self.output_map == "Qinv":
            F.check_general_exp_decay(x, self.Q, self.Qinv, self.S, t, self.tau, self.alpha, self.backward,
                                      filters=self.filters)
            return F.run_general_exp_decay(x, self.Q, self.Qinv, self.S, t, self.tau, self.alpha, self.backward)
        # Checked before the QR of _begin_step, so bad input changes nothing.
        F.check_exp_decay(x, self.Q, self.S, t, self.tau, self.alpha, filters=self.filters)
        scalar = self._begin_step(T)
        return F.run_exp_decay(x, self.Q, self.S, t, self.tau, self.alpha, scalar_decay=scalar)

    def extra_repr(self) -> str:
        return f"filters={self.filters}, output_map={self.output_map!r}, backward={self.backward!r}"


class StateUpdate(_DecayParameters):
    """``h + StateExpDecay(GroupNorm(y), t)`` in one fused op; GroupNorm without affine.

    Args:
        filters: state channels C. groups: GroupNorm groups (divides C).
        tau, alpha: as in :class:`StateExpDecay`. eps: GroupNorm epsilon.
    Shapes: ``h``, ``y`` (B, C, H, W) -> (B, C, H, W), in ``h``'s dtype.
    """

    def __init__(self, filters: int, groups: int, tau: float = 0.1, alpha: float = 1.0, eps: float = 1e-5):
        super().__init__(filters, tau, alpha)
        groups = _checks.integer("groups", groups, 1)
        _checks.divides("groups", groups, "filters", self.filters)
        _checks.scalar("eps", eps, positive=True)
        self.groups = groups
        self.eps = float(eps)

    def forward(self, h: torch.Tensor, y: torch.Tensor, t=0) -> torch.Tensor:
        step_time = self.T * _step_index("t", t)
        # Checked before the QR of _begin_step, so bad input changes nothing.
        F.check_state_update(h, y, self.Q, self.S, step_time, self.tau, self.alpha, self.groups, self.eps,
                             filters=self.filters)
        scalar = self._begin_step(t)
        return F.run_state_update(h, y, self.Q, self.S, step_time, self.tau, self.alpha, self.groups, self.eps,
                                  scalar_decay=scalar)

    def extra_repr(self) -> str:
        return f"filters={self.filters}, groups={self.groups}, eps={self.eps}"


class FeedbackInput(torch.nn.Module):
    """``cat([x, softmax_c(GroupNorm(resize(h[:, offset:offset+fb_filters])))])``.

    Args:
        fb_filters: fed-back channels. offset: first fed-back channel of the state.
        groups: GroupNorm groups (divides fb_filters). eps: GroupNorm epsilon.
    Shapes: ``x`` (B, Cx, H, W), ``h`` (B, Ch, h, w) -> (B, Cx + fb_filters, H, W).
    """

    def __init__(self, fb_filters: int, offset: int, groups: int, eps: float = 1e-5):
        super().__init__()
        self.fb_filters = _checks.integer("fb_filters", fb_filters, 1)
        self.offset = _checks.integer("offset", offset, 0)
        self.groups = _checks.integer("groups", groups, 1)
        _checks.divides("groups", self.groups, "fb_filters", self.fb_filters)
        _checks.scalar("eps", eps, positive=True)
        self.eps = float(eps)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return F.feedback_input(x, h, self.offset, self.fb_filters, self.groups, self.eps)

    def extra_repr(self) -> str:
        return f"fb_filters={self.fb_filters}, offset={self.offset}, groups={self.groups}, eps={self.eps}"
