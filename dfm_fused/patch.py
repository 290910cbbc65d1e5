"""``patch(model)``: swap reference ``StateExpDecay`` modules for the fused one, in place."""
from __future__ import annotations

import torch
from torch import nn

from dfm_fused.modules import StateExpDecay, StateUpdate

__all__ = ["patch"]

_DECAY_PARAMETERS = ("Q", "S", "tau", "alpha", "T")


def _is_reference_decay(module: nn.Module) -> bool:
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


def _fused_from(old: nn.Module) -> StateExpDecay:
    """A fused module holding ``old``'s very Parameter objects (values, device, dtype, optimizer refs)."""
    new = StateExpDecay.__new__(StateExpDecay)
    nn.Module.__init__(new)
    new.filters = old.Q.shape[0]
    for name, param in old.named_parameters(recurse=False):
        new.register_parameter(name, param)
    if "Qinv" not in new._parameters:
        new.register_parameter("Qinv", None)
    new.state = getattr(old, "state", torch.zeros((1, new.filters), device=old.Q.device))
    new.train(old.training)
    return new


def patch(model: nn.Module) -> dict[str, nn.Module]:
    """Replace every reference-style ``StateExpDecay`` submodule of ``model`` by
    :class:`dfm_fused.StateExpDecay`, in place.

    A module qualifies when it has the parameters ``Q`` (C, C), ``S`` (C,) and 0-d
    ``tau``, ``alpha`` and ``T`` (the reference ``dfbmodels.state.StateExpDecay``,
    :class:`dfm_fused.reference.StateExpDecay`, or a copy). The new module shares
    the old one's Parameter objects, so values, device, dtype, ``requires_grad``
    and optimizer references are kept, as is its ``state`` attribute. Works on
    models already moved to a device and on ``torch.compile``d models (the
    ``_orig_mod`` is patched; compiled code re-traces on its next call).

    Returns:
        ``{qualified name: replaced module}``, in ``named_modules`` order.
    Raises:
        TypeError: ``model`` is not an ``nn.Module``; ValueError: ``model`` itself is such a module
        (it cannot be replaced in place; wrap it or construct the fused module instead).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module; got {type(model).__name__}")
    if _is_reference_decay(model):
        raise ValueError("model: is itself a StateExpDecay-like module and cannot be replaced in place; patch its parent")
    replaced: dict[str, nn.Module] = {}
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if not _is_reference_decay(module):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        if getattr(parent, child) is not module:
            continue  # already swapped through another path to the same module
        fused = _fused_from(module)
        setattr(parent, child, fused)
        replaced[name] = module
        # Other registrations of the same module object (shared submodules) get the same replacement.
        for other_name, other in list(model.named_modules(remove_duplicate=False)):
            for child_name, grandchild in list(other._modules.items()):
                if grandchild is module:
                    setattr(other, child_name, fused)
    return replaced
