"""Backend selection: auto, forcing, the environment variable, unavailable backends."""
import subprocess
import sys

import pytest
import torch

import dfm_fused
from dfm_fused import _dispatch

from _helpers import decay_args


@pytest.fixture(autouse=True)
def _restore():
    yield
    dfm_fused.set_backend(None)


def test_reference_and_torch_are_always_available_on_cpu():
    available = dfm_fused.available_backends("cpu")
    assert "torch" in available and "reference" in available
    status = dfm_fused.backend_status("cpu")
    assert list(status) == ["triton", "extension", "torch", "reference"]


def _extension_reason(device_type: str) -> str | None:
    from dfm_fused import _extension

    try:
        _extension.require(device_type)
    except dfm_fused.BackendUnavailable as exc:
        return str(exc)
    return None


def test_one_extension_backend_reports_each_device():
    """``extension`` is one backend for the CPU and CUDA kernels of one library (before: ``cpp`` and
    ``cuda``); its status says per device whether it runs there and, if not, why."""
    for device_type in ("cpu", "cuda"):
        reason = _extension_reason(device_type)
        status = dfm_fused.backend_status(device_type)["extension"]
        if reason is None:
            assert status is None and "extension" in dfm_fused.available_backends(device_type)
        else:
            assert status == f"backend 'extension' is unavailable: {reason}"
    if not torch.cuda.is_available():
        assert "no CUDA device is available" in dfm_fused.backend_status("cuda")["extension"]


def test_auto_picks_the_first_available_backend_for_the_device():
    name, _ = _dispatch.resolve("state_update", "cpu")
    order = [b for b in _dispatch._AUTO_ORDER["cpu"] if b in dfm_fused.available_backends("cpu")]
    assert name == order[0]


def test_set_backend_forces_and_use_backend_restores():
    dfm_fused.set_backend("reference")
    assert dfm_fused.get_backend() == "reference"
    assert _dispatch.resolve("exp_decay", "cpu")[0] == "reference"
    with dfm_fused.use_backend("torch"):
        assert _dispatch.resolve("exp_decay", "cpu")[0] == "torch"
    assert dfm_fused.get_backend() == "reference"
    dfm_fused.set_backend("auto")
    assert dfm_fused.get_backend() == "auto"


def test_unknown_backend_is_a_value_error():
    with pytest.raises(ValueError, match=r"set_backend\(name\): expected one of auto, triton"):
        dfm_fused.set_backend("fast")
    x = torch.randn(1, 4, 2, 2)
    Q, S = decay_args(4)
    with pytest.raises(ValueError, match="backend: expected one of"):
        dfm_fused.exp_decay(x, Q, S, 1, 1, 1, backend="fast")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_backend_raises_with_the_reason(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(_dispatch, "_cache", {})  # the probes read TRITON_INTERPRET once, then cache
    with pytest.raises(dfm_fused.BackendUnavailable, match="backend 'triton' is unavailable"):
        dfm_fused.set_backend("triton")
    assert dfm_fused.get_backend() == "auto"  # a refused set_backend leaves the setting alone
    x = torch.randn(1, 4, 2, 2)
    Q, S = decay_args(4)
    with pytest.raises(dfm_fused.BackendUnavailable, match="backend 'triton' is unavailable"):
        dfm_fused.exp_decay(x, Q, S, 1, 1, 1, backend="triton")
    with pytest.raises(dfm_fused.BackendUnavailable, match="backend 'extension' is unavailable: no CUDA device"):
        _dispatch.resolve("exp_decay", "cuda", "extension")


@pytest.mark.parametrize("name", ["cpp", "cuda"])
def test_former_extension_names_are_not_backends(name):
    """``cpp`` and ``cuda`` were the extension's two backends before it became one; they are refused
    like any unknown name, everywhere a backend is named."""
    known = "expected one of auto, triton, extension, torch, reference; got"
    with pytest.raises(ValueError, match=rf"set_backend\(name\): {known} '{name}'"):
        dfm_fused.set_backend(name)
    x = torch.randn(1, 4, 2, 2)
    Q, S = decay_args(4)
    with pytest.raises(ValueError, match=rf"backend: {known} '{name}'"):
        dfm_fused.exp_decay(x, Q, S, 1, 1, 1, backend=name)
    assert _import_error(DFM_FUSED_BACKEND=name) == (
        f"ValueError: environment variable DFM_FUSED_BACKEND: {known} '{name}'")


def test_environment_variable_forces_a_backend_in_a_fresh_process():
    code = (
        "import torch, dfm_fused\n"
        "from dfm_fused import _dispatch\n"
        "print(dfm_fused.get_backend(), _dispatch.resolve('state_update', 'cpu')[0])\n"
    )
    env = {**_env(), "DFM_FUSED_BACKEND": "reference"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["reference", "reference"]
    bad = subprocess.run(
        [sys.executable, "-c", code], env={**_env(), "DFM_FUSED_BACKEND": "nope"}, capture_output=True, text=True
    )
    assert bad.returncode != 0 and "environment variable DFM_FUSED_BACKEND: expected one of" in bad.stderr


def _env():
    import os

    return {k: v for k, v in os.environ.items() if k not in ("DFM_FUSED_BACKEND", "DFM_FUSED_CPU_TARGET")}


def _import_error(**variables) -> str:
    """The last line of stderr of ``import dfm_fused`` in a fresh process with ``variables`` set."""
    proc = subprocess.run([sys.executable, "-c", "import dfm_fused"], env={**_env(), **variables},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0, f"import dfm_fused accepted {variables}"
    return proc.stderr.strip().splitlines()[-1]


def _set_backend_error(name: str) -> str:
    with pytest.raises((ValueError, dfm_fused.BackendUnavailable)) as raised:
        dfm_fused.set_backend(name)
    return str(raised.value)


def test_unknown_backend_in_the_environment_is_refused_at_import():
    """Before: ``DFM_FUSED_BACKEND=gpu`` imported fine and failed at the first op."""
    line = _import_error(DFM_FUSED_BACKEND="gpu")
    expected = _set_backend_error("gpu").replace("set_backend(name)", "environment variable DFM_FUSED_BACKEND")
    assert line == f"ValueError: {expected}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_backend_in_the_environment_says_what_set_backend_says(monkeypatch):
    """One wording for "no CUDA": at import the variable gets set_backend's message (before, the first
    op said "does not run on 'cpu' tensors" while set_backend said "no CUDA device is available")."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(_dispatch, "_cache", {})  # the probes read TRITON_INTERPRET once, then cache
    line = _import_error(DFM_FUSED_BACKEND="triton", TRITON_INTERPRET="0")
    expected = _set_backend_error("triton")
    assert line == f"dfm_fused._errors.BackendUnavailable: environment variable DFM_FUSED_BACKEND=triton: {expected}"
    assert "no CUDA device is available" in line or "triton is not importable" in line


def test_unknown_cpu_target_is_refused_at_import():
    """Before: ``DFM_FUSED_CPU_TARGET=avx512`` failed inside the first cpp kernel's dispatch."""
    line = _import_error(DFM_FUSED_CPU_TARGET="avx512")
    assert line == ("ValueError: environment variable DFM_FUSED_CPU_TARGET: expected one of baseline, avx2 "
                    "(or unset: the best this CPU supports); got 'avx512'")


def test_auto_passes_over_backends_that_do_not_take_the_dtype(monkeypatch):
    """triton takes no float64: auto must choose the next backend rather than fail."""
    monkeypatch.setitem(_dispatch._AUTO_ORDER, "cpu", ("triton", "torch"))
    monkeypatch.setattr(_dispatch, "_load", lambda name, device_type: {})
    assert _dispatch._resolve_name("exp_decay", "cpu", None, torch.float64) == "torch"
    assert _dispatch._resolve_name("exp_decay", "cpu", None, torch.float32) == "triton"
