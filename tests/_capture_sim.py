"""CUDA graphs simulated on the CPU, to test what dfm_fused.capture decides without a GPU.

A real graph replays the kernels recorded at capture on the memory addresses recorded at
capture; the host runs nothing. :class:`SimulatedGraph` does the same with CPU ops:

- capture runs the body under a dispatch mode that records every aten op, its Python-number
  arguments and its tensors. A tensor that existed before the capture is recorded as an alias
  of its storage at that moment (``detach()``), so a later ``p.data = ...``, ``.to(...)`` or
  ``load_state_dict(assign=True)`` leaves the replay on the old memory, as on a GPU (where that
  memory may even have been freed). A tensor made inside the capture is recorded as itself: it
  stands for a fixed address of the graph's pool;
- capture changes no memory (a real capture launches no kernel): every tensor that existed before
  and that a recorded op touched gets its value back afterwards, and so does the CPU RNG state;
- ``replay()`` calls the recorded ops again, in order, on the recorded tensors, and copies each
  op's fresh outputs into the tensors recorded for them. No Python of the body runs: a decision
  the body made on the host (train or eval BatchNorm, which parameters get gradients, the decay
  path) stays the one made at capture.

:func:`simulate_cuda_graphs` installs it with ``monkeypatch`` (streams, sync-debug mode, graph
pools, ``is_current_stream_capturing``) and lets the capture code accept CPU models.
"""
from __future__ import annotations

import itertools

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from dfm_fused.capture import _guards

__all__ = ["SimulatedGraph", "simulate_cuda_graphs"]


def _fresh_outputs(func, out) -> list[torch.Tensor]:
    """The tensors among ``out`` that ``func`` allocates (outputs that alias no input)."""
    returns = func._schema.returns
    groups = list(out) if len(returns) > 1 else [out]
    fresh = []
    for ret, group in zip(returns, groups):
        if ret.alias_info is None:
            fresh += [t for t in tree_flatten(group)[0] if isinstance(t, torch.Tensor)]
    return fresh


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[tuple] = []
        self.made: dict[int, torch.Tensor] = {}       # id -> tensor made during the capture
        self.aliases: dict[int, tuple] = {}           # id -> (tensor, alias of its storage then)
        self.saved: list[tuple[torch.Tensor, torch.Tensor]] = []

    def _recorded(self, t):
        if not isinstance(t, torch.Tensor):
            return t
        if id(t) in self.made:
            return self.made[id(t)]
        if id(t) not in self.aliases:
            alias = t.detach()
            self.aliases[id(t)] = (t, alias)  # holding t keeps its id from being reused
            # Its value before any op of the capture, to put back: schemas do not mark every
            # write (native_batch_norm updates running_mean without a Tensor(a!) annotation).
            self.saved.append((alias, alias.clone()))
        return self.aliases[id(t)][1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        recorded_args, recorded_kwargs = tree_map(self._recorded, args), tree_map(self._recorded, kwargs)
        out = func(*args, **kwargs)
        fresh = _fresh_outputs(func, out)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and id(t) not in self.aliases:
                self.made[id(t)] = t
        self.ops.append((func, recorded_args, recorded_kwargs, fresh))
        return out

    def undo_writes(self) -> None:
        with torch.no_grad():
            for alias, value in reversed(self.saved):
                alias.copy_(value)


class SimulatedGraph:
    """Stands in for ``torch.cuda.CUDAGraph``; ``pool`` is the pool it was captured into."""

    def __init__(self, *args, **kwargs):
        self.ops: list[tuple] = []
        self.pool = None
        self.replays = 0

    def replay(self) -> None:
        with torch.no_grad():
            for func, args, kwargs, fresh in self.ops:
                out = func(*args, **kwargs)
                new = _fresh_outputs(func, out)
                for recorded, value in zip(fresh, new):
                    recorded.copy_(value)
        self.replays += 1


class _Stream:
    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other) -> None:
        pass


class _StreamContext:
    def __init__(self, stream):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _NoCpuTensorWatch(_guards.CpuTensorUse):
    """Every tensor is a CPU tensor here: the watch for CPU tensors next to device ones is off."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class Simulation:
    """What the installed simulation saw: every graph captured, and whether one is being captured."""

    def __init__(self):
        self.graphs: list[SimulatedGraph] = []
        self.capturing = False
        self.pools = itertools.count()


def simulate_cuda_graphs(monkeypatch) -> Simulation:
    """Install :class:`SimulatedGraph` in place of CUDA graphs for the rest of the test."""
    sim = Simulation()

    class graph:  # noqa: N801 - stands in for torch.cuda.graph
        def __init__(self, cuda_graph, pool=None, stream=None, capture_error_mode="global"):
            self.cuda_graph, self.pool = cuda_graph, pool

        def __enter__(self):
            self.rng = torch.get_rng_state()
            self.recorder = _Recorder()
            sim.capturing = True
            self.recorder.__enter__()
            return self.cuda_graph

        def __exit__(self, *exc):
            self.recorder.__exit__(*exc)
            sim.capturing = False
            self.recorder.undo_writes()
            torch.set_rng_state(self.rng)
            self.cuda_graph.ops, self.cuda_graph.pool = self.recorder.ops, self.pool
            sim.graphs.append(self.cuda_graph)
            return False

    initialized = torch.cuda.is_initialized
    sync_mode = ["default"]
    monkeypatch.setattr(torch.cuda, "CUDAGraph", SimulatedGraph)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: ("pool", next(sim.pools)), raising=False)
    monkeypatch.setattr(torch.cuda, "Stream", _Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _Stream())
    monkeypatch.setattr(torch.cuda, "stream", _StreamContext)
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: sync_mode[0])
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda mode: sync_mode.__setitem__(0, mode))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: sim.capturing)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: sim.capturing or initialized())
    monkeypatch.setattr(_guards, "GRAPH_DEVICE_TYPE", "cpu", raising=False)
    monkeypatch.setattr(_guards, "CpuTensorUse", _NoCpuTensorWatch)
    import dfm_fused.capture.inference as inference
    import dfm_fused.capture.train as train

    for module in (train, inference):
        monkeypatch.setattr(module, "require_cuda", lambda api: None)
    return sim
