"""For :func:`dfm_fused.patch`: which fused ``StateExpDecay`` computes exactly what a module does.

A module is replaced only by a fused configuration that passes two kinds of check:

- structural: no submodules, no hooks, ``forward(x, T=5)`` like the fused module, ``Qinv``
  (if any) of ``Q``'s shape;
- a probe: the module and the candidate, each on its own copy of the parameters, run on
  the same small random input, forward and backward, in eval mode at ``T = 0`` and ``T = 2``
  and in training mode at ``T = 0`` (where dfbmodels re-orthogonalises ``Q``) and
  ``T = 3``, ``T`` once a Python int and once a 0-d tensor; in training mode ``Q`` is first
  moved off orthogonal (on both copies alike). Compared: the output, the gradients of the
  input, ``Q``, ``Qinv`` and every parameter that requires one (``None`` must match
  ``None``), and every parameter after the call (the QR side effect), to float rounding
  (relative 2-norm 1e-5; 1e-10 for float64 modules; half-precision ones are probed in float32).

The module itself is never run: the probe works on deep copies, so its parameters keep
their values and version counters, and the global RNG streams are restored.
"""
from __future__ import annotations

import contextlib
import copy
import inspect

import torch
from torch import nn

from dfm_fused.modules import StateExpDecay

# (output_map, backward, description), tried in this order.
CONFIGURATIONS = (
    ("QT", "exact", "dfbmodels' decay (Q^T map, QR at training T=0, exact backward)"),
    ("Qinv", "neumann", "feedback_segmentation's decay (Qinv map, no QR, Neumann surrogate backward)"),
    ("Qinv", "exact", "the Qinv map with no QR and the exact backward"),
)
# (training, T, T as a 0-d tensor). The training cases run on a perturbed, non-orthogonal Q
# (the same on both sides): after an optimizer step Q is not orthogonal, and a QR of an
# orthogonal Q may return it unchanged, which would hide a missing (or extra) QR.
_CASES = ((False, 0, False), (False, 2, True), (True, 0, False), (True, 3, True))
# Relative 2-norm difference allowed: rounding of the probe dtype.
_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
          "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


class NotExactError(ValueError):
    """``patch`` found no fused configuration that computes exactly what a module does."""


def fused_like(module: nn.Module, output_map: str, backward: str) -> StateExpDecay:
    """A fused module holding ``module``'s very Parameter and buffer objects, in ``module``'s
    registration order (so ``parameters()`` and ``state_dict`` keep their order), its ``state``
    attribute and its training flag."""
    # Built with one channel, so its throw-away initial parameters cost nothing (no C x C QR),
    # without drawing from the caller's RNG and as normal tensors even under inference_mode
    # (the module records their version counters); then given ``module``'s parameters.
    with torch.random.fork_rng(devices=[]), torch.inference_mode(False):
        new = StateExpDecay(1, (), output_map=output_map, backward=backward)
    new.filters = module.Q.shape[0]
    new.state = torch.zeros((1, new.filters), device=module.Q.device)
    new._parameters.clear()
    for name, param in module._parameters.items():
        new.register_parameter(name, param)
    new._parameters.setdefault("Qinv", None)  # a module without Qinv (only for output_map="QT")
    for name, buffer in module._buffers.items():
        new.register_buffer(name, buffer, persistent=name not in module._non_persistent_buffers_set)
    if hasattr(module, "state"):
        new.state = module.state
    return new.train(module.training)


def structural_problem(module: nn.Module) -> str | None:
    """Why no fused module can stand in for ``module`` whatever it computes, or None."""
    children = [name for name, _ in module.named_children()]
    if children:
        return f"it has submodules ({', '.join(children)}), which the fused module would drop"
    hooks = [name.strip("_") for name in _HOOKS if getattr(module, name, None)]
    if hooks:
        return f"it has hooks registered ({', '.join(hooks)}), which the fused module would drop"
    try:
        theirs = _signature(module.forward)
    except (TypeError, ValueError) as exc:
        return f"its forward's signature cannot be read ({exc})"
    ours = _signature(StateExpDecay.forward)[1:]  # without self
    if theirs != ours:
        return f"its forward takes {_describe(theirs)}; the fused module's takes {_describe(ours)}"
    qinv = module._parameters.get("Qinv")
    if qinv is not None and qinv.shape != module.Q.shape:
        return f"its Qinv has shape {tuple(qinv.shape)}, not Q's {tuple(module.Q.shape)}"
    return None


def exact_configuration(module: nn.Module) -> tuple[str, str]:
    """``(output_map, backward)`` of the first fused configuration that computes what ``module``
    does, by the structural checks and the probe (module docstring); raise
    :class:`NotExactError` saying what differs otherwise."""
    problem = structural_problem(module)
    if problem:
        raise NotExactError(problem)
    failures = []
    # Probing needs autograd: not inference tensors even if patch() runs under inference_mode.
    with _ieee_float32_matmuls(), torch.inference_mode(False):
        expected = [_probe_case(module, case, None) for case in _CASES]
        for output_map, backward, description in CONFIGURATIONS:
            if output_map == "Qinv" and module._parameters.get("Qinv") is None:
                continue
            differences = []
            for case, reference in zip(_CASES, expected):
                differences += _compare(reference, _probe_case(module, case, (output_map, backward)), case)
            if not differences:
                return output_map, backward
            failures.append(f"as {description} [output_map={output_map!r}, backward={backward!r}]: "
                            + "; ".join(differences[:4]) + ("; ..." if len(differences) > 4 else ""))
    raise NotExactError("no fused configuration computes what it does:\n    - " + "\n    - ".join(failures))


@contextlib.contextmanager
def _ieee_float32_matmuls():
    """float32 matmuls in full precision while probing (TF32 or bfloat16 passes, if enabled,
    round to ~1e-3 and would fail the 1e-5 comparison of two exact computations)."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def _signature(forward) -> list[tuple]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(forward).parameters.values()]


def _describe(signature: list[tuple]) -> str:
    return "(" + ", ".join(n if d is inspect.Parameter.empty else f"{n}={d!r}" for n, _, d in signature) + ")"


def _probe_case(module: nn.Module, case, configuration) -> dict | str:
    """Outputs, gradients and parameters after one forward/backward of a deep copy of ``module``
    (``configuration=None``) or of the fused candidate built on another deep copy; or, where the
    call raised, a string saying so."""
    training, T, as_tensor = case
    # A candidate never reads the ``state`` attribute (feedback_segmentation's can be 1 x C x 512 x 512):
    # its copies share it instead of copying it.
    state = getattr(module, "state", None)
    shared = {id(state): state} if configuration is not None and isinstance(state, torch.Tensor) else {}
    try:
        twin = copy.deepcopy(module, shared)
    except Exception as exc:  # noqa: BLE001 - any failure means the probe cannot run
        raise NotExactError(f"it cannot be deep-copied for the probe ({type(exc).__name__}: {exc})") from None
    device = module.Q.device
    dtype = module.Q.dtype if module.Q.dtype in _TOLERANCE else torch.float32
    twin.to(dtype)
    if configuration is not None:
        twin = fused_like(twin, *configuration)
    twin.train(training)
    generator = torch.Generator().manual_seed(0)
    C = module.Q.shape[0]
    if training:
        with torch.no_grad():
            Q = twin.Q
            noise = torch.randn((C, C), generator=generator, dtype=torch.float64)
            Q.add_((0.2 * Q.double().abs().mean() * noise).to(device=Q.device, dtype=Q.dtype))
    forced = {"Q", "Qinv"}
    params = {n: p for n, p in twin._parameters.items() if p is not None}
    for name, p in params.items():
        if name in forced and p.is_floating_point():
            p.requires_grad_(True)
    x = torch.randn((2, C, 3, 5), generator=generator, dtype=dtype).to(device).requires_grad_()
    weight = torch.randn(x.shape, generator=generator, dtype=dtype).to(device)
    step = torch.tensor(float(T), device=device) if as_tensor else T
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.enable_grad(), \
            torch.autocast(device.type, enabled=False):
        try:
            out = twin(x, T=step)
            if not isinstance(out, torch.Tensor):
                return f"it returned a {type(out).__name__}, not a tensor"
            if out.requires_grad:
                loss = (out * weight.to(out.dtype)).sum() if out.shape == x.shape else out.sum()
                loss.backward()
        except Exception as exc:  # noqa: BLE001 - reported as a difference (or a refusal) by the caller
            who = "the fused module" if configuration is not None else "it"
            return f"{who} raised {type(exc).__name__}: {exc}"
    result = {"output": out.detach(), "grad of the input": x.grad}
    for name, p in params.items():
        result[f"grad of {name}"] = p.grad
        result[f"{name} after the call"] = p.detach()
    return result


def _compare(expected, actual, case) -> list[str]:
    """What differs between the module's probe results and the candidate's, beyond rounding."""
    training, T, as_tensor = case
    where = f"{'training' if training else 'eval'} at T={T}{' (tensor)' if as_tensor else ''}"
    if isinstance(expected, str):
        raise NotExactError(f"{expected} on the probe ({where}, x of shape (2, C, 3, 5))")
    if isinstance(actual, str):
        return [f"{where}: {actual}"]
    differences = []
    for key, want in expected.items():
        got = actual.get(key)
        if want is None or got is None:
            if (want is None) != (got is None):
                whose = "the module's" if got is None else "the fused module's"
                differences.append(f"{where}: {key} exists only in {whose} result")
            continue
        if got.shape != want.shape:
            differences.append(f"{where}: {key} has shape {tuple(got.shape)}, not {tuple(want.shape)}")
            continue
        error = _relative_error(got, want)
        if not error <= _TOLERANCE.get(want.dtype, _TOLERANCE[torch.float32]):
            differences.append(f"{where}: {key} differs by {error:.3g} relative")
    return differences


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double(), expected.detach().double()
    if torch.equal(actual, expected):
        return 0.0
    scale = expected.norm()
    return float((actual - expected).norm() / (scale if scale > 0 else 1.0))
