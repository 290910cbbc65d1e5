"""The fused DFM operations (docs/design.md, 'The op contract'), dispatched to the fastest backend.

All ops take ordinary tensors in float16, bfloat16, float32 or float64 (state
math and reductions run in float32, or float64 for float64 inputs), any batch
and spatial size, and have autograd for every differentiable input. Pass
``backend=`` to force one backend for one call; otherwise
:func:`dfm_fused.set_backend` / ``DFM_FUSED_BACKEND`` / ``auto`` decide (under
``torch.compile`` the choice in force at trace time is baked into the graph).

Under ``torch.autocast`` each op returns the dtype the reference returns under
autocast (``exp_decay``: the autocast dtype; ``state_update``: ``h``'s dtype
promoted with it; ``feedback_input``: float32 or wider) but computes as above.
"""
from __future__ import annotations

import functools

import torch

from dfm_fused import _checks
from dfm_fused._dispatch import resolve

__all__ = ["exp_decay", "feedback_input", "general_exp_decay", "state_update"]


def exp_decay(x, Q, S, t, tau, alpha, *, scalar_decay: bool = False, backend: str | None = None) -> torch.Tensor:
    """``Q^T diag(exp(t * Delta)) Q x`` per pixel, ``Delta = -(1/tau) |S|**alpha``.

    Args:
        x: ``(B, C, H, W)`` floating tensor.
        Q: ``(C, C)``; receives a gradient. S: ``(C,)``; receives none.
        t: step time (number or 0-d tensor); the reference module passes ``module.T * T``.
        tau: number or 0-d tensor, > 0. alpha: number or 0-d tensor.
        scalar_decay: the caller's promise that ``Q`` is orthonormal and ``|S|**alpha`` uniform
            (see below); nothing checks it.
    Returns:
        ``(B, C, H, W)`` in ``x``'s dtype.

    With ``scalar_decay=True`` the op uses ``M = d I``, ``d = exp(t * Delta)`` (docs/design.md, 'Scalar decay'):
    ``out = d x`` with no C x C product, while ``grad_Q`` is still ``diag(D) Q (A + A^T)``,
    ``A = sum x g^T``, the gradient of the general form at that ``Q``. Only the module that
    re-orthogonalised ``Q`` itself can make the promise (:class:`dfm_fused.StateExpDecay`
    does, until ``Q`` is written). The reference backend ignores the flag: it is the oracle.
    """
    check_exp_decay(x, Q, S, t, tau, alpha)
    return run_exp_decay(x, Q, S, t, tau, alpha, scalar_decay, backend)


def check_exp_decay(x, Q, S, t, tau, alpha, filters: int | None = None) -> None:
    """The argument checks of :func:`exp_decay`; ``filters``: the channel count a module expects of ``x``."""
    _checks.tensor("x", x, ndim=4)
    _check_filters("x", x, filters)
    _checks.decay_params(Q, S, x.shape[1], "x.shape[1]")
    _checks.same_device(x=x, Q=Q, S=S)
    _decay_scalars(t, tau, alpha)


def run_exp_decay(x, Q, S, t, tau, alpha, scalar_decay: bool = False, backend: str | None = None) -> torch.Tensor:
    """:func:`exp_decay` on arguments :func:`check_exp_decay` has passed (modules check before they
    re-orthogonalise ``Q``, then run the op without checking again)."""
    # Under autocast the reference's linear layers return the autocast dtype.
    return _call("exp_decay", x.device.type, backend, lambda low: x.dtype if x.dtype == torch.float64 else low,
                 (x, Q, S, t, tau, alpha), _flag("scalar_decay", scalar_decay))


def feedback_input(x, h, offset: int, fb: int, groups: int, eps: float = 1e-5, *, backend: str | None = None):
    """``cat([x, softmax_c(GroupNorm(resize(h[:, offset:offset+fb], x.shape[-2:])))], dim=1)``.

    The resize is bilinear with ``align_corners=False``; the GroupNorm has no
    affine (the reference's frozen weight 1, bias 0).

    Args:
        x: ``(B, Cx, H, W)`` frontend output. h: ``(B, Ch, h, w)`` state.
        offset, fb: the fed-back channels of ``h`` are ``offset:offset+fb``.
        groups: GroupNorm groups, dividing ``fb``. eps: GroupNorm epsilon.
    Returns:
        ``(B, Cx + fb, H, W)`` in the promoted dtype of ``x`` and ``h``. Its
        gradient w.r.t. ``x`` is a view of the incoming gradient.
    """
    _checks.tensor("x", x, ndim=4)
    _checks.tensor("h", h, ndim=4)
    _checks.same_device(x=x, h=h)
    if h.shape[0] != x.shape[0]:
        raise ValueError(f"h: expected batch size {x.shape[0]} to match x; got {h.shape[0]}")
    offset = _checks.integer("offset", offset, 0)
    fb = _checks.integer("fb", fb, 1)
    groups = _checks.integer("groups", groups, 1)
    if offset + fb > h.shape[1]:
        raise ValueError(f"offset + fb: expected at most h.shape[1]={h.shape[1]}; got {offset} + {fb} = {offset + fb}")
    _checks.divides("groups", groups, "fb", fb)
    _checks.scalar("eps", eps, positive=True)
    # Under autocast the reference's group_norm and softmax run in float32 and cat promotes.
    return _call("feedback_input", x.device.type, backend,
                 lambda low: torch.promote_types(torch.promote_types(x.dtype, h.dtype), torch.float32),
                 (x, h, offset, fb, groups, float(eps)), False)


def state_update(h, y, Q, S, t, tau, alpha, groups: int, eps: float = 1e-5, *, scalar_decay: bool = False,
                 backend: str | None = None):
    """``h + Q^T diag(exp(t * Delta)) Q GroupNorm(y)`` per pixel.

    Args:
        h: ``(B, C, H, W)`` state. y: ``(B, C, H, W)`` body output.
        Q, S, t, tau, alpha, scalar_decay: as in :func:`exp_decay` (with ``scalar_decay``,
            ``out = h + d GroupNorm(y)`` and ``A = sum GroupNorm(y) g^T``).
        groups: GroupNorm groups, dividing ``C``. eps: GroupNorm epsilon.
    Returns:
        ``(B, C, H, W)`` in ``h``'s dtype. Gradients flow to ``h`` (identity), ``y`` and ``Q``.
    """
    groups = check_state_update(h, y, Q, S, t, tau, alpha, groups, eps)
    return run_state_update(h, y, Q, S, t, tau, alpha, groups, eps, scalar_decay, backend)


def check_state_update(h, y, Q, S, t, tau, alpha, groups, eps, filters: int | None = None) -> int:
    """The argument checks of :func:`state_update`; returns ``groups`` as an int. ``filters``: the
    channel count a module expects of ``h``."""
    _checks.tensor("h", h, ndim=4)
    _check_filters("h", h, filters)
    _checks.tensor("y", y, ndim=4)
    if h.shape != y.shape:
        raise ValueError(f"y: expected the shape of h {tuple(h.shape)}; got {tuple(y.shape)}")
    _checks.decay_params(Q, S, h.shape[1], "h.shape[1]")
    _checks.same_device(h=h, y=y, Q=Q, S=S)
    groups = _checks.integer("groups", groups, 1)
    _checks.divides("groups", groups, "h.shape[1]", h.shape[1])
    _checks.scalar("eps", eps, positive=True)
    _decay_scalars(t, tau, alpha)
    return groups


def run_state_update(h, y, Q, S, t, tau, alpha, groups: int, eps: float = 1e-5, scalar_decay: bool = False,
                     backend: str | None = None) -> torch.Tensor:
    """:func:`state_update` on arguments :func:`check_state_update` has passed."""
    # Under autocast the reference adds the autocast-dtype decay output to h.
    return _call("state_update", h.device.type, backend, lambda low: torch.promote_types(h.dtype, low),
                 (h, y, Q, S, t, tau, alpha, groups, float(eps)), _flag("scalar_decay", scalar_decay))


def general_exp_decay(x, Q, Qinv, S, t, tau, alpha, *, backward: str = "exact", backend: str | None = None):
    """``Qinv diag(exp(t * Delta)) Q x`` per pixel, ``Delta = -(1/tau) |S|**alpha``: a general channel
    mix (``Qinv`` is any matrix, not assumed to be ``Q``'s inverse or ``Q^T``; no symmetry).

    Args:
        x: ``(B, C, H, W)`` floating tensor. Q, Qinv: ``(C, C)``. S: ``(C,)``.
        t, tau, alpha: as in :func:`exp_decay`; ``t >= 0`` with ``backward="neumann"``.
        backward: ``"exact"``: the derivative; ``x``, ``Q``, ``Qinv``, ``S`` (and ``t``,
            ``tau``, ``alpha`` where they are tensors requiring grad) get their gradients.
            ``"neumann"``: the surrogate of ``feedback_segmentation``'s ``StateExpDecay``
            (not the derivative): the decay stage back-propagates ``g * s`` with
            ``s = sum_{i=1..n+1} exp(i * Delta)``, ``n = trunc(t)``, and gives ``Delta``
            ``mean over batch and pixels of s * (Qinv^T g) * (Q x)``; ``t`` gets none.
            Summed in closed form on the device: no host synchronisation.
    Returns:
        ``(B, C, H, W)`` in ``x``'s dtype. Only the torch backend implements this op; the
        others decline it (:class:`BackendUnavailable` with the reason when forced).
    """
    check_general_exp_decay(x, Q, Qinv, S, t, tau, alpha, backward)
    return run_general_exp_decay(x, Q, Qinv, S, t, tau, alpha, backward, backend)


def check_general_exp_decay(x, Q, Qinv, S, t, tau, alpha, backward: str = "exact", filters: int | None = None) -> None:
    """The argument checks of :func:`general_exp_decay`; ``filters`` as in :func:`check_exp_decay`."""
    _checks.tensor("x", x, ndim=4)
    _check_filters("x", x, filters)
    _checks.decay_params(Q, S, x.shape[1], "x.shape[1]")
    _checks.tensor("Qinv", Qinv, ndim=2)
    if Qinv.shape != Q.shape:
        raise ValueError(f"Qinv: expected the shape of Q {tuple(Q.shape)}; got {tuple(Qinv.shape)}")
    _checks.same_device(x=x, Q=Q, Qinv=Qinv, S=S)
    _decay_scalars(t, tau, alpha)
    if backward not in ("exact", "neumann"):
        raise ValueError(f"backward: expected 'exact' or 'neumann'; got {backward!r}")
    if backward == "neumann":
        _checks.scalar("t", t, allow_negative=False)


def run_general_exp_decay(x, Q, Qinv, S, t, tau, alpha, backward: str = "exact",
                          backend: str | None = None) -> torch.Tensor:
    """:func:`general_exp_decay` on arguments :func:`check_general_exp_decay` has passed."""
    return _call("general_exp_decay", x.device.type, backend, lambda low: x.dtype if x.dtype == torch.float64 else low,
                 (x, Q, Qinv, S, t, tau, alpha, backward), False)


def _call(op, device_type, backend, autocast_dtype, args, scalar_decay: bool):
    """Run ``op`` on the chosen backend. Under ``torch.autocast`` the result has the dtype
    the reference would return there, while the op itself keeps its float32 state math."""
    widest = functools.reduce(torch.promote_types, (a.dtype for a in args if isinstance(a, torch.Tensor)))
    name, impl = resolve(op, device_type, backend, widest)
    if scalar_decay and name != "reference":
        impl = functools.partial(impl, scalar_decay=True)
    if not torch.is_autocast_enabled(device_type):
        return impl(*args)
    with torch.autocast(device_type, enabled=False):
        out = impl(*args)
    return out.to(autocast_dtype(torch.get_autocast_dtype(device_type)))


def _check_filters(name: str, value: torch.Tensor, filters: int | None) -> None:
    if filters is not None and value.shape[1] != filters:
        raise ValueError(f"{name}: expected {filters} channels (filters); got {value.shape[1]}")


def _flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool; got {type(value).__name__} {value!r}")
    return value


def _decay_scalars(t, tau, alpha) -> None:
    _checks.scalar("t", t)
    _checks.scalar("tau", tau, positive=True)
    _checks.scalar("alpha", alpha)
