"""For :func:`dfm_fused.patch`: which fused ``StateExpDecay`` computes exactly what a module does.

A module is replaced only by a fused configuration that passes two kinds of check:

- structural: no submodules, no hooks, ``forward(x, T=5)`` like the fused module (its own
  keyword-only options with defaults aside), ``Qinv`` (if any) of ``Q``'s shape;
- a probe: the module and the candidate, each on its own copy of the parameters, run on
  the same small random input, forward and backward, in eval mode at ``T = 0`` and ``T = 2``
  and in training mode at ``T = 0`` (where dfbmodels re-orthogonalises ``Q``) and
  ``T = 3``, ``T`` once a Python int and once a 0-d tensor; in training mode ``Q`` is first
  moved off orthogonal (on both copies alike). Each case runs twice: at the module's own
  parameter values, and with ``S``, ``T``, ``tau`` and ``alpha`` set (on both copies alike)
  to the randomised values of :func:`probe_values`, away from a fresh module's ``S = 1``,
  ``T = 1``, ``alpha = 1``, where formulas that ignore one of them coincide. Compared: the
  output, the gradients of the input, ``Q``, ``Qinv`` and every parameter that requires one
  (``None`` must match ``None``), and every parameter after the call (the QR side effect),
  to float rounding (relative 2-norm 1e-5; 1e-10 for float64 modules; half-precision ones
  are probed in float32).

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
_STEPS = ((False, 0, False), (False, 2, True), (True, 0, False), (True, 3, True))
# (randomised parameter values?, training, T, T as a 0-d tensor)
_CASES = tuple((randomised, *step) for randomised in (False, True) for step in _STEPS)
_PROBE_SEED = 20240611
_RANDOMISED = "randomised S, T, tau, alpha"
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
    # Without self, and without the fused module's own keyword-only options (they have defaults,
    # so every call the old module took means the same to the fused one).
    ours = [p for p in _signature(StateExpDecay.forward)[1:]
            if not (p[1] is inspect.Parameter.KEYWORD_ONLY and p[2] is not inspect.Parameter.empty)]
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
    message = "no fused configuration computes what it does:\n    - " + "\n    - ".join(failures)
    if any(_RANDOMISED in failure for failure in failures):
        message += f"\n    ({_RANDOMISED}: {_describe_values(probe_values(module.Q.shape[0]))})"
    raise NotExactError(message)


def probe_values(filters: int) -> dict[str, torch.Tensor]:
    """The parameter values of the probe's second run, float64 on the CPU, from a fixed seed.

    Away from a fresh module's ``S = 1``, ``T = 1``, ``alpha = 1``, where formulas that ignore
    one of them (or use ``S`` for ``|S|``) coincide: ``S`` (``filters``,) with magnitudes in
    [0.35, 0.7] and [1.3, 1.7] (half each, in a random order: away from 1, so ``|S|**alpha``
    moves with ``alpha``), half of them negative, in another random order (one channel: a low,
    negative entry); ``T`` in [0.3, 0.7] (not a whole number); ``tau`` in
    [1.5, 2.5]; ``alpha`` in [1.3, 1.7] (not a whole number: ``S**alpha`` of a negative entry
    is NaN, ``|S|**alpha`` is not). The probe's largest ``t |Delta|``, at step ``T = 3``, is
    below 0.7 * 3 * 1.7**1.7 / 1.5 < 3.5, so every ``exp(t Delta)`` exceeds 0.03: nothing
    underflows, and outputs move measurably with each of the four values.
    """
    generator = torch.Generator().manual_seed(_PROBE_SEED)

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return low + (high - low) * torch.rand(shape, generator=generator, dtype=torch.float64)

    def half(count: int) -> torch.Tensor:  # True at ceil(count / 2) random places
        return torch.randperm(count, generator=generator) % 2 == 0

    magnitude = torch.where(half(filters), uniform(0.35, 0.7, filters), uniform(1.3, 1.7, filters))
    S = torch.where(half(filters), -magnitude, magnitude)
    return {"S": S, "T": uniform(0.3, 0.7), "tau": uniform(1.5, 2.5), "alpha": uniform(1.3, 1.7)}


def _describe_values(values: dict[str, torch.Tensor]) -> str:
    S = values["S"]
    scalars = ", ".join(f"{name}={float(values[name]):.4g}" for name in ("T", "tau", "alpha"))
    return (f"{scalars}, S from {float(S.min()):.4g} to {float(S.max()):.4g} "
            f"({int((S < 0).sum())} of {S.numel()} negative)")


# torch >= 2.9's per-backend float32 settings, as (backend, op), and the one each inherits from
# while it is "none". Read and set by torch's own accessors of one (backend, op) each: the public
# attributes do not map one to one (in torch 2.14 setting torch.backends.mkldnn.fp32_precision
# writes the global setting, while reading it reads mkldnn's).
_MATMUL_SETTINGS = (("cuda", "matmul"), ("mkldnn", "matmul"))
_INHERITS_FROM = {("cuda", "matmul"): ("cuda", "all"), ("mkldnn", "matmul"): ("mkldnn", "all"),
                  ("cuda", "all"): ("generic", "all"), ("mkldnn", "all"): ("generic", "all")}


@contextlib.contextmanager
def _ieee_float32_matmuls():
    """float32 matmuls in full precision while probing (TF32 or bfloat16 passes, if enabled,
    round to ~1e-3 and would fail the 1e-5 comparison of two exact computations); afterwards
    every setting as it was stored.

    torch >= 2.9 has per-backend settings (``torch.backends.{cuda,mkldnn}.matmul.fp32_precision``)
    beside the legacy value of ``torch.set_float32_matmul_precision``, and raises wherever the two
    disagree: ``torch.get_float32_matmul_precision()`` does, and so does every cuBLAS matmul while
    the legacy value allows TF32 and the cuda setting does not. So: the per-backend settings,
    and the legacy value too only where it is not "highest" (set by the legacy API, whose user
    gets it back). Before torch 2.9, the legacy API alone.
    """
    if not hasattr(torch._C, "_set_fp32_precision_setter"):
        previous = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(previous)
        return
    stored = {setting: _stored_precision(setting) for setting in _MATMUL_SETTINGS}
    for setting in _MATMUL_SETTINGS:
        torch._C._set_fp32_precision_setter(*setting, "ieee")
    legacy = torch.get_float32_matmul_precision()  # both settings "ieee" agree with any legacy value
    if legacy != "highest":
        torch.set_float32_matmul_precision("highest")  # also sets both to "ieee", as they are
    try:
        yield
    finally:
        if legacy != "highest":
            torch.set_float32_matmul_precision(legacy)
        for setting, value in stored.items():
            torch._C._set_fp32_precision_setter(*setting, value)


def _stored_precision(setting: tuple[str, str]) -> str:
    """The fp32 precision stored for ``(backend, op)``, ``"none"`` where it inherits.

    torch's getter answers the inherited value, not "none"; so the setting inherited from is set
    to another value for a moment (and back, as stored), to see whether this one follows it.
    """
    seen = torch._C._get_fp32_precision_getter(*setting)
    parent = _INHERITS_FROM.get(setting)
    if parent is None:
        return seen
    parent_value = _stored_precision(parent)
    other = "tf32" if seen == "ieee" else "ieee"
    torch._C._set_fp32_precision_setter(*parent, other)
    try:
        follows = torch._C._get_fp32_precision_getter(*setting) == other
    finally:
        torch._C._set_fp32_precision_setter(*parent, parent_value)
    return "none" if follows else seen


def _signature(forward) -> list[tuple]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(forward).parameters.values()]


def _describe(signature: list[tuple]) -> str:
    return "(" + ", ".join(n if d is inspect.Parameter.empty else f"{n}={d!r}" for n, _, d in signature) + ")"


def _probe_case(module: nn.Module, case, configuration) -> dict | str:
    """Outputs, gradients and parameters after one forward/backward of a deep copy of ``module``
    (``configuration=None``) or of the fused candidate built on another deep copy; or, where the
    call raised, a string saying so."""
    randomised, training, T, as_tensor = case
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
    C = module.Q.shape[0]
    if randomised:
        with torch.no_grad():
            for name, value in probe_values(C).items():
                getattr(twin, name).copy_(value)
    if configuration is not None:
        twin = fused_like(twin, *configuration)
    twin.train(training)
    generator = torch.Generator().manual_seed(0)
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
    randomised, training, T, as_tensor = case
    where = (f"{'training' if training else 'eval'} at T={T}{' (tensor)' if as_tensor else ''}, "
             + (_RANDOMISED if randomised else "its own parameter values"))
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
        non_finite = [whose for whose, value in (("the module's", want), ("the fused module's", got))
                      if not bool(torch.isfinite(value).all())]
        if non_finite:
            if not torch.allclose(got.double(), want.double(), rtol=0, atol=0, equal_nan=True):
                differences.append(f"{where}: {key} is not finite in {' and '.join(non_finite)} result")
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
