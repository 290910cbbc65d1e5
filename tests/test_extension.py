"""The C++/CUDA extension backend (``extension``: its CPU kernels on CPU tensors, its CUDA kernels
on GPU tensors) against :mod:`dfm_fused.reference`: forward and every gradient, dtypes, odd shapes, layouts,
float64 gradcheck, thread-count determinism and ``torch.compile(fullgraph=True)``.

Expected values come from the reference run in float64 on the same (upcast) inputs.
Outputs are allocated NaN-filled (:func:`dfm_fused._extension.set_poison`, the hook behind
``DFM_FUSED_POISON=1``), so an element a kernel fails to write fails the full-tensor comparison.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dfm_fused import _extension, reference
from dfm_fused import BackendUnavailable


def _reason(device_type: str) -> str | None:
    try:
        _extension.require(device_type)
    except BackendUnavailable as exc:
        return str(exc)
    return None


CPU_REASON = _reason("cpu")
CUDA_REASON = _reason("cuda")
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(CPU_REASON is not None, reason=f"extension on cpu: {CPU_REASON}")),
    pytest.param("cuda", marks=pytest.mark.skipif(CUDA_REASON is not None, reason=f"extension on cuda: {CUDA_REASON}")),
]
# Relative tolerance per dtype, applied against max(1, max |expected|).
TOL = {torch.float64: 1e-10, torch.float32: 3e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


@pytest.fixture(autouse=True)
def _poison():
    if CPU_REASON is not None:  # the library is not loaded: nothing to poison
        yield
        return
    previous = _extension.set_poison(True)
    yield
    _extension.set_poison(previous)


@pytest.fixture
def cpu_target():
    """Sets the CPU target with :func:`dfm_fused._extension.set_cpu_target`; restores the previous one."""
    previous = _extension.set_cpu_target(None)
    _extension.set_cpu_target(previous)
    yield _extension.set_cpu_target
    _extension.set_cpu_target(previous)


def _ops():
    from dfm_fused.ops.exp_decay import extension_backend as ed
    from dfm_fused.ops.feedback_input import extension_backend as fi
    from dfm_fused.ops.state_update import extension_backend as su

    return ed.exp_decay, fi.feedback_input, su.state_update


def _close(actual, expected, dtype, what):
    assert actual.shape == expected.shape, what
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype}, expected {dtype}"
    expected = expected.to(torch.float64)
    tol = TOL[dtype] * max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual.to(torch.float64), expected, rtol=TOL[dtype], atol=tol, msg=lambda m: f"{what}: {m}")


def _decay_params(C, device, dtype=torch.float32):
    Q = torch.linalg.qr(torch.randn(C, C, dtype=torch.float64))[0].to(device=device, dtype=dtype)
    S = (torch.rand(C, dtype=torch.float64) + 0.5).to(device=device, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    return Q, S, 1.3, 2.0, 0.9


def _layout(x, layout):
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # a non-contiguous view with the same values
        return torch.cat([x, x], dim=3)[..., ::2]
    return x


def _run(fn, inputs, grad_dtype=None):
    """Output and gradients of ``fn(*inputs)`` w.r.t. the inputs that require grad, for a fixed
    random upstream gradient rounded to ``grad_dtype`` (default: the output's dtype)."""
    out = fn(*inputs)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    g = g.to(grad_dtype or out.dtype).to(device=out.device, dtype=out.dtype)
    diff = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    grads = torch.autograd.grad(out, diff, g)
    return out, grads


def _upcast(inputs):
    return [
        t.detach().to(torch.float64).requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t
        for t in inputs
    ]


def _check_against_reference(fn, ref, inputs, dtype, what):
    out, grads = _run(fn, inputs)
    ref_out, ref_grads = _run(ref, _upcast(inputs), grad_dtype=out.dtype)
    _close(out, ref_out, dtype, f"{what} forward")
    for i, (a, e) in enumerate(zip(grads, ref_grads)):
        _close(a, e, a.dtype, f"{what} grad {i}")


# (2, 520, 23, 25): two pixel tiles per image on the CPU, the second one partial.
# (1, 4, 1, 1), (2, 528, 2, 3) and (21, 528, 2, 2) have fewer pixels than channels: the kernels
# skip forming M there; the last one splits into uneven groups of images (16 + 5 on the CPU).
# (5, 24, 2, 2) has fewer pixels than channels but more than half as many, as the operating point
# (528 channels, 512 pixels): state_update's CPU forward forms M there for its backward to reuse.
# (3, 6, 7, 5), (2, 16, 4, 3) and (300, 16, 2, 2): images too small for wide pixel tiles, so the
# CPU backward works on groups of images and forms A in wide GEMMs (two pixel chunks for the last).
DECAY_SHAPES = [(1, 4, 1, 1), (3, 6, 7, 5), (2, 16, 4, 3), (300, 16, 2, 2), (5, 24, 2, 2), (2, 528, 2, 3),
                (21, 528, 2, 2), (2, 520, 23, 25)]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
LAYOUTS = ["contiguous", "channels_last", "strided"]


def _decay_case(shape, dtype, device, layout):
    if dtype == torch.float64 and shape[1] > 64:
        pytest.skip("float64 is covered by the small shapes")
    B, C, H, W = shape
    x = _layout(torch.randn(shape, dtype=torch.float64).to(device=device, dtype=dtype), layout)
    Q, S, t, tau, alpha = _decay_params(C, device, torch.float64 if dtype == torch.float64 else torch.float32)
    return x.requires_grad_(), Q.requires_grad_(), S, t, tau, alpha


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", DECAY_SHAPES, ids=str)
def test_exp_decay(shape, dtype, layout, device):
    exp_decay = _ops()[0]
    inputs = _decay_case(shape, dtype, device, layout)
    _check_against_reference(exp_decay, reference.exp_decay, inputs, dtype, "exp_decay")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", DECAY_SHAPES, ids=str)
def test_state_update(shape, dtype, layout, device):
    state_update = _ops()[2]
    y, Q, S, t, tau, alpha = _decay_case(shape, dtype, device, layout)
    h = _layout(torch.randn(shape, dtype=torch.float64).to(device=device, dtype=dtype), layout).requires_grad_()
    groups = {4: 2, 6: 3, 16: 4, 24: 4, 528: 8, 520: 8}[shape[1]]
    y = (y * 3 + 0.5).detach().requires_grad_()  # GroupNorm must remove a non-zero mean and scale
    inputs = (h, y, Q, S, t, tau, alpha, groups, 1e-5)
    _check_against_reference(state_update, reference.state_update, inputs, dtype, "state_update")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 4, 1, 1), (3, 6, 7, 5), (21, 528, 2, 2), (300, 16, 2, 2), (2, 16, 21, 23)],
                         ids=str)
def test_scalar_decay(shape, dtype, layout, device):
    """scalar_decay=True (Q orthonormal, S uniform) against the general reference: small images (A
    in wide GEMMs over all pixels on the CPU, two pixel chunks for 300 images), wide tiles, every
    dtype and layout."""
    exp_decay, _, state_update = _ops()
    x, Q, S, t, tau, alpha = _decay_case(shape, dtype, device, layout)
    S = torch.full_like(S, 0.8)
    h = _layout(torch.randn(shape, dtype=torch.float64).to(device=device, dtype=dtype), layout).requires_grad_()
    groups = {4: 2, 6: 3, 16: 4, 528: 8}[shape[1]]
    _check_against_reference(lambda *a: exp_decay(*a, scalar_decay=True), reference.exp_decay,
                             (x, Q, S, t, tau, alpha), dtype, "exp_decay")
    y = (x * 3 + 0.5).detach().requires_grad_()
    _check_against_reference(lambda *a: state_update(*a, scalar_decay=True), reference.state_update,
                             (h, y, Q, S, t, tau, alpha, groups, 1e-5), dtype, "state_update")


# (x shape, h shape, offset, fb, groups): up- and down-sampling, 1x1, odd sizes, fb not a power of two.
FEEDBACK_CASES = [
    ((1, 3, 1, 1), (1, 5, 1, 1), 1, 2, 1),
    ((3, 5, 7, 5), (3, 10, 3, 2), 2, 6, 3),
    ((2, 4, 4, 4), (2, 9, 7, 7), 0, 9, 3),
    ((2, 8, 56, 56), (2, 24, 7, 7), 8, 16, 8),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", FEEDBACK_CASES, ids=str)
def test_feedback_input(case, dtype, layout, device):
    feedback_input = _ops()[1]
    x_shape, h_shape, offset, fb, groups = case
    x = _layout(torch.randn(x_shape, dtype=torch.float64).to(device=device, dtype=dtype), layout).requires_grad_()
    h = (torch.randn(h_shape, dtype=torch.float64) * 2).to(device=device, dtype=dtype)
    h = _layout(h, layout).requires_grad_()
    _check_against_reference(
        feedback_input, reference.feedback_input, (x, h, offset, fb, groups, 1e-5), dtype, "feedback_input"
    )


@pytest.mark.skipif(CPU_REASON is not None, reason=f"extension on cpu: {CPU_REASON}")
@pytest.mark.parametrize("target", ["baseline", "avx2"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", FEEDBACK_CASES, ids=str)
def test_feedback_input_each_cpu_target(case, dtype, layout, target, cpu_target):
    """Both builds of the CPU kernels (csrc/cpu/target.h), whichever one `auto` picks here."""
    if target not in _extension.build_info()["cpu_targets"]:
        pytest.skip(f"this build has no {target} kernels")
    try:
        cpu_target(target)
    except RuntimeError as exc:  # built, but this CPU lacks the instructions
        pytest.skip(str(exc))
    assert _extension.build_info()["cpu_target"] == target
    test_feedback_input(case, dtype, layout, "cpu")


@pytest.mark.skipif(CPU_REASON is not None, reason=f"extension on cpu: {CPU_REASON}")
def test_bad_cpu_target_raises_and_changes_nothing(cpu_target):
    before = _extension.build_info()["cpu_target"]
    with pytest.raises(RuntimeError, match="DFM_FUSED_CPU_TARGET must be 'baseline' or 'avx2'; got 'avx512'"):
        cpu_target("avx512")
    assert _extension.build_info()["cpu_target"] == before


def _run_python(code: str, **variables) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DFM_FUSED_")} | variables
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(CPU_REASON is not None, reason=f"extension on cpu: {CPU_REASON}")
def test_test_hooks_are_read_once_when_the_library_loads():
    """DFM_FUSED_POISON and DFM_FUSED_CPU_TARGET are read when dfm_fused._C is loaded, not per call
    (before: a getenv per kernel call); later changes to the environment have no effect, the
    setters do. A bad target named at load raises at the first CPU kernel call, as before."""
    code = (
        "import os, torch, dfm_fused\n"
        "from dfm_fused import _extension\n"
        "print(_extension.build_info()['cpu_target'])\n"
        "os.environ['DFM_FUSED_CPU_TARGET'] = 'no-such-target'\n"
        "os.environ['DFM_FUSED_POISON'] = '0'\n"
        "print(_extension.build_info()['cpu_target'], _extension.set_poison(False), _extension.set_poison(False))\n"
    )
    out = _run_python(code, DFM_FUSED_CPU_TARGET="baseline", DFM_FUSED_POISON="1")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["baseline", "baseline", "True", "False"]

    bad = (
        "import os, torch, dfm_fused\n"
        "os.environ['DFM_FUSED_CPU_TARGET'] = 'avx512'  # after the import's check, before the library loads\n"
        "dfm_fused.feedback_input(torch.randn(1, 2, 3, 3), torch.randn(1, 4, 2, 2), 0, 2, 1, backend='extension')\n"
    )
    out = _run_python(bad)
    assert out.returncode != 0
    assert "DFM_FUSED_CPU_TARGET must be 'baseline' or 'avx2'; got 'avx512'" in out.stderr


@pytest.mark.skipif(CPU_REASON is not None, reason=f"extension on cpu: {CPU_REASON}")
def test_poison_fills_outputs_a_kernel_does_not_write():
    """The GroupNorm statistics of an empty state are never written: NaN while poisoning is on."""
    state = torch.zeros(2, 4, 0, 3)
    _extension.set_poison(True)
    mean = torch.ops.dfm_fused.state_update(state, state, torch.eye(4), torch.ones(4), 2, 1e-5)[1]
    assert mean.shape == (2, 2) and mean.isnan().all()


@pytest.mark.parametrize("device", DEVICES)
def test_feedback_input_grad_x_is_a_view(device):
    feedback_input = _ops()[1]
    x = torch.randn(2, 3, 5, 4, device=device, requires_grad=True)
    h = torch.randn(2, 6, 3, 3, device=device, requires_grad=True)
    out = feedback_input(x, h, 1, 4, 2, 1e-5)
    g = torch.randn_like(out)
    (grad_x,) = torch.autograd.grad(out, x, g)
    assert grad_x.data_ptr() == g.data_ptr()
    torch.testing.assert_close(grad_x, g[:, :3], rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_float64(device):
    exp_decay, feedback_input, state_update = _ops()
    kw = dict(dtype=torch.float64, device=device, requires_grad=True)
    Q, S, t, tau, alpha = _decay_params(6, device, torch.float64)
    Q.requires_grad_()
    x = torch.randn(2, 6, 3, 5, **kw)
    h = torch.randn(2, 6, 3, 5, **kw)
    assert torch.autograd.gradcheck(lambda x, Q: exp_decay(x, Q, S, t, tau, alpha), (x, Q))
    assert torch.autograd.gradcheck(lambda h, y, Q: state_update(h, y, Q, S, t, tau, alpha, 3, 1e-5), (h, x, Q))
    # Fewer pixels than channels: the kernels take the path that does not form M.
    h1, y1, x1 = (torch.randn(1, 6, 1, 2, **kw) for _ in range(3))
    assert torch.autograd.gradcheck(lambda h, y, Q: state_update(h, y, Q, S, t, tau, alpha, 3, 1e-5), (h1, y1, Q))
    assert torch.autograd.gradcheck(lambda x, Q: exp_decay(x, Q, S, t, tau, alpha), (x1, Q))
    # Fewer pixels than channels but more than half as many: the CPU forward forms M and keeps it.
    h4, y4 = (torch.randn(4, 6, 1, 1, **kw) for _ in range(2))
    assert torch.autograd.gradcheck(lambda h, y, Q: state_update(h, y, Q, S, t, tau, alpha, 3, 1e-5), (h4, y4, Q))
    xs = torch.randn(2, 3, 5, 4, **kw)
    hs = torch.randn(2, 7, 3, 2, **kw)
    assert torch.autograd.gradcheck(lambda x, h: feedback_input(x, h, 1, 4, 2, 1e-5), (xs, hs))


def _all_ops_once(device):
    exp_decay, feedback_input, state_update = _ops()
    y, Q, S, t, tau, alpha = _decay_case((3, 520, 23, 25), torch.float32, device, "contiguous")
    h = torch.randn(y.shape, device=device, requires_grad=True)
    results = []
    results += _run(exp_decay, (y, Q, S, t, tau, alpha))[1]
    out, grads = _run(state_update, (h, y, Q, S, t, tau, alpha, 8, 1e-5))
    results += [out, *grads]
    # Fewer pixels than channels (the path without M): two groups of images on the CPU.
    y_thin, Q_thin, S_thin, *_ = _decay_case((21, 528, 2, 2), torch.float32, device, "contiguous")
    h_thin = torch.randn(y_thin.shape, device=device, requires_grad=True)
    out, grads = _run(state_update, (h_thin, y_thin, Q_thin, S_thin, t, tau, alpha, 8, 1e-5))
    results += [out, *grads]
    # As at the operating point (528 channels, 280 pixels here): M formed in the forward and kept.
    y_op, Q_op, S_op, *_ = _decay_case((70, 528, 2, 2), torch.float32, device, "contiguous")
    h_op = torch.randn(y_op.shape, device=device, requires_grad=True)
    out, grads = _run(state_update, (h_op, y_op, Q_op, S_op, t, tau, alpha, 8, 1e-5))
    results += [out, *grads]
    # The scalar-decay path at the thin shape: grad_Q's A by groups of images.
    out, grads = _run(lambda *a: state_update(*a, scalar_decay=True),
                      (h_thin, y_thin, Q_thin, S_thin, t, tau, alpha, 8, 1e-5))
    results += [out, *grads]
    results += _run(lambda *a: exp_decay(*a, scalar_decay=True), (y_thin, Q_thin, S_thin, t, tau, alpha))[1]
    x = torch.randn(3, 8, 56, 56, device=device, requires_grad=True)
    hf = torch.randn(3, 24, 7, 7, device=device, requires_grad=True)
    out, grads = _run(feedback_input, (x, hf, 8, 16, 8, 1e-5))
    results += [out, *grads]
    return results


@pytest.mark.skipif(CPU_REASON is not None, reason=f"extension on cpu: {CPU_REASON}")
def test_cpu_results_do_not_depend_on_thread_count():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        torch.manual_seed(0)
        one = _all_ops_once("cpu")
        torch.set_num_threads(2)
        torch.manual_seed(0)
        two = _all_ops_once("cpu")
    finally:
        torch.set_num_threads(threads)
    for i, (a, b) in enumerate(zip(one, two)):
        assert torch.equal(a, b), f"result {i} differs between 1 and 2 threads"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck_fake_and_autograd_registrations(layout, device):
    """torch.library.opcheck: schema, fake (meta) kernels incl. output strides, autograd registration."""
    _ops()
    ops = torch.ops.dfm_fused
    C, groups = 6, 3
    x = _layout(torch.randn(2, C, 5, 4, device=device), layout).requires_grad_()
    h = _layout(torch.randn(2, C, 5, 4, device=device), layout).requires_grad_()
    g = _layout(torch.randn(2, C, 5, 4, device=device), layout)
    Q = torch.randn(C, C, device=device).t().detach().requires_grad_()  # column-major, as QR returns it
    D = torch.rand(C, device=device)
    for scalar in (False, True):
        torch.library.opcheck(ops.exp_decay, (x, Q, D, scalar))
        torch.library.opcheck(ops.exp_decay_backward, (g, x.detach(), Q.detach(), D, True, True, scalar))
        for keep_M in (False, True):
            out, mean, rstd, M = ops.state_update(h, x, Q, D, groups, 1e-5, scalar, keep_M)
            assert M.shape == ((C, C) if keep_M and not scalar else (0,))
            torch.library.opcheck(ops.state_update, (h, x, Q, D, groups, 1e-5, scalar, keep_M))
            torch.library.opcheck(
                ops.state_update_backward, (g, x.detach(), Q.detach(), D, mean, rstd, groups, True, True, scalar, M)
            )
    xs = _layout(torch.randn(2, 3, 5, 4, device=device), layout).requires_grad_()
    hs = _layout(torch.randn(2, 7, 3, 2, device=device), layout).requires_grad_()
    out, mean, rstd = ops.feedback_input(xs, hs, 1, 4, 2, 1e-5)
    torch.library.opcheck(ops.feedback_input, (xs, hs, 1, 4, 2, 1e-5))
    gs = _layout(torch.randn(out.shape, device=device), layout)
    torch.library.opcheck(ops.feedback_input_backward, (gs, hs.detach(), mean, rstd, 1, 4, 2))


@pytest.mark.parametrize("device", DEVICES)
def test_state_update_backward_rejects_a_kept_M_unlike_Q(device):
    _ops()
    C = 6
    y, g = torch.randn(2, C, 3, 2, device=device), torch.randn(2, C, 3, 2, device=device)
    Q, D = torch.eye(C, device=device), torch.rand(C, device=device)
    _, mean, rstd, M = torch.ops.dfm_fused.state_update(y, y, Q, D, 3, 1e-5, False, True)
    for bad, what in ((M[:4, :4], r"\[4, 4\] Float"), (M.double(), r"\[6, 6\] Double")):
        with pytest.raises(RuntimeError, match=r"M \(the forward's decay matrix\) must be like Q, \[6, 6\] Float .*; got " + what):
            torch.ops.dfm_fused.state_update_backward(g, y, Q, D, mean, rstd, 3, True, True, False, bad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ["exp_decay", "state_update", "feedback_input"])
def test_torch_compile_fullgraph(op, device):
    exp_decay, feedback_input, state_update = _ops()
    torch._dynamo.reset()
    Q, S, t, tau, alpha = _decay_params(8, device)
    Q.requires_grad_()
    if op == "exp_decay":
        args = (torch.randn(2, 8, 5, 3, device=device, requires_grad=True), Q)
        fn = lambda x, Q: exp_decay(x, Q, S, t, tau, alpha)  # noqa: E731
    elif op == "state_update":
        args = (torch.randn(2, 8, 5, 3, device=device, requires_grad=True),
                torch.randn(2, 8, 5, 3, device=device, requires_grad=True), Q)
        fn = lambda h, y, Q: state_update(h, y, Q, S, t, tau, alpha, 4, 1e-5)  # noqa: E731
    else:
        args = (torch.randn(2, 3, 6, 5, device=device, requires_grad=True),
                torch.randn(2, 9, 3, 2, device=device, requires_grad=True))
        fn = lambda x, h: feedback_input(x, h, 2, 6, 3, 1e-5)  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True)
    eager_out, eager_grads = _run(fn, args)
    # No on-disk caches: a graph cached by an older build of the ops must not be reused.
    with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
        out, grads = _run(compiled, args)
    torch.testing.assert_close(out, eager_out)
    for a, e in zip(grads, eager_grads):
        torch.testing.assert_close(a, e)


@pytest.mark.skipif(CPU_REASON is not None, reason=f"extension on cpu: {CPU_REASON}")
def test_build_info():
    info = _extension.build_info()
    assert info["available"] and info["reason"] is None
    assert info["torch_version"] == torch.__version__
    assert info["openmp"] is True
    assert "OpenMP" in info["parallel_info"]
    assert info["cpu_targets"][0] == "baseline" and set(info["cpu_targets"]) <= {"baseline", "avx2"}
    assert info["cpu_target"] in info["cpu_targets"]


def test_extension_built_when_required():
    """CI sets DFM_FUSED_REQUIRE_EXTENSION=1: there a missing extension is a failure, not a skip."""
    if os.environ.get("DFM_FUSED_REQUIRE_EXTENSION") != "1":
        pytest.skip("DFM_FUSED_REQUIRE_EXTENSION is not set")
    assert CPU_REASON is None, CPU_REASON


def test_unavailable_reasons(monkeypatch, tmp_path):
    monkeypatch.setattr(_extension, "_library_files", lambda: [])
    module, reason = _extension._try_load()
    assert module is None and "not built" in reason and "pip install --no-build-isolation -e ." in reason

    fake = tmp_path / "_C.so"
    fake.write_bytes(b"\x00junk DFM_FUSED_TORCH_VERSION=1.0.0+old; junk")
    monkeypatch.setattr(_extension, "_library_files", lambda: [fake])

    def fail(name):
        raise ImportError("undefined symbol: _ZN3c10")

    monkeypatch.setattr(_extension.importlib, "import_module", fail)
    module, reason = _extension._try_load()
    assert module is None
    assert f"built against torch 1.0.0+old, running {torch.__version__}: rebuild" in reason


@pytest.mark.skipif(CPU_REASON is not None, reason=f"extension on cpu: {CPU_REASON}")
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cuda_backend_unavailable_message_without_gpu():
    with pytest.raises(BackendUnavailable, match="CUDA"):
        _extension.require("cuda")


@pytest.mark.skipif(CPU_REASON is not None, reason=f"extension on cpu: {CPU_REASON}")
def test_functional_dispatch_uses_the_extension():
    import dfm_fused

    x = torch.randn(2, 6, 3, 3)
    Q, S, t, tau, alpha = _decay_params(6, "cpu")
    out = dfm_fused.exp_decay(x, Q, S, t, tau, alpha, backend="extension")
    _close(out, reference.exp_decay(*_upcast([x, Q, S]), t, tau, alpha), torch.float32, "functional extension")
    assert "extension" in dfm_fused.available_backends("cpu")


def test_installed_package_is_tested():
    """scripts/test.sh runs the suite against the installed wheel, never the source tree."""
    if os.environ.get("DFM_FUSED_EXPECT_INSTALLED") != "1":
        pytest.skip("DFM_FUSED_EXPECT_INSTALLED is not set")
    import dfm_fused

    package = Path(dfm_fused.__file__).resolve()
    assert "site-packages" in package.parts, package
    # Installed into the test environment itself, not lent by the build environment.
    assert package.is_relative_to(Path(sys.prefix).resolve()), (package, sys.prefix)
