r"""Two-sample statistics for checking samplers against ground truth."""

from __future__ import annotations

import torch

__all__ = ["energy_distance"]


def _mean_pairwise(a: torch.Tensor, b: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    total = a.new_zeros(())
    for i in range(0, a.shape[0], chunk):
        total = total + torch.cdist(a[i : i + chunk], b).sum()
    return total / (a.shape[0] * b.shape[0])


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    r"""Squared energy distance (Székely & Rizzo) between samples ``x`` ``(n, ...)`` and ``y`` ``(m, ...)``:

    .. math::

        \mathcal{E}^2 = 2\,E\|X - Y\| - E\|X - X'\| - E\|Y - Y'\|,

    the V-statistic (all pairs, self-pairs included), computed in float64 in
    chunks. It is zero iff the distributions agree; for two independent samples
    of the same distribution it is of order :math:`1/n` (its noise floor:
    measure it with two independent reference samples of the same sizes).
    """
    x = x.reshape(x.shape[0], -1).double()
    y = y.reshape(y.shape[0], -1).double()
    return 2 * _mean_pairwise(x, y) - _mean_pairwise(x, x) - _mean_pairwise(y, y)
