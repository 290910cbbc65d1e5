"""``general_exp_decay`` and ``StateExpDecay(output_map="Qinv")``: feedback_segmentation's decay."""
from __future__ import annotations

import pytest
import torch

import dfm_fused
from dfm_fused import functional as F
from dfm_fused.ops.general_exp_decay import torch_backend

from _feedback_segmentation import NeumannDecayStage, SegmentationStateExpDecay
from _helpers import assert_close, needs_cuda_build


def _inputs(C=6, shape=(2, 6, 3, 4), dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=dtype).requires_grad_()
    Q = torch.randn(C, C, generator=g, dtype=dtype).requires_grad_()
    Qinv = torch.randn(C, C, generator=g, dtype=dtype).requires_grad_()  # no relation to Q
    S = (torch.rand(C, generator=g, dtype=dtype) + 0.5).requires_grad_()
    return x, Q, Qinv, S


def _literal_exact(x, Q, Qinv, S, t, tau, alpha):
    """``Qinv diag(exp(t Delta)) Q x`` by plain autograd-differentiated ops: the exact derivative."""
    delta = (1 / tau) * -1.0 * torch.abs(S) ** alpha
    z = torch.einsum("ij,bjhw->bihw", Q, x) * torch.exp(t * delta)[None, :, None, None]
    return torch.einsum("ij,bjhw->bihw", Qinv, z)


def _literal_neumann(x, Q, Qinv, S, t, tau, alpha):
    delta = (1 / tau) * -1.0 * torch.abs(S) ** alpha
    z = torch.einsum("ij,bjhw->bihw", Q, x)
    return torch.einsum("ij,bjhw->bihw", Qinv, NeumannDecayStage.apply(z, t, delta))


def _grads(out, inputs, seed=1):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad(out, inputs, g, allow_unused=True)


@pytest.mark.parametrize("shape", [(2, 6, 3, 4), (1, 6, 1, 2)], ids=["pixels>=C", "pixels<C"])
def test_exact_backward_passes_gradcheck(shape):
    x, Q, Qinv, S = (a.detach().double().requires_grad_() for a in _inputs(shape=shape))
    tau = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    alpha = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: F.general_exp_decay(*a), (x, Q, Qinv, S, t, tau, alpha))


def test_exact_matches_autograd_of_the_literal_form_in_float32():
    x, Q, Qinv, S = _inputs()
    tau, alpha = torch.tensor(0.7), torch.tensor(1.3)
    inputs = (x, Q, Qinv, S)
    out = F.general_exp_decay(x, Q, Qinv, S, 3, tau, alpha)
    expected = _literal_exact(x, Q, Qinv, S, torch.tensor(3.0), tau, alpha)
    assert_close(out, expected, torch.float32, "output")
    for name, got, want in zip(("x", "Q", "Qinv", "S"), _grads(out, inputs), _grads(expected, inputs)):
        assert_close(got, want, torch.float32, f"grad {name}")


@pytest.mark.parametrize("t", [0, 1, 2, 5, 2.5, "tensor"])
def test_neumann_matches_feedback_segmentations_surrogate(t):
    x, Q, Qinv, S = _inputs()
    with torch.no_grad():
        S[0] = 0.0  # Delta = 0: the series is n + 1 there
        S[1] = 1e-4  # |Delta| << 1: 1 - e^Delta cancels
    tau, alpha = torch.tensor(0.5), torch.tensor(1.5)
    t_ref = torch.tensor(3.0) if t == "tensor" else torch.tensor(float(t))
    t_op = t_ref if t == "tensor" else t
    inputs = (x, Q, Qinv, S)
    out = F.general_exp_decay(x, Q, Qinv, S, t_op, tau, alpha, backward="neumann")
    expected = _literal_neumann(x, Q, Qinv, S, t_ref, tau, alpha)
    assert_close(out, expected, torch.float32, "output")
    got, want = _grads(out, inputs), _grads(expected, inputs)
    for name, a, b in zip(("x", "Q", "Qinv", "S"), got, want):
        assert_close(a, b, torch.float32, f"grad {name}")
    # The surrogate is not the derivative: guard against the two being the same by accident.
    exact = _grads(_literal_exact(x, Q, Qinv, S, t_ref, tau, alpha), inputs)
    assert (got[0] - exact[0]).norm() > 1e-2 * exact[0].norm()


def test_neumann_backward_reads_nothing_back_from_the_device(monkeypatch):
    x, Q, Qinv, S = _inputs()
    t = torch.tensor(2.0)
    expected = _grads(_literal_neumann(x, Q, Qinv, S, t, torch.tensor(0.5), torch.tensor(1.5)), (x, Q, Qinv, S))

    def host_read(self, *args):
        raise AssertionError("a tensor value was read on the host")

    for method in ("item", "tolist", "__int__", "__float__", "__bool__", "__index__"):
        monkeypatch.setattr(torch.Tensor, method, host_read)
    out = torch_backend.general_exp_decay(x, Q, Qinv, S, t, torch.tensor(0.5), torch.tensor(1.5), "neumann")
    got = _grads(out, (x, Q, Qinv, S))
    monkeypatch.undo()
    for name, a, b in zip(("x", "Q", "Qinv", "S"), got, expected):
        assert_close(a, b, torch.float32, f"grad {name}")


def test_backends_without_the_general_mix_decline_with_the_reason():
    x, Q, Qinv, S = _inputs()
    runnable = [b for b in dfm_fused.available_backends("cpu") if b != "torch"]
    assert "reference" in runnable
    for backend in runnable:  # these run the other ops here, and decline this one with the reason
        with pytest.raises(dfm_fused.BackendUnavailable, match=f"backend '{backend}' does not run general_exp_decay: "
                           "(its kernels implement only the symmetric mix|it transcribes dfbmodels)"):
            F.general_exp_decay(x, Q, Qinv, S, 1, 0.5, 1.0, backend=backend)
    for backend in ("extension", "triton"):
        with pytest.raises(dfm_fused.BackendUnavailable, match=f"backend '{backend}'"):
            F.general_exp_decay(x, Q, Qinv, S, 1, 0.5, 1.0, backend=backend)
    from dfm_fused import _dispatch

    assert _dispatch.resolve("general_exp_decay", "cpu")[0] == "torch"


def test_bad_arguments_name_themselves():
    x, Q, Qinv, S = _inputs()
    with pytest.raises(ValueError, match="backward: expected 'exact' or 'neumann'; got 'surrogate'"):
        F.general_exp_decay(x, Q, Qinv, S, 1, 0.5, 1.0, backward="surrogate")
    with pytest.raises(ValueError, match=r"Qinv: expected the shape of Q \(6, 6\); got \(6, 5\)"):
        F.general_exp_decay(x, Q, Qinv[:, :5], S, 1, 0.5, 1.0)
    with pytest.raises(ValueError, match="t: expected a number >= 0"):
        F.general_exp_decay(x, Q, Qinv, S, -1, 0.5, 1.0, backward="neumann")
    with pytest.raises(ValueError, match="output_map: expected 'QT' or 'Qinv'; got 'Q'"):
        dfm_fused.StateExpDecay(4, (2, 2), output_map="Q")
    with pytest.raises(ValueError, match="backward: 'neumann' .* needs output_map='Qinv'"):
        dfm_fused.StateExpDecay(4, (2, 2), backward="neumann")


def _fused_twin(reference: SegmentationStateExpDecay, backward="neumann") -> dfm_fused.StateExpDecay:
    fused = dfm_fused.StateExpDecay(reference.filters, (2, 2), output_map="Qinv", backward=backward)
    fused.load_state_dict({k: v for k, v in reference.state_dict().items() if k != "W"})
    for name, p in fused.named_parameters():
        p.requires_grad_(getattr(reference, name).requires_grad)
    return fused


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("T", [0, 1, 3])
def test_module_matches_the_transcribed_module(training, T):
    torch.manual_seed(0)
    reference = SegmentationStateExpDecay(6, (2, 2), tau=0.3, alpha=1.5)
    with torch.no_grad():
        reference.S.uniform_(0.5, 1.5)
        reference.Q.add_(0.1 * torch.randn(6, 6))  # not orthogonal: no QR must touch it
    reference.Q.requires_grad_(True)
    fused = _fused_twin(reference).train(training)
    reference.train(training)
    Q_before = reference.Q.detach().clone()
    x = torch.randn(2, 6, 3, 4, requires_grad=True)
    results = []
    for module in (reference, fused):
        out = module(x, T=torch.tensor(float(T)))
        results.append((out, _grads(out, (x, module.Q, module.S))))
    (expected, want), (out, got) = results
    assert torch.equal(fused.Q.detach(), Q_before)
    assert_close(out, expected, torch.float32, "output")
    for name, a, b in zip(("x", "Q", "S"), got, want):
        assert_close(a, b, torch.float32, f"grad {name}")


def test_qinv_module_defaults_start_from_the_dfbmodels_decay():
    torch.manual_seed(0)
    general = dfm_fused.StateExpDecay(5, (2, 2), tau=0.5, output_map="Qinv")
    symmetric = dfm_fused.StateExpDecay(5, (2, 2), tau=0.5).eval()
    symmetric.load_state_dict(general.state_dict())
    assert torch.equal(general.Qinv, general.Q.t()) and general.S.requires_grad
    assert "output_map='Qinv', backward='exact'" in repr(general)
    x = torch.randn(2, 5, 3, 3)
    assert_close(general(x, T=2), symmetric(x, T=2), torch.float32, "output")


class _HostTransfers(torch.utils._python_dispatch.TorchDispatchMode):
    """Records host-to-device copies and device-to-host reads (``_local_scalar_dense``)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        results = [o for o in torch.utils._pytree.tree_leaves(out) if isinstance(o, torch.Tensor)]
        host_to_device = func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default) and any(
            a.device.type == "cpu" for a in tensors) and any(o.device.type != "cpu" for o in results)
        if host_to_device or func is torch.ops.aten._local_scalar_dense.default:
            self.seen.append(str(func))
        return out


@needs_cuda_build
@pytest.mark.parametrize("t", ["number", "device tensor"])
def test_neumann_forward_and_backward_copy_nothing_between_host_and_device_on_fake_cuda(t):
    """CPU proxy of the sync check below: on fake CUDA tensors no host-to-device copy and no
    read-back, forward and backward (the original reads T back in every backward). The autograd
    engine needs a real device, so the backward is called directly, with every input needing a
    gradient."""
    import types

    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 6, 3, 4, device="cuda", requires_grad=True)
        Q = torch.empty(6, 6, device="cuda", requires_grad=True)
        Qinv = torch.empty(6, 6, device="cuda", requires_grad=True)
        S = torch.ones(6, device="cuda", requires_grad=True)
        step = 2.0 if t == "number" else torch.empty((), device="cuda")
        with _HostTransfers() as transfers:
            out = F.general_exp_decay(x, Q, Qinv, S, step, 0.5, 1.5, backward="neumann")
            delta = torch.empty(6, device="cuda")
            t_saved = torch.tensor(2.0) if t == "number" else step  # a number arrives as a 0-d CPU tensor
            ctx = types.SimpleNamespace(saved_tensors=(x, Q, Qinv, delta, t_saved), neumann=True,
                                        needs_input_grad=(True,) * 5 + (False,))
            grads = torch_backend.GeneralExpDecayFunction.backward(ctx, torch.empty_like(out))
    assert transfers.seen == []
    assert [g is not None for g in grads] == [True, True, True, True, False, False]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backward", ["exact", "neumann"])
def test_general_decay_does_not_sync_with_the_host_on_cuda(backward):
    x, Q, Qinv, S = (a.detach().cuda().requires_grad_() for a in _inputs())
    t = torch.tensor(3.0, device="cuda")

    def run():
        out = F.general_exp_decay(x, Q, Qinv, S, t, 0.5, 1.5, backward=backward)
        return torch.autograd.grad(out.square().sum(), (x, Q, Qinv, S))

    expected = run()
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = run()
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    for a, e in zip(got, expected):
        torch.testing.assert_close(a, e)
