"""``dfm_fused.patch``: reference StateExpDecay modules swapped for the fused one in place."""
from __future__ import annotations

import pytest
import torch

import dfm_fused
from dfm_fused import reference
from tests._golden import rel_err


class _TinyReferenceDFM(torch.nn.Module):
    """A reference-style DFM: the state update is a reference StateExpDecay, also reachable twice."""

    def __init__(self, C=12):
        super().__init__()
        self.body = torch.nn.Conv2d(C, C, 3, padding=1)
        self.decay = reference.StateExpDecay(C, (5, 7), tau=0.7, alpha=1.3)
        self.blocks = torch.nn.ModuleList([self.decay])
        with torch.no_grad():
            self.decay.S.uniform_(0.5, 2.0)  # non-uniform spectrum: Q matters

    def forward(self, h, T=3):
        for t in range(T):
            h = h + self.blocks[0](torch.tanh(self.body(h)), T=t)
        return h


def _run(model, h):
    model.zero_grad()
    out = model(h)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_patch_keeps_outputs_gradients_and_parameters(dtype):
    torch.manual_seed(0)
    model = _TinyReferenceDFM().to(dtype).eval()
    h = torch.randn(3, 12, 5, 7, dtype=dtype)
    expected_out, expected_grads = _run(model, h)
    old = model.decay
    params = dict(old.named_parameters())
    replaced = dfm_fused.patch(model)
    assert list(replaced) == ["decay"] and replaced["decay"] is old
    assert isinstance(model.decay, dfm_fused.StateExpDecay) and model.blocks[0] is model.decay
    for name, p in model.decay.named_parameters():
        assert p is params[name] and p.dtype == dtype
    assert model.decay.state is old.state
    out, grads = _run(model, h)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert rel_err(out, expected_out) < tol
    assert grads.keys() == expected_grads.keys() and "decay.Q" in grads
    for name in grads:
        assert rel_err(grads[name], expected_grads[name]) < tol, name
    assert dfm_fused.patch(model) == {}


def test_patch_training_reorthogonalizes_like_reference():
    torch.manual_seed(0)
    model = _TinyReferenceDFM().train()
    twin = _TinyReferenceDFM().train()
    twin.load_state_dict(model.state_dict())
    with torch.no_grad():
        for m in (model, twin):
            m.decay.Q.add_(0.01 * torch.randn(12, 12, generator=torch.Generator().manual_seed(1)))
    dfm_fused.patch(model)
    h = torch.randn(2, 12, 5, 7)
    _, grads = _run(model, h)
    _, expected = _run(twin, h)
    assert rel_err(model.decay.Q, twin.decay.Q) < 1e-6
    assert rel_err(grads["decay.Q"], expected["decay.Q"]) < 1e-5


def test_patch_compiled_reference_resnet():
    torch.manual_seed(0)
    from dfm_fused.models.reference import ReferenceResNet18

    model = ReferenceResNet18(fb_filters=8, n_classes=4, shape=(32, 32)).eval()
    x = torch.randn(2, 3, 32, 32)
    h0 = torch.randn(2, 520, 1, 1) * 1e-3
    model.zero_grad()
    expected_out = model(x, 1, h0=h0)
    expected_out.sum().backward()
    expected_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    compiled = torch.compile(model, backend="eager")
    replaced = dfm_fused.patch(compiled)
    assert list(replaced) == ["_orig_mod.error_head"]
    assert isinstance(model.error_head, dfm_fused.StateExpDecay)
    model.zero_grad()
    out = compiled(x, 1, h0=h0)
    out.sum().backward()
    assert rel_err(out, expected_out) < 1e-5
    for name, g in expected_grads.items():
        assert rel_err(dict(model.named_parameters())[name].grad, g) < 1e-4, name


def test_patch_rejects_bad_input():
    with pytest.raises(TypeError, match="model"):
        dfm_fused.patch("model")
    with pytest.raises(ValueError, match="parent"):
        dfm_fused.patch(reference.StateExpDecay(4, (2, 2)))
