"""``unroll``: the T-step DFM loop with a memory-saving backward (SPEC section 3).

With ``checkpoint=True`` the forward runs the first T-1 steps without building a
graph and keeps only the states ``h_0 .. h_{T-1}``; the last step keeps its graph,
since its backward comes first. The backward walks the steps in reverse, re-runs
one step with grad enabled (all but the last), back-propagates through it and
frees it, so activation memory is one step's graph plus T states instead of T
graphs, and T-1 steps are recomputed. The replay is faithful:

- the RNG state (CPU and the state's CUDA device) is restored, so dropout masks repeat;
- autocast settings of the forward are restored;
- the module's buffers (BatchNorm running statistics, counters) are set to their
  values before that step for the replay and put back afterwards, so each
  buffer is updated exactly once per real step;
- modules of this package skip their once-per-forward side effects (the QR
  re-orthogonalisation) while replaying; a step that mutates a parameter while
  being replayed is an error.

Parameters of the step are inputs of the autograd function and their gradients
its outputs: each parameter's gradient is accumulated once per backward, as
``DistributedDataParallel`` expects. Gradients flowing into several states
(losses on the whole trajectory) are summed in the one reverse sweep.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch

from dfm_fused import _checks
from dfm_fused._recompute import recomputing
from dfm_fused.modules import _DecayParameters

__all__ = ["unroll"]

Step = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


def unroll(
    step: Step,
    x: torch.Tensor | None,
    h0: torch.Tensor,
    T: int,
    *,
    checkpoint: bool = True,
    return_states: bool = False,
    module: torch.nn.Module | None = None,
    preserve_rng_state: bool = True,
):
    """Run ``h_{t+1} = step(x, h_t, t)`` for ``t = 0 .. T-1``.

    Args:
        step: callable ``(x, h, t) -> h_next`` with ``h_next`` shaped like ``h``.
        x: the loop-invariant input (e.g. the frontend output), or ``None``.
        h0: ``(B, C, ...)`` initial state.
        T: number of steps (int >= 0). ``T == 0`` returns ``h0``.
        checkpoint: keep only the states and replay steps in backward (default);
            ``False`` builds the plain graph through all steps (faster, more memory).
        return_states: return ``[h_1, ..., h_T]`` instead of ``h_T``, for losses
            on the whole trajectory.
        module: the ``nn.Module`` whose parameters and buffers ``step`` uses.
            Defaults to ``step`` itself when it is a module, or the module a
            bound method belongs to. With ``checkpoint=True`` a step that uses a
            tensor needing a gradient from elsewhere raises in backward rather
            than silently dropping that gradient; pass ``module`` to cover it.
        preserve_rng_state: restore the RNG in the replay (needed for dropout).
    Returns:
        ``h_T``, or the list ``[h_1, ..., h_T]`` with ``return_states=True``.
    """
    T = _checks.integer("T", T, 0)
    _checks.tensor("h0", h0)
    if x is not None:
        _checks.tensor("x", x)
    if not callable(step):
        raise TypeError(f"step: expected a callable (x, h, t) -> h_next; got {type(step).__name__}")
    if module is None:
        module = _owning_module(step)
    elif not isinstance(module, torch.nn.Module):
        raise TypeError(f"module: expected a torch.nn.Module or None; got {type(module).__name__}")
    if T == 0:
        return [] if return_states else h0

    with _restored_on_error(module):
        if not checkpoint or not torch.is_grad_enabled():
            return _plain_unroll(step, x, h0, T, return_states)
        params = [p for p in module.parameters() if p.requires_grad] if module is not None else []
        replay = _Replay(step, module, T, return_states, preserve_rng_state, h0)
        outputs = _UnrollFunction.apply(replay, x, h0, *params)
    return list(outputs) if return_states else outputs[0]


@contextlib.contextmanager
def _restored_on_error(module):
    """If the loop raises, put back what its completed steps changed: the buffers
    (BatchNorm statistics) and the decay modules' ``Q`` (re-orthogonalised at t=0)."""
    if module is None:
        yield
        return
    tensors = list(module.buffers()) + [m.Q for m in module.modules() if isinstance(m, _DecayParameters)]
    saved = [t.detach().clone() for t in tensors]
    try:
        yield
    except BaseException:
        _copy_all(tensors, saved)
        raise


def _owning_module(step) -> torch.nn.Module | None:
    if isinstance(step, torch.nn.Module):
        return step
    owner = getattr(step, "__self__", None)
    return owner if isinstance(owner, torch.nn.Module) else None


def _check_next_state(h_next, h, t: int) -> None:
    if not isinstance(h_next, torch.Tensor):
        raise TypeError(f"step: expected it to return a tensor at t={t}; got {type(h_next).__name__}")
    if h_next.shape != h.shape:
        raise ValueError(
            f"step: expected it to return a state of shape {tuple(h.shape)} at t={t}; got {tuple(h_next.shape)}"
        )


def _plain_unroll(step, x, h0, T, return_states):
    states, h = [], h0
    for t in range(T):
        h_next = step(x, h, t)
        _check_next_state(h_next, h, t)
        h = h_next
        if return_states:
            states.append(h)
    return states if return_states else h


class _Replay:
    """What the backward needs to re-run step ``t`` exactly as the forward ran it."""

    def __init__(self, step, module, T, return_states, preserve_rng_state, h0):
        self.step = step
        self.module = module
        self.T = T
        self.return_states = return_states
        self.params: list[torch.Tensor] = []
        self.buffers = list(module.buffers()) if module is not None else []
        self.rng_states: list[tuple] = []
        self.buffers_before: list[list[torch.Tensor]] = []
        self.preserve_rng_state = preserve_rng_state
        self.kept: tuple | None = None
        self.cuda_devices = [h0.device] if h0.device.type == "cuda" else []
        device_type = h0.device.type
        self.autocast = [
            (kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))
            for kind in dict.fromkeys(("cpu", device_type))
        ]

    def run_forward_step(self, x, h, t):
        self._snapshot()
        return self.step(x, h, t)

    def run_last_step(self, x, h, needs_x):
        """Run the last step with its graph, kept for the first backward: that step's
        backward comes first, so keeping it costs no more peak memory than any replayed
        step, and it saves one of the T recomputations."""
        self._snapshot()
        h_in = h.detach().requires_grad_(True)
        x_in = x.detach().requires_grad_(True) if needs_x else x
        with torch.enable_grad():
            h_next = self.step(x_in, h_in, self.T - 1)
        self.kept = (h_in, x_in, h_next)
        return h_next

    def take_kept(self):
        """The last step's ``(h, x, h_next)`` graph, once; ``None`` after that (a second
        backward through a retained graph replays the step like the others)."""
        kept, self.kept = self.kept, None
        return kept

    def _snapshot(self):
        if self.preserve_rng_state:
            self.rng_states.append(
                (torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in self.cuda_devices])
            )
        # Kernels such as batch_norm update running statistics without bumping
        # version counters, and comparing values would sync with the device, so
        # every buffer is snapshotted (they are small next to a state).
        self.buffers_before.append([b.clone() for b in self.buffers])

    @contextlib.contextmanager
    def replaying(self, t):
        """Context in which step ``t`` sees the RNG, autocast and buffers of its forward."""
        before = self.buffers_before[t]
        after = [b.clone() for b in self.buffers]
        with contextlib.ExitStack() as stack:
            if self.preserve_rng_state:
                stack.enter_context(torch.random.fork_rng(devices=self.cuda_devices))
                cpu_state, cuda_states = self.rng_states[t]
                torch.set_rng_state(cpu_state)
                for device, state in zip(self.cuda_devices, cuda_states):
                    torch.cuda.set_rng_state(state, device)
            for kind, enabled, dtype in self.autocast:
                stack.enter_context(torch.autocast(kind, dtype=dtype, enabled=enabled))
            stack.enter_context(recomputing())
            _copy_all(self.buffers, before)
            param_versions = [p._version for p in self.params]
            try:
                yield
            finally:
                _copy_all(self.buffers, after)
            changed = [i for i, (p, v) in enumerate(zip(self.params, param_versions)) if p._version != v]
            if changed:
                raise RuntimeError(
                    f"unroll(checkpoint=True): the step modified parameter(s) {changed} in place while being "
                    "replayed in backward. Steps must not mutate parameters when "
                    "dfm_fused.is_recomputing() is true (dfm_fused modules honour this; "
                    "dfm_fused.patch() swaps reference StateExpDecay modules for them), or use checkpoint=False."
                )


class _UnrollFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, replay: _Replay, x, h0, *params):
        replay.params = list(params)
        states = [h0]
        h = h0
        for t in range(replay.T):
            if t == replay.T - 1:
                h_next = replay.run_last_step(x, h, x is not None and ctx.needs_input_grad[1])
            else:
                h_next = replay.run_forward_step(x, h, t)
            _check_next_state(h_next, h, t)
            states.append(h_next.detach())
            h = h_next
        ctx.replay = replay
        # Saved: x and h_0 .. h_{T-1}; h_T is not needed to back-propagate.
        ctx.save_for_backward(x, *states[:-1])
        return tuple(states[1:]) if replay.return_states else (states[-1],)

    @staticmethod
    def backward(ctx, *grad_outputs):
        replay: _Replay = ctx.replay
        x, *states = ctx.saved_tensors
        params = replay.params
        needs_x = x is not None and ctx.needs_input_grad[1]
        needs_params = [ctx.needs_input_grad[3 + i] for i in range(len(params))]
        grad_x = _Sum()
        grad_params = [_Sum() for _ in params]
        grad_h = grad_outputs[-1]
        wanted = [p for p, need in zip(params, needs_params) if need]
        kept = replay.take_kept()
        for t in reversed(range(replay.T)):
            if t == replay.T - 1 and kept is not None:
                h_t, x_t, h_next = kept
                grads = _step_grads(h_next, [h_t] + ([x_t] if needs_x else []) + wanted, grad_h, check_leaves=True)
            else:
                h_t = states[t].detach().requires_grad_(True)
                x_t = x.detach().requires_grad_(True) if needs_x else x
                # The gradient is taken inside the replay context: the step's graph may
                # hold buffers (batch_norm saves its running statistics) that are put
                # back only when the context closes.
                with replay.replaying(t):
                    with torch.enable_grad():
                        h_next = replay.step(x_t, h_t, t)
                    inputs = [h_t] + ([x_t] if needs_x else []) + wanted
                    grads = _step_grads(h_next, inputs, grad_h, check_leaves=t == replay.T - 1)
            grad_h = grads.pop(0)
            if grad_h is None:
                grad_h = torch.zeros_like(h_t)
            if replay.return_states and t > 0:
                grad_h = grad_h + grad_outputs[t - 1]
            if needs_x:
                grad_x.add(grads.pop(0))
            for i, need in enumerate(needs_params):
                if need:
                    grad_params[i].add(grads.pop(0))
        return (None, grad_x.total, grad_h, *(g.total for g in grad_params))


def _step_grads(h_next, inputs, grad_h, check_leaves: bool) -> list:
    """Gradients of one step's output w.r.t. ``inputs`` (``None`` where unused)."""
    if check_leaves:
        _check_no_lost_leaves(h_next, inputs)
    if not h_next.requires_grad:
        return [None] * len(inputs)
    return list(torch.autograd.grad(h_next, inputs, grad_h, allow_unused=True))


def _copy_all(destinations, sources) -> None:
    # Through ``.data`` so that version counters do not move: a graph outside the step
    # (a frontend's batch_norm) may have saved these buffers, and the values it will
    # see at backward time are the same as without the replay.
    with torch.no_grad():
        for destination, source in zip(destinations, sources):
            destination.data.copy_(source)


class _Sum:
    """A gradient summed over the steps. The first term is kept as autograd returned it (it may
    be a tensor someone else holds, such as the incoming gradient); the second sum is a new
    tensor, and later terms are added into it in place, so a T-step backward allocates one
    parameter-sized buffer rather than one per step."""

    def __init__(self):
        self.total: torch.Tensor | None = None
        self.owned = False

    def add(self, grad: torch.Tensor | None) -> None:
        if grad is None:
            return
        if self.total is None:
            self.total = grad
        elif self.owned:
            self.total.add_(grad)
        else:
            self.total = self.total + grad
            self.owned = True


def _check_no_lost_leaves(output: torch.Tensor, inputs: Sequence[torch.Tensor]) -> None:
    """Raise if the replayed step used a tensor needing a gradient that is not an input."""
    if output.grad_fn is None:
        return
    known = {id(t) for t in inputs}
    seen, stack, lost = set(), [output.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if variable is not None and id(variable) not in known:
            lost.append(tuple(variable.shape))
        stack.extend(next_node for next_node, _ in node.next_functions)
    if lost:
        raise RuntimeError(
            f"unroll(checkpoint=True): the step uses {len(lost)} tensor(s) that need gradients but are not "
            f"parameters of `module` (shapes {lost[:5]}); their gradients would be lost. Pass "
            "module=<the nn.Module holding them> to unroll, or use checkpoint=False."
        )
