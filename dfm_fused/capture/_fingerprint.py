"""What a captured graph assumes of the model, checked on the host before every replay.

A CUDA graph replays kernels on the device addresses it was captured with, and keeps every
decision the host made while it was captured. So a graph is stale after any of:

- a parameter, buffer, optimizer param or state tensor, or fixed gradient moved to new memory
  or a new layout: ``p.data = ...``, ``model.to(memory_format=torch.channels_last)``,
  ``model.cpu().cuda()``, ``load_state_dict(assign=True)``, ``to_empty()``. The graph would read
  and write the old (perhaps freed) memory: :func:`layout` records, per tensor, its object,
  ``data_ptr``, dtype, shape and stride, and :func:`first_change` names the first that differs;
- a module switched between train and eval (a frozen BatchNorm), or a parameter's
  ``requires_grad`` flipped: the graph would run the other BatchNorm or compute (and apply) a
  gradient eager no longer computes. :func:`mode` records both; it is part of the cache key, so
  each mode gets its own graph.

Both are Python-side reads (no device work): a few microseconds per tensor and module.
"""
from __future__ import annotations

import torch

__all__ = ["first_change", "layout", "mode", "mode_change"]


def _tracked(model: torch.nn.Module, optimizer, grads) -> list[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` for every tensor a graph reads or writes in place across replays."""
    named = [*model.named_parameters(), *model.named_buffers()]
    seen = {id(t) for _, t in named}
    if optimizer is not None:
        for i, group in enumerate(optimizer.param_groups):
            for j, p in enumerate(group["params"]):
                if id(p) not in seen:
                    named.append((f"optimizer param_groups[{i}]['params'][{j}]", p))
                    seen.add(id(p))
                for key, value in optimizer.state.get(p, {}).items():
                    if isinstance(value, torch.Tensor):
                        named.append((f"optimizer state {key!r} of param_groups[{i}]['params'][{j}]", value))
    named += [(f"the fixed .grad of {name}", g) for name, g in grads]
    return named


def layout(model: torch.nn.Module, optimizer=None, grads=()) -> tuple:
    """Per tensor (name, object id, data_ptr, dtype, shape, stride): the memory a graph replays on.

    ``grads``: ``(name, tensor)`` of the gradients fixed for the graphs."""
    return tuple(
        (name, id(t), t.data_ptr(), t.dtype, tuple(t.shape), t.stride()) for name, t in _tracked(model, optimizer, grads)
    )


def mode(model: torch.nn.Module, with_requires_grad: bool) -> tuple:
    """Every submodule's ``training`` flag (and every parameter's ``requires_grad``): host decisions
    a graph keeps. Hashable, for a cache key."""
    flags = tuple(m.training for m in model.modules())
    if with_requires_grad:
        flags += tuple(p.requires_grad for p in model.parameters())
    return flags


FIELDS = ("tensor object", "data_ptr", "dtype", "shape", "stride")


def first_change(before: tuple, now: tuple) -> str:
    """The first difference between two :func:`layout` records, in words."""
    for old, new in zip(before, now):
        if old[0] != new[0]:
            return f"the model's tensors changed: {old[0]} is now {new[0]}"
        for field, a, b in zip(FIELDS, old[1:], new[1:]):
            if a != b:
                if field == "tensor object":
                    return f"{old[0]} was replaced by another tensor"
                if field == "data_ptr":
                    return f"{old[0]} moved to other memory (data_ptr {a:#x} -> {b:#x})"
                return f"{old[0]} changed {field} {a} -> {b}"
    if len(before) != len(now):
        extra = now[len(before)][0] if len(now) > len(before) else before[len(now)][0]
        return f"the number of tracked tensors changed {len(before)} -> {len(now)} (first unmatched: {extra})"
    return "nothing"


def mode_change(model: torch.nn.Module, before: tuple, now: tuple) -> str:
    """The first flag that differs between two :func:`mode` records, named."""
    names = [f"{name or 'model'}.training" for name, _ in model.named_modules()]
    names += [f"{name}.requires_grad" for name, _ in model.named_parameters()]
    for name, a, b in zip(names, before, now):
        if a != b:
            return f"{name} {a} -> {b}"
    return "the number of modules or parameters"
