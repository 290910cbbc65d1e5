"""Whole DFMs: the T-step loop around a frontend, a body and a head (docs/design.md, "What a DFM is").

:class:`FeedbackLoop` is the loop shared by every model of this package; a
subclass says how to encode the input, run the body and read the prediction.
:class:`FeedbackModel` turns any network into a DFM from those three parts.

One forward:

1. the frontend runs once; its output ``x`` is the loop invariant;
2. the state starts as ``h0`` or an N(0, ``init_std``) draw;
3. ``h_{t+1} = StateUpdate(h_t, body(FeedbackInput(x, h_t)), t)`` for the T
   steps, through :func:`dfm_fused.unroll` (``checkpoint``: ``True`` full
   recompute, ``"selective"`` keeps convolution outputs, ``False`` plain graph);
4. the head reads the prediction from ``h_T[:, :pred_channels]``.

Loop invariants: ``x`` is computed once and only read by the steps. The fused
``feedback_input`` writes ``x`` and the softmax projection straight into the one
output buffer the body reads (no ``cat``, no intermediate copies), and its
backward hands ``x`` a view of the incoming gradient. Reusing one persistent
buffer across steps would also save that copy of ``x``, but only where no step's
graph is kept: the first conv of the body saves its input for backward, so the
plain (``checkpoint=False``) graph needs one buffer per step whatever we do, and
writing the next step's feedback into a saved buffer would corrupt it.

Early stop (the reference's ``atol``): the reference reads ``sum |h|`` on the
host after every step. Here ``atol=None`` (default) runs exactly T steps with no
host read at all; with ``atol`` the sums stay on the device and are read once
every ``check_every`` steps. The step at which the loop stops and the state it
continues from are the reference's; the up to ``check_every - 1`` steps run past
it are discarded (in training mode their BatchNorm statistic updates are not).
Under data parallelism (DDP, FSDP2) the sums are added over the ranks of ``early_stop_group``
(by default every rank, when a default process group of world size > 1 exists): all ranks stop
at the step one process would for their batches together, and so run the same steps (and the
same collectives; a rank that stopped alone would leave the others waiting in one).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from dfm_fused import _checks, _decay_scope
from dfm_fused.modules import FeedbackInput, StateUpdate
from dfm_fused.unroll import checkpoint_mode, run_steps

__all__ = ["FeedbackLoop", "FeedbackModel"]


class FeedbackLoop(nn.Module):
    """The DFM loop. Subclasses provide ``encode``, ``run_body``, ``predict``, ``state_size``,
    ``step_modules`` and the attribute ``state_channels``.

    Args:
        error_head: the decay module, a :class:`StateUpdate` (its unused ``Qinv`` is frozen, so
            DistributedDataParallel needs no ``find_unused_parameters``), registered with the
            step counter ``T`` (a frozen 0-d parameter holding the steps run after a forward).
            ``None``: the subclass registers both itself (the ResNet DFMs build them with the
            reference's layers, in the reference's order).
        feedback: the :class:`FeedbackInput` of the fed-back channels, or ``None`` (no feedback).
        checkpoint: ``True`` (memory-saving backward, flat in T), ``"selective"`` or ``False``,
            as for :func:`dfm_fused.unroll`; a settable attribute.
        init_std: std of the random initial state.
        reference_init: ``True`` reproduces the reference's ``to_equilibrium``, which zeroes the
            state before its loop: for ``T >= 2`` the initial state (``h0`` or the random draw)
            is replaced by zeros; for ``T == 1`` it is used as is.
    Attribute ``early_stop_group``: the ranks whose batches decide the early stop (``atol``)
    together: ``"default"`` (the default process group, when one of world size > 1 is
    initialised), ``None`` (this process alone, e.g. a rank evaluating on its own) or a
    ``ProcessGroup``. Every rank of the group must call ``forward`` with ``atol`` together.
        **modules: the subclass's other modules, registered first, in the order given (their
            order is the parameters' order).
    """

    def __init__(
        self,
        *,
        error_head: nn.Module | None = None,
        feedback: FeedbackInput | None = None,
        checkpoint: bool | str = True,
        init_std: float = 1e-3,
        reference_init: bool = False,
        **modules: nn.Module,
    ):
        super().__init__()
        self.checkpoint = checkpoint_mode(checkpoint)
        self.init_std = float(init_std)
        self.reference_init = bool(reference_init)
        for name, module in modules.items():
            setattr(self, name, module)
        self.feedback = feedback
        if error_head is not None:
            self.error_head = error_head
            self.error_head.Qinv.requires_grad_(False)
            self.T = nn.Parameter(torch.zeros(()), requires_grad=False)
        self.state = torch.zeros(())
        self.steps_run = 0
        self.early_stop_group = "default"

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def run_body(self, x_tilde: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def predict(self, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def state_size(self, x: torch.Tensor) -> tuple[int, int]:
        raise NotImplementedError

    def step_modules(self) -> list[nn.Module]:
        """The modules ``step`` uses, the ``module`` of :func:`dfm_fused.unroll`: their BatchNorm
        statistics are frozen in the replays, the buffers and frozen parameters a step changes
        are set back for them, and the selective mode keeps their convolution outputs."""
        raise NotImplementedError

    def step(self, x: torch.Tensor, h: torch.Tensor, t: int) -> torch.Tensor:
        """One step: ``h + M_t GroupNorm(body(cat[x, softmax(GN(resize(v)))]))``."""
        x_tilde = x if self.feedback is None else self.feedback(x, h)
        return self.error_head(h, self.run_body(x_tilde), t)

    def initial_state(self, x: torch.Tensor, h0: torch.Tensor | None = None) -> torch.Tensor:
        """``h0`` (checked, cast to ``x``'s dtype) or an N(0, init_std) draw, (B, C_h, h, w)."""
        shape = (x.shape[0], self.state_channels, *self.state_size(x))
        if h0 is None:
            return torch.randn(shape, device=x.device, dtype=x.dtype) * self.init_std
        _checks.tensor("h0", h0, ndim=4)
        if tuple(h0.shape) != shape:
            raise ValueError(f"h0: expected shape {shape}; got {tuple(h0.shape)}")
        if h0.device != x.device:
            raise ValueError(f"h0: expected device {x.device} (the input's); got {h0.device}")
        return h0.to(x.dtype)

    def forward(
        self,
        x: torch.Tensor,
        T: int = 5,
        h0: torch.Tensor | None = None,
        *,
        return_all: bool = False,
        atol: float | None = None,
        check_every: int = 4,
    ):
        """Run the DFM for ``T`` steps.

        Args:
            x: the network input, e.g. (B, 3, H, W).
            T: steps (>= 0). ``T == 0`` returns the prediction of the initial state.
            h0: initial state (B, C_h, h, w) instead of the N(0, init_std) draw.
            return_all: return the list of predictions after every step run
                (the decision trajectory) instead of the last one.
            atol: the reference's early stop on ``|sum|h_t| - sum|h_{t-1}|| <= atol``
                over the first T-1 steps; ``None`` runs exactly T steps, no host sync.
            check_every: with ``atol``, read the device-side sums once per this many steps.
        Returns:
            the prediction of the last state, or the list of per-step predictions.
            ``self.state`` holds the last state (detached), ``self.steps_run`` the steps run.
        """
        T = _checks.integer("T", T, 0)
        check_every = _checks.integer("check_every", check_every, 1)
        if atol is not None:
            _checks.scalar("atol", atol, allow_negative=False)
        # One call for the decay modules' scalar-decay decision: the QR at the first step tells
        # the later ones (and the replays in backward) that Q is orthonormal.
        with _decay_scope.call(new=True):
            states = self._run(x, T, h0, return_all, atol, check_every)
        with torch.no_grad():
            self.T.fill_(self.steps_run)
        self.state = states[-1].detach()
        if return_all:
            return [self.predict(s) for s in states]
        return self.predict(states[-1])

    def _run(self, x, T, h0, return_all, atol, check_every) -> list[torch.Tensor]:
        """The frontend and the steps; returns the states to predict from."""
        z = self.encode(x)
        h = self.initial_state(z, h0)
        if self.reference_init and T >= 2:
            h = torch.zeros_like(h)
        if T == 0:
            states = [h]
            self.steps_run = 0
        elif atol is None:
            states = self._unroll(z, h, T, 0, return_all)
            self.steps_run = T
        else:
            states = self._to_equilibrium(z, h, T - 1, float(atol), check_every)
            states += self._unroll(z, states[-1] if states else h, 1, self.steps_run, False)
            self.steps_run += 1
            if not return_all:
                states = states[-1:]
        return states

    def _unroll(self, z, h, T, t0, return_all, checkpoint_last=False):
        def step(x, state, t):
            return self.step(x, state, t0 + t)

        module = nn.ModuleList([m for m in self.step_modules() if m is not None])
        mode = checkpoint_mode(self.checkpoint)
        out = run_steps(step, z, h, T, mode, return_all, module, checkpoint_last=checkpoint_last)
        return out if return_all else [out]

    def _to_equilibrium(self, z, h, T, atol, check_every):
        """Up to ``T`` steps, stopping after the first whose ``sum |h|`` moved by ``<= atol``.

        Returns the states after each step kept; sets ``self.steps_run``.
        """
        self.steps_run = 0
        trajectory = []
        prev = torch.full((1,), math.inf, dtype=torch.float64, device=h.device)
        while self.steps_run < T:
            n = min(check_every, T - self.steps_run)
            # Every step of a chunk is recomputed (with checkpoint=True): only the last step
            # after the loop keeps its graph, so the graph stays one step plus the states.
            chunk = self._unroll(z, h, n, self.steps_run, True, checkpoint_last=True)
            with torch.no_grad():
                # The reference compares float32 sums as Python floats (float64).
                sums = self._summed_over_ranks(torch.stack([s.abs().sum() for s in chunk]).to(torch.float64))
                done = ((sums - torch.cat([prev, sums[:-1]])).abs() <= atol).tolist()
                prev = sums[-1:]
            stop = done.index(True) + 1 if True in done else n
            trajectory += chunk[:stop]
            h = chunk[stop - 1]
            self.steps_run += stop
            if True in done:
                break
        return trajectory

    def _summed_over_ranks(self, sums: torch.Tensor) -> torch.Tensor:
        """``sums`` (n,) float64, per step ``sum |h|`` of this rank's batch, added over the ranks of
        ``early_stop_group``."""
        group = getattr(self, "early_stop_group", "default")
        if group is None or not dist.is_available() or not dist.is_initialized():
            return sums
        if isinstance(group, str):
            if group != "default":
                raise ValueError(f"early_stop_group: expected 'default', None or a ProcessGroup; got {group!r}")
            group = None
        if dist.get_world_size(group) > 1:
            dist.all_reduce(sums, group=group)
        return sums


class FeedbackModel(FeedbackLoop):
    """Any network as a DFM: ``frontend`` once, then T steps of ``body`` with feedback, then ``head``.

    Args:
        frontend: module applied once to the input (``None``: identity); output (B, in_channels, H, W).
        body: module mapping (B, in_channels + fb_channels, H, W) to the state (B, pred_channels +
            fb_channels, h, w) with ``(h, w) = ceil((H, W) / state_stride)``.
        head: module reading the prediction from ``h[:, :pred_channels]``.
        in_channels: channels of the frontend output.
        pred_channels, fb_channels: the state's channel split; channels
            ``pred_channels : pred_channels + fb_channels`` are fed back (``fb_channels=0``: no feedback).
        state_stride: int or (int, int), the body's downsampling factor.
        groups: GroupNorm groups of the state update; fb_groups: of the feedback (default ``groups``).
        tau, alpha: decay parameters of :class:`StateUpdate`. eps: GroupNorm epsilon.
        checkpoint: ``True`` (default) memory-saving backward, flat in T; ``"selective"`` keeps the
            convolution outputs and recomputes the cheap ops; ``False`` keeps the full graph (fastest).
        init_std: std of the random initial state. reference_init: see :class:`FeedbackLoop`.
    """

    def __init__(
        self,
        frontend: nn.Module | None,
        body: nn.Module,
        head: nn.Module,
        *,
        in_channels: int,
        pred_channels: int,
        fb_channels: int,
        state_stride=1,
        groups: int = 8,
        fb_groups: int | None = None,
        tau: float = 1.0,
        alpha: float = 1.0,
        eps: float = 1e-5,
        checkpoint: bool | str = True,
        init_std: float = 1e-3,
        reference_init: bool = False,
    ):
        for name, module in (("body", body), ("head", head)):
            if not isinstance(module, nn.Module):
                raise TypeError(f"{name}: expected a torch.nn.Module; got {type(module).__name__}")
        if frontend is not None and not isinstance(frontend, nn.Module):
            raise TypeError(f"frontend: expected a torch.nn.Module or None; got {type(frontend).__name__}")
        in_channels = _checks.integer("in_channels", in_channels, 1)
        pred_channels = _checks.integer("pred_channels", pred_channels, 1)
        fb_channels = _checks.integer("fb_channels", fb_channels, 0)
        stride = (state_stride, state_stride) if isinstance(state_stride, int) else tuple(state_stride)
        state_stride = tuple(_checks.integer("state_stride", s, 1) for s in stride)
        state_channels = pred_channels + fb_channels
        feedback = FeedbackInput(fb_channels, pred_channels, fb_groups or groups, eps) if fb_channels else None
        super().__init__(
            frontend=nn.Identity() if frontend is None else frontend,
            body=body,
            head=head,
            feedback=feedback,
            error_head=StateUpdate(state_channels, groups, tau, alpha, eps),
            checkpoint=checkpoint,
            init_std=init_std,
            reference_init=reference_init,
        )
        self.in_channels, self.pred_channels, self.fb_channels = in_channels, pred_channels, fb_channels
        self.state_stride = state_stride
        self.state_channels = state_channels

    def encode(self, x):
        z = self.frontend(x)
        if z.dim() != 4 or z.shape[1] != self.in_channels:
            raise ValueError(f"frontend: expected output (B, {self.in_channels}, H, W); got {tuple(z.shape)}")
        return z

    def run_body(self, x_tilde):
        return self.body(x_tilde)

    def step_modules(self):
        return [self.feedback, self.body, self.error_head]

    def predict(self, h):
        return self.head(h[:, : self.pred_channels])

    def state_size(self, x):
        return tuple(-(-s // k) for s, k in zip(x.shape[-2:], self.state_stride))
