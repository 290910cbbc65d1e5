"""What a forward pass leaves alive for its backward, counted at the allocation.

``saved_tensors_hooks`` see only the tensors autograd saves directly: inside a
``torch.utils.checkpoint`` region the checkpoint's own hooks take over, and a
selective policy keeps its tensors in a cache of its own. :func:`forward_live_bytes`
instead records every tensor storage the forward's ops create (a
``TorchDispatchMode`` below autograd) and sums those still alive once the forward
returned and its output is dropped: saved activations, checkpointed states and
cached convolution outputs alike, on any device.
"""
from __future__ import annotations

import gc
from typing import Callable

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["forward_live_bytes"]


class _CreatedStorages(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.storages: dict[int, tuple[StorageWeakRef, int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not any(r.alias_info is not None for r in func._schema.returns):  # views and in-place ops allocate nothing
            for tensor in tree_leaves(out):
                if isinstance(tensor, torch.Tensor):
                    storage = tensor.untyped_storage()
                    # A freed storage's address may be reused: the later entry replaces it.
                    self.storages[storage.data_ptr()] = (StorageWeakRef(storage), storage.nbytes())
        return out

    def live_bytes(self, exclude: set[int]) -> int:
        return sum(n for ptr, (ref, n) in self.storages.items() if ptr not in exclude and not ref.expired())


def forward_live_bytes(forward: Callable[[], object]) -> tuple[int, object]:
    """``(bytes, output)``: bytes of the storages ``forward()`` allocated that are still alive
    after it, less the output's own storages (which the loss would hold anyway)."""
    with _CreatedStorages() as created:
        out = forward()
    gc.collect()
    exclude = {t.untyped_storage().data_ptr() for t in tree_leaves(out) if isinstance(t, torch.Tensor)}
    return created.live_bytes(exclude), out


# Implementations whose forward runs eagerly, so every allocation passes the dispatch mode
# (compiled code and CUDA-graph replays allocate below it).
_EAGER_IMPLS = ("reference", "fused", "fused-selective", "fused-nockpt")


def e2e_graph_bytes(case, bench) -> dict | None:
    """Graph memory of an eager end-to-end case, as :func:`forward_live_bytes` counts it, in the keys
    of :func:`dfm_fused.bench.measure.graph_saved_bytes`; ``None`` for other cases."""
    if case.kind != "e2e" or case.impl not in _EAGER_IMPLS or bench.backward is None:
        return None
    live, out = forward_live_bytes(bench.forward)
    bench.backward(out)
    return {
        "saved_bytes": live,
        "saved_activation_bytes": live,
        "graph_kind": "bytes allocated by the forward and alive after it (dispatch mode; sees checkpointed steps)",
    }
