"""``patch(model)``: swap decay modules for the fused one in place, only where it is exact."""
from __future__ import annotations

import warnings

from torch import nn

from dfm_fused._patch_probe import NotExactError, exact_configuration, fused_like
from dfm_fused.modules import StateExpDecay, StateUpdate

__all__ = ["NotExactError", "patch"]

_DECAY_PARAMETERS = ("Q", "S", "tau", "alpha", "T")


def _is_decay_like(module: nn.Module) -> bool:
    """A ``StateExpDecay``-like module: parameters ``Q`` (C, C), ``S`` (C,), 0-d ``tau``, ``alpha``, ``T``."""
    if isinstance(module, (StateExpDecay, StateUpdate)):
        return False
    params = dict(module.named_parameters(recurse=False))
    if not all(name in params for name in _DECAY_PARAMETERS):
        return False
    Q, S = params["Q"], params["S"]
    return (
        Q.dim() == 2 and Q.shape[0] == Q.shape[1] and S.shape == (Q.shape[0],)
        and all(params[name].dim() == 0 for name in ("tau", "alpha", "T"))
    )


def patch(model: nn.Module, strict: bool = True) -> dict[str, nn.Module]:
    """Replace every ``StateExpDecay``-like submodule of ``model`` by an exact
    :class:`dfm_fused.StateExpDecay`, in place, or refuse.

    Candidates are modules with the parameters ``Q`` (C, C), ``S`` (C,) and 0-d ``tau``,
    ``alpha`` and ``T``. Each is replaced only by a fused configuration shown to compute
    what it computes, at the module's own parameter values and at randomised ``S``, ``T``,
    ``tau``, ``alpha`` (see :mod:`dfm_fused._patch_probe`): ``output_map="QT"`` for
    ``dfbmodels.state.StateExpDecay`` (and :class:`dfm_fused.reference.StateExpDecay`),
    ``output_map="Qinv", backward="neumann"`` for ``feedback_segmentation``'s
    ``StateExpDecay``, ``output_map="Qinv"`` for a general mix with the exact backward.
    The check runs on copies: ``model`` is not modified unless every candidate passes
    (with ``strict=True``). The new module shares the old one's Parameter and buffer
    objects (values, device, dtype, ``requires_grad``, optimizer references and
    registration order are kept) and its ``state`` attribute. Works on models already
    moved to a device and on ``torch.compile``d models (the ``_orig_mod`` is patched;
    compiled code re-traces on its next call).

    Args:
        model: the model to patch. strict: raise on a candidate that cannot be replaced
            exactly (default); with ``strict=False``, warn and leave that module in place.
    Returns:
        ``{qualified name: replaced module}``, in ``named_modules`` order.
    Raises:
        TypeError: ``model`` is not an ``nn.Module``; ValueError: ``model`` itself is such a
        module (it cannot be replaced in place; wrap it or construct the fused module instead);
        NotExactError (a ValueError): ``strict`` and some candidate differs from every fused
        configuration; the message names each such module, its class and what differs.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module; got {type(model).__name__}")
    if not isinstance(strict, bool):
        raise TypeError(f"strict: expected a bool; got {type(strict).__name__} {strict!r}")
    if _is_decay_like(model):
        raise ValueError("model: is itself a StateExpDecay-like module and cannot be replaced in place; patch its parent")
    plans: dict[int, tuple[str, nn.Module, tuple[str, str]]] = {}
    refusals = []
    for name, module in model.named_modules():  # each module object once, under its first name
        if not _is_decay_like(module):
            continue
        try:
            plans[id(module)] = (name, module, exact_configuration(module))
        except NotExactError as exc:
            cls = type(module)
            refusals.append(f"{name!r} ({cls.__module__}.{cls.__qualname__}): {exc}")
    if refusals:
        listing = "\n  ".join(refusals)
        if strict:
            raise NotExactError(f"patch: cannot replace exactly:\n  {listing}\n"
                                "(patch(model, strict=False) leaves such modules in place; nothing was replaced)")
        warnings.warn(f"patch: left in place, since it cannot replace them exactly:\n  {listing}", stacklevel=2)
    fused = {key: fused_like(module, *configuration) for key, (_, module, configuration) in plans.items()}
    # Every registration of a replaced module object (shared submodules included) gets its replacement.
    for parent in list(model.modules()):
        for child_name, child in list(parent._modules.items()):
            if child is not None and id(child) in fused and plans[id(child)][1] is child:
                setattr(parent, child_name, fused[id(child)])
    return {name: module for name, module, _ in plans.values()}
