"""Edge cases, autocast, torch.compile, determinism, thread safety and property tests, on every CPU backend."""
import threading

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import dfm_fused
from dfm_fused import reference

from _helpers import TOLERANCE, assert_close, cpu_backends, decay_args, grads, needs_cuda_build, rel_err

BACKENDS = cpu_backends()


def _all_three(fn, C=8, B=2, H=3, W=3, dtype=torch.float32, backend=None):
    """Run the three ops (via ``fn``: dfm_fused or reference) on fixed random inputs; return outputs and grads."""
    gen = torch.Generator().manual_seed(5)
    Q = torch.linalg.qr(torch.randn(C, C, generator=gen, dtype=torch.float64))[0].to(dtype).requires_grad_()
    S = torch.rand(C, generator=gen, dtype=dtype) + 0.5
    x = torch.randn(B, C, H, W, generator=gen, dtype=dtype).requires_grad_()
    h = torch.randn(B, C, H, W, generator=gen, dtype=dtype).requires_grad_()
    xf = torch.randn(B, 3, 2 * H + 1, 2 * W, generator=gen, dtype=dtype).requires_grad_()
    kw = {} if backend is None else {"backend": backend}
    outs = [
        fn.exp_decay(x, Q, S, 2.0, 0.5, 1.0, **kw),
        fn.state_update(h, x, Q, S, 1.0, 0.5, 1.0, 4, **kw),
        fn.feedback_input(xf, h, 2, 4, 2, **kw),
    ]
    seeds = [torch.randn(o.shape, generator=gen, dtype=o.dtype) for o in outs]
    g = grads(sum((o * s).sum() for o, s in zip(outs, seeds)), (x, h, xf, Q), None) if outs[0].numel() else None
    return outs, g


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,H,W", [(0, 3, 3), (1, 1, 1), (1, 7, 5), (3, 2, 9)])
def test_edge_shapes_match_reference(backend, B, H, W):
    outs, g = _all_three(dfm_fused, B=B, H=H, W=W, backend=backend)
    ref_outs, ref_g = _all_three(reference, B=B, H=H, W=W)
    for name, a, e in zip(("exp_decay", "state_update", "feedback_input"), outs, ref_outs):
        assert a.shape == e.shape, name
        if a.numel():
            assert_close(a, e, torch.float32, name)
    if B:
        for name, a, e in zip(("x", "h", "xf", "Q"), g, ref_g):
            assert_close(a, e, torch.float32, f"grad_{name}")
    else:
        empty = sum(o.sum() for o in outs)
        empty.backward()  # batch 0: backward runs and gives zero parameter gradients


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_and_inf_propagate_like_the_reference(backend):
    C = 8
    Q, S = decay_args(C)
    y = torch.randn(2, C, 3, 3)
    y[0, 1, 1, 1] = float("nan")
    h = torch.randn(2, C, 3, 3)
    h[1, 5, 0, 2] = float("inf")
    xf = torch.randn(2, 3, 6, 6)
    pairs = [
        (dfm_fused.state_update(h, y, Q, S, 1, 1, 1, 2, backend=backend), reference.state_update(h, y, Q, S, 1, 1, 1, 2)),
        (dfm_fused.exp_decay(y, Q, S, 1, 1, 1, backend=backend), reference.exp_decay(y, Q, S, 1, 1, 1)),
        (dfm_fused.feedback_input(xf, h, 4, 4, 2, backend=backend), reference.feedback_input(xf, h, 4, 4, 2)),
    ]
    for out, expected in pairs:
        assert expected.isnan().any()
        assert torch.equal(out.isnan(), expected.isnan())
        finite = torch.isfinite(expected)
        assert_close(out[finite], expected[finite], torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_t_underflows_to_zero_without_nan(backend):
    C = 8
    Q, S = decay_args(C)
    h, y = torch.randn(2, C, 3, 3), torch.randn(2, C, 3, 3)
    out = dfm_fused.state_update(h, y, Q, S, 10_000, 0.01, 1.0, 2, backend=backend)
    assert torch.equal(out, h)
    module = dfm_fused.StateExpDecay(C, (3, 3), tau=0.01)
    assert torch.equal(module(y, T=10_000), torch.zeros_like(y))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_autocast_behaves_like_the_reference_under_autocast(backend, low):
    with torch.autocast("cpu", dtype=low):
        outs, _ = _all_three(dfm_fused, backend=backend)
        ref_outs, _ = _all_three(reference)
    for name, a, e in zip(("exp_decay", "state_update", "feedback_input"), outs, ref_outs):
        assert a.dtype == e.dtype, name
        # The reference rounds its GEMMs to `low`; the fused ops keep float32, so compare at `low`'s tolerance.
        assert_close(a, e, torch.bfloat16 if e.dtype == torch.bfloat16 else low, name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_is_bitwise_deterministic(backend):
    first = _all_three(dfm_fused, C=20, B=3, H=7, W=5, backend=backend)
    second = _all_three(dfm_fused, C=20, B=3, H=7, W=5, backend=backend)
    for a, b in zip(first[0] + list(first[1]), second[0] + list(second[1])):
        assert torch.equal(a, b)


class _Step(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.feedback = dfm_fused.FeedbackInput(4, 4, 2)
        self.conv = torch.nn.Conv2d(8, 8, 3, padding=1, stride=2)
        self.decay = dfm_fused.StateExpDecay(8, (3, 3), tau=0.5)
        self.update = dfm_fused.StateUpdate(8, 2, tau=1.0)

    def forward(self, x, h, t: int):
        return self.update(h, self.decay(self.conv(self.feedback(x, h)), T=t + 1), t)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()
    step = _Step().eval()
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    h = torch.randn(2, 8, 3, 3, requires_grad=True)
    with dfm_fused.use_backend(backend):
        eager = step(x, h, 1)
        eager_grads = torch.autograd.grad(eager.square().sum(), (x, h, step.update.Q, step.conv.weight))
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(x, h, 1)
        compiled_grads = torch.autograd.grad(compiled.square().sum(), (x, h, step.update.Q, step.conv.weight))
    assert_close(compiled, eager, torch.float32, "out")
    for a, e in zip(compiled_grads, eager_grads):
        assert_close(a, e, torch.float32, "grad")


def test_backend_can_change_between_calls_from_many_threads():
    C = 12
    Q, S = decay_args(C)
    Q = Q.detach()
    x = torch.randn(2, C, 4, 4)
    expected = reference.exp_decay(x, Q, S, 1.0, 0.5, 1.0)
    errors, stop = [], threading.Event()

    def toggler():
        names = ["reference", *BACKENDS, "auto"]
        i = 0
        while not stop.is_set():
            dfm_fused.set_backend(names[i % len(names)])
            i += 1

    def worker():
        try:
            for _ in range(30):
                assert_close(dfm_fused.exp_decay(x, Q, S, 1.0, 0.5, 1.0), expected, torch.float32)
        except Exception as exc:  # collected and re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=toggler)] + [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads[1:]:
        t.join()
    stop.set()
    threads[0].join()
    dfm_fused.set_backend(None)
    assert not errors, errors[0]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    B=st.integers(1, 3),
    groups=st.sampled_from([1, 2, 3]),
    per_group=st.integers(1, 5),
    H=st.integers(1, 6),
    W=st.integers(1, 6),
    t=st.integers(0, 6),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    backend=st.sampled_from(BACKENDS),
)
def test_property_ops_match_reference(data, B, groups, per_group, H, W, t, dtype, backend):
    C = groups * per_group
    # The reference's group_norm refuses groups of a single value (the fused ops return 0 there).
    assume(per_group * H * W > 1)
    fb = data.draw(st.sampled_from([d for d in range(1, C + 1) if d % groups == 0]), label="fb")
    offset = data.draw(st.integers(0, C - fb), label="offset")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    gen = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(C, C, generator=gen, dtype=torch.float64))[0].to(dtype).requires_grad_()
    S = torch.rand(C, generator=gen, dtype=dtype) + 0.25
    h = torch.randn(B, C, H, W, generator=gen, dtype=dtype).requires_grad_()
    y = torch.randn(B, C, H, W, generator=gen, dtype=dtype).requires_grad_()
    xf = torch.randn(B, 2, H + 2, 2 * W, generator=gen, dtype=dtype).requires_grad_()
    # Oracle: the reference in float64. A fused result must be within a few times the dtype's
    # tolerance of it, or at least about as close as the reference itself in ``dtype``: random
    # shapes include GroupNorms of a few nearly equal values, whose gradients amplify rounding
    # for the reference and the fused ops alike. There (groups of at most 4 values) the
    # reference's own error is one draw of that noise and can be luckily small, so the floor
    # is 10x the dtype's tolerance (seen: 3.9e-5 for the torch backend at B=2, C=2, 1x1).
    def wide(*tensors):
        return [t.detach().double().requires_grad_(t.requires_grad) for t in tensors]

    def check(name, run_fused, run_reference, inputs, group_size):
        fused = run_fused(*inputs)
        ref_same = run_reference(*inputs)
        wide_inputs = wide(*inputs)
        truth = run_reference(*wide_inputs)
        assert fused.dtype == ref_same.dtype == dtype
        g = torch.randn(fused.shape, generator=gen, dtype=dtype)
        floor = 1e-2 * g.norm().item()
        differentiable = [i for i, t in enumerate(inputs) if t.requires_grad]
        results = zip(
            [fused, *grads(fused, [inputs[i] for i in differentiable], g)],
            [ref_same, *grads(ref_same, [inputs[i] for i in differentiable], g)],
            [truth, *grads(truth, [wide_inputs[i] for i in differentiable], g.double())],
        )
        for k, (a, r, e) in enumerate(results):
            tol = max((10 if group_size <= 4 else 3) * TOLERANCE[dtype], 3 * rel_err(r, e, floor))
            assert_close(a, e, dtype, f"{name} {'out' if k == 0 else f'grad {k}'}", floor=floor, tol=tol)

    check(
        "state_update",
        lambda h, y, Q, S: dfm_fused.state_update(h, y, Q, S, t, 0.9, 1.2, groups, backend=backend),
        lambda h, y, Q, S: reference.state_update(h, y, Q, S, t, 0.9, 1.2, groups),
        (h, y, Q, S),
        per_group * H * W,
    )
    f_groups = data.draw(st.sampled_from([d for d in range(1, fb + 1) if fb % d == 0]), label="f_groups")
    assume(fb // f_groups * xf.shape[-1] * xf.shape[-2] > 1)
    # The feedback's GroupNorm runs on h resized to x's size, but the resize adds no values:
    # its conditioning is that of the group's H x W source values in h.
    check(
        "feedback_input",
        lambda xf, h: dfm_fused.feedback_input(xf, h, offset, fb, f_groups, backend=backend),
        lambda xf, h: reference.feedback_input(xf, h, offset, fb, f_groups),
        (xf, h),
        fb // f_groups * H * W,
    )


class _HostTransfers(torch.utils._python_dispatch.TorchDispatchMode):
    """Records ops that copy host data to a device or read a device value back to the host."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        leaves = torch.utils._pytree.tree_leaves
        inputs = [a for a in leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        outputs = [o for o in leaves(out) if isinstance(o, torch.Tensor)]
        copies = func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default)
        if copies and any(a.device.type == "cpu" for a in inputs) and any(o.device.type != "cpu" for o in outputs):
            self.seen.append(str(func))
        if func is torch.ops.aten._local_scalar_dense.default:
            self.seen.append(str(func))
        return out


@needs_cuda_build
@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("scalar_decay", [False, True])
def test_no_host_device_copy_in_forward_on_fake_cuda(backend, scalar_decay):
    """CPU proxy of the GPU sync check: on fake CUDA tensors the forward of each op copies nothing
    from the host to the device (Python scalars stay 0-d CPU tensors, which device kernels take as
    arguments) and reads nothing back."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    decay = {} if backend == "reference" else {"scalar_decay": scalar_decay}
    with FakeTensorMode():
        Q = torch.empty(8, 8, device="cuda", requires_grad=True)
        S = torch.ones(8, device="cuda")
        x = torch.empty(2, 8, 3, 3, device="cuda", requires_grad=True)
        h = torch.empty(2, 8, 3, 3, device="cuda", requires_grad=True)
        xf = torch.empty(2, 3, 5, 6, device="cuda", requires_grad=True)
        with _HostTransfers() as transfers:
            dfm_fused.exp_decay(x, Q, S, 2.0, 0.5, 1.0, backend=backend, **decay)
            dfm_fused.state_update(h, x, Q, S, 1.0, 0.5, 1.0, 4, backend=backend, **decay)
            dfm_fused.feedback_input(xf, h, 2, 4, 2, backend=backend)
    assert transfers.seen == []


def _cuda_backends():
    if not torch.cuda.is_available():
        return [pytest.param("none", marks=pytest.mark.skip(reason="no CUDA device"))]
    return [b for b in dfm_fused.available_backends("cuda")]


@pytest.mark.parametrize("backend", _cuda_backends())
@pytest.mark.parametrize("scalar_decay", [False, True])
def test_ops_do_not_sync_with_the_host_on_cuda(backend, scalar_decay):
    """Forward and backward of every op under torch.cuda.set_sync_debug_mode("error"), at the
    operating point's shapes (SPEC section 7): no blocking copy, no synchronisation; the results
    equal the reference's (Q is orthonormal and S uniform, so the scalar path must too)."""
    dev = "cuda"
    Q = torch.linalg.qr(torch.randn(528, 528, device=dev))[0].requires_grad_()
    S = torch.ones(528, device=dev)
    h = torch.randn(8, 528, 2, 2, device=dev, requires_grad=True)
    y = torch.randn(8, 528, 2, 2, device=dev, requires_grad=True)
    x = torch.randn(8, 64, 16, 16, device=dev, requires_grad=True)
    t = torch.tensor(2.0, device=dev)
    # Random weights: the gradient of a plain sum through a GroupNorm vanishes by cancellation.
    w_out = torch.randn(8, 528, 2, 2, device=dev)
    w_fed = torch.randn(8, 80, 16, 16, device=dev)

    def run(backend, decay):
        out = dfm_fused.state_update(h, y, Q, S, t, 0.1, 1.0, 8, backend=backend, **decay)
        out = out + dfm_fused.exp_decay(y, Q, S, 3.0, 0.1, 1.0, backend=backend, **decay)
        fed = dfm_fused.feedback_input(x, out, 512, 16, 8, backend=backend)
        return torch.autograd.grad((out * w_out).sum() + (fed * w_fed).sum(), (h, y, Q, x))

    decay = {} if backend == "reference" else {"scalar_decay": scalar_decay}
    expected = run(backend, decay)  # warm-up: autotuning and lazy initialisation may synchronise
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = run(backend, decay)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    for a, e in zip(got, expected):
        torch.testing.assert_close(a, e)
    for name, a, e in zip(("h", "y", "Q", "x"), got, run("reference", {})):
        assert rel_err(a, e) <= 1e-4, f"grad_{name}: relative error {rel_err(a, e):.2e}"
