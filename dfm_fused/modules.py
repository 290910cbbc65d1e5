"""Drop-in ``torch.nn`` modules over :mod:`dfm_fused.functional`.

``StateExpDecay`` has the reference's constructor, parameter names (so its
``state_dict`` keys are ``Q, Qinv, S, T, alpha, tau``), ``state`` attribute and
``forward(x, T=5)``, including the QR re-orthogonalisation of ``Q`` when
training at ``T == 0``. ``StateUpdate`` holds the same decay parameters and
fuses the GroupNorm and the residual add; ``FeedbackInput`` is the softmax
feedback projection plus the concat with the input.
"""
from __future__ import annotations

import sys

import torch

from dfm_fused import _checks, _decay_scope
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


def _capturing() -> bool:
    """Whether the current CUDA stream is being captured into a CUDA graph."""
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


def _promise(scalar_decay):
    if scalar_decay is not None and not isinstance(scalar_decay, bool):
        raise TypeError(f"scalar_decay: expected None or a bool; got {type(scalar_decay).__name__} {scalar_decay!r}")
    return scalar_decay


def _is_dtensor(value) -> bool:
    # torch.distributed.tensor is imported by whoever made a DTensor; nothing here imports it.
    dtensor = sys.modules.get("torch.distributed.tensor")
    return dtensor is not None and isinstance(value, dtensor.DTensor)


def _write_local_shard(sharded, full: torch.Tensor, name: str) -> None:
    """Copy this rank's part of ``full`` (the gathered value, identical on every rank) into the
    local tensor of the DTensor ``sharded``: ``torch.chunk`` per ``Shard`` placement, as DTensor
    and FSDP2 split a tensor."""
    if tuple(full.shape) != tuple(sharded.shape):
        raise RuntimeError(f"{name}: the gathered tensor has shape {tuple(full.shape)} but the sharded "
                           f"parameter {tuple(sharded.shape)}; it was replaced outside FSDP2")
    part, mesh = full.detach(), sharded.device_mesh
    for mesh_dim, placement in enumerate(sharded.placements):
        if placement.is_shard():
            pieces = torch.chunk(part, mesh.size(mesh_dim), dim=placement.dim)
            rank = mesh.get_local_rank(mesh_dim)
            part = pieces[rank] if rank < len(pieces) else part.narrow(placement.dim, 0, 0)
    with torch.no_grad():
        local = sharded.to_local()
        if local.shape != part.shape:
            raise RuntimeError(f"{name}: this rank's shard has shape {tuple(local.shape)}; splitting the "
                               f"gathered tensor by {sharded.placements} gave {tuple(part.shape)}")
        local.copy_(part)


class _DecayParameters(torch.nn.Module):
    """The parameters of the exponential decay, registered as the reference registers them."""

    # False while the caller re-orthogonalises Q itself right before each training forward:
    # dfm_fused.capture does, when the QR cannot be captured into a CUDA graph.
    qr_in_forward = True
    # While a CUDA graph is made, the answer of uniform_S() read before it (S cannot be read
    # during a capture); None there means the general path. Set and checked by dfm_fused.capture.
    baked_uniform_S: bool | None = None

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

    @staticmethod
    def reorthogonalize(p: torch.Tensor) -> None:
        """Replace ``p`` in place by the Q factor of its complete QR decomposition."""
        with torch.no_grad():
            p.copy_(torch.linalg.qr(p, mode="complete")[0])

    def orthogonalize_Q(self) -> None:
        """The reference's re-orthogonalisation, done by a training forward at ``T == 0``:
        ``Q`` replaced in place by the Q factor of its complete QR decomposition.

        Under FSDP2 (``fully_shard``) ``self.Q`` is, during a forward, the gathered copy that FSDP2
        discards when it reshards: the QR's result is then also written into this rank's rows of
        the sharded ``Q`` (every rank gathers the same ``Q`` and computes the same QR), so the
        optimizer and every later forward see the ``Q`` this forward used, as in one process.
        """
        self.reorthogonalize(self.Q)
        sharded = self.__dict__.get("_sharded_Q")
        if sharded is not None and self.Q is not sharded:
            _write_local_shard(sharded, self.Q, f"{type(self).__name__}.Q")
            self.__dict__["_Q_written_through"] = True

    def __setattr__(self, name, value):
        # FSDP2 swaps Q between its sharded DTensor and the gathered tensor by setattr when a
        # module overrides __setattr__; the sharded one (the one the optimizer holds) is kept
        # here for orthogonalize_Q. A DTensor on another mesh is the transient copy FSDP2 keeps
        # between forward and backward with reshard_after_forward=<int>, not the parameter.
        if name == "Q" and _is_dtensor(value):
            kept = self.__dict__.get("_sharded_Q")
            if kept is None or kept.device_mesh == value.device_mesh:
                self.__dict__["_sharded_Q"] = value
        super().__setattr__(name, value)

    def uniform_S(self) -> bool:
        """Whether ``|S|`` (so ``|S|**alpha``) is one value, read now (a host read for a device ``S``)."""
        return _decay_scope.Judgement(self.S).value()

    def _judge_S(self) -> _decay_scope.Judgement:
        if _capturing() or self.baked_uniform_S is not None:
            return _decay_scope.Judgement(value=bool(self.baked_uniform_S))
        return _decay_scope.Judgement(self.S)

    def _begin_step(self, T, scalar_decay: bool | None) -> bool:
        """Re-orthogonalise ``Q`` where the reference does; return whether this step takes the
        scalar-decay path (``M = exp(t * Delta) I``; docs/design.md, "The decay is usually a
        scalar").

        Decided per call (see :mod:`dfm_fused._decay_scope`), never from what earlier calls saw:

        - ``scalar_decay`` given: the caller's own promise (or refusal), taken as it is;
        - a step replayed in ``unroll``'s backward takes the decision its forward took;
        - a training step at ``T == 0`` runs the QR (or, with ``qr_in_forward`` off, its caller
          just did), so ``Q`` is orthonormal: the scalar path (``D = 1`` at ``T == 0``, whatever
          ``S``), and ``|S|`` is judged on its values for the call's later steps;
        - a later step of the same call (the loop of :func:`dfm_fused.unroll` or of a model)
          takes the scalar path if that judgement found ``|S|`` uniform;
        - anything else (eval, a hand-written loop past ``T == 0``, ``torch.compile``) takes the
          general path.
        """
        frame = _decay_scope.current_step()
        if is_recomputing() and frame is not None and id(self) in frame.decisions:
            return frame.decisions[id(self)]
        # The reference re-orthogonalises at the first step of every training forward; a replay
        # inside unroll's backward must not do it a second time.
        runs_qr = self.training and T == 0 and not is_recomputing()
        if runs_qr and self.qr_in_forward:
            self.orthogonalize_Q()
        if scalar_decay is not None:
            decision = scalar_decay
        elif torch.compiler.is_compiling():
            decision = False
        elif runs_qr:
            judgement = self._judge_S()
            call = _decay_scope.current_call()
            if call is not None:
                call.judged[id(self)] = judgement
            decision = judgement.value() if judgement.known else True
        else:
            call = _decay_scope.current_call()
            judgement = call.judged.get(id(self)) if call is not None else None
            decision = judgement is not None and judgement.value()
        if frame is not None:
            frame.decisions[id(self)] = decision
        return decision

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

    def forward(self, x: torch.Tensor, T=5, *, scalar_decay: bool | None = None) -> torch.Tensor:
        """``x`` (B, C, H, W) at step ``T``. ``scalar_decay``: ``None`` (default) lets the module
        decide (see ``_begin_step``); ``True`` is the caller's promise that ``Q`` is orthonormal and
        ``|S|`` uniform, ``False`` forces the general path (``output_map="QT"`` only)."""
        scalar_decay = _promise(scalar_decay)
        t = self.T * _step_index("T", T)
        if self.output_map == "Qinv":
            F.check_general_exp_decay(x, self.Q, self.Qinv, self.S, t, self.tau, self.alpha, self.backward,
                                      filters=self.filters)
            return F.run_general_exp_decay(x, self.Q, self.Qinv, self.S, t, self.tau, self.alpha, self.backward)
        # Checked before the QR of _begin_step, so bad input changes nothing.
        F.check_exp_decay(x, self.Q, self.S, t, self.tau, self.alpha, filters=self.filters)
        scalar = self._begin_step(T, scalar_decay)
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

    def forward(self, h: torch.Tensor, y: torch.Tensor, t=0, *, scalar_decay: bool | None = None) -> torch.Tensor:
        """``h``, ``y`` (B, C, H, W) at step ``t``; ``scalar_decay`` as in :meth:`StateExpDecay.forward`."""
        scalar_decay = _promise(scalar_decay)
        step_time = self.T * _step_index("t", t)
        # Checked before the QR of _begin_step, so bad input changes nothing.
        F.check_state_update(h, y, self.Q, self.S, step_time, self.tau, self.alpha, self.groups, self.eps,
                             filters=self.filters)
        scalar = self._begin_step(t, scalar_decay)
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
