r""":class:`ScoreFlowReparam`: HMC, NUTS and SVI in the latent space of a score prior's flow.

A :class:`~pyro_scoreflow.ScoreSDEPrior` site :math:`x \sim p_\epsilon` is the push-forward of the
SDE's prior :math:`\pi = \mathcal N(0, \sigma_T^2 I)` under the probability-flow map
:math:`\Phi: x_T \mapsto x_\epsilon`, the solution at :math:`\epsilon` of

.. math::

    \frac{dx}{dt} = f(x, t) - \tfrac12 g(t)^2 s_\theta(x, t), \qquad x(T) = x_T .

So the model with :math:`x \sim p_\epsilon` and the model with :math:`x_T \sim \pi`,
:math:`x = \Phi(x_T)` are the same model, and the second never needs :math:`\log p_\epsilon` (no
divergence, no log-determinant): its potential is
:math:`-\log\pi(x_T) - \log p(y \mid \Phi(x_T))` and its gradient is one backpropagation through
the solve. This is neural transport (Hoffman et al. 2019) with the diffusion's own flow: the
posterior in :math:`x_T` is close to :math:`\pi` wherever the likelihood is weak, a geometry HMC
handles well, and the multimodality of :math:`p_\epsilon` is unfolded by :math:`\Phi`.

References:

[1] M. Hoffman, P. Sountsov, J. V. Dillon, I. Langmore, D. Tran, S. Vasudevan, "NeuTra-lizing Bad
    Geometry in Hamiltonian Monte Carlo Using Neural Transport", 2019.
[2] C. Lu, Y. Zhou, F. Bao, J. Chen, C. Li, J. Zhu, "DPM-Solver++: Fast Solver for Guided Sampling of
    Diffusion Probabilistic Models", 2022.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.infer.reparam.reparam import Reparam

from ..checks import check_choice, check_int, check_optional
from ..distribution import ScoreSDEPrior
from ..dynamics import model_dtype_device
from ..samplers import dpm_end_time, dpm_solver_sample

__all__ = ["ScoreFlowReparam", "REPARAM_SAMPLERS"]

#: the decoders :class:`ScoreFlowReparam` offers
REPARAM_SAMPLERS = ("ode", "dpm-solver")
#: score evaluations of the ``"dpm-solver"`` decoder when ``num_steps`` is ``None``
DEFAULT_DPM_STEPS = 20


class ScoreFlowReparam(Reparam):
    r"""Reparameterize a :class:`~pyro_scoreflow.ScoreSDEPrior` site by the noise of its flow.

    Under ``poutine.reparam(model, config={"x": ScoreFlowReparam()})`` the site ``"x"`` becomes a
    latent site ``"x_base"`` drawn from the SDE's prior :math:`\mathcal N(0, \sigma_T^2 I)`
    (``sde.prior``: :math:`\sigma_T = 1` for the VP and sub-VP SDEs,
    :math:`\sqrt{\sigma_{max}^2 - \sigma_{min}^2}` for the VE SDE) with the site's batch and event
    shape, and :math:`x = \mathrm{decode}(x_{base})` is recorded at ``"x"`` as a deterministic site
    (as Pyro's :class:`~pyro.infer.reparam.TransformReparam` does). No divergence is computed.

    * ``sampler="ode"``: :math:`\mathrm{decode} = \Phi`, the probability-flow map from :math:`T` to
      :math:`\epsilon`, solved with the prior's own options (``ode_method``, ``rtol``, ``atol``,
      ``max_num_steps``, ``adjoint``; ``num_steps`` for fixed-grid methods): the same map as
      ``prior.flow``, so **the reparameterized model is the same model** (to the solver's tolerance).
    * ``sampler="dpm-solver"``: :math:`\mathrm{decode} = \Phi_M`, ``num_steps`` :math:`= M`
      deterministic DPM-Solver++ steps (the prior's ``dpm_order``, stopping at its ``dpm_end_time``,
      see :func:`~pyro_scoreflow.samplers.dpm_solver_sample`). The prior of ``x`` is then the
      push-forward :math:`\Phi_{M\#}\pi`, a slightly different (and much cheaper) distribution than
      :math:`p_\epsilon`: its distance to :math:`p_\epsilon` is the sampler's error (measured on random
      2-D mixtures with the exact score in benchmarks/few_step_family.py).

    Both maps are differentiable with respect to :math:`x_{base}`, a context that requires grad and
    the score model's parameters. Works under plates and ``expand`` (one latent per batch element),
    with ``ConditionalScoreSDEPrior(...).condition(c)``, with NUTS/HMC, SVI (autoguides see
    ``"x_base"``) and ``Predictive``. The prior's ``denoise`` option is not applied (the decoded
    value is :math:`x_\epsilon`, like ``prior.flow``).

    **Initial values.** Pyro's built-in init strategies (``init_to_uniform``, ``init_to_median``,
    ...) are applied to ``"x_base"``, a Gaussian; a custom initial value of ``"x"`` (e.g.
    ``init_to_value(values={"x": x0})`` or :func:`~pyro_scoreflow.infer.init_to_score_prior`) is
    encoded into ``"x_base"`` by solving the probability-flow ODE from :math:`\epsilon` (or the
    DPM-Solver's end time) up to :math:`T`, without gradient.

    Only latent sites: an observed site's density is :math:`\log p_\epsilon`, which needs the
    divergence; a ``ValueError`` says so.

    :param str sampler: ``"ode"`` or ``"dpm-solver"``.
    :param int num_steps: ``"dpm-solver"``: score evaluations of the decoder (default 20);
        ``"ode"``: steps of a fixed-grid ``ode_method`` (default: the prior's ``num_steps``).
    """

    def __init__(self, sampler: str = "ode", num_steps: int | None = None):
        self.sampler = check_choice("sampler", sampler, REPARAM_SAMPLERS)
        self.num_steps = check_optional(check_int, "num_steps", num_steps)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sampler={self.sampler!r}, num_steps={self.num_steps})"

    # -- the maps ---------------------------------------------------------------------------------
    def _end_time(self, prior: ScoreSDEPrior) -> float:
        return prior.sde.eps if self.sampler == "ode" else dpm_end_time(prior.sde, prior.dpm_end_time)

    def _flow(self, prior: ScoreSDEPrior):
        """The prior's flow transform, with ``num_steps`` overriding the prior's for ``"ode"``."""
        if self.sampler == "ode" and self.num_steps is not None:
            prior = prior.with_options(num_steps=self.num_steps)
        return prior.flow

    @staticmethod
    def _lead(prior: ScoreSDEPrior, value: torch.Tensor) -> tuple[torch.Tensor, torch.Size]:
        """``value`` in the model's dtype and device, broadcast with the prior's batch shape."""
        dtype, device = model_dtype_device(prior.score_model, value)
        k = len(prior.event_shape)
        lead = torch.broadcast_shapes(value.shape[: value.dim() - k], prior.batch_shape)
        return value.to(dtype=dtype, device=device).expand(lead + prior.event_shape), lead

    def decode(self, prior: ScoreSDEPrior, x_base: torch.Tensor) -> torch.Tensor:
        r""":math:`x = \Phi(x_{base})` (``"ode"``) or :math:`\Phi_M(x_{base})` (``"dpm-solver"``), differentiably.

        ``x_base`` is ``(*lead, *event_shape)`` with ``lead`` broadcasting with ``prior.batch_shape``;
        returns ``(*broadcast lead, *event_shape)``."""
        x_base, lead = self._lead(prior, x_base)
        if self.sampler == "ode":
            return self._flow(prior).solve(x_base, prior.sde.T, prior.sde.eps, divergence=False)[0]
        if x_base.numel() == 0:
            return x_base
        field = prior._score_field(lead, x_base.dtype, x_base.device)
        num_steps = DEFAULT_DPM_STEPS if self.num_steps is None else self.num_steps
        try:
            x = dpm_solver_sample(
                field, x_base.reshape(-1, prior.event_dim_size), num_steps=num_steps, order=prior.dpm_order,
                t_end=self._end_time(prior),
            )  # fmt: skip
        finally:
            prior._record_nfe(field.nfe)
        return x.reshape(lead + prior.event_shape)

    def encode(self, prior: ScoreSDEPrior, x: torch.Tensor) -> torch.Tensor:
        r"""The noise that decodes to ``x``: the probability-flow ODE from the decoder's end time up to
        :math:`T`, with the prior's tolerances, without gradient (the inverse of ``"ode"``'s map to the
        solver's tolerance, of ``"dpm-solver"``'s to the sampler's error)."""
        x, _ = self._lead(prior, x)
        with torch.no_grad():
            return self._flow(prior).solve(x, self._end_time(prior), prior.sde.T, divergence=False)[0]

    # -- pyro.infer.reparam protocol ---------------------------------------------------------------
    def apply(self, msg: dict) -> dict:
        name, fn, value, is_observed = msg["name"], msg["fn"], msg["value"], msg["is_observed"]
        if is_observed:
            raise ValueError(
                f"ScoreFlowReparam: site {name!r} is observed; it reparameterizes latent sites only (the density "
                f"of an observed value is log p_eps, which needs the divergence): condition on {name + '_base'!r} "
                "instead, or leave the site out of the reparam config"
            )
        prior, event_dim = self._unwrap(fn)
        if not isinstance(prior, ScoreSDEPrior):
            raise ValueError(
                f"ScoreFlowReparam: site {name!r} has distribution {type(prior).__name__}, not a ScoreSDEPrior "
                "(possibly wrapped in .to_event())"
            )
        dtype, device = model_dtype_device(prior.score_model)
        base = prior.sde.prior(prior.event_shape, dtype=dtype, device=device)
        if prior.batch_shape:
            base = base.expand(prior.batch_shape)
        base = self._wrap(base, event_dim)

        # a built-in init strategy's value of "x" carries no information about x_base: let the strategy
        # initialize x_base itself; a custom one is encoded (TransformReparam inverts it the same way)
        custom_init = value is not None and getattr(value, "_pyro_custom_init", True)
        value_base = self.encode(prior, value).to(dtype) if custom_init else None
        x_base = pyro.sample(f"{name}_base", base, obs=value_base, infer={"is_observed": False})
        if not custom_init:
            value = self.decode(prior, x_base)
        # a pyro.deterministic() site, as TransformReparam records it
        return {"fn": dist.Delta(value, event_dim=event_dim).mask(False), "value": value, "is_observed": True}
