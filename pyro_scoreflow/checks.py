"""Argument checks shared by every module: one error style.

A value of the wrong *type* raises :class:`ArgumentTypeError`, which is both a ``TypeError`` and a
``ValueError`` (so ``except ValueError`` catches every bad argument); a value of the right type
outside its range raises ``ValueError``. Every message names the argument and what was wrong.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

__all__ = [
    "ArgumentTypeError",
    "check_batch_shape",
    "check_bool",
    "check_choice",
    "check_device",
    "check_event_shape",
    "check_int",
    "check_interval",
    "check_optional",
    "check_real",
    "check_seed",
]

#: the largest step budget accepted (torchdiffeq and torchsde count steps in int32)
MAX_STEPS = 2**31 - 1


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong type (a ``TypeError`` that is also a ``ValueError``)."""


def check_int(name: str, value, minimum: int | None = 1, maximum: int | None = None) -> int:
    """An integer (not a bool, not a float such as 2.5) in ``[minimum, maximum]``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ArgumentTypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def check_real(
    name: str,
    value,
    *,
    positive: bool = False,
    nonnegative: bool = False,
    maximum: float | None = None,
    finite: bool = True,
) -> float:
    """A real number (not a bool), finite unless ``finite=False``, with the stated sign and upper bound."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ArgumentTypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if math.isnan(value) or (finite and math.isinf(value)):
        raise ValueError(f"{name} must be a finite number, got {value}")
    if positive and not value > 0:
        raise ValueError(f"{name} must be positive, got {value}")
    if nonnegative and not value >= 0:
        raise ValueError(f"{name} must be non-negative, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def check_choice(name: str, value, choices: Sequence[str]) -> str:
    """One of ``choices`` (strings)."""
    if not isinstance(value, str):
        raise ArgumentTypeError(f"{name} must be one of {list(choices)}, got {value!r} ({type(value).__name__})")
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def check_interval(name: str, value) -> tuple[float, float]:
    """A pair ``(low, high)`` of finite reals with ``low < high``."""
    if not (isinstance(value, (tuple, list)) and len(value) == 2):
        raise ArgumentTypeError(f"{name} must be a pair (low, high), got {value!r}")
    low, high = (check_real(name, v) for v in value)
    if not low < high:
        raise ValueError(f"{name} must have low < high, got {value!r}")
    return low, high


def check_bool(name: str, value) -> bool:
    """``True`` or ``False`` (also a 0-d boolean tensor/array); a truthy string such as ``"false"`` is refused."""
    if isinstance(value, bool):
        return value
    if hasattr(value, "dtype") and getattr(value, "shape", None) == () and "bool" in str(value.dtype):
        return bool(value)
    raise ArgumentTypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")


def check_seed(name: str, value) -> int:
    """A seed for ``torch.Generator.manual_seed``: an integer in ``[0, 2**64)``."""
    return check_int(name, value, minimum=0, maximum=2**64 - 1)


def check_optional(check, name: str, value, *args, **kwargs):
    """``None``, or ``value`` passed through ``check``."""
    return None if value is None else check(name, value, *args, **kwargs)


def _shape(name: str, value) -> torch.Size:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = (value,)
    if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, torch.Size)):
        raise ArgumentTypeError(f"{name} must be a tuple of ints, got {value!r}")
    if any(isinstance(s, bool) or not isinstance(s, numbers.Integral) for s in value):
        raise ArgumentTypeError(f"{name} must be a tuple of ints, got {value!r}")
    return torch.Size(int(s) for s in value)


def check_event_shape(event_shape, name: str = "event_shape") -> torch.Size:
    """A non-empty tuple of positive ints (an int ``D`` means ``(D,)``)."""
    shape = _shape(name, event_shape)
    if len(shape) == 0 or any(s <= 0 for s in shape):
        raise ValueError(f"{name} must be a non-empty tuple of positive ints, got {tuple(shape)}")
    return shape


def check_batch_shape(batch_shape, name: str = "batch_shape") -> torch.Size:
    """A tuple of non-negative ints (possibly empty)."""
    shape = _shape(name, batch_shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"{name} must be a tuple of non-negative ints, got {tuple(shape)}")
    return shape


def check_device(name: str, value) -> torch.device:
    """A ``torch.device``, or a string or index naming one, that this build of torch can allocate on.

    ``"cuda"`` on a CPU-only build (torch raises an ``AssertionError`` there), or a GPU index beyond the
    machine's, is a ``ValueError`` naming the argument.
    """
    if isinstance(value, bool) or not isinstance(value, (str, int, torch.device)):
        raise ArgumentTypeError(f"{name} must be a torch.device, a string such as 'cpu' or 'cuda', or a GPU index, "
                                f"got {value!r} ({type(value).__name__})")  # fmt: skip
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError) as err:
        raise ValueError(f"{name} must name a torch device such as 'cpu' or 'cuda', got {value!r}") from err
    try:
        torch.empty(0, device=device)
    except (AssertionError, RuntimeError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"{name}={value!r}: this machine cannot use device {device} ({reason})") from err
    return device
