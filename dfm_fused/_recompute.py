"""Replaying a step inside ``unroll``'s backward exactly as its forward ran.

:func:`is_recomputing` is the flag that modules with a once-per-step side effect
(``StateExpDecay``'s QR re-orthogonalisation at ``T == 0``) consult.
:class:`StepStates` keeps what a replay of step ``t`` must see besides the RNG
and autocast (which ``torch.utils.checkpoint`` restores):

- BatchNorm modules (``SyncBatchNorm`` too) in training mode run the replay with momentum 0,
  their ``num_batches_tracked`` put back afterwards: they normalise with the same batch statistics, save
  the same tensors for backward, and leave the running statistics as they are
  (``(1 - 0) * r + 0 * b == r`` exactly for finite batch statistics; non-finite
  ones already made ``r`` non-finite in the forward), so each statistic is
  updated once per real step, with no copy of any buffer;
- other buffers and frozen parameters the step changes in place (a step
  counter) are found by their version counters after each forward step; only
  those are snapshotted, set back to their value before step ``t`` for its
  replay and put back afterwards;
- a replay that writes into any other tensor that existed before it (a
  parameter, a tensor outside ``module``, a BatchNorm outside ``module``) raises
  instead of silently changing what later replays and the optimiser see.

:class:`KeptOutputs` is the selective mode's memory of a step: the convolution
outputs it hands back to the replay.
"""
from __future__ import annotations

import contextlib
import math
import sys
import threading

import torch
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

_local = threading.local()


def is_recomputing() -> bool:
    """True while ``dfm_fused.unroll`` re-runs a step to back-propagate through it."""
    return getattr(_local, "depth", 0) > 0


@contextlib.contextmanager
def recomputing():
    _local.depth = getattr(_local, "depth", 0) + 1
    try:
        yield
    finally:
        _local.depth -= 1


class StepStates:
    """The mutable state of ``module`` (or of nothing, ``module=None``) around each step of one unroll.

    ``begin_step()``/``end_step()`` bracket every forward step; ``replaying(t)`` is the
    context in which step ``t`` is re-run in backward.
    """

    def __init__(self, module: torch.nn.Module | None, originals: dict[int, torch.Tensor]):
        """``originals``: ``{id(tensor): copy}`` of at least the buffers and frozen parameters of
        ``module`` as they were before the first step."""
        modules = list(module.modules()) if module is not None else []
        self.batch_norms = [m for m in modules if isinstance(m, _BatchNorm) and m.training and m.track_running_stats]
        # The selective mode keeps these modules' outputs: convolutions larger than 1x1 (a 1x1
        # convolution, such as a ResNet's downsampling shortcut, is a GEMM with 1/9 of a 3x3
        # convolution's work per output element: recomputed).
        self.costly = [m for m in modules if isinstance(m, _ConvNd) and math.prod(m.kernel_size) > 1]
        frozen_stats = {id(b) for m in self.batch_norms for b in m.buffers(recurse=False)}
        unique = {id(t): t for t in tracked_tensors(module) if id(t) not in frozen_stats}
        self.tracked = list(unique.values())
        self.values = [originals[id(t)] for t in self.tracked]  # the values before the next step
        self.before: list = []  # per step: the values before it (entries shared while unchanged)
        self.mutated: set[int] = set()  # indices into tracked
        self._versions: list[int] = []

    def begin_step(self) -> None:
        self.before.append(list(self.values))
        self._versions = [t._version for t in self.tracked]

    def end_step(self) -> None:
        for i, (t, version) in enumerate(zip(self.tracked, self._versions)):
            if t._version != version:
                self.values[i] = t.detach().clone()
                self.mutated.add(i)

    def finish(self) -> None:
        """After the last forward step: keep only the values of the tensors the steps changed
        (this object lives as long as the graph)."""
        self.before = [{i: values[i] for i in self.mutated} for values in self.before]
        self.values = []

    def replaying(self, t: int, kept: "KeptOutputs | None" = None) -> "_Replaying":
        """Context in which step ``t`` is re-run: its buffers and frozen parameters, BatchNorm
        statistics frozen, writes guarded, the ``kept`` outputs handed back instead of recomputed.
        Re-enterable, for a second backward through a retained graph."""
        return _Replaying(self, t, kept)


class KeptOutputs:
    """The selective mode's memory of one step: the outputs of its costly convolution modules.

    ``recording()`` (around the step's forward) keeps each output; one that the step then changes
    in place (``ReLU(inplace=True)`` on it) is dropped and recomputed, since its value before the
    change is gone. In the replay, each costly module's call returns its kept output (a detached
    alias; autograd records the call as usual and saves its input and weight) without computing.
    """

    def __init__(self, modules: list[torch.nn.Module]):
        self.modules = modules
        self.outputs: list[torch.Tensor | None] = []  # in call order
        self.next = 0
        self.pending = None  # the output the next convolution returns (replay)

    @contextlib.contextmanager
    def recording(self):
        calls = []

        def keep(module, args, output):
            calls.append((output, output._version))

        handles = [m.register_forward_hook(keep) for m in self.modules]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
        self.outputs = [out if out._version == version else None for out, version in calls]

    def _announce(self, module, args):
        self.pending = self.outputs[self.next] if self.next < len(self.outputs) else None
        self.next += 1

    @contextlib.contextmanager
    def handing_back(self):
        self.next, self.pending = 0, None
        handles = [m.register_forward_pre_hook(self._announce) for m in self.modules]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            self.pending = None

    def take(self, func) -> torch.Tensor | None:
        """The kept output if ``func`` is the convolution of an announced module call, else ``None``."""
        if func is not _CONVOLUTION or self.pending is None:
            return None
        out, self.pending = self.pending, None
        return out.detach()


class _Replaying:
    def __init__(self, states: StepStates, t: int, kept: KeptOutputs | None):
        self.states, self.t, self.kept = states, t, kept
        self.entered: list = []

    def __enter__(self):
        s = self.states
        indices = sorted(s.mutated)
        mutated = [s.tracked[i] for i in indices]
        after = [m.detach().clone() for m in mutated]
        # The step counters are kept (SyncBatchNorm asserts one is there) and counted up by the
        # replay like any BatchNorm forward; their values are put back afterwards.
        counts = [m.num_batches_tracked for m in s.batch_norms if m.num_batches_tracked is not None]
        settings = ([m.momentum for m in s.batch_norms], counts, [c.detach().clone() for c in counts])
        stack = contextlib.ExitStack()
        self.entered.append((mutated, after, settings, stack))
        _copy_all(mutated, [s.before[self.t][i] for i in indices])
        for m in s.batch_norms:
            m.momentum = 0.0
        if self.kept is not None:
            stack.enter_context(self.kept.handing_back())
        stack.enter_context(recomputing())
        allowed = {t.untyped_storage().data_ptr() for t in mutated + counts}
        stack.enter_context(_ReplayMode(allowed, self.kept))
        return self

    def __exit__(self, *exc):
        mutated, after, (momenta, counts, count_values), stack = self.entered.pop()
        try:
            stack.close()
        finally:
            for m, momentum in zip(self.states.batch_norms, momenta):
                m.momentum = momentum
            _copy_all(mutated + counts, after + count_values)
        return False


def tracked_tensors(module: torch.nn.Module | None) -> list[torch.Tensor]:
    """The tensors of ``module`` a step may change in place: buffers and frozen parameters."""
    if module is None:
        return []
    return list(module.buffers()) + [p for p in module.parameters() if not p.requires_grad]


def _copy_all(destinations, sources) -> None:
    # Through ``.data`` so that version counters do not move: a graph outside the step
    # (a frontend's batch_norm) may have saved these tensors, and the values it will
    # see at backward time are the same as without the replay.
    with torch.no_grad():
        for destination, source in zip(destinations, sources):
            destination.data.copy_(source)


_SCHEMAS: dict = {}


def _schema(func):
    """``(names and positions of the arguments the op writes, whether its outputs alias an input)``."""
    info = _SCHEMAS.get(func)
    if info is None:
        schema = func._schema
        written = [
            (i, a.name) for i, a in enumerate(schema.arguments) if a.alias_info is not None and a.alias_info.is_write
        ]
        aliasing = any(r.alias_info is not None for r in schema.returns)
        info = _SCHEMAS[func] = (written, aliasing)
    return info


def written_tensors(func, args, kwargs) -> list[torch.Tensor]:
    """The non-empty tensors an aten op writes into (its mutable arguments)."""
    out = []
    for position, name in _schema(func)[0]:
        target = kwargs[name] if name in kwargs else args[position] if position < len(args) else None
        out += [t for t in tree_leaves(target) if isinstance(t, torch.Tensor) and t.numel()]
    return out


_CONVOLUTION = torch.ops.aten.convolution.default


def _in_fsdp_unshard() -> bool:
    """Whether FSDP2 is gathering parameters further up the Python stack
    (``FSDPParamGroup.unshard`` / ``wait_for_unshard``): a sharded module called by a replay
    gathers its parameters again (its ``fsdp`` ops, or with a single rank a plain ``aten.copy_``),
    and those writes put back the values the parameters had. Walked only for a write that would
    otherwise be refused."""
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if code.co_name in ("wait_for_unshard", "unshard") and "fsdp" in code.co_filename:
            return True
        frame = frame.f_back
    return False


class _ReplayMode(TorchDispatchMode):
    """Below autograd during a replay: hands back the ``kept`` convolution outputs, and raises when
    an op writes into a tensor that existed before the replay (other than ``allowed`` storages): a
    replay must not change parameters, foreign buffers or anything else the forward, the other
    replays or the optimiser read."""

    def __init__(self, allowed: set[int], kept: KeptOutputs | None):
        super().__init__()
        self.allowed = allowed
        self.kept = kept
        self.created: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.kept is not None:
            out = self.kept.take(func)
            if out is not None:
                self.created.add(out.untyped_storage().data_ptr())
                return out
        for tensor in written_tensors(func, args, kwargs):
            pointer = tensor.untyped_storage().data_ptr()
            if pointer not in self.created and pointer not in self.allowed and not _in_fsdp_unshard():
                raise RuntimeError(
                    f"unroll(checkpoint=...): the step modified a tensor of shape {tuple(tensor.shape)} in place "
                    f"({func}) while being replayed in backward, and that tensor is not a buffer or frozen "
                    "parameter of `module` that the forward changed too. Replaying it would change what the "
                    "forward and the optimiser see. Pass module=<the nn.Module holding it> to unroll, make the "
                    "step skip the write when dfm_fused.is_recomputing() is true (dfm_fused modules do; "
                    "dfm_fused.patch() swaps reference StateExpDecay modules for them), or use checkpoint=False."
                )
        out = func(*args, **kwargs)
        if not _schema(func)[1]:
            for tensor in tree_leaves(out):
                if isinstance(tensor, torch.Tensor):
                    self.created.add(tensor.untyped_storage().data_ptr())
        return out
