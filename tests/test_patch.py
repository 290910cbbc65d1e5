"""``dfm_fused.patch``: reference StateExpDecay modules swapped for the fused one in place."""
from __future__ import annotations

import copy

import pytest
import torch

import dfm_fused
from dfm_fused import reference
from tests._golden import load_golden, rel_err

from _feedback_segmentation import NeumannDecayStage, SegmentationStateExpDecay, TinyNeumannFeedback


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


# --- exact or refuse --------------------------------------------------------------------------

def _delta(m):
    return (1 / m.tau) * -1.0 * torch.abs(m.S) ** m.alpha


def _pixels(matrix, x):
    return torch.einsum("ij,bjhw->bihw", matrix, x)


class _QinvMapWithQR(reference.StateExpDecay):
    """dfbmodels' module, but mapping back by its Qinv parameter."""

    def forward(self, x, T=5):
        if self.training and T == 0:
            self.reorthogonalize(self.Q)
        return _pixels(self.Qinv, reference.ExpDecay.apply(_pixels(self.Q, x), self.T * T, _delta(self)))


class _NoQR(reference.StateExpDecay):
    """dfbmodels' module without the QR at training T == 0."""

    def forward(self, x, T=5):
        return reference.exp_decay(x, self.Q, self.S, self.T * T, self.tau, self.alpha)


class _TrainableS(reference.StateExpDecay):
    """dfbmodels' module with a trainable S that gets its derivative."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.S.requires_grad_(True)

    def forward(self, x, T=5):
        if self.training and T == 0:
            self.reorthogonalize(self.Q)
        D = torch.exp(self.T * T * _delta(self))
        return _pixels(self.Q.t(), D[None, :, None, None] * _pixels(self.Q, x))


class _SurrogateQT(reference.StateExpDecay):
    """dfbmodels' module with feedback_segmentation's surrogate backward."""

    def forward(self, x, T=5):
        if self.training and T == 0:
            self.reorthogonalize(self.Q)
        return _pixels(self.Q.t(), NeumannDecayStage.apply(_pixels(self.Q, x), self.T * T, _delta(self)))


class _Masked(SegmentationStateExpDecay):
    """feedback_segmentation's randomly masked variant: a frozen 0/1 mask on Delta."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.mask = torch.nn.Parameter((torch.arange(self.filters) % 2).float(), requires_grad=False)

    def forward(self, x, T=5):
        delta = self.mask * (1 / self.tau) * -1.0 * torch.abs(self.S) ** self.alpha
        return _pixels(self.Qinv, NeumannDecayStage.apply(_pixels(self.Q, x), self.T * T, delta))


class _Holder(torch.nn.Module):
    def __init__(self, *decays):
        super().__init__()
        self.decays = torch.nn.ModuleList(decays)


@pytest.mark.parametrize("cls, says", [
    (_QinvMapWithQR, "Q after the call"),
    (_NoQR, "training at T=0: Q after the call differs"),
    (_TrainableS, "grad of S exists only in the module's result"),
    (_SurrogateQT, "grad of the input differs"),
    (_Masked, "output differs"),
])
def test_patch_refuses_a_look_alike_naming_it_and_what_differs(cls, says):
    torch.manual_seed(0)
    model = _Holder(reference.StateExpDecay(6, (2, 2), tau=0.5), cls(6, (2, 2), tau=0.5))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    versions = {n: p._version for n, p in model.named_parameters()}
    with pytest.raises(dfm_fused.NotExactError) as info:
        dfm_fused.patch(model)
    message = str(info.value)
    assert f"'decays.1' ({cls.__module__}.{cls.__qualname__})" in message and says in message, message
    assert "decays.0" not in message
    # Nothing swapped (not even the exact one) and nothing written.
    assert type(model.decays[0]) is reference.StateExpDecay and type(model.decays[1]) is cls
    assert {n: p._version for n, p in model.named_parameters()} == versions
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    with pytest.warns(UserWarning, match=r"(?s)left in place.*'decays.1'"):
        replaced = dfm_fused.patch(model, strict=False)
    assert list(replaced) == ["decays.0"] and type(model.decays[1]) is cls
    assert isinstance(model.decays[0], dfm_fused.StateExpDecay)


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_patch_probe_leaves_rng_streams_and_grad_mode_alone(mode):
    torch.manual_seed(0)
    model = _TinyReferenceDFM()
    rng = torch.get_rng_state()
    with mode():
        assert list(dfm_fused.patch(model)) == ["decay"]
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.decay.Q.grad is None and model.body.weight.grad is None


def _run_segmentation(model, x, T, train):
    model.train(train)
    model.zero_grad()
    out = model(x, T)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_patch_replaces_feedback_segmentations_decay_exactly():
    torch.manual_seed(0)
    model = TinyNeumannFeedback()
    twin = copy.deepcopy(model)
    Q_before = model.error_head.Q.detach().clone()
    assert (Q_before.t() @ Q_before - torch.eye(6)).norm() > 0.1  # Xavier: not orthogonal
    replaced = dfm_fused.patch(model)
    assert list(replaced) == ["h_class", "error_head"]
    for name in replaced:
        fused = model.get_submodule(name)
        assert (fused.output_map, fused.backward) == ("Qinv", "neumann")
        assert list(fused.state_dict()) == list(twin.get_submodule(name).state_dict())  # W kept, order kept
    x = torch.randn(2, 3, 8, 8)
    for train in (False, True):
        for T in (1, 2, 5):
            out, grads = _run_segmentation(model, x, T, train)
            expected_out, expected_grads = _run_segmentation(twin, x, T, train)
            assert rel_err(out, expected_out) < 1e-5
            assert grads.keys() == expected_grads.keys() and {"error_head.Q", "error_head.Qinv"} <= grads.keys()
            scale = max(g.norm() for g in expected_grads.values())
            for name, g in expected_grads.items():  # biases before LayerNorms have ~0 gradients: absolute floor
                assert (grads[name] - g).norm() <= 1e-5 * max(g.norm(), 1e-3 * scale), (train, T, name)
    assert torch.equal(model.error_head.Q.detach(), Q_before)  # no QR touched it


def test_patch_replaces_the_base_segmentation_module_with_trainable_S():
    torch.manual_seed(0)
    model = _Holder(SegmentationStateExpDecay(5, (2, 2), tau=0.5, alpha=1.5))
    with torch.no_grad():
        model.decays[0].S.uniform_(0.5, 1.5)
    twin = copy.deepcopy(model)
    dfm_fused.patch(model)
    x = torch.randn(2, 5, 3, 3, requires_grad=True)
    for T in (0, 3):
        outs = [m.decays[0](x, T=T) for m in (model, twin)]
        grads = [torch.autograd.grad(o.pow(2).sum(), (x, m.decays[0].S)) for o, m in zip(outs, (model, twin))]
        assert rel_err(outs[0], outs[1]) < 1e-5
        for got, want in zip(*grads):
            assert rel_err(got, want) < 1e-5


def test_patch_probes_half_precision_modules_in_float32_and_restores_matmul_precision():
    torch.manual_seed(0)
    model = _TinyReferenceDFM().to(torch.bfloat16)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        assert list(dfm_fused.patch(model)) == ["decay"]
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(previous)
    assert model.decay.Q.dtype == torch.bfloat16


def test_patch_keeps_the_golden_reference_resnet18_exact_in_training():
    """The real dfbmodels weights in the literal transcription: training mode (QR at T=0,
    BatchNorm statistics), T=3; patched and unpatched agree to float32 rounding."""
    from dfm_fused import models
    from dfm_fused.models.reference import ReferenceResNet18

    golden = load_golden()
    case = golden["cases"][0]
    assert case["training"]
    model = ReferenceResNet18(**golden["config"])
    models.load_reference_state_dict(model, golden["state_dict"])
    twin = copy.deepcopy(model)
    assert list(dfm_fused.patch(model)) == ["error_head"]
    results = []
    for m in (twin, model):
        m.train()
        logits = m(case["x"], case["T"], h0=case["h0"], atol=case["atol"])
        (logits * case["w"]).sum().backward()
        results.append((logits.detach(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None}))
    (expected, expected_grads), (logits, grads) = results
    assert rel_err(logits, expected) < 1e-5
    assert grads.keys() == expected_grads.keys() and "error_head.Q" in grads
    for name, g in expected_grads.items():
        assert rel_err(grads[name], g) < 1e-5, name
    assert rel_err(model.error_head.Q, twin.error_head.Q) < 1e-6  # both re-orthogonalised at T=0
