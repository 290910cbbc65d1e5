"""Checks that stop what a CUDA graph cannot replay, with errors that name it.

A graph replays device work only. What happens on the host during capture
(reading a device value, the value of a CPU tensor, a Python branch) is frozen
into the graph, so these are refused:

- a host sync (``.item()``, ``.tolist()``, ``float(t)``, printing a CUDA tensor, the
  reference's early stop that reads ``sum |h|`` after every step): the warm-up runs
  under ``torch.cuda.set_sync_debug_mode("error")``;
- a CPU tensor used by an op on the device (its value would be read once, at
  capture): :class:`CpuTensorUse` watches every op of the warm-up;
- inputs, parameters or buffers not on the one CUDA device of the model.
"""
from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["CaptureError", "CpuTensorUse", "capture_error_mode", "explain", "input_tensor", "model_device", "no_host_sync", "require_cuda"]

MODES = ("global", "thread_local", "relaxed")
# The device type whose memory a graph replays; tests of the capture logic on the CPU (which
# simulate the graphs, see tests/_capture_sim.py) set it to "cpu".
GRAPH_DEVICE_TYPE = "cuda"

HINTS = (
    "a host sync inside the step (.item(), .tolist(), float()/int()/bool() of a CUDA tensor, printing one, "
    "or early stop with atol, which reads sum|h| on the host)",
    "a CPU tensor used together with CUDA tensors (a graph would keep the value it had at capture)",
    "an optimizer constructed with capturable=False, or a torch.cuda.amp.GradScaler (it reads found_inf on the host)",
)


class CaptureError(RuntimeError):
    """Something in the step cannot be captured into a CUDA graph; the message names it."""


def require_cuda(api: str) -> None:
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"{api}: CUDA graphs need a CUDA device, and none is available here (torch.cuda.is_available() is False; "
            f"torch {torch.__version__}, CUDA build {torch.version.cuda}). The rest of dfm_fused runs on the CPU: "
            "call the model and the optimizer directly."
        )


def model_device(api: str, model: torch.nn.Module, extra_params=()) -> torch.device:
    """The one CUDA device that holds every parameter and buffer of ``model`` (and ``extra_params``)."""
    named = [*model.named_parameters(), *model.named_buffers(), *((f"optimizer param {i}", p) for i, p in enumerate(extra_params))]
    if not named:
        raise ValueError(f"{api}: model has no parameters or buffers, so there is no device to capture on")
    devices = {t.device for _, t in named}
    for name, tensor in named:
        if tensor.device.type != GRAPH_DEVICE_TYPE:
            raise ValueError(
                f"{api}: {name} is on {tensor.device}; a captured step needs every parameter and buffer on one CUDA "
                "device (a CPU tensor cannot be captured). Move the model with model.to('cuda') before building the optimizer."
            )
    if len(devices) > 1:
        raise ValueError(f"{api}: expected every parameter and buffer on one CUDA device; got {sorted(map(str, devices))}")
    return devices.pop()


def input_tensor(name: str, value, device: torch.device) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor; got {type(value).__name__}")
    if value.device != device:
        raise ValueError(
            f"{name}: expected a tensor on {device} (the model's device); got one on {value.device}. A CUDA graph reads "
            f"its inputs from device memory: copy it first, e.g. {name}.to('{device}', non_blocking=True)"
        )
    return value


class CpuTensorUse(TorchDispatchMode):
    """Records the first op that reads, together with tensors on ``device``, a CPU tensor that
    existed before the watched code ran.

    Eager reads such a tensor's value at each call, a graph only at capture. CPU tensors the
    watched code makes itself (``torch.tensor(python_number)``, which dfm_fused's ops pass to
    device kernels as arguments) hold the same constant at every call, so they pass, and so do
    Python numbers, which reach ops as scalars.
    """

    def __init__(self, device: torch.device):
        super().__init__()
        self.device = device
        self.found: str | None = None
        self.created: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.found is None:
            tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            cpu = [t for t in tensors if t.device.type == "cpu" and t.untyped_storage().data_ptr() not in self.created]
            if cpu and any(t.device == self.device for t in tensors):
                self.found = f"{func} reads a CPU tensor of shape {tuple(cpu[0].shape)} and dtype {cpu[0].dtype}"
        out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                self.created.add(t.untyped_storage().data_ptr())
        return out


@contextlib.contextmanager
def no_host_sync(api: str, device: torch.device, what: str):
    """Run the body with host syncs raising and CPU tensors on the device refused, naming ``what``."""
    previous = torch.cuda.get_sync_debug_mode()
    watch = CpuTensorUse(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        with watch:
            yield
    except CaptureError:
        raise
    except Exception as exc:
        raise CaptureError(explain(api, f"{what} (run with torch.cuda.set_sync_debug_mode('error'))", exc)) from exc
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    if watch.found:
        raise CaptureError(
            f"{api}: {what} uses a CPU tensor on the device: {watch.found}. A CUDA graph would replay the value it "
            "had at capture. Keep the tensor on the device (or pass a Python number if it never changes)."
        )


def explain(api: str, what: str, exc: BaseException, extra_hints=()) -> str:
    """The message of a failed warm-up or capture: what failed, torch's error and what usually causes it."""
    text = f"{type(exc).__name__}: {exc}".strip()
    hints = list(extra_hints)
    if "CUDAGeneratorImpl" in text or "get_rng_state" in text:
        hints.insert(0, "something in the step reads the CUDA RNG state (torch.cuda.get_rng_state, e.g. "
                        "torch.utils.checkpoint with preserve_rng_state=True called outside dfm_fused.unroll), "
                        "which capture forbids; dfm_fused.unroll's checkpoint=True and 'selective' do not read it "
                        "under capture (a checkpointed step with dropout raises instead: use checkpoint=False)")
    hints += HINTS
    listing = "".join(f"\n  - {hint}" for hint in hints)
    return f"{api}: {what} failed, so the step cannot be captured into a CUDA graph.\n{text}\nUsual causes:{listing}"


def capture_error_mode(value: str) -> str:
    if value not in MODES:
        raise ValueError(f"capture_error_mode: expected one of {MODES}; got {value!r}")
    return value
