"""Argument checks shared by the modules (no dependencies inside the package)."""

from __future__ import annotations

import numbers

import torch

__all__ = ["check_event_shape"]


def check_event_shape(event_shape) -> torch.Size:
    if isinstance(event_shape, numbers.Integral) and not isinstance(event_shape, bool):
        event_shape = (event_shape,)
    try:
        shape = torch.Size(event_shape)
    except TypeError as err:
        raise TypeError(f"event_shape must be a tuple of positive ints, got {event_shape!r}") from err
    if len(shape) == 0 or any(s <= 0 for s in shape):
        raise ValueError(f"event_shape must be a non-empty tuple of positive ints, got {tuple(shape)}")
    return shape
