"""Argument checks shared by the ops and the optimizer: each names the argument it rejects."""
from __future__ import annotations

import math
import numbers

import torch


def show(value, form: str = "str") -> str:
    """A rejected value as a message shows it. Under torch.compile (a value changed by hand
    after the step was compiled) dynamo cannot format numbers into a message; the message then
    names the option alone, so the error still says what is wrong."""
    if torch.compiler.is_compiling():
        return "a value set by hand (see it with opt.param_groups)"
    if form == "typed":
        return f"{type(value).__name__} {value!r}"
    return repr(value) if form == "repr" else str(value)


def _real(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {show(value, 'typed')}")
    value = float(value)
    if not -math.inf < value < math.inf:  # NaN fails too; a comparison, which dynamo traces on a SymFloat
        raise ValueError(f"{name} must be finite, got {show(value)}")
    return value


def tensor_or(check, value, name: str):
    """``check(value, name)`` for a number; for a tensor hyper-parameter (an lr a scheduler changes
    in place), a one-element floating tensor whose value is checked where reading it costs no
    device sync (CPU tensors). Returns ``value`` as given."""
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point() or value.is_complex():
            raise TypeError(f"{name} must be a real number or a one-element floating tensor, got "
                            f"a {value.dtype} tensor")
        if value.numel() != 1:  # a ValueError, as torch.optim raises for it
            raise ValueError(f"{name} must be a one-element tensor, got one of shape {tuple(value.shape)}")
        if value.device.type == "cpu" and not torch.compiler.is_compiling():  # .item() would break the graph
            check(value.item(), name)
        return value
    check(value, name)
    return value


def finite(value, name: str) -> float:
    """A finite real number (not a bool), as a float."""
    return _real(value, name)


def non_negative(value, name: str) -> float:
    value = _real(value, name)
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {show(value)}")
    return value


def beta(value, name: str) -> float:
    value = _real(value, name)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {show(value)}")
    return value


def unit_interval(value, name: str) -> float:
    value = _real(value, name)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {show(value)}")
    return value


def betas(value, name: str = "betas") -> tuple[float, float]:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"{name} must be a pair (beta1, beta2), got {show(value, 'repr')}")
    return beta(value[0], f"{name}[0]"), beta(value[1], f"{name}[1]")


def density(value, name: str = "density") -> float:
    value = _real(value, name)
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {show(value)}")
    return value


def positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive int, got {show(value, 'typed')}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int, got {show(value)}")
    return int(value)


# Blocks are padded whole in places (the reference backend's norm pass, compact state's slabs):
# a block far larger than any tensor would allocate gigabytes of padding, and past 2**31 the
# GPU kernels' int32 element offsets overflow. 2**24 elements (64 MiB of fp32) bounds both.
MAX_BLOCK_SIZE = 2 ** 24


def block_size(value, name: str = "block_size") -> int:
    """A positive int of at most :data:`MAX_BLOCK_SIZE` elements."""
    value = positive_int(value, name)
    if value > MAX_BLOCK_SIZE:
        raise ValueError(f"{name} must be at most 2**24 = {MAX_BLOCK_SIZE} elements, got {show(value)}")
    return value


def positive(value, name: str) -> float:
    value = _real(value, name)
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {show(value)}")
    return value


def non_negative_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a non-negative int, got {show(value, 'typed')}")
    if value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {show(value)}")
    return int(value)


def flag(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {show(value, 'typed')}")
    return value


def choice(value, options: tuple[str, ...], name: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, one of {options}; got {type(value).__name__}")
    if value not in options:
        raise ValueError(f"{name} must be one of {options}, got {show(value, 'repr')}")
    return value


def num_selected(density_value: float, num_blocks: int) -> int:
    """``ceil(density * num_blocks)``, blind to binary rounding: 0.3 * 10 gives 3, not 4.

    A product within a relative 1e-12 above an integer counts as that integer.
    """
    product = float(density_value) * num_blocks
    return math.ceil(product - product * 1e-12)
