"""Loading reference ResNet DFM checkpoints."""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

__all__ = ["checked_reference_state_dict", "load_reference_state_dict", "strip_compile_prefixes"]

_COMPILED = "_orig_mod."


def strip_compile_prefixes(state_dict) -> "OrderedDict[str, torch.Tensor]":
    """Remove the ``_orig_mod.`` infix that ``torch.compile``d submodules put into keys."""
    out = OrderedDict()
    for key, value in state_dict.items():
        clean = key.replace(_COMPILED, "")
        if clean in out and not torch.equal(out[clean], value):
            raise ValueError(f"state_dict: keys {key!r} and {clean!r} name one tensor but hold different values")
        out[clean] = value
    return out


def load_reference_state_dict(model: nn.Module, state_dict, strict: bool = True):
    """Load a reference (``dfbmodels``) checkpoint into a :mod:`dfm_fused.models` model.

    Strips ``_orig_mod.`` infixes, checks that keys naming one shared tensor
    (``conv1.weight`` and ``frontend.0.weight``) agree and, for the fused models,
    that the frozen GroupNorm affines are the identity the fused ops assume.
    Returns ``model.load_state_dict``'s result. (A model sharded by FSDP2:
    :func:`dfm_fused.distributed.load_full_state_dict`.)
    """
    return model.load_state_dict(checked_reference_state_dict(model, state_dict), strict=strict)


def checked_reference_state_dict(model: nn.Module, state_dict) -> "OrderedDict[str, torch.Tensor]":
    """``state_dict`` with the checks and key cleaning of :func:`load_reference_state_dict`, not loaded."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module; got {type(model).__name__}")
    if not hasattr(state_dict, "items"):
        raise TypeError(f"state_dict: expected a mapping of names to tensors; got {type(state_dict).__name__}")
    clean = strip_compile_prefixes(state_dict)
    shared = {"frontend.0.weight": "conv1.weight"}
    shared.update({f"frontend.1.{n}": f"bn1.{n}" for n in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")})
    shared.update({"classification_head.2.weight": "fc.weight", "classification_head.2.bias": "fc.bias"})
    for alias, name in shared.items():
        if alias in clean and name in clean and not torch.equal(clean[alias], clean[name]):
            raise ValueError(f"state_dict: {alias!r} and {name!r} are one tensor in the model but differ in the checkpoint")
    if getattr(model, "fused_groupnorm_affine", False):
        for name in ("layernorm_error", "layernorm_input"):
            w, b = clean.get(f"{name}.weight"), clean.get(f"{name}.bias")
            if (w is not None and not torch.all(w == 1)) or (b is not None and not torch.all(b == 0)):
                raise ValueError(
                    f"state_dict: {name}.weight/bias must be 1/0 (the reference freezes them and the fused ops assume "
                    "it); this checkpoint changed them"
                )
    return clean
