"""Drop-in modules: reference parity, state_dict compatibility, QR timing, bad input."""
import copy

import pytest
import torch

import dfm_fused
from dfm_fused import reference

from _helpers import assert_close, decay_args, rel_err


def _pair(filters=20, shape=(5, 7), tau=0.7):
    ref = reference.StateExpDecay(filters, shape, tau=tau)
    fused = dfm_fused.StateExpDecay(filters, shape, tau=tau)
    with torch.no_grad():
        ref.S.uniform_(0.5, 1.5)
    fused.load_state_dict(ref.state_dict())
    return ref, fused


def test_state_dict_keys_and_round_trip():
    ref, fused = _pair()
    assert set(fused.state_dict()) == {"Q", "Qinv", "S", "T", "alpha", "tau"}
    assert list(fused.state_dict()) == list(ref.state_dict())
    for key, value in fused.state_dict().items():
        assert torch.equal(value, ref.state_dict()[key]), key
    back = reference.StateExpDecay(20, (5, 7))
    back.load_state_dict(fused.state_dict())
    for key, value in back.state_dict().items():
        assert torch.equal(value, fused.state_dict()[key]), key
    assert {n for n, p in fused.named_parameters() if p.requires_grad} == {"Q", "Qinv"}
    assert fused.state.shape == (1, 20, 5, 7) and not fused.state.any()
    assert "state" not in dict(fused.named_buffers())


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("T", [0, 1, 3, torch.tensor(0.0), torch.tensor(2.0)])
def test_forward_backward_and_qr_match_reference(training, T):
    ref, fused = _pair()
    with torch.no_grad():  # a Q that is not orthogonal, so the QR step changes it visibly
        ref.Q.add_(0.1 * torch.randn_like(ref.Q))
        fused.Q.copy_(ref.Q)
    ref.train(training)
    fused.train(training)
    x = torch.randn(3, 20, 5, 7, requires_grad=True)
    out_ref = ref(x, T=T)
    out = fused(x, T=T)
    assert_close(out, out_ref, torch.float32, "out")
    assert torch.equal(fused.Q, ref.Q), "Q after forward (QR exactly when the reference does it)"
    g = torch.randn_like(out)
    gx_ref, gq_ref = torch.autograd.grad(out_ref, (x, ref.Q), g)
    gx, gq = torch.autograd.grad(out, (x, fused.Q), g)
    assert_close(gx, gx_ref, torch.float32, "grad_x")
    assert_close(gq, gq_ref, torch.float32, "grad_Q")


def test_qr_happens_only_when_training_at_step_zero():
    _, fused = _pair()
    with torch.no_grad():
        fused.Q.add_(0.1)
    before = fused.Q.detach().clone()
    x = torch.randn(1, 20, 5, 7)
    fused.train()
    fused(x, T=2)
    assert torch.equal(fused.Q, before)
    fused.eval()
    fused(x, T=0)
    assert torch.equal(fused.Q, before)
    fused.train()
    fused(x, T=0)
    assert not torch.equal(fused.Q, before)
    eye = fused.Q.detach().T @ fused.Q.detach()
    assert torch.allclose(eye, torch.eye(20), atol=1e-5)


def test_state_update_module_matches_reference_composition():
    C, groups = 24, 8
    module = dfm_fused.StateUpdate(C, groups, tau=0.6, alpha=1.1).eval()
    with torch.no_grad():
        module.S.uniform_(0.5, 1.5)
    h = torch.randn(2, C, 3, 3, requires_grad=True)
    y = torch.randn(2, C, 3, 3, requires_grad=True)
    out = module(h, y, 3)
    expected = reference.state_update(h, y, module.Q, module.S, module.T * 3, module.tau, module.alpha, groups)
    assert_close(out, expected, torch.float32)
    assert set(module.state_dict()) == {"Q", "Qinv", "S", "T", "alpha", "tau"}


def test_feedback_input_module_matches_reference():
    module = dfm_fused.FeedbackInput(fb_filters=8, offset=16, groups=4)
    x = torch.randn(2, 5, 12, 10)
    h = torch.randn(2, 24, 3, 3)
    assert_close(module(x, h), reference.feedback_input(x, h, 16, 8, 4), torch.float32)


def test_modules_reject_bad_input_without_changing_state():
    _, fused = _pair()
    fused.train()
    Q = fused.Q.detach().clone()
    with pytest.raises(ValueError, match="x: expected 20 channels"):
        fused(torch.randn(1, 19, 5, 7), T=0)
    with pytest.raises(ValueError, match="x: expected a 4-D tensor"):
        fused(torch.randn(20, 5, 7), T=0)
    with pytest.raises(TypeError, match="x: expected a floating-point tensor"):
        fused(torch.ones(1, 20, 5, 7, dtype=torch.int64), T=0)
    with pytest.raises(ValueError, match="T: expected a number >= 0"):
        fused(torch.randn(1, 20, 5, 7), T=-1)
    with pytest.raises(ValueError, match="T: expected a whole number"):
        fused(torch.randn(1, 20, 5, 7), T=0.5)
    assert torch.equal(fused.Q, Q)
    with pytest.raises(ValueError, match="groups: expected a divisor of filters=20"):
        dfm_fused.StateUpdate(20, 3)
    with pytest.raises(ValueError, match="tau: expected a number > 0"):
        dfm_fused.StateExpDecay(4, (2, 2), tau=0.0)
    with pytest.raises(ValueError, match="groups: expected a divisor of fb_filters=6"):
        dfm_fused.FeedbackInput(6, 0, 4)


def test_module_deepcopy_and_device_move_keep_values():
    ref, fused = _pair()
    clone = copy.deepcopy(fused)
    assert torch.equal(clone.Q, fused.Q)
    clone = clone.double()
    x = torch.randn(1, 20, 5, 7, dtype=torch.float64)
    assert clone(x, T=1).dtype == torch.float64


def _record_scalar_decay(monkeypatch):
    """The ``scalar_decay`` flag of every decay op call the modules make, in order (the modules
    check their arguments first, then run the op through ``functional.run_*``)."""
    seen = []
    for name in ("run_exp_decay", "run_state_update"):
        original = getattr(dfm_fused.functional, name)

        def spy(*args, _original=original, **kwargs):
            seen.append(kwargs.get("scalar_decay", False))
            return _original(*args, **kwargs)

        monkeypatch.setattr(dfm_fused.functional, name, spy)
    return seen


def _update_pair(C=24, groups=4, tau=0.7):
    fused = dfm_fused.StateUpdate(C, groups, tau=tau)
    ref = reference.StateExpDecay(C, (1, 1), tau=tau)
    ref.load_state_dict(fused.state_dict())
    return ref, fused


def _check_update(ref, fused, t, groups=4):
    """fused(h, y, t) against h + ref(GroupNorm(y), t): output and the gradients of h, y and Q."""
    h = torch.randn(3, fused.filters, 2, 2, requires_grad=True)
    y = torch.randn(3, fused.filters, 2, 2, requires_grad=True)
    out = fused(h, y, t)
    expected = h + ref(torch.nn.functional.group_norm(y, groups, eps=fused.eps), T=t)
    assert_close(out, expected, torch.float32, f"t={t} out")
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (h, y, fused.Q), g)
    want = torch.autograd.grad(expected, (h, y, ref.Q), g)
    for name, a, e in zip(("h", "y", "Q"), got, want):
        assert_close(a, e, torch.float32, f"t={t} grad_{name}")


def test_scalar_decay_only_while_Q_is_the_modules_own_qr(monkeypatch):
    """Training: the QR at t=0 makes Q orthonormal, so every step takes the scalar path and
    matches the reference. An in-place change of Q (an optimizer step, a 1e-3 perturbation) or a
    fresh module that never ran its QR takes the general path, and still matches."""
    seen = _record_scalar_decay(monkeypatch)
    ref, fused = _update_pair()
    fused.eval()
    ref.eval()
    _check_update(ref, fused, 1)  # Q from orthogonal_(), not from this module's QR
    assert seen == [False]
    fused.train()
    ref.train()
    for t in range(3):
        _check_update(ref, fused, t)
    assert seen[1:] == [True, True, True]
    torch.testing.assert_close(fused.Q, ref.Q, rtol=0, atol=0)
    # An optimizer-like step of 1e-3: general path, in training (t > 0) and in eval.
    with torch.no_grad():
        step = 1e-3 * torch.randn_like(fused.Q)
        fused.Q.add_(step)
        ref.Q.add_(step)
    _check_update(ref, fused, 2)
    fused.eval()
    ref.eval()
    _check_update(ref, fused, 1)
    assert seen[4:] == [False, False]
    # The next training forward re-orthogonalises at t=0: scalar again.
    fused.train()
    ref.train()
    _check_update(ref, fused, 0)
    assert seen[6:] == [True]


def test_scalar_decay_after_an_optimizer_step_is_off():
    """Eval after a training step with SGD: Q moved, and the output is the reference's, which the
    scalar formula would miss by far more than float32 rounding."""
    ref, fused = _update_pair()
    opt = torch.optim.SGD([fused.Q], lr=0.1)
    h, y = torch.randn(2, 24, 2, 2), torch.randn(2, 24, 2, 2)
    fused(h, y, 0).square().sum().backward()
    opt.step()
    fused.eval()
    ref.load_state_dict(fused.state_dict())
    ref.eval()
    n = torch.nn.functional.group_norm(y, 4, eps=fused.eps)
    out = fused(h, y, 1)
    assert_close(out, h + ref(n, T=1), torch.float32, "eval after a step")
    scalar = h + torch.exp(torch.tensor(-1 / 0.7)) * n
    assert rel_err(out, scalar) > 1e-4


def test_scalar_decay_needs_uniform_S(monkeypatch):
    seen = _record_scalar_decay(monkeypatch)
    ref, fused = _pair()  # S uniform in [0.5, 1.5)
    x = torch.randn(2, 20, 5, 7)
    assert_close(fused(x, T=0), ref(x, T=0), torch.float32, "T=0")
    assert_close(fused(x, T=2), ref(x, T=2), torch.float32, "T=2")
    with torch.no_grad():
        fused.S.fill_(1.3)
        ref.S.fill_(1.3)
    assert_close(fused(x, T=1), ref(x, T=1), torch.float32, "uniform S")
    assert seen == [False, False, True]


def test_scalar_decay_decision_is_the_same_in_unroll_replays(monkeypatch):
    """unroll(checkpoint=True) replays each step in backward: it must take the same path as in
    the forward (the replay skips the QR, but Q is unchanged), and the gradients must equal
    those of the plain graph."""
    seen = _record_scalar_decay(monkeypatch)
    torch.manual_seed(0)
    update = dfm_fused.StateUpdate(16, 4, tau=0.5)
    body = torch.nn.Conv2d(16, 16, 1)
    model = torch.nn.ModuleList([update, body])
    h0 = torch.randn(2, 16, 2, 2)
    Q0 = update.Q.detach().clone()

    def step(x, h, t):
        return update(h, body(h), t)

    results = {}
    for checkpoint in (False, True):
        with torch.no_grad():
            update.Q.copy_(Q0)
        seen.clear()
        hT = dfm_fused.unroll(step, None, h0, 3, checkpoint=checkpoint, module=model)
        forward = list(seen)
        grads = torch.autograd.grad(hT.square().sum(), (update.Q, body.weight))
        results[checkpoint] = (forward, list(seen[len(forward):]), grads)
    forward, replays, grads = results[True]
    assert forward == [True, True, True]
    assert replays == [True, True]  # steps 1 and 0 replayed (the last one keeps its graph)
    for a, e in zip(grads, results[False][2]):
        assert_close(a, e, torch.float32)


def test_scalar_decay_under_cuda_graph_capture(monkeypatch):
    """A decision baked into a CUDA graph holds for every replay, and replays move no version
    counter. So while capturing only a training step whose QR was captured too (re-run by every
    replay) takes the scalar path, and a QR made inside a capture is no evidence outside it
    (the graph's optimizer step may have changed Q since). Capture is simulated on the CPU."""
    seen = _record_scalar_decay(monkeypatch)
    capturing = [False]
    monkeypatch.setattr(dfm_fused.modules, "_capturing", lambda: capturing[0])
    ref, fused = _update_pair()

    def run(mode, t):
        fused.train(mode == "train")
        ref.train(mode == "train")
        _check_update(ref, fused, t)
        return seen[-1]

    capturing[0] = True
    assert [run("train", 0), run("train", 1)] == [True, True]  # QR captured in this forward
    assert run("eval", 1) is False  # an eval graph: always the general path
    capturing[0] = False
    assert run("eval", 1) is False  # eager after the capture: its QR is no evidence
    assert run("train", 2) is False
    assert run("train", 0) is True  # an eager QR
    capturing[0] = True
    assert run("train", 1) is False  # the eager QR is no evidence inside a capture
    assert run("eval", 2) is False


def test_module_forward_checks_each_argument_once(monkeypatch):
    """The modules run the functional layer's checks (before their QR) and not checks of their own
    on top: each tensor argument is checked once per forward."""
    checked = []
    original = dfm_fused._checks.tensor

    def spy(name, value, ndim=None):
        checked.append(name)
        return original(name, value, ndim)

    monkeypatch.setattr(dfm_fused._checks, "tensor", spy)
    update = dfm_fused.StateUpdate(8, 2, tau=1.0).train()
    update(torch.randn(2, 8, 3, 3), torch.randn(2, 8, 3, 3), 0)
    assert sorted(checked) == ["Q", "S", "h", "y"]
    checked.clear()
    dfm_fused.StateExpDecay(8, (3, 3), tau=1.0).train()(torch.randn(2, 8, 3, 3), T=0)
    assert sorted(checked) == ["Q", "S", "x"]
    checked.clear()
    dfm_fused.StateExpDecay(8, (3, 3), tau=1.0, output_map="Qinv")(torch.randn(2, 8, 3, 3), T=1)
    assert sorted(checked) == ["Q", "Qinv", "S", "x"]


@pytest.mark.parametrize("fused", [False, True])
def test_scalar_decay_ends_with_an_optimizer_step_fused_ones_too(monkeypatch, fused):
    """A fused optimizer (``fused=True``) writes Q without moving its version counter: the next
    training step without a QR of its own (t > 0) must still take the general path and match the
    reference. Eval never takes the scalar path (its forward does no QR)."""
    seen = _record_scalar_decay(monkeypatch)
    ref, module = _update_pair()
    opt = torch.optim.Adam([module.Q], lr=1e-2, fused=fused)
    h, y = torch.randn(2, 24, 2, 2), torch.randn(2, 24, 2, 2)
    module(h, y, 0).square().sum().backward()
    module.eval()
    module(h, y, 1)
    module.train()
    assert seen == [True, False]
    opt.step()
    ref.load_state_dict(module.state_dict())
    _check_update(ref, module, 1)
    assert seen[-1] is False
    _check_update(ref, module, 0)  # a new QR: the scalar path again
    assert seen[-1] is True
