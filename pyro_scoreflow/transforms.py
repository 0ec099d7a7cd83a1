r""":class:`ProbabilityFlowTransform`: the probability-flow ODE as a bijective Pyro transform; it owns the solve."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.distributions import constraints
from torch.distributions.transforms import Transform

from .compiled import CompiledFlow
from .dynamics import ProbabilityFlowODE, ScoreField, make_probes, solve_ode
from .options import SolverOptions
from .sde import ForwardSDE

__all__ = ["ProbabilityFlowTransform", "broadcast_context"]


def broadcast_context(
    context: torch.Tensor | None, context_shape: torch.Size, lead: torch.Size, dtype=None, device=None
) -> torch.Tensor | None:
    """The context for points laid out as ``lead``, one row per point: ``(prod(lead), *context_shape)``.

    A floating context takes the computation's dtype; integer labels stay integers."""
    if context is None:
        return None
    context = context.expand(tuple(lead) + tuple(context_shape)).reshape((-1,) + tuple(context_shape))
    if context.is_floating_point() and dtype is not None:
        context = context.to(dtype)
    return context if device is None else context.to(device)


class ProbabilityFlowTransform(Transform):
    r"""Noise at :math:`T` to data at :math:`\epsilon` along the probability-flow ODE
    :math:`dx = \tilde f(x, t)\,dt`, :math:`\tilde f = f - \tfrac12 g^2 s`; ``.inv`` encodes data into noise.

    The flow map :math:`\Phi: x_T \mapsto x_\epsilon` is a diffeomorphism with

    .. math::

        \log\left|\det \frac{\partial x_\epsilon}{\partial x_T}\right|
        = -\int_\epsilon^T \nabla\cdot\tilde f(x_t, t)\,dt,

    integrated along the same trajectory (instantaneous change of variables), so
    ``TransformedDistribution(sde.prior(event_shape), [flow])`` has the density of
    :meth:`ScoreSDEPrior.log_prob`, which is built on :meth:`solve`. Each call solves the augmented
    ODE once and remembers the last ``(x, y, log|det|)`` triple, so ``log_abs_det_jacobian`` right
    after ``_call`` or ``_inverse`` costs nothing. :meth:`solve` with ``divergence=False`` is the map
    alone (one plain ODE solve, differentiable), as used to decode latents.

    Usually obtained as ``prior.flow``, which passes the prior's score model, SDE, options and context.

    :param score_model: ``score_model(x, t[, context])``.
    :param ForwardSDE sde: the forward SDE.
    :param event_shape: the event shape.
    :param SolverOptions options: ``ode_method``, tolerances, divergence estimator, adjoint, compile...
    :param context: a conditioning context ``(*batch, *context_shape)``, broadcast against the points.
    :param context_shape: the shape of one context.
    :param compiled: a dict shared by copies of a prior: divergence -> :class:`CompiledFlow`.
    :param record_nfe: called with the score evaluations of each solve.
    """

    domain = constraints.real
    codomain = constraints.real
    bijective = True
    sign = +1

    def __init__(
        self,
        score_model: Callable,
        sde: ForwardSDE,
        event_shape: torch.Size,
        options: SolverOptions | None = None,
        *,
        context: torch.Tensor | None = None,
        context_shape: torch.Size = torch.Size(),
        compiled: dict | None = None,
        record_nfe: Callable[[int], None] | None = None,
        cache_size: int = 1,
    ):
        self.score_model = score_model
        self.sde = sde
        self.event_shape = torch.Size(event_shape)
        self.options = SolverOptions() if options is None else options
        self.context = context
        self.context_shape = torch.Size(context_shape)
        self._compiled = {} if compiled is None else compiled
        self._record_nfe = record_nfe
        k = len(self.event_shape)
        self.domain = constraints.independent(constraints.real, k)
        self.codomain = constraints.independent(constraints.real, k)
        self._last: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        super().__init__(cache_size=cache_size)

    def __eq__(self, other) -> bool:
        return isinstance(other, ProbabilityFlowTransform) and all(
            getattr(self, k) is getattr(other, k) for k in ("score_model", "sde", "context")
        ) and (self.options, self.event_shape) == (other.options, other.event_shape)  # fmt: skip

    def __hash__(self) -> int:
        return hash((id(self.score_model), id(self.sde), self.options, self.event_shape))

    def with_cache(self, cache_size: int = 1):
        if self._cache_size == cache_size:
            return self
        return ProbabilityFlowTransform(
            self.score_model, self.sde, self.event_shape, self.options, context=self.context,
            context_shape=self.context_shape, compiled=self._compiled, record_nfe=self._record_nfe,
            cache_size=cache_size,
        )  # fmt: skip

    @property
    def event_dim(self) -> int:
        return len(self.event_shape)

    # -- the solve ------------------------------------------------------------------------------------
    def _ode(self, field: ScoreField, divergence: bool, n: int, dtype, device) -> ProbabilityFlowODE:
        options = self.options
        if not divergence:
            return ProbabilityFlowODE(field)
        probes = draw_probes = None
        if options.divergence == "hutchinson":
            generator = None
            if options.hutchinson_seed is not None:
                generator = torch.Generator(device=device).manual_seed(options.hutchinson_seed)
            d = math.prod(self.event_shape)

            def draw_probes():
                return make_probes(options.hutchinson_probe, options.hutchinson_samples, n, d, dtype, device, generator)

            if not options.hutchinson_redraw:  # one draw, fixed along the trajectory
                probes, draw_probes = draw_probes(), None
        compiled = None
        if options.compile:
            compiled = self._compiled.get(options.divergence)
            if compiled is None:
                compiled = self._compiled[options.divergence] = CompiledFlow()
        return ProbabilityFlowODE(field, options.divergence, probes, compiled, draw_probes)

    def solve(
        self, x: torch.Tensor, t0: float, t1: float, divergence: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        r"""Integrate points ``x`` ``(*lead, *event_shape)`` from ``t0`` to ``t1``.

        Returns the end points (shaped like ``x``, broadcast with the context's batch shape) and, with
        ``divergence``, :math:`\int_{t_0}^{t_1} \nabla\cdot\tilde f\,dt` ``(*lead,)`` (else ``None``).
        Differentiable with respect to ``x``, the score model's parameters and the context.
        """
        if torch.is_inference_mode_enabled():  # the divergence needs autograd, which inference mode forbids
            with torch.inference_mode(False), torch.no_grad():
                return self.solve(x.clone(), t0, t1, divergence)
        k = len(self.event_shape)
        lead = x.shape[: x.dim() - k]
        if self.context is not None:  # each point meets its own context
            lead = torch.broadcast_shapes(lead, self.context.shape[: self.context.dim() - len(self.context_shape)])
            x = x.expand(lead + self.event_shape)
        flat = x.reshape(-1, math.prod(self.event_shape))
        n = flat.shape[0]
        if n == 0:
            return x, (x.new_zeros(lead) if divergence else None)
        context = broadcast_context(self.context, self.context_shape, lead, flat.dtype, flat.device)
        field = ScoreField(self.score_model, self.sde, self.event_shape, context=context)
        func = self._ode(field, divergence, n, flat.dtype, flat.device)
        y0 = torch.cat([flat, flat.new_zeros(n, 1)], dim=-1) if divergence else flat
        o = self.options
        try:
            y1 = solve_ode(
                func, y0, t0, t1, method=o.ode_method, rtol=o.rtol, atol=o.atol, num_steps=o.num_steps,
                adjoint=o.adjoint, max_num_steps=o.max_num_steps,
            )  # fmt: skip
        finally:
            if self._record_nfe is not None:
                self._record_nfe(field.nfe)
        if not divergence:
            return y1.reshape(x.shape), None
        return y1[:, :-1].reshape(x.shape), y1[:, -1].reshape(lead)

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        y, integral = self.solve(x, self.sde.T, self.sde.eps)
        self._last = (x, y, integral)  # log|det dy/dx| = int_T^eps div
        return y

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        x, integral = self.solve(y, self.sde.eps, self.sde.T)
        self._last = (x, y, -integral)
        return x

    def log_abs_det_jacobian(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self._last is not None and self._last[0] is x and self._last[1] is y:
            return self._last[2]
        self._call(x)
        return self._last[2]
