"""Sharding a DFM with FSDP2 (``torch.distributed.fsdp.fully_shard``), one block at a time.

``torch.distributed.fsdp.fully_shard(model)`` refuses every DFM of this package and every
``dfbmodels`` model: the decay's ``tau``, ``alpha`` and ``T`` and the model's step counter ``T``
are 0-d parameters (kept so that ``state_dict`` keys, shapes and the parameter order stay the
reference's), and FSDP2 shards along dimension 0. :func:`fully_shard` applies FSDP2 as torchtitan
does, per block then the root, keeping those 0-d frozen parameters out of the sharding
(``ignored_params``: every rank holds them whole, as one process would).

What stays one-process (docs/design.md, "Reference semantics"):

- the QR that a training forward runs on ``Q`` at step 0 is written into the sharded ``Q``
  (:meth:`dfm_fused.modules._DecayParameters.orthogonalize_Q`), so the optimizer steps on the
  ``Q`` the forward used, and the scalar-decay decision is made on the gathered ``S``;
- the early stop (``atol``) of :class:`dfm_fused.FeedbackModel` and the models of
  :mod:`dfm_fused.models` sums ``|h|`` over every rank's batch, so all ranks stop at the step
  one process would for the whole batch (and run the same collectives);
- BatchNorm statistics are per rank, as with ``DistributedDataParallel`` without
  ``SyncBatchNorm``: each rank normalises its micro-batch with that micro-batch's statistics.
  The running statistics, not sharded, drift apart across ranks; :func:`broadcast_buffers`
  copies rank 0's to all (before saving or evaluating).

A parameter written in a forward (as the QR writes ``Q``) is written into FSDP2's gathered copy,
which FSDP2 discards: training would silently go on from the old value. :func:`fully_shard`
checks every sharded parameter's version counter around each block's forward and raises, naming
the module and the parameter, for any write other than the decay QR. (A write through ``.data``
does not move the version counter and escapes the check.)
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn

from dfm_fused.modules import _DecayParameters

__all__ = ["broadcast_buffers", "default_blocks", "fully_shard", "load_full_state_dict"]


def default_blocks(model: nn.Module) -> list[nn.Module]:
    """The modules :func:`fully_shard` shards on their own, innermost first: each decay module
    (``StateUpdate``, ``StateExpDecay``, and those :func:`dfm_fused.patch` put in), and each child
    holding parameters of every top-level ``nn.Sequential`` or ``nn.ModuleList`` of ``model`` (a
    ResNet's residual blocks, a body's layers). The root takes the rest."""
    blocks: dict[int, nn.Module] = {}
    for module in model.modules():
        if isinstance(module, _DecayParameters) and module is not model:
            blocks[id(module)] = module
    for child in model.children():
        if isinstance(child, (nn.Sequential, nn.ModuleList)):
            for block in child.children():
                if any(True for _ in block.parameters()) and id(block) not in blocks:
                    blocks[id(block)] = block
    return list(blocks.values())


def fully_shard(
    model: nn.Module,
    mesh=None,
    *,
    blocks: Iterable[nn.Module] | None = None,
    reshard_after_forward: bool = True,
    sync_module_states: bool = True,
    **fsdp_kwargs,
) -> nn.Module:
    """Shard ``model`` in place with FSDP2, per block and then the root; returns ``model``.

    Args:
        model: a DFM of this package, a model :func:`dfm_fused.patch` patched, or any module
            (on its device: ``cuda`` with NCCL, ``cpu`` with gloo).
        mesh: a 1-D ``DeviceMesh`` (or 2-D for HSDP); default: every rank of the default
            process group on ``model``'s device type.
        blocks: the modules sharded on their own (default :func:`default_blocks`); each must
            be a submodule of ``model``, none inside another.
        reshard_after_forward: as for ``torch.distributed.fsdp.fully_shard``, for the blocks.
        sync_module_states: broadcast rank 0's parameters and buffers first (as
            ``DistributedDataParallel`` does), so ranks that built the model differently agree.
        **fsdp_kwargs: passed on (``mp_policy``, ``offload_policy``, ...); ``ignored_params``
            are kept out of the sharding besides the 0-d parameters.
    Raises:
        RuntimeError: no default process group; ValueError: a 0-d parameter needs a gradient
        (FSDP2 cannot shard it and nothing would average its gradient), or a block is not a
        submodule of ``model``. In a forward: RuntimeError naming the module and parameter a
        block wrote in place.
    """
    from torch.distributed.fsdp import fully_shard as fsdp_fully_shard

    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module; got {type(model).__name__}")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("fully_shard: no default process group; call torch.distributed.init_process_group first")
    paths = {id(m): n for n, m in model.named_modules()}
    ignored = set(fsdp_kwargs.pop("ignored_params", None) or ())
    for name, param in model.named_parameters():
        if param.dim() == 0:
            if param.requires_grad:
                raise ValueError(f"model: parameter {name!r} is 0-d and needs a gradient; FSDP2 shards along "
                                 "dimension 0 and cannot shard it, and nothing would average its gradient "
                                 "across ranks. Freeze it or give it shape (1,)")
            ignored.add(param)
    if mesh is None:
        from torch.distributed.device_mesh import init_device_mesh

        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    if sync_module_states:
        _broadcast(list(model.parameters()) + list(model.buffers()), mesh)
    blocks = default_blocks(model) if blocks is None else list(blocks)
    inside = {id(m) for m in model.modules()}
    for block in blocks:
        if not isinstance(block, nn.Module) or id(block) not in inside or block is model:
            raise ValueError(f"blocks: expected submodules of model; got {type(block).__name__}")
    units = blocks + [model]
    managed = _managed_parameters(units, ignored, paths)
    for block in blocks:
        fsdp_fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward, ignored_params=ignored,
                         **fsdp_kwargs)
    fsdp_fully_shard(model, mesh=mesh, ignored_params=ignored, **fsdp_kwargs)
    for unit in units:
        _WriteGuard(unit, managed[id(unit)])
    return model


def load_full_state_dict(model: nn.Module, state_dict, strict: bool = True):
    """Load a whole (unsharded) ``state_dict`` into ``model`` sharded by :func:`fully_shard`: a
    checkpoint of one process, of this package's models or of ``dfbmodels`` (reference key layout,
    ``_orig_mod.`` infixes allowed). Every rank passes the same values; each tensor is split as the
    parameter it loads into. Returns ``model.load_state_dict``'s result.

    ``torch.distributed.checkpoint.state_dict.set_model_state_dict(..., full_state_dict=True)``
    fails on these models: the reference layout names some parameters twice
    (``conv1.weight`` and ``frontend.0.weight``), and it converts only the first name's tensor.
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    from dfm_fused.models._checkpoint import checked_reference_state_dict

    targets = model.state_dict(keep_vars=True)
    converted = {}
    for key, value in checked_reference_state_dict(model, state_dict).items():
        target = targets.get(key)
        if isinstance(target, DTensor):
            if tuple(value.shape) != tuple(target.shape):
                raise ValueError(f"state_dict: {key!r} has shape {tuple(value.shape)}; the model's parameter "
                                 f"{tuple(target.shape)}")
            value = distribute_tensor(value.to(target.device, target.dtype), target.device_mesh, target.placements)
        converted[key] = value
    return model.load_state_dict(converted, strict=strict)


def broadcast_buffers(model: nn.Module, src: int = 0, group=None) -> None:
    """Copy rank ``src``'s buffers (BatchNorm running statistics, which stay per rank under data
    parallelism) to every rank of ``group`` (default: all), in place."""
    with torch.no_grad():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=src, group=group)


def _broadcast(tensors, mesh) -> None:
    """Every rank of ``mesh`` gets the tensors of its first rank: along each mesh dimension, from
    that dimension's first rank, last dimension first."""
    unique = list({id(t): t for t in tensors}.values())
    with torch.no_grad():
        for mesh_dim in reversed(range(mesh.ndim)):
            group = mesh.get_group(mesh_dim)
            src = dist.get_global_rank(group, 0)
            for tensor in unique:
                dist.broadcast(tensor.data, src=src, group=group)


def _managed_parameters(units, ignored, paths) -> dict[int, list[tuple[str, nn.Module, str]]]:
    """For each unit, the (module path, module, attribute) of the parameters FSDP2 will shard in
    it: its own, less those of units inside it and the ignored ones."""
    unit_ids = {id(u) for u in units}
    out = {}
    for unit in units:
        entries = []
        stack = [unit]
        while stack:
            module = stack.pop()
            for attribute, param in module._parameters.items():
                if param is not None and param not in ignored:
                    entries.append((paths.get(id(module), "") or "<root>", module, attribute))
            stack += [child for child in module.children() if id(child) not in unit_ids]
        out[id(unit)] = entries
    return out


class _WriteGuard:
    """Raises when a forward of ``unit`` writes one of its gathered parameters in place (FSDP2
    would discard the write), except the decay QR, which writes through to the sharded ``Q``."""

    def __init__(self, unit: nn.Module, entries):
        self.entries = entries
        self.active: list[list[int]] = []
        # Registered after fully_shard: the pre-hook runs after FSDP2's (the parameters are
        # gathered), the post-hook first (before FSDP2 reshards).
        unit.register_forward_pre_hook(self._before)
        unit.register_forward_hook(self._after, prepend=True)

    def _before(self, module, args):
        self.active.append([getattr(m, a)._version for _, m, a in self.entries])
        for _, m, _ in self.entries:
            if isinstance(m, _DecayParameters):
                m.__dict__["_Q_written_through"] = False

    def _after(self, module, args, output):
        versions = self.active.pop()
        for (name, m, attribute), version in zip(self.entries, versions):
            if getattr(m, attribute)._version == version:
                continue
            if isinstance(m, _DecayParameters) and attribute == "Q" and m.__dict__.get("_Q_written_through"):
                continue
            raise RuntimeError(
                f"fully_shard: {_class_name(m)} ({name!r}) wrote its parameter {attribute!r} in place during a "
                "forward. FSDP2 runs the forward on a gathered copy of the parameter and discards it afterwards, "
                "so the write would be lost and training would silently diverge from one process. Move the "
                "write out of forward (e.g. into an optimizer step), freeze the parameter and keep it a buffer, "
                "or do not shard this module."
            )


def _class_name(module: nn.Module) -> str:
    """The module's own class name; FSDP2 puts each sharded module in a subclass named FSDP<name>."""
    from torch.distributed.fsdp import FSDPModule

    cls = type(module)
    while issubclass(cls, FSDPModule) and cls.__bases__ and cls.__name__.startswith("FSDP"):
        cls = cls.__bases__[-1]
    return cls.__name__
