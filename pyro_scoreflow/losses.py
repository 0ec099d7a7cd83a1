r"""Denoising score-matching losses: the training objective and the likelihood bound, from the SDE alone.

For data :math:`x_0`, a time :math:`t \in [\epsilon, T]`, :math:`z \sim \mathcal N(0, I)` and
:math:`x_t = \alpha(t) x_0 + \sigma(t) z` (the SDE's marginal), the denoising score-matching objective
of Song et al. (2021) is

.. math::

    J(\theta) = E_{t \sim U[\epsilon, T]}\, E_{x_0, z}\,
        \frac{w(t)}{\sigma(t)^2}\,\big\| \sigma(t)\, s_\theta(x_t, t) + z \big\|^2 / D,

with :math:`D` the event size (:func:`dsm_loss` is the per-point :math:`\|\sigma s_\theta + z\|^2/D`).
Two weightings (:data:`WEIGHTINGS`):

* ``"score"``: :math:`w = \sigma^2`, i.e. :math:`\|\sigma s_\theta + z\|^2`, the DDPM noise-prediction loss
  (:math:`\|z - \epsilon_\theta\|^2` for a :class:`~pyro_scoreflow.networks.ScoreNet`); times uniform on
  :math:`[\epsilon, T]`. Best sample quality.
* ``"likelihood"``: :math:`w = g^2` (Song, Durkan, Murray & Ermon 2021), for which :math:`J` bounds the
  KL divergence from the data to the model, so it trains for log-likelihood. Its integrand
  :math:`(g^2/\sigma^2)\,\|\sigma s_\theta + z\|^2` is dominated by small :math:`t`, where
  :math:`g^2/\sigma^2 \sim 1/t`, so the times are importance sampled. For every linear SDE
  (:math:`\alpha' = f\alpha`, :math:`(\sigma^2)' = 2f\sigma^2 + g^2`),
  :math:`g^2/\sigma^2 = -\tfrac{d}{dt}\,2\lambda(t)` with :math:`\lambda = \log\alpha - \log\sigma` the
  SDE's (half) log-SNR (:meth:`~pyro_scoreflow.sde.ForwardSDE.log_snr`), so times are drawn with density
  :math:`q(t) \propto g^2/\sigma^2`, i.e. uniformly in :math:`\lambda`:
  :math:`t = \lambda^{-1}(\lambda(\epsilon) - u(\lambda(\epsilon) - \lambda(T)))`, :math:`u \sim U[0, 1)`
  (:meth:`~pyro_scoreflow.sde.ForwardSDE.inverse_log_snr`, closed form), and reweighted by the constant
  :math:`Z/(T - \epsilon)` with :math:`Z = 2(\lambda(\epsilon) - \lambda(T))`, which keeps the estimate
  of :math:`J` unbiased (:class:`TimeSampler`).

:func:`dsm_bound` is the same integrand turned into a per-point lower bound on :math:`\log p(x)`
(Song et al. 2021b, Thm. 1).

References:

[1] Y. Song, J. Sohl-Dickstein, D. P. Kingma, A. Kumar, S. Ermon, B. Poole, "Score-Based Generative
    Modeling through Stochastic Differential Equations", ICLR 2021.
[2] Y. Song, C. Durkan, I. Murray, S. Ermon, "Maximum Likelihood Training of Score-Based Diffusion
    Models", NeurIPS 2021.
[3] D. P. Kingma, T. Salimans, B. Poole, J. Ho, "Variational Diffusion Models", NeurIPS 2021 (the log-SNR
    parametrisation).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .checks import check_choice, check_int
from .sde import ForwardSDE, _broadcast_time

__all__ = ["WEIGHTINGS", "TimeSampler", "dsm_bound", "dsm_loss", "weighted_dsm_loss"]

#: the weightings of the objective: ``"score"`` (weight sigma^2) and ``"likelihood"`` (weight g^2)
WEIGHTINGS = ("score", "likelihood")


class TimeSampler:
    r"""Diffusion times and their importance weight for a weighting (module docstring).

    ``sampler(u)`` maps :math:`u \in [0, 1)` to :math:`(t, w)` with
    :math:`E_u[w\,h(t)] = E_{t \sim U[\epsilon, T]}[\tfrac{w(t)}{\sigma(t)^2}\, h(t)]` for any :math:`h`:
    :math:`t = \epsilon + u(T - \epsilon)` and :math:`w = 1` for ``"score"``;
    :math:`t = \lambda^{-1}(\lambda(\epsilon) - uZ/2)` (the inverse CDF of :math:`q \propto g^2/\sigma^2`)
    and :math:`w = Z/(T - \epsilon)`, :math:`Z = 2(\lambda(\epsilon) - \lambda(T))`, for ``"likelihood"``.

    :param ForwardSDE sde: the forward SDE.
    :param str weighting: ``"score"`` or ``"likelihood"``.
    """

    def __init__(self, sde: ForwardSDE, weighting: str = "score"):
        if not isinstance(sde, ForwardSDE):
            raise TypeError(f"sde must be a VPSDE, SubVPSDE or VESDE (a ForwardSDE), got {type(sde).__name__}")
        self.sde = sde
        self.weighting = check_choice("weighting", weighting, WEIGHTINGS)
        ends = sde.log_snr(torch.tensor([sde.eps, sde.T], dtype=torch.float64))
        self._lam_eps, self._lam_T = float(ends[0]), float(ends[1])  # the SDE's half log-SNR at eps and T
        if weighting == "likelihood":
            self.weight = 2 * (self._lam_eps - self._lam_T) / (sde.T - sde.eps)
        else:
            self.weight = 1.0

    def density(self, t: torch.Tensor) -> torch.Tensor:
        r"""The density :math:`q(t)` of the sampled times on :math:`[\epsilon, T]`."""
        sde = self.sde
        if self.weighting == "score":
            return torch.full_like(t, 1 / (sde.T - sde.eps))
        return sde.diffusion(t) ** 2 / sde.marginal(t)[1] ** 2 / (2 * (self._lam_eps - self._lam_T))

    def __call__(self, u: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Times ``t`` (shaped and typed like ``u``) and their common weight."""
        sde = self.sde
        if self.weighting == "score":
            return sde.eps + u * (sde.T - sde.eps), self.weight
        lam = self._lam_eps - u.double() * (self._lam_eps - self._lam_T)
        return sde.inverse_log_snr(lam).clamp(sde.eps, sde.T).to(u.dtype), self.weight


def dsm_loss(score_model: Callable, sde: ForwardSDE, x0: torch.Tensor, t: torch.Tensor, z: torch.Tensor, context=None):
    r"""Per-point :math:`\|\sigma(t)\, s_\theta(x_t, t) + z\|^2 / D` with :math:`x_t = \alpha(t) x_0 + \sigma(t) z`.

    :param score_model: ``score_model(x_t, t)``, or ``score_model(x_t, t, context)`` with a context.
    :param x0: data ``(N, *event_shape)``.
    :param t: times ``(N,)``.
    :param z: standard normal noise shaped like ``x0``.
    :param context: optional context ``(N, ...)``.
    :returns: ``(N,)``.
    """
    alpha, std = sde.marginal(t)
    alpha, std = _broadcast_time(alpha, x0), _broadcast_time(std, x0)
    x_t = alpha * x0 + std * z
    score = score_model(x_t, t) if context is None else score_model(x_t, t, context)
    return (std * score + z).pow(2).flatten(1).mean(1)


def weighted_dsm_loss(
    sampler: TimeSampler,
    score_model: Callable,
    x0: torch.Tensor,
    context: torch.Tensor | None = None,
    u: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""The batch estimate of :math:`J`: :math:`w \cdot` mean of :func:`dsm_loss` at the times ``sampler(u)``.

    :param u: ``(N,)`` uniforms for the times; drawn fresh (``torch.rand``) when ``None``.
    :param z: the noise, shaped like ``x0``; drawn fresh (``torch.randn``) when ``None``.
    :returns: a scalar.
    """
    if u is None:
        u = torch.rand(x0.shape[0], dtype=x0.dtype, device=x0.device)
    if z is None:
        z = torch.randn_like(x0)
    t, weight = sampler(u)
    return weight * dsm_loss(score_model, sampler.sde, x0, t, z, context).mean()


def dsm_bound(score_fn: Callable, sde: ForwardSDE, x: torch.Tensor, num_samples: int = 64) -> torch.Tensor:
    r"""A Monte Carlo denoising score-matching lower bound on :math:`\log p(x)` per point, no ODE.

    Song, Durkan, Murray & Ermon (2021), Thm. 1, with :math:`x_t = \alpha_t x + \sigma_t z`:

    .. math::

        \log p(x) \ge E[\log \pi(x_T)]
          - \tfrac12 \int_\epsilon^T \frac{g^2}{\sigma_t^2}
            E_z\big[\|\sigma_t s(x_t, t) + z\|^2 - \|z\|^2\big]\,dt
          + \int_\epsilon^T \nabla\cdot f\,dt .

    :math:`E[\log\pi(x_T)]` (with :math:`x_T \sim \mathcal N(\alpha_T x, \sigma_T^2 I)` and
    :math:`\pi = \mathcal N(0, s^2 I)` the SDE's prior) and :math:`\int\nabla\cdot f = D\log(\alpha_T/\alpha_\epsilon)`
    are closed-form; the time integral is estimated with ``num_samples`` times per point (rounded up to
    an even number) from the likelihood :class:`TimeSampler`, stratified (:math:`u_j = (j + v_j)/m`), and
    antithetic noise pairs :math:`\pm z`. Random numbers are drawn in this order: the :math:`v` ``(N, m)``,
    then :math:`z` ``(N m, D)``, with :math:`m = \lceil` ``num_samples`` :math:`/2\rceil`. The estimate is unbiased
    for the bound, not for :math:`\log p`; the :math:`[0, \epsilon]` slice is dropped (an :math:`O(\epsilon)`
    term). Differentiable in ``x`` and in the score's parameters.

    :param score_fn: ``score_fn(x_t, t)`` for flat states ``(M, D)`` and times ``(M,)``, with
        ``M = N m``: row ``i m + j`` belongs to point ``i`` (contexts repeated ``m`` times per point).
    :param ForwardSDE sde: the forward SDE.
    :param x: the points, flat ``(N, D)``.
    :param int num_samples: score evaluations per point (at least 1).
    :returns: the bound, ``(N,)``.
    """
    num_samples = check_int("num_samples", num_samples)
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x must be a tensor of flat points (N, D), got {getattr(x, 'shape', type(x).__name__)}")
    n, d = x.shape
    dtype, device = x.dtype, x.device
    ends = torch.tensor([sde.eps, sde.T], dtype=dtype, device=device)
    alphas, sigmas = sde.marginal(ends)
    s2 = sde.prior_std() ** 2
    prior_term = -0.5 * (alphas[1] ** 2 * x.pow(2).sum(-1) + d * sigmas[1] ** 2) / s2 - 0.5 * d * math.log(
        2 * math.pi * s2
    )
    drift_term = d * torch.log(alphas[1] / alphas[0])
    half = (num_samples + 1) // 2
    u = (torch.arange(half, dtype=dtype, device=device) + torch.rand(n, half, dtype=dtype, device=device)) / half
    t, weight = TimeSampler(sde, "likelihood")(u.reshape(-1))
    z = torch.randn(n * half, d, dtype=dtype, device=device)
    alpha, sigma = sde.marginal(t)
    alpha, sigma = alpha.unsqueeze(-1), sigma.unsqueeze(-1)
    xs = x.repeat_interleave(half, 0)
    terms = []
    for sign in (1.0, -1.0):
        score = score_fn(alpha * xs + sign * sigma * z, t)
        terms.append((sigma * score + sign * z).pow(2).sum(-1) - z.pow(2).sum(-1))
    integrand = 0.5 * (terms[0] + terms[1])  # the antithetic average, (N m,)
    integral = weight * (sde.T - sde.eps) * integrand.reshape(n, half).mean(-1)
    return prior_term - 0.5 * integral + drift_term
