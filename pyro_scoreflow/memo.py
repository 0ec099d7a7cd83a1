r"""A one-entry memo of ``log_prob`` that cannot go stale.

Two uses rely on it: ``log_prob`` of a tensor just returned by ``sample_and_log_prob`` costs
nothing, and a model and a guide sharing a prior (``Importance``) get the *same* number for the
same draw, so the prior terms cancel exactly even with Hutchinson's estimator.

A hit needs every input of the computation to be unchanged, checked by content, not only by
identity or version counter (an edit through ``x.numpy()`` or ``x.data`` bumps no version):

* the value: the same tensor object (a copy gets a fresh computation, e.g. fresh Hutchinson
  probes), holding the same numbers as when it was stored;
* the score model: an ``nn.Module`` whose parameters and buffers are the same tensors holding
  the same numbers (so ``fit``, an optimiser step or ``score.locs.add_(1)`` invalidate it);
* the context (the same numbers), the SDE's parameters and the solver options; the caller checks
  that the stored result has the shape the batch shape asks for now.

A score model that is not an ``nn.Module`` has no state to compare, so its results are never
memoised. Results carrying an autograd graph are never stored either (a cached number without
its graph would silently stop gradients). Checking costs a comparison of the value and of the
model's weights, far below one ODE solve.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["LogProbMemo"]


def _snapshot(tensor: torch.Tensor | None) -> tuple | None:
    if tensor is None:
        return None
    return (tensor, tensor.detach().clone())


def _unchanged(snapshot: tuple | None, tensor: torch.Tensor | None, same_object: bool = True) -> bool:
    if snapshot is None or tensor is None:
        return snapshot is None and tensor is None
    ref, copy = snapshot
    if same_object and ref is not tensor:
        return False
    return (
        tensor.shape == copy.shape
        and tensor.dtype == copy.dtype
        and tensor.device == copy.device
        and torch.equal(tensor.detach(), copy)
    )


def _model_state(score_model) -> list[torch.Tensor] | None:
    if not isinstance(score_model, nn.Module):
        return None
    return [*score_model.parameters(), *score_model.buffers()]


class LogProbMemo:
    """Remembers the last ``(value, key) -> log_prob``; shared by a prior and its ``expand``-ed copies."""

    def __init__(self):
        self._entry: tuple | None = None

    def clear(self) -> None:
        self._entry = None

    def get(self, value: torch.Tensor, score_model, context: torch.Tensor | None, key: Any) -> torch.Tensor | None:
        """The stored result for ``value`` if nothing it depends on changed, else ``None``."""
        entry = self._entry
        if entry is None or value.is_inference():
            return None
        stored_value, stored_state, stored_context, stored_key, result = entry
        if stored_key != key or not _unchanged(stored_value, value):
            return None
        if not _unchanged(stored_context, context, same_object=False):  # expand() makes new context views
            return None
        state = _model_state(score_model)
        if state is None or len(state) != len(stored_state):
            return None
        if not all(_unchanged(s, t) for s, t in zip(stored_state, state)):
            return None
        return result

    def put(self, value: torch.Tensor, score_model, context: torch.Tensor | None, key: Any, result: torch.Tensor):
        """Store ``result`` for ``value`` (skipped for graph-carrying results, inference tensors, non-Modules)."""
        state = _model_state(score_model)
        if state is None or result.requires_grad or value.is_inference():
            self._entry = None
            return
        if context is not None and context.is_inference():
            self._entry = None
            return
        with torch.no_grad():
            self._entry = (
                _snapshot(value),
                [_snapshot(t) for t in state],
                _snapshot(context),
                key,
                result,
            )
