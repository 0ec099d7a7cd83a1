r""":class:`ProbabilityFlowTransform`: the probability-flow ODE as a bijective Pyro transform."""

from __future__ import annotations

import math

import torch
from torch.distributions import constraints
from torch.distributions.transforms import Transform

__all__ = ["ProbabilityFlowTransform"]


class ProbabilityFlowTransform(Transform):
    r"""Noise at :math:`T` to data at :math:`\epsilon` along the probability-flow ODE
    :math:`dx = \tilde f(x, t)\,dt`; ``.inv`` encodes data into noise.

    The flow map :math:`\Phi: x_T \mapsto x_\epsilon` is a diffeomorphism with

    .. math::

        \log\left|\det \frac{\partial x_\epsilon}{\partial x_T}\right|
        = -\int_\epsilon^T \nabla\cdot\tilde f(x_t, t)\,dt,

    integrated along the same trajectory (instantaneous change of variables),
    so ``TransformedDistribution(sde.prior(event_shape), [flow])`` has the
    density of :meth:`ScoreSDEPrior.log_prob`. Each call solves the augmented
    ODE once and remembers the last ``(x, y, log|det|)`` triple, so
    ``log_abs_det_jacobian`` right after ``_call`` or ``_inverse`` costs nothing.

    Usually obtained as ``prior.flow``; solver options come from the prior.
    """

    domain = constraints.real
    codomain = constraints.real
    bijective = True
    sign = +1

    def __init__(self, prior, cache_size: int = 1):
        self.prior = prior
        k = len(prior.event_shape)
        self.domain = constraints.independent(constraints.real, k)
        self.codomain = constraints.independent(constraints.real, k)
        self._last: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        super().__init__(cache_size=cache_size)

    def __eq__(self, other) -> bool:
        return isinstance(other, ProbabilityFlowTransform) and other.prior is self.prior

    def __hash__(self) -> int:
        return id(self.prior)

    def with_cache(self, cache_size: int = 1):
        if self._cache_size == cache_size:
            return self
        return ProbabilityFlowTransform(self.prior, cache_size=cache_size)

    @property
    def event_dim(self) -> int:
        return len(self.prior.event_shape)

    def _solve(self, value: torch.Tensor, t0: float, t1: float) -> tuple[torch.Tensor, torch.Tensor]:
        r"""Integrate from ``t0`` to ``t1``: the end state and :math:`\int_{t_0}^{t_1}\nabla\cdot\tilde f\,dt`."""
        prior = self.prior
        k = len(prior.event_shape)
        lead = value.shape[: value.dim() - k]
        x = value.reshape(-1, math.prod(prior.event_shape))
        end, integral = prior._flow_solve(x, t0, t1, lead)
        return end.reshape(value.shape), integral.reshape(lead)

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        sde = self.prior.sde
        y, integral = self._solve(x, sde.T, sde.eps)
        self._last = (x, y, integral)  # log|det dy/dx| = int_T^eps div
        return y

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        sde = self.prior.sde
        x, integral = self._solve(y, sde.eps, sde.T)
        self._last = (x, y, -integral)
        return x

    def log_abs_det_jacobian(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self._last is not None and self._last[0] is x and self._last[1] is y:
            return self._last[2]
        self._call(x)
        return self._last[2]
