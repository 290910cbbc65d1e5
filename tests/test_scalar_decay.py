"""The scalar-decay decision (``M = d I``): made per forward call from what that call did and saw,
recorded per step for the replays in backward, never from process-wide state."""
from __future__ import annotations

import datetime
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import dfm_fused
from dfm_fused import reference

from _helpers import assert_close, cpu_backends, rel_err

GROUPS = 4


def _record(monkeypatch) -> list[bool]:
    """The ``scalar_decay`` flag of every decay op call the modules make, in order."""
    seen = []
    for name in ("run_exp_decay", "run_state_update"):
        original = getattr(dfm_fused.functional, name)

        def spy(*args, _original=original, **kwargs):
            seen.append(kwargs.get("scalar_decay", False))
            return _original(*args, **kwargs)

        monkeypatch.setattr(dfm_fused.functional, name, spy)
    return seen


def _pair(C=24, tau=0.7, S=None):
    """A fused StateUpdate and a reference StateExpDecay with the same parameters."""
    fused = dfm_fused.StateUpdate(C, GROUPS, tau=tau)
    if S is not None:
        with torch.no_grad():
            fused.S.copy_(S)
    ref = reference.StateExpDecay(C, (1, 1), tau=tau)
    ref.load_state_dict(fused.state_dict())
    return ref, fused


def _body(C=24):
    torch.manual_seed(3)
    return torch.nn.Conv2d(C, C, 1)


def _reference_loop(ref, body, h0, T):
    h = h0
    for t in range(T):
        h = h + ref(torch.nn.functional.group_norm(body(h), GROUPS), T=t)
    return h


def _fused_loop(fused, body, h0, T, how):
    if how == "by hand":
        h = h0
        for t in range(T):
            h = fused(h, body(h), t)
        return h
    return dfm_fused.unroll(lambda x, h, t: fused(h, body(h), t), None, h0, T, checkpoint=how,
                            module=torch.nn.ModuleList([fused, body]))


def _compare(ref, fused, body, T, how, training=True):
    """Output and the gradients of ``h0``, ``Q`` and the body's weight against the reference."""
    ref.train(training)
    fused.train(training)
    h0 = torch.randn(4, fused.filters, 2, 2, requires_grad=True)
    Q0 = fused.Q.detach().clone()
    expected = _reference_loop(ref, body, h0, T)
    want = torch.autograd.grad(expected.square().sum(), (h0, ref.Q, body.weight))
    with torch.no_grad():
        fused.Q.copy_(Q0)
    out = _fused_loop(fused, body, h0, T, how)
    got = torch.autograd.grad(out.square().sum(), (h0, fused.Q, body.weight))
    assert_close(out, expected, torch.float32, f"{how} out")
    for name, a, e in zip(("h0", "Q", "body.weight"), got, want):
        assert_close(a, e, torch.float32, f"{how} grad {name}")
    torch.testing.assert_close(fused.Q, ref.Q, rtol=0, atol=0)


@pytest.mark.parametrize("how", [False, True, "selective"])
def test_a_training_call_decides_once_at_its_qr(monkeypatch, how):
    """In one call of unroll, the QR at t=0 makes Q orthonormal: every step takes the scalar
    path (the replays too), and the result is the reference's."""
    seen = _record(monkeypatch)
    ref, fused = _pair()
    body = _body()
    with torch.no_grad():  # Q off orthonormal, as after an optimizer step: the QR shows
        fused.Q.add_(0.1 * torch.randn_like(fused.Q))
        ref.Q.copy_(fused.Q)
    _compare(ref, fused, body, 3, how)
    replays = {False: 0, True: 2, "selective": 3}[how]
    assert seen == [True] * (3 + replays)


def test_a_call_without_its_own_qr_takes_the_general_path(monkeypatch):
    """A hand-written loop past t=0 and every eval step: no QR in this call, general path (and
    exact); the caller's own promise is taken as given."""
    seen = _record(monkeypatch)
    ref, fused = _pair()
    body = _body()
    _compare(ref, fused, body, 3, "by hand")
    assert seen == [True, False, False]
    seen.clear()
    _compare(ref, fused, body, 3, True, training=False)
    assert seen == [False] * 5
    seen.clear()
    h = torch.randn(2, 24, 2, 2)
    fused.eval()(h, h, 2, scalar_decay=True)
    fused.train()(h, h, 0, scalar_decay=False)
    assert seen == [True, False]
    with pytest.raises(TypeError, match="scalar_decay: expected None or a bool; got int 1"):
        fused(h, h, 1, scalar_decay=1)


def test_S_written_through_data_is_seen(monkeypatch):
    """``S.data.uniform_()`` moves no version counter: a module that judged S uniform in an
    earlier call must judge it again, on its values (T=3, tau=5: the scalar path would be off
    by far more than rounding)."""
    seen = _record(monkeypatch)
    ref, fused = _pair(tau=5.0)
    body = _body()
    _compare(ref, fused, body, 3, True)
    assert seen[:3] == [True] * 3
    fused.S.data.uniform_(0.2, 3.0)
    ref.S.data.copy_(fused.S)
    seen.clear()
    _compare(ref, fused, body, 3, True)
    assert seen == [False] * 5
    # The scalar formula would be wrong here: the general path is not a formality.
    h = torch.randn(2, 24, 2, 2)
    n = torch.nn.functional.group_norm(h, GROUPS)
    d = torch.exp(-3 * fused.S[0].abs() / 5.0)
    assert rel_err(fused.eval()(h, h, 3), h + ref.eval()(n, T=3)) < 1e-5
    assert rel_err(h + d * n, h + ref(n, T=3)) > 1e-2


def test_parameters_filled_after_to_empty_are_seen():
    """Meta-device construction, ``to_empty()``, then values written through ``.data``."""
    with torch.device("meta"):
        fused = dfm_fused.StateUpdate(24, GROUPS, tau=2.0)
    fused.to_empty(device="cpu")
    S = torch.rand(24) + 0.5
    Q = torch.linalg.qr(torch.randn(24, 24))[0]
    fused.S.data.copy_(S)
    fused.Q.data.copy_(Q)
    for name in ("tau", "alpha", "T"):
        getattr(fused, name).data.fill_({"tau": 2.0, "alpha": 1.0, "T": 1.0}[name])
    fused.Qinv.data.copy_(Q.t())
    ref = reference.StateExpDecay(24, (1, 1), tau=2.0)
    ref.load_state_dict(fused.state_dict())
    _compare(ref, fused, _body(), 3, True)


def _broadcast_worker(rank: int, port: int, C: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    try:
        torch.manual_seed(0)
        fused = dfm_fused.StateUpdate(C, GROUPS, tau=3.0)
        body = _body(C)
        fused.train()(torch.randn(2, C, 2, 2), torch.randn(2, C, 2, 2), 0)  # judged S uniform: ones
        if rank == 0:
            with torch.no_grad():
                fused.S.copy_(torch.linspace(0.5, 2.0, C))
        dist.broadcast(fused.S, src=0)  # rank 1's S written in place by the collective
        ref = reference.StateExpDecay(C, (1, 1), tau=3.0)
        ref.load_state_dict(fused.state_dict())
        assert not bool((fused.S == fused.S[0]).all())
        _compare(ref, fused, body, 3, True)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_S_written_by_a_collective_is_seen():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    workers = mp.spawn(_broadcast_worker, args=(port, 24), nprocs=2, join=False)
    deadline = time.monotonic() + 180
    while not workers.join(timeout=1):  # raises if a worker failed
        if time.monotonic() > deadline:
            for process in workers.processes:
                process.kill()
            pytest.fail("the two workers did not finish within 180 s")


def _generator(checkpoint):
    torch.manual_seed(0)
    frontend = torch.nn.Conv2d(3, 8, 3, padding=1)
    body = torch.nn.Sequential(torch.nn.Conv2d(8 + 8, 24, 3, stride=2, padding=1), torch.nn.GroupNorm(4, 24),
                               torch.nn.ReLU(), torch.nn.Conv2d(24, 24, 3, padding=1))
    head = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 16))
    # State (4, 24, 2, 2): 16 pixels > C/2, where the extension keeps M for the backward.
    return dfm_fused.FeedbackModel(frontend, body, head, in_channels=8, pred_channels=16, fb_channels=8,
                                   state_stride=2, groups=4, checkpoint=checkpoint)


def _gan_iteration(checkpoint):
    """A GAN loop's generator step: the discriminator's optimizer steps between the generator's
    forward and its backward. Returns the generator's gradients."""
    generator = _generator(checkpoint).train()
    torch.manual_seed(1)
    discriminator = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=1e-2)
    z = torch.randn(4, 3, 4, 4)
    fake = generator(z, 3)
    opt_d.zero_grad()
    torch.nn.functional.softplus(discriminator(fake.detach())).mean().backward()
    opt_d.step()
    torch.nn.functional.softplus(-discriminator(fake)).mean().backward()
    return [p.grad for p in generator.parameters() if p.requires_grad]


@pytest.mark.parametrize("backend", cpu_backends())
def test_gan_loop_equals_the_plain_graph(backend):
    """Another optimizer's step between a forward and its backward changes nothing the replays
    decide: memory saving gives the plain graph's gradients on every backend."""
    with dfm_fused.use_backend(backend):
        plain = _gan_iteration(False)
        for checkpoint in (True, "selective"):
            for a, e in zip(_gan_iteration(checkpoint), plain):
                assert_close(a, e, torch.float32, f"{backend} checkpoint={checkpoint!r}")


def test_importing_registers_no_optimizer_hook():
    code = (
        "from torch.optim import optimizer as o\n"
        "hooks = lambda: (len(o._global_optimizer_pre_hooks), len(o._global_optimizer_post_hooks))\n"
        "before = hooks()\n"
        "import dfm_fused, dfm_fused.models, dfm_fused.capture\n"
        "assert hooks() == before, (before, hooks())\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_modules_build_and_run_under_inference_mode():
    """The reference's module builds and runs under ``torch.inference_mode()``; so do ours and a
    whole model."""
    with torch.inference_mode():
        ref = reference.StateExpDecay(12, (2, 2), tau=0.5)
        fused = dfm_fused.StateExpDecay(12, (2, 2), tau=0.5)
        fused.load_state_dict(ref.state_dict())
        x = torch.randn(2, 12, 2, 2)
        for training in (False, True):
            ref.train(training)
            fused.train(training)
            for t in (0, 2):
                assert_close(fused(x, T=t), ref(x, T=t), torch.float32, f"training={training} T={t}")
        update = dfm_fused.StateUpdate(12, 4, tau=0.5)
        assert update(x, x, 1).shape == x.shape
        model = _generator(True)
        assert model(torch.randn(2, 3, 4, 4), 3).shape == (2, 16)


@pytest.mark.parametrize("baked", [None, False, True])
def test_under_capture_the_baked_answer_decides(monkeypatch, baked):
    """While a CUDA graph is made, S cannot be read: the answer baked in by the capture decides
    (none baked: the general path). Simulated on the CPU."""
    seen = _record(monkeypatch)
    monkeypatch.setattr(dfm_fused.modules, "_capturing", lambda: True)
    monkeypatch.setattr(dfm_fused._decay_scope.Judgement, "__init__", _baked_only)
    ref, fused = _pair()
    if baked is not None:
        fused.baked_uniform_S = baked
    _compare(ref, fused, _body(), 3, False)
    assert seen == [bool(baked)] * 3


def _baked_only(self, S=None, value=None):
    """``Judgement.__init__`` that refuses to read ``S``."""
    if value is None:
        raise AssertionError("S read during a capture")
    self._value, self._host, self._event = value, None, None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_the_decision_adds_no_blocking_read_on_cuda(monkeypatch):
    """On CUDA the |S| judgement is queued beside the QR and copied to pinned memory without
    blocking, and read at step 1 after an event wait: a training forward and backward run under
    ``set_sync_debug_mode("error")`` and take the scalar path at every step (not run on a GPU yet)."""
    seen = _record(monkeypatch)
    model = _generator(True).cuda().train()
    z = torch.randn(4, 3, 4, 4, device="cuda")
    model(z, 3).sum().backward()  # warm-up: lazy initialisation may synchronise
    torch.cuda.synchronize()
    seen.clear()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        model(z, 3).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    assert seen[:3] == [True, True, True]
