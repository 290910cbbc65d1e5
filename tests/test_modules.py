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
