"""The Triton backend against the reference oracle.

Kernels run on CUDA tensors when a GPU is present, and on CPU tensors under the
Triton interpreter. ``TRITON_INTERPRET=1`` has to be set before triton is
imported, and the main pytest process has imported it long before, so
:func:`test_interpreter_suite` reruns this file in a subprocess with the variable
set; there the ``cpu`` cases run and the ``cuda`` ones are skipped. Outputs of
every kernel are NaN-poisoned (``DFM_FUSED_POISON=1``) so unwritten elements fail.

Errors are relative norm errors against the reference evaluated in float64 on
the same (rounded) inputs.
"""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys

import pytest
import torch

from dfm_fused import _testing
from dfm_fused import functional as F
from dfm_fused import reference

from _helpers import TOLERANCE, orthogonal, rel_err

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

CPU = pytest.param(
    "cpu",
    marks=pytest.mark.skipif(not INTERPRET, reason="interpreter cases run in test_interpreter_suite's subprocess"),
)
CUDA = pytest.param(
    "cuda",
    marks=pytest.mark.skipif(not HAS_CUDA or INTERPRET, reason="needs a CUDA GPU (and compiled, not interpreted triton)"),
)
DEVICES = [CPU, CUDA]
needs_cuda = pytest.mark.skipif(not HAS_CUDA or INTERPRET, reason="needs a CUDA GPU")

# Relative norm error bounds. float32 assumes IEEE float32 dots (PyTorch's default); TF32 is tested apart.
TOL = {dtype: TOLERANCE[dtype] for dtype in (torch.float32, torch.float16, torch.bfloat16)}
TF32_TOL = 1e-3
DTYPES = list(TOL)


@pytest.fixture(autouse=True)
def _poison():
    with _testing.override(poison=True):
        yield


def leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_()


def decay_params(C: int, device):
    Q = orthogonal(C, device=device)
    S = (torch.rand(C) + 0.5).to(device)
    return Q, S


def check_op(run_fused, run_ref, inputs: dict, tol: float):
    """Forward and input gradients of ``run_fused`` against ``run_ref`` on float64 copies of ``inputs``."""
    fused_in = {k: leaf(v) for k, v in inputs.items()}
    ref_in = {k: leaf(v.double()) for k, v in inputs.items()}
    out = run_fused(**fused_in)
    ref = run_ref(**ref_in)
    weight = torch.randn(ref.shape, device=ref.device, dtype=torch.float64)
    grads = torch.autograd.grad((out.double() * weight).sum(), list(fused_in.values()))
    ref_grads = torch.autograd.grad((ref * weight).sum(), list(ref_in.values()))
    results = {"out": (out, ref), **{f"grad_{k}": (g, r) for k, g, r in zip(inputs, grads, ref_grads)}}
    for name, (actual, expected) in results.items():
        assert actual.shape == expected.shape, name
        assert torch.isfinite(actual).all(), f"{name}: non-finite values (an unwritten, NaN-poisoned element?)"
    errors = {name: rel_err(actual, expected) for name, (actual, expected) in results.items()}
    bad = {k: e for k, e in errors.items() if not e <= tol}
    assert not bad, f"relative errors above {tol:g}: {bad} (all: {errors})"
    return out


# (B, C, H, W, groups): 1x1, odd spatial, batch 1 and 3, channels not a power of two, groups > 1.
DECAY_SHAPES = [(1, 12, 1, 1, 3), (3, 20, 7, 5, 4), (2, 36, 4, 4, 1)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", DECAY_SHAPES, ids=str)
def test_exp_decay(device, dtype, shape):
    B, C, H, W, _ = shape
    Q, S = decay_params(C, device)
    check_op(
        lambda x, Q: F.exp_decay(x, Q, S, 3.0, 0.7, 1.5, backend="triton"),
        lambda x, Q: reference.exp_decay(x, Q, S, 3.0, 0.7, 1.5),
        {"x": torch.randn(B, C, H, W, device=device).to(dtype), "Q": Q},
        TOL[dtype],
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", DECAY_SHAPES, ids=str)
def test_state_update(device, dtype, shape):
    B, C, H, W, groups = shape
    Q, S = decay_params(C, device)
    t = torch.tensor(2.0, device=device)  # a 0-d device tensor, as the modules pass it
    check_op(
        lambda h, y, Q: F.state_update(h, y, Q, S, t, 0.5, 1.0, groups, 1e-5, backend="triton"),
        lambda h, y, Q: reference.state_update(h, y, Q, S, t, 0.5, 1.0, groups, 1e-5),
        {
            "h": torch.randn(B, C, H, W, device=device).to(dtype),
            # An offset and scale so that the GroupNorm statistics matter.
            "y": (3.0 + 2.0 * torch.randn(B, C, H, W, device=device)).to(dtype),
            "Q": Q,
        },
        TOL[dtype],
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scalar_decay(device, dtype):
    """scalar_decay=True (the modules' path after their QR: Q orthonormal, S uniform): the
    elementwise kernels against the general reference, gradients of Q included."""
    B, C, H, W, groups = 3, 20, 7, 5, 4
    Q = orthogonal(C, device=device)
    S = torch.full((C,), 0.8, device=device)
    check_op(
        lambda x, Q: F.exp_decay(x, Q, S, 3.0, 0.7, 1.5, scalar_decay=True, backend="triton"),
        lambda x, Q: reference.exp_decay(x, Q, S, 3.0, 0.7, 1.5),
        {"x": torch.randn(B, C, H, W, device=device).to(dtype), "Q": Q},
        TOL[dtype],
    )
    check_op(
        lambda h, y, Q: F.state_update(h, y, Q, S, 2.0, 0.5, 1.0, groups, 1e-5, scalar_decay=True, backend="triton"),
        lambda h, y, Q: reference.state_update(h, y, Q, S, 2.0, 0.5, 1.0, groups, 1e-5),
        {
            "h": torch.randn(B, C, H, W, device=device).to(dtype),
            "y": (3.0 + 2.0 * torch.randn(B, C, H, W, device=device)).to(dtype),
            "Q": Q,
        },
        TOL[dtype],
    )
    # The flag selects the elementwise path: on a Q that is not orthonormal the result is still d x.
    x = torch.randn(B, C, H, W, device=device)
    bent = Q + 1e-2 * torch.randn_like(Q)
    d = torch.exp(torch.tensor(-3.0 / 0.7 * 0.8**1.5, device=device))
    out = F.exp_decay(x, bent, S, 3.0, 0.7, 1.5, scalar_decay=True, backend="triton")
    assert rel_err(out, d * x) <= 1e-6


@pytest.mark.parametrize("device", DEVICES)
def test_state_update_mixed_dtypes(device):
    """float32 state, bfloat16 body output (autocast): the result keeps the state's dtype."""
    B, C, H, W, groups = 2, 20, 5, 3, 5
    Q, S = decay_params(C, device)
    out = check_op(
        lambda h, y, Q: F.state_update(h, y, Q, S, 1.0, 0.5, 1.0, groups, backend="triton"),
        lambda h, y, Q: reference.state_update(h, y, Q, S, 1.0, 0.5, 1.0, groups),
        {"h": torch.randn(B, C, H, W, device=device), "y": torch.randn(B, C, H, W, device=device).bfloat16(), "Q": Q},
        TOL[torch.bfloat16],
    )
    assert out.dtype == torch.float32


HALF_DTYPES = [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("op", ["exp_decay", "state_update"])
def test_half_precision_no_worse_than_reference_under_autocast(op, dtype, device):
    """With half-precision activations the Triton GEMMs take ``M`` and ``x`` (or ``GroupNorm(y)``)
    rounded to that half type (tensor-core dots, float32 accumulation; statistics, ``exp`` and the
    ``+ h`` stay float32). The reference under autocast runs its two linears in the half type too.
    Against the float64 answer on the same (rounded) inputs, each output and gradient of Triton must
    be at least as accurate as the reference's under the same autocast.

    CI cannot see the bfloat16 rounding: the interpreter's bfloat16 dot is wrong, so under
    ``TRITON_INTERPRET=1`` bfloat16 dots get float32 operands (``_triton.host.dot_dtype``) and
    that case checks float32 math. float16 dots keep half operands there. The GPU run of this test
    (``scripts/gpu_check.sh``) is what checks bfloat16."""
    B, C, H, W, groups = 2, 48, 6, 5, 4
    Q, S = decay_params(C, device)
    y = (3.0 + 2.0 * torch.randn(B, C, H, W, device=device)).to(dtype)
    if op == "exp_decay":
        inputs = {"x": y, "Q": Q}
        run = {"triton": lambda x, Q: F.exp_decay(x, Q, S, 2.0, 0.7, 1.0, backend="triton"),
               "reference": lambda x, Q: reference.exp_decay(x, Q, S, 2.0, 0.7, 1.0)}
    else:
        inputs = {"h": torch.randn(B, C, H, W, device=device), "y": y, "Q": Q}
        run = {"triton": lambda h, y, Q: F.state_update(h, y, Q, S, 2.0, 0.7, 1.0, groups, backend="triton"),
               "reference": lambda h, y, Q: reference.state_update(h, y, Q, S, 2.0, 0.7, 1.0, groups)}
    weight = torch.randn(B, C, H, W, device=device, dtype=torch.float64)

    def outputs(fn, cast=None, autocast=True):
        leaves = {k: leaf(v if cast is None else v.to(cast)) for k, v in inputs.items()}
        with torch.autocast(device, dtype=dtype, enabled=autocast):
            out = fn(**leaves)
        return [out, *torch.autograd.grad((out.double() * weight).sum(), list(leaves.values()))]

    exact = outputs(run["reference"], torch.float64, autocast=False)
    fused, ref = outputs(run["triton"]), outputs(run["reference"])
    names = ["out", *(f"grad_{k}" for k in inputs)]
    errors = {}
    for name, a, r, e in zip(names, fused, ref, exact):
        assert a.dtype == r.dtype, f"{name}: {a.dtype}, the reference under autocast gives {r.dtype}"
        assert torch.isfinite(a).all(), name
        errors[name] = (rel_err(a, e), rel_err(r, e))
    # The measured errors, for the record (scripts/gpu_check.sh shows them with -rP).
    print(f"{op} {dtype} {device}: " + ", ".join(f"{k} triton {t:.2e} reference {r:.2e}" for k, (t, r) in errors.items()))
    # The floor: both exact to float32 rounding (e.g. grad_h, the incoming gradient itself).
    worse = {k: f"triton {t:.2e} > reference {r:.2e}" for k, (t, r) in errors.items() if not t <= max(r, 1e-6)}
    assert not worse, f"error against float64 above the reference's under autocast: {worse}"


# (B, Cx, H, W, Ch, Hi, Wi, offset, fb, groups): upsampling, downsampling, mixed, 1x1 output, odd sizes,
# and an x without channels (Cx = 0: the output is the projection alone).
FEEDBACK_GEOMETRIES = [
    (2, 5, 8, 8, 12, 4, 4, 3, 6, 2),
    (1, 3, 7, 5, 10, 3, 2, 0, 10, 5),
    (3, 4, 1, 1, 9, 2, 3, 1, 8, 2),
    (2, 6, 5, 9, 7, 11, 6, 2, 4, 1),
    (2, 0, 6, 5, 8, 3, 2, 2, 4, 2),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("geometry", FEEDBACK_GEOMETRIES, ids=str)
def test_feedback_input(device, dtype, geometry):
    B, Cx, H, W, Ch, Hi, Wi, offset, fb, groups = geometry
    check_op(
        lambda x, h: F.feedback_input(x, h, offset, fb, groups, 1e-5, backend="triton"),
        lambda x, h: reference.feedback_input(x, h, offset, fb, groups, 1e-5),
        {
            "x": torch.randn(B, Cx, H, W, device=device).to(dtype),
            "h": (1.0 + 3.0 * torch.randn(B, Ch, Hi, Wi, device=device)).to(dtype),
        },
        TOL[dtype],
    )


@pytest.mark.parametrize("device", DEVICES)
def test_layouts(device):
    """channels_last and sliced (non-contiguous) inputs give the same results as contiguous ones."""
    B, C, H, W, groups = 2, 12, 5, 6, 3
    Q, S = decay_params(C, device)
    h = torch.randn(B, C, H, W, device=device).to(memory_format=torch.channels_last)
    y = torch.randn(B, 2 * C, H, W, device=device)[:, ::2]
    check_op(
        lambda h, y, Q: F.state_update(h, y, Q, S, 1.0, 0.5, 1.0, groups, backend="triton"),
        lambda h, y, Q: reference.state_update(h, y, Q, S, 1.0, 0.5, 1.0, groups),
        {"h": h, "y": y, "Q": Q},
        TOL[torch.float32],
    )
    check_op(
        lambda x, Q: F.exp_decay(x, Q, S, 1.0, 0.5, 1.0, backend="triton"),
        lambda x, Q: reference.exp_decay(x, Q, S, 1.0, 0.5, 1.0),
        {"x": h, "Q": Q},
        TOL[torch.float32],
    )
    x = torch.randn(B, 4, 9, 7, device=device).to(memory_format=torch.channels_last)
    state = torch.randn(B, 3 * C, 4, 3, device=device)[:, ::3]
    check_op(
        lambda x, h: F.feedback_input(x, h, 4, 8, 2, backend="triton"),
        lambda x, h: reference.feedback_input(x, h, 4, 8, 2),
        {"x": x, "h": state},
        TOL[torch.float32],
    )


@pytest.mark.parametrize("device", DEVICES)
def test_gradients_are_views(device):
    """grad_h of state_update is the incoming gradient; grad_x of feedback_input a slice of it."""
    B, C, H, W = 2, 12, 3, 3
    Q, S = decay_params(C, device)
    h, y = leaf(torch.randn(B, C, H, W, device=device)), leaf(torch.randn(B, C, H, W, device=device))
    out = F.state_update(h, y, Q, S, 1.0, 0.5, 1.0, 3, backend="triton")
    g = torch.randn_like(out)
    (grad_h,) = torch.autograd.grad(out, h, g)
    assert grad_h.data_ptr() == g.data_ptr()

    x, state = leaf(torch.randn(B, 5, 6, 6, device=device)), leaf(torch.randn(B, C, 3, 3, device=device))
    out = F.feedback_input(x, state, 2, 4, 2, backend="triton")
    g = torch.randn_like(out)
    (grad_x,) = torch.autograd.grad(out, x, g)
    assert grad_x.data_ptr() == g.data_ptr() and grad_x.stride() == g.stride()
    torch.testing.assert_close(grad_x, g[:, :5], rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_non_finite_and_underflow_like_the_reference(device):
    """NaN and inf propagate to the same elements as in the reference; a huge t leaves h unchanged."""
    C = 8
    Q, S = decay_params(C, device)
    y = torch.randn(2, C, 3, 3, device=device)
    y[0, 1, 1, 1] = float("nan")
    h = torch.randn(2, C, 3, 3, device=device)
    h[1, 5, 0, 2] = float("inf")
    x = torch.randn(2, 3, 6, 6, device=device)
    pairs = [
        (F.state_update(h, y, Q, S, 1, 1, 1, 2, backend="triton"), reference.state_update(h, y, Q, S, 1, 1, 1, 2)),
        (F.exp_decay(y, Q, S, 1, 1, 1, backend="triton"), reference.exp_decay(y, Q, S, 1, 1, 1)),
        (F.feedback_input(x, h, 4, 4, 2, backend="triton"), reference.feedback_input(x, h, 4, 4, 2)),
    ]
    for out, expected in pairs:
        assert expected.isnan().any()
        assert torch.equal(out.isnan(), expected.isnan())
        finite = torch.isfinite(expected)
        assert torch.equal(torch.isfinite(out), finite)
        assert rel_err(out[finite], expected[finite]) <= TOL[torch.float32]
    h = torch.randn(2, C, 3, 3, device=device)
    assert torch.equal(F.state_update(h, y.nan_to_num(), Q, S, 10_000, 0.01, 1.0, 2, backend="triton"), h)


@pytest.mark.parametrize("device", DEVICES)
def test_float64_is_refused(device):
    x = torch.randn(1, 4, 2, 2, device=device, dtype=torch.float64)
    Q, S = decay_params(4, device)
    with pytest.raises(TypeError, match="x: the triton backend takes float16, bfloat16 or float32"):
        F.exp_decay(x, Q, S, 1.0, 0.5, 1.0, backend="triton")


@needs_cuda
@pytest.mark.parametrize("op", ["exp_decay", "state_update"])
def test_tf32_follows_torch(op, monkeypatch):
    """With ``allow_tf32`` on, float32 dots use TF32: within TF32 tolerance, and not bitwise IEEE."""
    B, C, H, W, groups = 4, 72, 9, 9, 8
    Q, S = decay_params(C, "cuda")
    h, y = torch.randn(B, C, H, W, device="cuda"), torch.randn(B, C, H, W, device="cuda")
    # exp_decay has no state input: differentiate only what each op takes.
    inputs = {"y": y, "Q": Q} if op == "exp_decay" else {"h": h, "y": y, "Q": Q}
    run = {
        "exp_decay": lambda y, Q: F.exp_decay(y, Q, S, 1.0, 0.5, 1.0, backend="triton"),
        "state_update": lambda h, y, Q: F.state_update(h, y, Q, S, 1.0, 0.5, 1.0, groups, backend="triton"),
    }[op]
    ref = {
        "exp_decay": lambda y, Q: reference.exp_decay(y, Q, S, 1.0, 0.5, 1.0),
        "state_update": lambda h, y, Q: reference.state_update(h, y, Q, S, 1.0, 0.5, 1.0, groups),
    }[op]
    ieee = run(**inputs)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    tf32 = check_op(run, ref, inputs, TF32_TOL)
    assert not torch.equal(tf32, ieee), "allow_tf32=True did not change the float32 dot"


LARGE = {"resnet18": (64, 520, 7, 7, 8), "deeplab": (8, 258, 128, 128, 258)}


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(LARGE))
def test_state_update_large(name, dtype):
    B, C, H, W, groups = LARGE[name]
    Q, S = decay_params(C, "cuda")
    check_op(
        lambda h, y, Q: F.state_update(h, y, Q, S, 4.0, 0.1, 1.0, groups, backend="triton"),
        lambda h, y, Q: reference.state_update(h, y, Q, S, 4.0, 0.1, 1.0, groups),
        {"h": torch.randn(B, C, H, W, device="cuda").to(dtype),
         "y": torch.randn(B, C, H, W, device="cuda").to(dtype), "Q": Q},
        TOL[dtype],
    )


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(LARGE))
def test_exp_decay_large(name, dtype):
    B, C, H, W, _ = LARGE[name]
    Q, S = decay_params(C, "cuda")
    check_op(
        lambda x, Q: F.exp_decay(x, Q, S, 1.0, 0.1, 1.0, backend="triton"),
        lambda x, Q: reference.exp_decay(x, Q, S, 1.0, 0.1, 1.0),
        {"x": torch.randn(B, C, H, W, device="cuda").to(dtype), "Q": Q},
        TOL[dtype],
    )


# ResNet18 DFM: x at H/4 = 56, state (512 + 8) x 7 x 7. DeepLab: state 258 x 128 x 128, feedback at H/2.
LARGE_FEEDBACK = {
    "resnet18": (64, 64, 56, 56, 520, 7, 7, 512, 8, 8),
    "deeplab": (8, 64, 256, 256, 258, 128, 128, 256, 2, 2),
}


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(LARGE_FEEDBACK))
def test_feedback_input_large(name, dtype):
    B, Cx, H, W, Ch, Hi, Wi, offset, fb, groups = LARGE_FEEDBACK[name]
    check_op(
        lambda x, h: F.feedback_input(x, h, offset, fb, groups, backend="triton"),
        lambda x, h: reference.feedback_input(x, h, offset, fb, groups),
        {"x": torch.randn(B, Cx, H, W, device="cuda").to(dtype),
         "h": torch.randn(B, Ch, Hi, Wi, device="cuda").to(dtype)},
        TOL[dtype],
    )


@needs_cuda
def test_grad_Q_is_deterministic():
    B, C, H, W, groups = 8, 258, 32, 32, 258
    Q, S = decay_params(C, "cuda")
    h, y = torch.randn(B, C, H, W, device="cuda"), torch.randn(B, C, H, W, device="cuda")
    g = torch.randn(B, C, H, W, device="cuda")
    Q = leaf(Q)
    grads = [
        torch.autograd.grad(F.state_update(h, y, Q, S, 1.0, 0.5, 1.0, groups, backend="triton"), Q, g)[0]
        for _ in range(3)
    ]
    assert all(torch.equal(grads[0], other) for other in grads[1:])


@needs_cuda
def test_auto_order_on_cuda():
    """``auto`` on a GPU: the extension when it is built with CUDA kernels, else torch;
    Triton only when asked for."""
    import dfm_fused
    from dfm_fused._dispatch import resolve

    expected = "extension" if "extension" in dfm_fused.available_backends("cuda") else "torch"
    assert resolve("state_update", "cuda")[0] == expected


@pytest.mark.skipif(INTERPRET, reason="checks the compiled (GPU) configs, not the interpreter's single one")
def test_autotune_configs_fit_sm90():
    """Every GEMM config uses tl.dot tiles of at least 16 and fits sm_90 shared memory (227 KiB) in float32."""
    from dfm_fused.ops._triton import channel as k

    smem_limit = 227 * 1024
    for config in k.channel_matmul_kernel.configs:
        co, p, kk = (config.kwargs[n] for n in ("BLOCK_CO", "BLOCK_P", "BLOCK_K"))
        assert min(co, p, kk) >= 16
        assert config.num_stages * (co * kk + kk * p) * 4 <= smem_limit, config
    for config in k.channel_outer_kernel.configs:
        i, j, p = (config.kwargs[n] for n in ("BLOCK_I", "BLOCK_J", "BLOCK_P"))
        assert min(i, j, p) >= 16 and k._SPLIT_QUANTUM % p == 0
        assert config.num_stages * (i * p + p * j) * 4 <= smem_limit, config
    assert len(k.channel_matmul_kernel.configs) > 1


@pytest.mark.skipif(INTERPRET, reason="checks the compiled (GPU) configs, not the interpreter's single one")
def test_config_pruning():
    """IEEE float32 dots get the FMA configs (16-deep reduction), others the tensor-core ones;
    the autotune hook off (DFM_FUSED_AUTOTUNE=0) keeps one config (no benchmarking)."""
    from dfm_fused.ops._triton import channel as k

    for kernel, k_block in ((k.channel_matmul_kernel, "BLOCK_K"), (k.channel_outer_kernel, "BLOCK_P")):
        prune = kernel.early_config_prune
        with _testing.override(autotune=True):
            fma = prune(kernel.configs, {}, INPUT_PRECISION="ieee")
            mma = prune(kernel.configs, {}, INPUT_PRECISION="tf32")
        assert fma and all(c.kwargs[k_block] == 16 for c in fma)
        assert mma and all(c.kwargs[k_block] >= 32 for c in mma)
        assert len(fma) + len(mma) == len(kernel.configs)
        with _testing.override(autotune=False):
            assert prune(kernel.configs, {}, INPUT_PRECISION="ieee") == fma[:1]
            assert prune(kernel.configs, {}, INPUT_PRECISION="tf32") == mma[:1]


def _triton_version() -> tuple[int, int]:
    import triton

    return tuple(int(part) for part in triton.__version__.split(".")[:2])


@pytest.mark.skipif(INTERPRET, reason="this process is the interpreter run")
def test_interpreter_suite():
    """Runs this file's ``cpu`` cases under ``TRITON_INTERPRET=1`` in a fresh interpreter."""
    if _triton_version() < (3, 8):
        # Seen with 3.6: its interpreter hands scalar kernel arguments over as 1-element arrays,
        # which a loop bound (range(0, C, BLOCK_K)) rejects. The compiled kernels ran on an H200
        # with 3.6; the interpreter suite is known to pass from 3.8 on.
        pytest.skip("the Triton interpreter suite needs triton >= 3.8 (3.6's interpreter rejects "
                    "scalar loop bounds); the compiled kernels do not")
    env = dict(os.environ, TRITON_INTERPRET="1", DFM_FUSED_POISON="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", os.path.abspath(__file__), "-q", "-p", "no:cacheprovider", "-rfE"],
        cwd=root, env=env, capture_output=True, text=True, timeout=1200,
    )
    report = proc.stdout[-12000:] + proc.stderr[-4000:]
    assert proc.returncode == 0, report
    passed = re.search(r"(\d+) passed", proc.stdout)
    # Every cpu case must have run: a silently skipped suite is a failure.
    cpu_cases = (2 * len(DECAY_SHAPES) * len(DTYPES) + len(DTYPES) + len(FEEDBACK_GEOMETRIES) * len(DTYPES)
                 + 2 * len(HALF_DTYPES) + 5)
    assert passed and int(passed.group(1)) == cpu_cases, report
    assert " failed" not in proc.stdout, report
