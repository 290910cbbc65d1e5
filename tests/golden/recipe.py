"""The seeded recipe that fills the in-repository golden ResNet18 DFM's weights.

The golden file (``resnet18_dfm_small.pt`` beside this module) stores the reference's outputs,
not its 12 M weights: :func:`fill_state_dict` makes those again from the key list the file holds.

Why integer hashing and not ``torch.manual_seed``: torch does not promise that its random
streams stay the same across versions and CPUs. Here every value comes from integer arithmetic
that cannot overflow (32-bit values times constants below 2**31, held in int64) and from float
operations that are exact or correctly rounded (a 24-bit integer plus 1/2, one multiply and one
add in float64, then one rounding to float32). The result is the same bit
for bit on every CPU and torch version; the golden file records a SHA-256 of it and the tests
check it, so a host that ever disagrees fails loudly instead of comparing against other weights.

What the weights look like (the reference's initialisation, made less special so that no term
of the model vanishes or cancels by accident):

- convolutions: uniform with the reference's Kaiming std ``sqrt(2 / fan_out)``;
- BatchNorm: weight in [0.5, 1.5], bias and running mean in [-0.25, 0.25], running variance in
  [0.5, 2] (eval mode reads the running statistics, so they are not the trivial 0 and 1);
- ``fc``: uniform with std ``sqrt(2 / fan_in)``, bias in [-0.1, 0.1];
- the decay (``error_head``): ``S`` of random sign with ``|S|`` in [0.25, 1.5], ``alpha`` 1.25,
  ``T`` 0.75, ``tau`` the constructor's; ``Q`` dense and uniform with std ``1 / sqrt(C)`` (near
  orthogonal, not exactly: the training case re-orthogonalises it by QR at t=0 as the reference
  does, and the eval case maps by ``Q^T diag(D) Q`` whatever ``Q`` is), ``Qinv`` its transpose;
- the frozen GroupNorm affines stay 1 and 0 (the reference never trains them and the fused ops
  assume them); the unused ``layernorm_weight`` is filled; the model's step counter ``T`` holds 3,
  as a checkpoint saved after a 3-step forward does (every forward resets it).

Why no structured ``Q``: an exactly orthogonal Hadamard-based ``Q`` (entries multiples of
``2**-8``) was tried first. It maps the state onto values with exact ties, and the training case
then sat on kinks of the model (a 1e-6 relative change of the input moved the reference's own
``conv1.weight`` gradient by 1.1e-3, both signs of the change alike): every correct implementation
that rounds differently from the reference would have missed it by 1e-3. Generic values keep the
case where the derivative is defined (the same change moves that gradient by 1e-5).
"""
from __future__ import annotations

import hashlib
import math
import re
import zlib

import torch

SEED = 24
_MASK = 0xFFFFFFFF
# BatchNorm tensors by name: ``bn1.*``, ``layerN.M.bnK.*``, ``layerN.M.downsample.1.*``.
_BATCHNORM = re.compile(r"(^|\.)(bn\d|downsample\.1)\.(weight|bias|running_mean|running_var|num_batches_tracked)$")
# The reference registers some modules twice (``frontend`` is conv1, bn1, relu, maxpool;
# ``classification_head`` ends in ``fc``) and ``torch.compile`` adds ``_orig_mod.``: both names of
# one tensor must get one value, so each is filled under its canonical name.
_ALIASES = ((r"^frontend\.0\.", "conv1."), (r"^frontend\.1\.", "bn1."), (r"^classification_head\.2\.", "fc."))


def canonical_name(name: str) -> str:
    """``frontend._orig_mod.0.weight`` -> ``conv1.weight``, ``layer1._orig_mod.0.x`` -> ``layer1.0.x``."""
    name = name.replace("_orig_mod.", "")
    for pattern, replacement in _ALIASES:
        name = re.sub(pattern, replacement, name)
    return name


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit integer mix (xor-shift, multiply by an odd constant, twice), in place on
    an int64 tensor of values in [0, 2**32); the constants are below 2**31, so no product overflows."""
    x.bitwise_xor_(x >> 16).mul_(0x21F0AAAD).bitwise_and_(_MASK)
    x.bitwise_xor_(x >> 15).mul_(0x735A2D97).bitwise_and_(_MASK)
    return x.bitwise_xor_(x >> 15)


def _stream(key: str, numel: int, seed: int) -> torch.Tensor:
    """``numel`` distinct 32-bit hashes (int64) of the element indices, keyed by ``key`` and ``seed``."""
    offset = _hash32(torch.tensor([(zlib.crc32(key.encode()) ^ (seed * 0x9E3779B1)) & _MASK])).item()
    return _hash32(torch.arange(offset, offset + numel, dtype=torch.int64).bitwise_and_(_MASK))


def uniform(key: str, shape, low: float, high: float, seed: int = SEED) -> torch.Tensor:
    """float64 values in (low, high), a pure function of ``key``, ``shape`` and ``seed``.

    The top 24 bits of each hash, ``k``, give ``low + (k + 1/2) * (high - low) / 2**24``: ``k + 1/2``
    is exact, the multiply and the add are each one correctly rounded float64 operation."""
    k = (_stream(key, math.prod(shape), seed) >> 8).to(torch.float64).add_(0.5)
    return k.mul_((high - low) / 2**24).add_(low).reshape(shape)


def _fill(name: str, shape, dtype: torch.dtype, tau: float, seed: int) -> torch.Tensor:
    """The value of one state_dict entry, by its canonical name."""
    leaf = name.rsplit(".", 1)[-1]
    if name.endswith("num_batches_tracked"):
        return torch.zeros(shape, dtype=dtype)
    if _BATCHNORM.search(name):
        low, high = {"weight": (0.5, 1.5), "bias": (-0.25, 0.25), "running_mean": (-0.25, 0.25),
                     "running_var": (0.5, 2.0)}[leaf]
        return uniform(name, shape, low, high, seed)
    if name.startswith("layernorm_error.") or name.startswith("layernorm_input."):
        return torch.full(shape, 1.0 if leaf == "weight" else 0.0, dtype=torch.float64)
    if name == "layernorm_weight":
        return uniform(name, shape, -0.5, 0.5, seed)
    if name == "T":
        return torch.full(shape, 3.0, dtype=torch.float64)
    if name == "fc.weight":
        bound = math.sqrt(3 * 2 / shape[1])  # uniform with std sqrt(2 / fan_in)
        return uniform(name, shape, -bound, bound, seed)
    if name == "fc.bias":
        return uniform(name, shape, -0.1, 0.1, seed)
    if name.endswith("weight") and len(shape) == 4:
        bound = math.sqrt(3 * 2 / (shape[0] * shape[2] * shape[3]))  # std sqrt(2 / fan_out)
        return uniform(name, shape, -bound, bound, seed)
    if name.startswith("error_head."):
        scalars = {"tau": tau, "T": 0.75, "alpha": 1.25}
        if leaf in scalars:
            return torch.full(shape, scalars[leaf], dtype=torch.float64)
        if leaf == "S":
            magnitude = uniform(name, shape, 0.25, 1.5, seed)
            return torch.where(_stream(f"{name}.sign", magnitude.numel(), seed) & 1 == 1, magnitude, -magnitude)
        if leaf in ("Q", "Qinv"):
            bound = math.sqrt(3 / shape[0])  # uniform with std 1 / sqrt(C): Q's columns near unit norm
            q = uniform("error_head.Q", shape, -bound, bound, seed)
            return q if leaf == "Q" else q.T.contiguous()
    raise ValueError(f"name: no fill rule for state_dict entry {name!r} (shape {tuple(shape)})")


def fill_state_dict(entries, tau: float, seed: int = SEED) -> dict[str, torch.Tensor]:
    """The reference state_dict from ``entries``: (name, shape, dtype name) triples in the
    reference's key order, as the golden file's ``recipe["entries"]`` holds them."""
    out = {}
    for name, shape, dtype_name in entries:
        dtype = getattr(torch, dtype_name)
        out[name] = _fill(canonical_name(name), tuple(shape), dtype, tau, seed).to(dtype)
    return out


def digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of ``tensors`` in order."""
    sha = hashlib.sha256()
    for name, tensor in tensors.items():
        sha.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        sha.update(tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return sha.hexdigest()


# Storage. The error head's gradient is a sum of two outer products per pixel and step
# (``dL/dQ = sum g_z y^T + z2 g_out^T``), so it has rank at most 2 * B * H * W * steps (48 in
# the training case) of its 528: the file stores it as two (528, rank) factors, a fifth of the
# full tensor. An entry that equals the weights (the error head's ``Q`` after an eval-mode run,
# which does not touch it) names them instead of repeating them.


def unpack(entry, state_dict: dict[str, torch.Tensor]):
    """A stored golden entry as a tensor (nested dicts of entries recursively)."""
    if isinstance(entry, torch.Tensor):
        return entry
    if isinstance(entry, dict) and "low_rank" in entry:
        left, right = entry["low_rank"]
        return (left @ right.T).to(getattr(torch, entry["dtype"]))
    if isinstance(entry, dict) and "same_as_weight" in entry:
        return state_dict[entry["same_as_weight"]].clone()
    if isinstance(entry, dict):
        return {key: unpack(value, state_dict) for key, value in entry.items()}
    return entry
