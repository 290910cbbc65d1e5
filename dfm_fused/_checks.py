"""Argument checks shared by the functional ops, the modules and ``unroll``.

Every check raises before anything is launched or mutated, with a message that
names the argument, what was expected and what came.
"""
from __future__ import annotations

import math
import numbers

import torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def tensor(name: str, value, ndim: int | None = None) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor; got {type(value).__name__}")
    if value.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{name}: expected a floating-point tensor (float16, bfloat16, float32 or float64); got {value.dtype}"
        )
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor; got {value.dim()}-D with shape {tuple(value.shape)}")
    return value


def same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise ValueError(f"expected all tensors on one device; got {listing}")


def integer(name: str, value, minimum: int) -> int:
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_floating_point():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an int; got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}; got {value}")
    return int(value)


def scalar(name: str, value, positive: bool = False, allow_negative: bool = True):
    """A real number or a 0-d tensor. Python numbers (and CPU tensors) are range-checked;
    device tensors are not, since reading them would synchronise with the device, and
    neither are tensors under torch.compile, where reading them would break the graph."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0:
            raise ValueError(f"{name}: expected a number or a 0-d tensor; got a tensor of shape {tuple(value.shape)}")
        if value.is_complex():
            raise TypeError(f"{name}: expected a real number; got a {value.dtype} tensor")
        if value.device.type != "cpu" or torch.compiler.is_compiling():
            return value
        number = float(value.detach())  # a range check, not part of any graph
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        number = float(value)
    else:
        raise TypeError(f"{name}: expected a real number or a 0-d tensor; got {type(value).__name__} {value!r}")
    if not math.isfinite(number):
        raise ValueError(f"{name}: expected a finite number; got {number}")
    if positive and number <= 0:
        raise ValueError(f"{name}: expected a number > 0; got {number}")
    if not allow_negative and number < 0:
        raise ValueError(f"{name}: expected a number >= 0; got {number}")
    return value


def divides(groups_name: str, groups: int, channels_name: str, channels: int) -> None:
    if channels % groups:
        raise ValueError(f"{groups_name}: expected a divisor of {channels_name}={channels}; got {groups}")


def decay_params(Q, S, channels: int, channels_name: str) -> None:
    tensor("Q", Q, ndim=2)
    tensor("S", S, ndim=1)
    if tuple(Q.shape) != (channels, channels):
        raise ValueError(f"Q: expected shape ({channels}, {channels}) to match {channels_name}={channels}; got {tuple(Q.shape)}")
    if S.shape[0] != channels:
        raise ValueError(f"S: expected shape ({channels},) to match {channels_name}={channels}; got {tuple(S.shape)}")
