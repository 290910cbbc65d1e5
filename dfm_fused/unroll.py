"""``unroll``: the T-step DFM loop with a memory-saving backward (docs/design.md, "The memory-saving unroll").

Three modes (``checkpoint=``):

- ``True`` (full recompute): every step but the last runs under
  ``torch.utils.checkpoint`` (non-reentrant) and saves nothing but its input
  state; the backward re-runs each such step once, when it reaches it, so
  activation memory is one step's graph plus the T states, and T-1 forwards are
  recomputed. The last step keeps its graph, since its backward comes first.
- ``"selective"``: every step runs under the checkpoint too, but the outputs of
  its convolution modules larger than 1x1 are kept from the forward (in
  bfloat16/float16 under autocast, as the convolutions produce them) and handed
  back in the replay instead of recomputed; the rest is recomputed:
  BatchNorm-apply, ReLU, GroupNorm, the fused ops, softmax, 1x1 convolutions.
  About half the plain graph's memory for a fraction of a forward's recompute.
  (``create_selective_checkpoint_contexts`` was the first choice; its forward
  dispatch mode cost more than the recompute on a CPU, and with a kept output
  changed in place it replays reads of the changed value: see
  :class:`dfm_fused._recompute.KeptOutputs`.)
- ``False``: the plain graph through all steps (fastest, memory grows with T).

The replay is faithful (see :mod:`dfm_fused._recompute`): RNG (dropout masks)
and autocast of the forward are restored; BatchNorm statistics are updated once
per real step; buffers and frozen parameters the step changes in place are set
to their values before that step for its replay; a replay that would write into
anything else raises. The gradients are those of the plain graph, accumulated
by autograd itself: each parameter's ``AccumulateGrad`` runs once per backward,
as ``DistributedDataParallel`` expects, and a step may use any tensor needing a
gradient (closures work).
"""
from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint as _checkpoint

from dfm_fused import _checks, _decay_scope
from dfm_fused._recompute import KeptOutputs, StepStates, _copy_all, tracked_tensors
from dfm_fused.modules import _DecayParameters

__all__ = ["unroll"]

Step = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]

def unroll(
    step: Step,
    x: torch.Tensor | None,
    h0: torch.Tensor,
    T: int,
    *,
    checkpoint: bool | str = True,
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
        checkpoint: ``True`` (default): keep only the states and recompute the steps in
            backward; ``"selective"``: keep the convolution outputs, recompute the cheap ops;
            ``False``: the plain graph through all steps (fastest, most memory).
        return_states: return ``[h_1, ..., h_T]`` instead of ``h_T``, for losses
            on the whole trajectory.
        module: the ``nn.Module`` whose BatchNorm statistics, buffers and frozen
            parameters ``step`` updates. Defaults to ``step`` itself when it is a
            module, the module a bound method belongs to, or the modules a function
            refers to (closure variables and globals). Gradients never depend on it;
            a replay that writes into a tensor outside it raises. ``"selective"`` keeps
            the outputs of its convolution modules (a convolution called as a function
            is recomputed).
        preserve_rng_state: restore the RNG in the replay (needed for dropout). During CUDA-graph
            capture the RNG state cannot be read: a checkpointed step that draws random numbers
            raises then (use ``checkpoint=False``); steps without random ops are captured.
    Returns:
        ``h_T``, or the list ``[h_1, ..., h_T]`` with ``return_states=True``.
    """
    T = _checks.integer("T", T, 0)
    _checks.tensor("h0", h0)
    if x is not None:
        _checks.tensor("x", x)
    if not callable(step):
        raise TypeError(f"step: expected a callable (x, h, t) -> h_next; got {type(step).__name__}")
    mode = checkpoint_mode(checkpoint)
    if module is None:
        module = _owning_module(step)
    elif not isinstance(module, torch.nn.Module):
        raise TypeError(f"module: expected a torch.nn.Module or None; got {type(module).__name__}")
    return run_steps(step, x, h0, T, mode, return_states, module, preserve_rng_state)


def checkpoint_mode(checkpoint) -> bool | str:
    """``checkpoint`` checked: ``True``, ``"selective"`` or ``False``."""
    if isinstance(checkpoint, bool) or checkpoint == "selective":
        return checkpoint
    raise ValueError(f"checkpoint: expected True, 'selective' or False; got {checkpoint!r}")


def run_steps(step, x, h0, T, mode, return_states, module, preserve_rng_state=True, checkpoint_last=False):
    """``unroll`` on checked arguments. ``checkpoint_last=True`` recomputes the last step too in
    ``True`` mode (for a loop run in chunks, such as the early stop, that keeps one step's graph
    in all rather than one per chunk)."""
    if T == 0:
        return [] if return_states else h0
    # The decay modules' scalar-decay decisions: one call for the whole loop (joined if the
    # caller, a model's forward, opened it), one frame per step that its replay re-enters.
    with _decay_scope.call() as call:
        if mode is False or not torch.is_grad_enabled():
            with _restored_on_error(module):
                return _plain_unroll(step, x, h0, T, return_states, call)
        return _checkpointed_unroll(step, x, h0, T, mode, return_states, module, preserve_rng_state,
                                    checkpoint_last, call)


def _checkpointed_unroll(step, x, h0, T, mode, return_states, module, preserve_rng_state, checkpoint_last, call):
    selective = mode == "selective"
    # During CUDA-graph capture, torch.utils.checkpoint cannot read the CUDA RNG state
    # (torch.cuda.get_rng_state raises): the replay then runs without restoring it, and the
    # checkpointed steps are refused any random op instead (see _NoRandomOps).
    guard_rng = preserve_rng_state and _capturing()
    preserve_rng_state = preserve_rng_state and not guard_rng
    outputs, h = [], h0
    with _restored_on_error(module) as originals:
        states = StepStates(module, originals)
        for t in range(T):
            states.begin_step()
            frame = _decay_scope.Step(call)
            if mode is True and t == T - 1 and not checkpoint_last:
                h_next = _in_frame(frame, step, x, h, t)
            else:
                h_next = _checkpoint(
                    _in_frame, frame, step, x, h, t, use_reentrant=False, preserve_rng_state=preserve_rng_state,
                    context_fn=functools.partial(_contexts, states, t, selective, mode, guard_rng),
                )
            states.end_step()
            _check_next_state(h_next, h, t)
            h = h_next
            if return_states:
                outputs.append(h)
        states.finish()
    return outputs if return_states else h


def _in_frame(frame: _decay_scope.Step, step, x, h, t):
    """``step(x, h, t)`` in its decision frame (the forward records, the replay reads)."""
    with _decay_scope.step(frame):
        return step(x, h, t)


def _contexts(states: StepStates, t: int, selective: bool, mode, guard_rng: bool):
    """``torch.utils.checkpoint``'s ``context_fn``: (forward context, recompute context)."""
    kept = KeptOutputs(states.costly) if selective else None
    return _forward_context(kept, mode if guard_rng else None), states.replaying(t, kept)


@contextlib.contextmanager
def _forward_context(kept: KeptOutputs | None, guarded_mode):
    """A checkpointed step's forward: its kept outputs recorded (selective), random ops refused
    (``guarded_mode`` not None: under CUDA-graph capture)."""
    with contextlib.ExitStack() as stack:
        if kept is not None:
            stack.enter_context(kept.recording())
        if guarded_mode is not None:
            stack.enter_context(_NoRandomOps(guarded_mode))
        yield


def _capturing() -> bool:
    """Whether the current CUDA stream is being captured into a CUDA graph (no CUDA context, no
    capture: the check initialises nothing)."""
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


class _NoRandomOps(TorchDispatchMode):
    """Raises on an op that draws random numbers (dropout) in a checkpointed step under CUDA-graph
    capture: its replay in backward could not draw the same numbers, so the gradients would be
    silently wrong."""

    def __init__(self, mode):
        super().__init__()
        self.mode = mode

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if torch.Tag.nondeterministic_seeded in func.tags:
            raise RuntimeError(
                f"unroll(checkpoint={self.mode!r}): the step draws random numbers ({func}, e.g. dropout) while "
                "being captured into a CUDA graph. Its replay in backward must draw the same numbers, but the "
                "CUDA RNG state cannot be read during capture (torch.cuda.get_rng_state), so its gradients "
                "would be wrong. Use checkpoint=False for a captured step with dropout (or dropout p=0)."
            )
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _restored_on_error(module):
    """Yields ``{id(tensor): copy}`` of the buffers, frozen parameters and decay modules' ``Q``
    (re-orthogonalised at t=0) of ``module``; if the loop raises, puts them back."""
    tracked = tracked_tensors(module)
    decays = [m.Q for m in module.modules() if isinstance(m, _DecayParameters)] if module is not None else []
    originals = {id(t): t.detach().clone() for t in tracked + decays}
    decay_versions = [_version(Q) for Q in decays]
    try:
        yield originals
    except BaseException:
        # Buffers through ``.data`` (see ``_copy_all``): BatchNorm updates its statistics
        # without moving their versions, and a graph outside the loop may have saved them.
        _copy_all(tracked, [originals[id(t)] for t in tracked])
        # ``Q`` by a plain in-place copy, so its version moves (a graph that saved the QR's
        # output must not be used with the ``Q`` from before it). Only a ``Q`` the loop wrote
        # (the QR moved its version, so no graph still usable saved it) is put back.
        with torch.no_grad():
            for Q, version in zip(decays, decay_versions):
                if _version(Q) != version:
                    Q.copy_(originals[id(Q)])
        raise


def _version(t: torch.Tensor) -> int | None:
    """``t``'s version counter; ``None`` for an inference tensor, which has none (and cannot be
    written outside inference mode, so it needs no restoring)."""
    return None if t.is_inference() else t._version


def _owning_module(step) -> torch.nn.Module | None:
    """``step`` if a module, the module of a bound method, else the modules a function refers to."""
    if isinstance(step, torch.nn.Module):
        return step
    owner = getattr(step, "__self__", None)
    if isinstance(owner, torch.nn.Module):
        return owner
    if not inspect.isfunction(step):
        return None
    refs = inspect.getclosurevars(step)
    found = {id(v): v for v in (*refs.nonlocals.values(), *refs.globals.values()) if isinstance(v, torch.nn.Module)}
    return torch.nn.ModuleList(found.values()) if found else None


def _check_next_state(h_next, h, t: int) -> None:
    if not isinstance(h_next, torch.Tensor):
        raise TypeError(f"step: expected it to return a tensor at t={t}; got {type(h_next).__name__}")
    if h_next.shape != h.shape:
        raise ValueError(
            f"step: expected it to return a state of shape {tuple(h.shape)} at t={t}; got {tuple(h_next.shape)}"
        )


def _plain_unroll(step, x, h0, T, return_states, call):
    states, h = [], h0
    for t in range(T):
        h_next = _in_frame(_decay_scope.Step(call), step, x, h, t)
        _check_next_state(h_next, h, t)
        h = h_next
        if return_states:
            states.append(h)
    return states if return_states else h
