"""What a warm-up changes and must give back, and what a captured graph bakes in.

A warm-up runs real training iterations: they move the parameters, the buffers
(BatchNorm statistics), the gradients, the optimizer state and the RNG.
:class:`Snapshot` records all of them before and puts them back afterwards, in
place, so the tensors a graph will read keep their addresses. It also tells
which optimizer state the warm-up created: state an optimizer allocates lazily
at its first step (momentum buffers, Adam moments) must exist before capture,
since a graph cannot allocate it once and then keep it.

A captured optimizer step bakes in every hyperparameter that is a Python number
(``lr`` as a float is a kernel argument): :func:`hyperparameters` records those the
step reads and :func:`changed_hyperparameter` names the first one changed since.
"""
from __future__ import annotations

import copy

import torch

__all__ = ["Snapshot", "changed_hyperparameter", "check_capturable", "hyperparameters", "optimizer_params"]


def optimizer_params(optimizer: torch.optim.Optimizer | None) -> list[torch.Tensor]:
    if optimizer is None:
        return []
    return [p for group in optimizer.param_groups for p in group["params"]]


def _unique(tensors) -> list[torch.Tensor]:
    return list({id(t): t for t in tensors}.values())


class Snapshot:
    """Parameters, buffers, gradients, optimizer state and RNG of ``model`` (and ``optimizer``).

    ``restore()`` writes the recorded values back into the same tensor objects (version
    counters untouched),
    rebinds each ``.grad`` to the tensor it held, drops optimizer state created
    since the snapshot and resets the CPU RNG and the RNG of ``device`` (CUDA).
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, device: torch.device):
        self.optimizer = optimizer
        self.device = device
        self.params = _unique([*model.parameters(), *optimizer_params(optimizer)])
        self.tensors = _unique([*self.params, *model.buffers()])
        with torch.no_grad():
            self.values = [t.detach().clone() for t in self.tensors]
        self.grads = [p.grad for p in self.params]
        self.state: dict[torch.Tensor, dict] = {}
        if optimizer is not None:
            for p, entry in optimizer.state.items():
                self.state[p] = {
                    key: (value, value.detach().clone()) if isinstance(value, torch.Tensor) else (value, copy.deepcopy(value))
                    for key, value in entry.items()
                }
        self.cpu_rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def clear_grads(self) -> None:
        """Set every ``.grad`` to ``None`` (the recorded tensors are kept for ``restore``)."""
        for p in self.params:
            p.grad = None

    def created_state(self) -> list[str]:
        """Optimizer state entries that exist now and did not at the snapshot, as ``"param i: key"``."""
        if self.optimizer is None:
            return []
        created = []
        for i, p in enumerate(optimizer_params(self.optimizer)):
            now = self.optimizer.state.get(p, {})
            before = self.state.get(p, {})
            created += [f"param {i}: {key!r}" for key in now if key not in before]
        return created

    def restore(self) -> None:
        # Through ``.data``, so that version counters do not move: the values are exactly back, and
        # an autograd graph the caller still holds (saved tensors are checked by version) stays usable.
        with torch.no_grad():
            for tensor, value in zip(self.tensors, self.values):
                tensor.data.copy_(value)
        for p, grad in zip(self.params, self.grads):
            p.grad = grad
        if self.optimizer is not None:
            state = self.optimizer.state
            for p in list(state):
                if p not in self.state:
                    del state[p]
            for p, saved in self.state.items():
                entry = state[p]
                for key in [k for k in entry if k not in saved]:
                    del entry[key]
                for key, (original, value) in saved.items():
                    if isinstance(original, torch.Tensor):
                        with torch.no_grad():
                            original.data.copy_(value)
                        entry[key] = original
                    else:
                        entry[key] = copy.deepcopy(value)
        torch.set_rng_state(self.cpu_rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state(self.cuda_rng, self.device)


def check_capturable(optimizer: torch.optim.Optimizer) -> None:
    """Optimizers with a ``capturable`` flag (Adam, AdamW, ...) keep their step count on the
    host unless it is set; such a step cannot be replayed by a graph."""
    for i, group in enumerate(optimizer.param_groups):
        if "capturable" in group and not group["capturable"]:
            raise ValueError(
                f"optimizer: {type(optimizer).__name__} param_groups[{i}] has capturable=False: its step counter "
                "lives on the host, so a CUDA graph would replay the first step's bias correction forever. "
                f"Construct it with capturable=True, e.g. torch.optim.{type(optimizer).__name__}(params, capturable=True)"
            )


def hyperparameters(optimizer: torch.optim.Optimizer) -> list[dict]:
    """Each param group's settings that the optimizer's step reads (the keys of
    ``optimizer.defaults``): numbers by value, tensors by identity. Other keys are left out:
    an LR scheduler adds ``initial_lr`` (and ``max_lr``, ...) that only the scheduler reads."""
    return [{key: value for key, value in group.items() if key in optimizer.defaults} for group in optimizer.param_groups]


def changed_hyperparameter(optimizer: torch.optim.Optimizer, recorded: list[dict]) -> str | None:
    """``"param_groups[i]['key']: old -> new"`` for the first setting changed since ``recorded``, else None."""
    groups = hyperparameters(optimizer)
    if len(groups) != len(recorded):
        return f"param_groups: {len(recorded)} groups -> {len(groups)}"
    for i, (now, before) in enumerate(zip(groups, recorded)):
        for key in sorted(set(now) | set(before), key=str):
            old, new = before.get(key), now.get(key)
            if isinstance(old, torch.Tensor) or isinstance(new, torch.Tensor):
                same = old is new
            else:
                try:
                    same = bool(old == new)
                except Exception:  # values without a plain comparison: compare their text
                    same = repr(old) == repr(new)
            if not same:
                return f"param_groups[{i}][{key!r}]: {old!r} -> {new!r}"
    return None
