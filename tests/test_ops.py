"""Every fused op on every CPU backend against the literal reference, forward and backward."""
import pytest
import torch

import dfm_fused
from dfm_fused import reference

from _helpers import TOLERANCE, assert_close, cpu_backends, decay_args, grads, rel_err

SHAPES = [(1, 12, 1, 1), (3, 20, 7, 5), (2, 36, 4, 4), (1, 8, 16, 16)]
DTYPES = [torch.float32, torch.float64]


def _layout(t, layout):
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided":
        # A non-contiguous view with the same values: every other column of a wider tensor.
        wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        wide[..., ::2] = t
        return wide[..., ::2]
    return t


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_exp_decay_matches_reference(backend, shape, dtype, layout):
    B, C, H, W = shape
    x = _layout(torch.randn(shape, dtype=dtype), layout).requires_grad_()
    Q, S = decay_args(C, dtype)
    args = (x, Q, S, 3.0, 0.7, 1.3)
    out = dfm_fused.exp_decay(*args, backend=backend)
    expected = reference.exp_decay(*args)
    assert out.dtype == x.dtype
    assert_close(out, expected, dtype, "out")
    g = torch.randn_like(expected)
    for name, a, e in zip(("x", "Q"), grads(out, (x, Q), g), grads(expected, (x, Q), g)):
        assert_close(a, e, dtype, f"grad_{name}")


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("shape,groups", [((1, 12, 1, 1), 4), ((3, 20, 7, 5), 5), ((2, 36, 4, 4), 1), ((3, 24, 2, 3), 24)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_state_update_matches_reference(backend, shape, groups, dtype, layout):
    C = shape[1]
    h = _layout(torch.randn(shape, dtype=dtype), layout).requires_grad_()
    y = _layout(3 * torch.randn(shape, dtype=dtype) + 1, layout).requires_grad_()
    Q, S = decay_args(C, dtype)
    args = (h, y, Q, S, 2.0, 0.9, 0.8, groups, 1e-5)
    out = dfm_fused.state_update(*args, backend=backend)
    expected = reference.state_update(*args)
    assert out.dtype == h.dtype
    assert_close(out, expected, dtype, "out")
    g = torch.randn_like(expected)
    for name, a, e in zip(("h", "y", "Q"), grads(out, (h, y, Q), g), grads(expected, (h, y, Q), g)):
        assert_close(a, e, dtype, f"grad_{name}")


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize(
    "x_shape,h_shape,offset,fb,groups",
    [
        ((1, 5, 1, 1), (1, 12, 1, 1), 4, 8, 2),  # 1x1 everywhere
        ((3, 6, 11, 9), (3, 20, 3, 2), 12, 8, 4),  # odd upsampling factors
        ((2, 4, 7, 5), (2, 10, 7, 5), 0, 6, 3),  # same size: the resize is the identity
        ((2, 3, 4, 4), (2, 9, 8, 8), 3, 6, 6),  # downsampling
    ],
)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_feedback_input_matches_reference(backend, x_shape, h_shape, offset, fb, groups, dtype, layout):
    x = _layout(torch.randn(x_shape, dtype=dtype), layout).requires_grad_()
    h = _layout(2 * torch.randn(h_shape, dtype=dtype), layout).requires_grad_()
    out = dfm_fused.feedback_input(x, h, offset, fb, groups, 1e-5, backend=backend)
    expected = reference.feedback_input(x, h, offset, fb, groups, 1e-5)
    assert_close(out, expected, dtype, "out")
    g = torch.randn_like(expected)
    for name, a, e in zip(("x", "h"), grads(out, (x, h), g), grads(expected, (x, h), g)):
        assert_close(a, e, dtype, f"grad_{name}")


@pytest.mark.parametrize("backend", cpu_backends())
def test_feedback_input_grad_x_is_a_view_of_the_incoming_gradient(backend):
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    h = torch.randn(2, 8, 3, 3, requires_grad=True)
    out = dfm_fused.feedback_input(x, h, 2, 4, 2, backend=backend)
    g = torch.randn_like(out)
    grad_x, = torch.autograd.grad(out, x, g)
    assert grad_x.data_ptr() == g.data_ptr()
    assert torch.equal(grad_x, g[:, :4])


@pytest.mark.parametrize("backend", cpu_backends())
def test_gradcheck_float64(backend):
    C = 6
    Q, S = decay_args(C, torch.float64)
    x = torch.randn(2, C, 3, 2, dtype=torch.float64, requires_grad=True)
    h = torch.randn(2, C, 3, 2, dtype=torch.float64, requires_grad=True)
    xf = torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, Q: dfm_fused.exp_decay(x, Q, S, 2.0, 0.5, 1.0, backend=backend), (x, Q))
    assert torch.autograd.gradcheck(
        lambda h, y, Q: dfm_fused.state_update(h, y, Q, S, 1.0, 0.5, 1.0, 3, 1e-5, backend=backend), (h, x, Q)
    )
    # Fewer pixels than channels but more than half as many (as at the operating point): M is
    # formed in the forward and kept for the backward.
    h4, y4 = (torch.randn(2, C, 1, 2, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(
        lambda h, y, Q: dfm_fused.state_update(h, y, Q, S, 1.0, 0.5, 1.0, 3, 1e-5, backend=backend), (h4, y4, Q)
    )
    assert torch.autograd.gradcheck(
        lambda xf, h: dfm_fused.feedback_input(xf, h, 2, 4, 2, 1e-5, backend=backend), (xf, h)
    )


def _gemm_calls(fn) -> int:
    """BLAS calls (aten::mm/addmm/bmm, at any depth) in ``fn()``, counted by the profiler."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.name in ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm") for e in prof.events())


@pytest.mark.parametrize("backend", cpu_backends())
def test_state_update_keeps_M_for_its_backward(backend):
    """With fewer pixels than channels but more than half as many (as at the operating point,
    C=528 for 512 pixels), the forward forms M and keeps it: five GEMMs in forward + backward
    (M, M·GN(y); M·g, A, Q(A + A^T)) against the reference's six, with equal gradients (checked
    at such shapes by test_state_update_matches_reference and test_gradcheck_float64). Without a
    gradient for y, M is not needed in backward and not formed."""
    B, C = 5, 24
    Q, S = decay_args(C)
    Q.requires_grad_()
    h, y = (torch.randn(B, C, 2, 2, requires_grad=True) for _ in range(2))

    def run(fn, y, inputs):
        out = fn(h, y, Q, S, 2.0, 0.9, 0.8, 4)
        torch.autograd.grad(out, inputs, torch.randn_like(out))

    ours = lambda *a: dfm_fused.state_update(*a, backend=backend)  # noqa: E731
    assert _gemm_calls(lambda: run(reference.state_update, y, (h, y, Q))) == 6
    assert _gemm_calls(lambda: run(ours, y, (h, y, Q))) == 5
    # y without a gradient: Q, D, Q^T applied in turn in forward (2), A and Q(A + A^T) in backward (2).
    assert _gemm_calls(lambda: run(ours, y.detach(), (h, Q))) == 4


@pytest.mark.parametrize("backend", cpu_backends())
def test_ops_accept_tensor_scalars_and_large_t(backend):
    """t, tau, alpha as 0-d tensors (as the modules pass them); huge t decays to exactly M = 0."""
    C = 10
    Q, S = decay_args(C)
    x = torch.randn(2, C, 3, 3)
    t, tau, alpha = torch.tensor(4.0), torch.tensor(0.5), torch.tensor(2.0)
    out = dfm_fused.exp_decay(x, Q, S, t, tau, alpha, backend=backend)
    assert_close(out, reference.exp_decay(x, Q, S, t, tau, alpha), torch.float32)
    far = dfm_fused.exp_decay(x, Q, S, 1e6, 0.1, 1.0, backend=backend)
    assert torch.isfinite(far).all() and far.abs().max() == 0


@pytest.mark.parametrize("backend", cpu_backends())
def test_half_precision_inputs_keep_their_dtype(backend):
    C = 16
    Q, S = decay_args(C)
    h = torch.randn(2, C, 4, 4)
    for dtype in (torch.float16, torch.bfloat16):
        y = torch.randn(2, C, 4, 4).to(dtype)
        out = dfm_fused.state_update(h, y, Q, S, 1.0, 1.0, 1.0, 4, backend=backend)
        expected = reference.state_update(h, y.float(), Q, S, 1.0, 1.0, 1.0, 4)
        assert out.dtype == torch.float32
        assert_close(out, expected, torch.float32, "half y")
        x = torch.randn(2, C, 4, 4).to(dtype)
        out = dfm_fused.exp_decay(x, Q, S, 1.0, 1.0, 1.0, backend=backend)
        assert out.dtype == dtype
        assert_close(out, reference.exp_decay(x.float(), Q, S, 1.0, 1.0, 1.0).to(dtype), dtype, "half x")
    assert TOLERANCE[torch.bfloat16] >= TOLERANCE[torch.float16]


def _skip_float64(backend, dtype):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the triton backend takes no float64")


def _uniform_decay(C, dtype):
    """An orthonormal Q (QR in float64, then rounded) and a uniform S: the scalar-decay promise."""
    Q, _ = decay_args(C, dtype)
    return Q, torch.full((C,), 0.8, dtype=dtype)


# (3, 40, 2, 2): fewer pixels than channels, as at the operating point (docs/design.md, 'The operating point').
SCALAR_SHAPES = [((3, 40, 2, 2), 8), ((2, 12, 5, 7), 3), ((1, 6, 1, 1), 2)]


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("shape,groups", SCALAR_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_scalar_decay_matches_reference_on_orthonormal_Q(backend, shape, groups, dtype, layout):
    """With the promise kept, the scalar path equals the general reference, gradients of Q included."""
    _skip_float64(backend, dtype)
    Q, S = _uniform_decay(shape[1], dtype)
    h = _layout(torch.randn(shape, dtype=dtype), layout).requires_grad_()
    y = _layout(3 * torch.randn(shape, dtype=dtype) + 1, layout).requires_grad_()
    g = torch.randn(shape, dtype=dtype)
    args = (h, y, Q, S, 2.0, 0.9, 0.8, groups, 1e-5)
    out = dfm_fused.state_update(*args, scalar_decay=True, backend=backend)
    expected = reference.state_update(*args)
    assert out.dtype == h.dtype
    assert_close(out, expected, dtype, "state_update")
    for name, a, e in zip(("h", "y", "Q"), grads(out, (h, y, Q), g), grads(expected, (h, y, Q), g)):
        assert_close(a, e, dtype, f"state_update grad_{name}")
    out = dfm_fused.exp_decay(y, Q, S, 2.0, 0.9, 0.8, scalar_decay=True, backend=backend)
    expected = reference.exp_decay(y, Q, S, 2.0, 0.9, 0.8)
    assert_close(out, expected, dtype, "exp_decay")
    for name, a, e in zip(("x", "Q"), grads(out, (y, Q), g), grads(expected, (y, Q), g)):
        assert_close(a, e, dtype, f"exp_decay grad_{name}")


@pytest.mark.parametrize("backend", cpu_backends())
def test_scalar_decay_computes_d_times_x_whatever_Q(backend):
    """The flag really selects the scalar path: on a Q that is not orthonormal the output is
    exp(t * Delta) x (the promise broken), not the reference's M x, which is 3%+ away."""
    C = 24
    dtype = torch.float32 if backend == "triton" else torch.float64
    Q, S = _uniform_decay(C, dtype)
    with torch.no_grad():
        Q.add_(1e-2 * torch.randn(C, C, dtype=dtype))
    x = torch.randn(3, C, 2, 3, dtype=dtype)
    h = torch.randn(3, C, 2, 3, dtype=dtype)
    t, tau = 2.0, 0.5
    d = torch.exp(torch.tensor(-t / tau * 0.8, dtype=dtype))
    out = dfm_fused.exp_decay(x, Q, S, t, tau, 1.0, scalar_decay=True, backend=backend)
    assert_close(out, d * x, dtype, "exp_decay")
    assert rel_err(reference.exp_decay(x, Q, S, t, tau, 1.0), d * x) > 1e-2
    n = torch.nn.functional.group_norm(x, 4, eps=1e-5)
    out = dfm_fused.state_update(h, x, Q, S, t, tau, 1.0, 4, 1e-5, scalar_decay=True, backend=backend)
    assert_close(out, h + d * n, dtype, "state_update")


@pytest.mark.parametrize("backend", cpu_backends())
def test_scalar_decay_gradcheck_float64(backend):
    """Exact gradients of the scalar path w.r.t. the activations (its output does not depend on
    Q; grad_Q is the general path's, checked against it above and in test_scalar_decay_grad_Q_*)."""
    _skip_float64(backend, torch.float64)
    Q, S = _uniform_decay(6, torch.float64)
    Q = Q.detach()
    x = torch.randn(2, 6, 3, 2, dtype=torch.float64, requires_grad=True)
    h = torch.randn(2, 6, 3, 2, dtype=torch.float64, requires_grad=True)
    thin = torch.randn(1, 6, 1, 2, dtype=torch.float64, requires_grad=True)
    for a in (x, thin):
        assert torch.autograd.gradcheck(
            lambda x: dfm_fused.exp_decay(x, Q, S, 2.0, 0.5, 1.0, scalar_decay=True, backend=backend), (a,)
        )
    assert torch.autograd.gradcheck(
        lambda h, y: dfm_fused.state_update(h, y, Q, S, 1.0, 0.5, 1.0, 3, 1e-5, scalar_decay=True, backend=backend),
        (h, x),
    )


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("shape", [(4, 30, 2, 2), (2, 8, 6, 5)])
def test_scalar_decay_grad_Q_equals_general_path_float64(backend, shape):
    """On a Q that is exactly orthonormal (float64 QR), grad_Q of the scalar path is the general
    path's to float64 rounding, itself checked by finite differences in test_gradcheck_float64."""
    _skip_float64(backend, torch.float64)
    C = shape[1]
    Q, S = _uniform_decay(C, torch.float64)
    y = torch.randn(shape, dtype=torch.float64)
    g = torch.randn(shape, dtype=torch.float64)
    for scalar in (True, False):
        out = dfm_fused.state_update(torch.zeros_like(y), y, Q, S, 1.0, 0.5, 1.0, 2, scalar_decay=scalar,
                                     backend=backend)
        (grad,) = torch.autograd.grad(out, Q, g)
        out = dfm_fused.exp_decay(y, Q, S, 1.0, 0.5, 1.0, scalar_decay=scalar, backend=backend)
        (grad_e,) = torch.autograd.grad(out, Q, g)
        if scalar:
            fast, fast_e = grad, grad_e
    assert_close(fast, grad, torch.float64, "state_update grad_Q")
    assert_close(fast_e, grad_e, torch.float64, "exp_decay grad_Q")


def test_scalar_decay_flag_must_be_a_bool():
    Q, S = _uniform_decay(4, torch.float32)
    x = torch.randn(1, 4, 2, 2)
    with pytest.raises(TypeError, match="scalar_decay: expected a bool; got int 1"):
        dfm_fused.exp_decay(x, Q, S, 1.0, 1.0, 1.0, scalar_decay=1)
    with pytest.raises(TypeError, match="scalar_decay: expected a bool"):
        dfm_fused.state_update(x, x, Q, S, 1.0, 1.0, 1.0, 2, scalar_decay="yes")
