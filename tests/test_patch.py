"""``dfm_fused.patch``: reference StateExpDecay modules swapped for the fused one in place."""
from __future__ import annotations

import copy
import re

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
    (_NoQR, "training at T=0, its own parameter values: Q after the call differs"),
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


# --- probed off the defaults: one look-alike per parameter it gets wrong ----------------------

class _DfbLookAlike(reference.StateExpDecay):
    """dfbmodels' module with the step time ``time(T)`` and the rates ``delta()`` overridable."""

    def time(self, T):
        return self.T * T

    def delta(self):
        return _delta(self)

    def forward(self, x, T=5):
        if self.training and T == 0:
            self.reorthogonalize(self.Q)
        return _pixels(self.Q.t(), reference.ExpDecay.apply(_pixels(self.Q, x), self.time(T), self.delta()))


class _IgnoresT(_DfbLookAlike):
    """t = T: its T parameter unused (the same at a fresh module's T = 1)."""

    def time(self, T):
        return torch.as_tensor(float(T), dtype=self.S.dtype)


class _IgnoresTau(_DfbLookAlike):
    def delta(self):
        return -torch.abs(self.S) ** self.alpha


class _IgnoresAlpha(_DfbLookAlike):
    def delta(self):
        return (1 / self.tau) * -1.0 * torch.abs(self.S)


class _IgnoresS(_DfbLookAlike):
    def delta(self):
        return (1 / self.tau) * -1.0 * torch.ones_like(self.S)


class _SignedS(_DfbLookAlike):
    """S**alpha for |S|**alpha: NaN at a negative entry and a fractional alpha."""

    def delta(self):
        return (1 / self.tau) * -1.0 * self.S ** self.alpha


class _OddPowerOfS(_DfbLookAlike):
    """S |S|**(alpha - 1) for |S|**alpha: a negative entry grows instead of decaying."""

    def delta(self):
        return (1 / self.tau) * -1.0 * self.S * torch.abs(self.S) ** (self.alpha - 1)


class _CapsS(_DfbLookAlike):
    """|S| capped at 2: exact at the probe's values, not at this module's own S = 3."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        with torch.no_grad():
            self.S.fill_(3.0)

    def delta(self):
        return (1 / self.tau) * -1.0 * torch.abs(self.S).clamp(max=2.0) ** self.alpha


class _NeumannSeriesOfTheStep(NeumannDecayStage):
    """feedback_segmentation's surrogate with its series length taken from the step T alone."""

    @staticmethod
    def forward(ctx, z, t, step, delta):
        ctx.save_for_backward(z, step, delta)
        return z * torch.exp(t * delta)[None, :, None, None]

    @staticmethod
    def backward(ctx, g):
        grad_z, _, grad_delta = NeumannDecayStage.backward(ctx, g)
        return grad_z, None, None, grad_delta


class _SeriesOfTheStep(SegmentationStateExpDecay):
    """feedback_segmentation's module whose surrogate backward sums int(T) terms, not int(self.T * T)."""

    def forward(self, x, T=5):
        delta = (1 / self.tau) * -1.0 * torch.abs(self.S) ** self.alpha
        step = torch.as_tensor(float(T), dtype=self.S.dtype)
        return _pixels(self.Qinv, _NeumannSeriesOfTheStep.apply(_pixels(self.Q, x), self.T * T, step, delta))


_RANDOMISED = "randomised S, T, tau, alpha"


@pytest.mark.parametrize("cls, says", [
    (_IgnoresT, "eval at T=2 (tensor), randomised S, T, tau, alpha: output differs"),
    (_IgnoresTau, "eval at T=2 (tensor), randomised S, T, tau, alpha: output differs"),
    (_IgnoresAlpha, "eval at T=2 (tensor), randomised S, T, tau, alpha: output differs"),
    (_IgnoresS, "eval at T=2 (tensor), randomised S, T, tau, alpha: output differs"),
    (_SignedS, "randomised S, T, tau, alpha: output is not finite in the module's result"),
    (_OddPowerOfS, "eval at T=2 (tensor), randomised S, T, tau, alpha: output differs"),
    (_SeriesOfTheStep, "training at T=3 (tensor), randomised S, T, tau, alpha: grad of the input differs"),
])
def test_patch_refuses_a_look_alike_that_matches_only_at_a_fresh_modules_values(cls, says):
    """Each computes what the module it imitates computes at S = 1, T = 1, tau = 1, alpha = 1
    (so the probe at its own values passes) and gets one parameter wrong elsewhere."""
    torch.manual_seed(0)
    model = _Holder(reference.StateExpDecay(6, (2, 2), tau=1.0), cls(6, (2, 2), tau=1.0))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(dfm_fused.NotExactError) as info:
        dfm_fused.patch(model)
    message = str(info.value)
    assert f"'decays.1' ({cls.__module__}.{cls.__qualname__})" in message and "decays.0" not in message, message
    # The configuration it imitates differs only at the randomised values.
    imitated = "[output_map='QT'" if issubclass(cls, reference.StateExpDecay) else "backward='neumann']"
    line = next(line for line in message.splitlines() if imitated in line)
    assert says in line and "its own parameter values" not in line, line
    assert re.search(r"\(randomised S, T, tau, alpha: T=0\.\d+, tau=[12]\.\d+, alpha=1\.\d+, "
                     r"S from -\d\.\d+ to \d\.\d+ \(3 of 6 negative\)\)", message), message
    assert type(model.decays[0]) is reference.StateExpDecay and type(model.decays[1]) is cls
    for k, v in model.state_dict().items():  # the values the probe set were the copies'
        assert torch.equal(v, state[k]), k
    # The probe at the module's own values alone (all there was) passes it; elsewhere it is wrong:
    look_alike = model.decays[1]
    twin = (reference.StateExpDecay if issubclass(cls, reference.StateExpDecay) else SegmentationStateExpDecay)(6, (2, 2))
    twin.load_state_dict(look_alike.state_dict())
    for m in (look_alike, twin):
        with torch.no_grad():
            m.T.fill_(0.25), m.tau.fill_(0.4), m.alpha.fill_(1.5)
            m.S.copy_(torch.linspace(-2.0, 1.5, 6))
    x = torch.randn(2, 6, 3, 3, requires_grad=True)
    outs = [m.eval()(x, T=3) for m in (look_alike, twin)]
    grads = [torch.autograd.grad(out.sum(), x)[0] for out in outs]
    assert not (rel_err(*outs) < 1e-3 and rel_err(*grads) < 1e-3)


def test_patch_refuses_a_look_alike_that_differs_only_at_its_own_values():
    """_CapsS is exact at the randomised values (|S| < 2 there) and wrong at its own S = 3."""
    model = _Holder(_CapsS(6, (2, 2), tau=0.5))
    with pytest.raises(dfm_fused.NotExactError, match=r"eval at T=2 \(tensor\), its own parameter values: "
                                                       r"output differs") as info:
        dfm_fused.patch(model)
    assert _RANDOMISED + ":" not in str(info.value)


@pytest.mark.parametrize("filters", [1, 2, 7, 64])
def test_probe_values_move_the_reference_output_with_each_parameter(filters):
    """At the probe's values no channel's decay underflows (exp(t Delta) > 0.03 at step 3) and
    the reference output moves by more than 5% when any one of S, T, tau, alpha is put back at
    1 (what a module ignoring it computes), or S is used for |S|: the comparison is not vacuous."""
    from dfm_fused._patch_probe import probe_values

    values = probe_values(filters)
    S, T, tau, alpha = values["S"], values["T"], values["tau"], values["alpha"]
    assert (S < 0).any() and (S.abs() - 1).abs().min() > 0.25 and T % 1 != 0 and alpha % 1 != 0
    if filters > 1:
        assert (S > 0).any() and S.abs().max() / S.abs().min() > 1.5
    assert torch.exp(3 * T * -(S.abs() ** alpha) / tau).min() > 0.03
    Q = torch.linalg.qr(torch.randn(filters, filters, dtype=torch.float64))[0]
    x = torch.randn(2, filters, 3, 5, dtype=torch.float64)
    one = torch.ones((), dtype=torch.float64)
    probed = reference.exp_decay(x, Q, S, T * 2, tau, alpha)
    for name, changed in [("S", (x, Q, torch.ones_like(S), T * 2, tau, alpha)), ("T", (x, Q, S, one * 2, tau, alpha)),
                          ("tau", (x, Q, S, T * 2, one, alpha)), ("alpha", (x, Q, S, T * 2, tau, one))]:
        assert rel_err(reference.exp_decay(*changed), probed) > 0.05, name
    signed = torch.exp(T * 2 * -(S.clamp(min=0) ** alpha) / tau)  # S**alpha: NaN where S < 0
    assert torch.isnan(S ** alpha).any() and not torch.isnan(signed).any()


@pytest.mark.parametrize("module", ["dfbmodels", "feedback_segmentation"])
def test_patch_is_exact_at_the_modules_own_values_off_the_defaults(module):
    """The reference modules with T = 0.25, a negative and non-uniform S, fractional alpha:
    accepted, and the swapped module computes what the old one did."""
    torch.manual_seed(0)
    if module == "dfbmodels":
        decay = reference.StateExpDecay(5, (2, 2), tau=0.3, alpha=1.7)
    else:
        decay = SegmentationStateExpDecay(5, (2, 2), tau=0.3, alpha=1.7)
    with torch.no_grad():
        decay.T.fill_(0.25)
        decay.S.copy_(torch.tensor([-1.5, 0.4, 2.0, -0.7, 1.1]))
    model = _Holder(decay)
    twin = copy.deepcopy(model)
    assert list(dfm_fused.patch(model)) == ["decays.0"]
    x = torch.randn(2, 5, 3, 3, requires_grad=True)
    for train in (False, True):
        for T in (0, 3, 7):
            outs = [m.train(train).decays[0](x, T=T) for m in (model, twin)]
            weight = torch.randn(outs[0].shape)
            grads = [torch.autograd.grad((o * weight).sum(), x) for o in outs]
            assert rel_err(outs[0], outs[1]) < 1e-5, (train, T)
            assert rel_err(grads[0][0], grads[1][0]) < 1e-5, (train, T)
            assert rel_err(model.decays[0].Q, twin.decays[0].Q) < 1e-6


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




# --- matmul precision: torch >= 2.9's per-backend settings, the legacy one, each restored as set -----

_NEW_PRECISION_API = hasattr(torch._C, "_get_fp32_precision_getter")
# torch's (backend, op) settings that float32 matmuls read, each inheriting from the next while "none".
_SETTINGS = (("generic", "all"), ("cuda", "all"), ("mkldnn", "all"), ("cuda", "matmul"), ("mkldnn", "matmul"))


def _torch_default_precisions():
    """torch's start-up state: the legacy value "highest", every per-backend setting inheriting."""
    torch.set_float32_matmul_precision("highest")
    for setting in _SETTINGS:
        torch._C._set_fp32_precision_setter(*setting, "none")


def _read_precisions():
    return {setting: torch._C._get_fp32_precision_getter(*setting) for setting in _SETTINGS}


def _legacy_precision():
    try:
        return torch.get_float32_matmul_precision()
    except RuntimeError:
        return "raises (legacy and per-backend settings disagree)"


class _RecordsPrecisions(reference.StateExpDecay):
    """dfbmodels' module, noting the float32 matmul settings each call runs under."""

    seen = []

    def forward(self, x, T=5):
        self.seen.append((torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision))
        return super().forward(x, T)


def _set_public(path, value):
    node = torch.backends
    for part in filter(None, path.split(".")):
        node = getattr(node, part)
    node.fp32_precision = value


# name: (how the user sets it, the (backend, op) settings that hold their own value afterwards)
_PRECISION_CASES = {
    "cuda.matmul tf32": (lambda: _set_public("cuda.matmul", "tf32"), {("cuda", "matmul")}),
    "mkldnn.matmul bf16": (lambda: _set_public("mkldnn.matmul", "bf16"), {("mkldnn", "matmul")}),
    "cudnn tf32": (lambda: _set_public("cudnn", "tf32"), {("cuda", "all")}),
    "mkldnn all tf32": (lambda: torch._C._set_fp32_precision_setter("mkldnn", "all", "tf32"), {("mkldnn", "all")}),
    "global tf32": (lambda: _set_public("", "tf32"), set()),
    "global and cuda.matmul tf32": (lambda: (_set_public("", "tf32"), _set_public("cuda.matmul", "tf32")),
                                    {("cuda", "matmul")}),
    "legacy high": (lambda: torch.set_float32_matmul_precision("high"), {("cuda", "matmul"), ("mkldnn", "matmul")}),
    "legacy medium": (lambda: torch.set_float32_matmul_precision("medium"),
                      {("cuda", "matmul"), ("mkldnn", "matmul")}),
}


@pytest.mark.skipif(not _NEW_PRECISION_API, reason="torch < 2.9 has the legacy API only")
@pytest.mark.parametrize("case", list(_PRECISION_CASES))
def test_patch_probes_in_full_precision_under_either_api_and_restores_each_setting(case):
    """Set by torch >= 2.9's per-backend API (after which torch.get_float32_matmul_precision()
    raises) or by the legacy one: patch() probes with both matmul settings at "ieee" and leaves
    every setting as it was stored, the inheriting ones ("none") still inheriting. Starts from
    and returns to torch's start-up settings."""
    set_by_user, explicit = _PRECISION_CASES[case]
    _RecordsPrecisions.seen.clear()
    try:
        _torch_default_precisions()
        set_by_user()
        before, legacy = _read_precisions(), _legacy_precision()
        model = _Holder(_RecordsPrecisions(6, (2, 2), tau=0.5))
        assert list(dfm_fused.patch(model)) == ["decays.0"]
        assert _RecordsPrecisions.seen and set(_RecordsPrecisions.seen) == {("ieee", "ieee")}
        assert _read_precisions() == before
        assert _legacy_precision() == legacy
        # What was set keeps its value, what inherited still inherits: move the global setting and look.
        for value in ("ieee", "tf32"):
            torch._C._set_fp32_precision_setter("generic", "all", value)
            for backend in ("cuda", "mkldnn"):
                for op in ("all", "matmul"):
                    chain = {(backend, op), (backend, "all")}
                    want = value if not chain & explicit else before[(backend, op)]
                    assert torch._C._get_fp32_precision_getter(backend, op) == want, (backend, op, value)
    finally:
        _torch_default_precisions()
