r"""Guidance: estimates of the likelihood :math:`\log p(y \mid x_t)` of a noisy state, and the guided score field.

Both estimates rest on Tweedie's formula for the posterior mean of the clean value,

.. math::

    \hat x_0(x_t) = E[x_0 \mid x_t] = \frac{x_t + \sigma_t^2\, s(x_t, t)}{\alpha_t},

with :math:`x_t \mid x_0 \sim \mathcal N(\alpha_t x_0, \sigma_t^2 I)`, and are differentiated with
respect to :math:`x_t` through :math:`\hat x_0` (hence through the score model) by autograd.

* :class:`DPSGuidance` (Chung et al. 2023): :math:`\log p(y \mid x_t) \approx \log p(y \mid \hat x_0(x_t))`,
  any differentiable likelihood, read from the Pyro model (:class:`~pyro_scoreflow.infer.ModelLikelihood`).
* :class:`PiGDMGuidance` (Song et al. 2023): for :math:`y = A x_0 + b + \epsilon`,
  :math:`\epsilon \sim \mathcal N(0, \Sigma_y)`, the Gaussian approximation
  :math:`p(x_0 \mid x_t) \approx \mathcal N(\hat x_0, r_t^2 I)` gives
  :math:`p(y \mid x_t) \approx \mathcal N(y;\ A \hat x_0 + b,\ \Sigma_y + r_t^2 A A^\top)`.

:class:`GuidedScoreField` wraps a score field so that the package's samplers
(:mod:`pyro_scoreflow.samplers`) integrate the guided reverse SDE unchanged.

References:

[1] H. Chung, J. Kim, M. T. Mccann, M. L. Klasky, J. C. Ye, "Diffusion Posterior Sampling for
    General Noisy Inverse Problems", ICLR 2023.
[2] J. Song, A. Vahdat, M. Mardani, J. Kautz, "Pseudoinverse-Guided Diffusion Models for
    Inverse Problems", ICLR 2023.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..dynamics import ScoreField, SolverError
from .likelihood import ModelLikelihood
from .linear_gaussian import LinearGaussian

__all__ = ["DPSGuidance", "GuidedScoreField", "PiGDMGuidance", "gradient_or_zero", "trust_region"]


def gradient_or_zero(log_lik: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    r""":math:`\nabla_x \sum_i \log\hat p(y \mid x_i)` per row of ``x``; zeros when no observation depends on ``x``."""
    if not log_lik.requires_grad:
        return torch.zeros_like(x)
    (grad,) = torch.autograd.grad(log_lik.sum(), x)
    return grad


def trust_region(term: torch.Tensor, clip: float, sigma) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Each row of ``term`` ``(N, D)`` scaled down to norm at most :math:`\kappa\sqrt{D}/\sigma_t` (``clip``
    :math:`\kappa`); returns the scaled term and which rows were scaled ``(N, 1)``."""
    cap = clip * math.sqrt(term.shape[-1]) / sigma
    norm = term.norm(dim=-1, keepdim=True)
    return term * (cap / norm.clamp_min(torch.finfo(norm.dtype).tiny)).clamp(max=1.0), norm > cap


class DPSGuidance:
    r"""Diffusion posterior sampling: :math:`\log p(y \mid x_t) \approx \log p(y \mid \hat x_0(x_t))`.

    The plug-in estimate ignores the spread of :math:`p(x_0 \mid x_t)`, so it is over-confident
    at large :math:`t` (where :math:`\hat x_0` is close to the prior mean); its gradient is
    nevertheless small there because :math:`\partial \hat x_0 / \partial x_t = \alpha_t
    \operatorname{Cov}[x_0 \mid x_t] / \sigma_t^2` is.

    :param ModelLikelihood likelihood: the model's :math:`\log p(y \mid x)`.
    """

    def __init__(self, likelihood: ModelLikelihood):
        self.likelihood = likelihood

    def __call__(self, x0: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """:math:`\\log p(y \\mid \\hat x_0)` per row of ``x0`` ``(B, *event_shape)``: ``(B,)``."""
        return self.likelihood.log_likelihood(x0)


class PiGDMGuidance:
    r"""Pseudoinverse-guided (:math:`\Pi`\ GDM) likelihood for linear-Gaussian observations.

    In whitened coordinates (:math:`\Sigma_y = I`, :class:`~pyro_scoreflow.infer.LinearGaussian`),

    .. math::

        \log p(y \mid x_t) \approx -\tfrac12 e^\top (I + r_t^2 A A^\top)^{-1} e + \text{const},
        \qquad e = y - A \hat x_0(x_t) - b,

    evaluated with the thin SVD :math:`A = U \operatorname{diag}(s) V^\top` computed once:
    :math:`e^\top (I + r^2 A A^\top)^{-1} e = \|e\|^2 - \sum_k \frac{r^2 s_k^2}{1 + r^2 s_k^2} (u_k^\top e)^2`.
    The variance of :math:`p(x_0 \mid x_t)` is that of data :math:`\mathcal N(0, d^2 I)` diffused
    to time :math:`t`,

    .. math::

        r_t^2 = \frac{d^2 \sigma_t^2}{\alpha_t^2 d^2 + \sigma_t^2},

    which for :math:`d = 1` (``data_std``, the default) is ΠGDM's
    :math:`r_t^2 = \sigma_t^2 / (1 + \sigma_t^2)` in the variance-exploding parameterisation.
    The constant (the log-determinant) does not depend on :math:`x_t`, so it is dropped.

    :param LinearGaussian observation: whitened :math:`A, b, y` (:func:`~pyro_scoreflow.infer.linear_gaussian`).
    :param float data_std: the assumed per-coordinate standard deviation of the data.
    """

    def __init__(self, observation: LinearGaussian, data_std: float = 1.0):
        self.matrix = observation.matrix
        self.target = observation.value - observation.offset
        u, s, _ = torch.linalg.svd(self.matrix, full_matrices=False)
        self.u, self.s2 = u, s**2
        self.data_var = float(data_std) ** 2

    def variance(self, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        r""":math:`r_t^2 = d^2\sigma_t^2 / (\alpha_t^2 d^2 + \sigma_t^2)`."""
        return self.data_var * sigma**2 / (alpha**2 * self.data_var + sigma**2)

    def __call__(self, x0: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        r"""The approximate :math:`\log p(y \mid x_t)` (up to a constant) per row of ``x0``: ``(B,)``."""
        flat = x0.reshape(x0.shape[0], -1).to(self.matrix.dtype)
        e = self.target - flat @ self.matrix.T  # (B, M)
        r2 = self.variance(alpha, sigma).to(self.matrix.dtype)
        shrink = r2 * self.s2 / (1 + r2 * self.s2)
        quad = (e**2).sum(-1) - ((e @ self.u) ** 2 * shrink).sum(-1)
        return -0.5 * quad


class GuidedScoreField(ScoreField):
    r"""The score field of the guided reverse SDE,

    .. math::

        S(x, t) = s_\theta(x, t) + \zeta\, \nabla_x \log \hat p_t(y \mid x),

    with the guidance term of each particle scaled down to norm at most :math:`\kappa\sqrt{D}/\sigma_t`
    (``clip`` :math:`\kappa`: a trust region, see :class:`~pyro_scoreflow.infer.DiffusionPosterior`), and
    with ``clip_denoised = (a, b)`` the prior score replaced by the one whose Tweedie estimate is clamped
    into the data's range. Calling it costs one score evaluation and one vector-Jacobian product through
    the score model (plus the likelihood's own cost). :meth:`prior_score` is the unguided score.

    It records, for the caller's diagnostics, how many evaluations had a zero guidance gradient for
    every particle (``zero_gradient_calls``) and how many clipped at least half of the particles
    (``clipped_calls``), out of ``guided_calls``.

    :param ScoreField field: the prior's score field.
    :param guidance: ``guidance(x0, alpha, sigma) -> log p̂(y | x_t)`` per particle, e.g. :class:`DPSGuidance`.
    :param float scale: :math:`\zeta \ge 0`.
    :param float clip: :math:`\kappa`, or ``None``.
    :param clip_denoised: ``(low, high)`` or ``None``.
    """

    def __init__(
        self,
        field: ScoreField,
        guidance: Callable,
        scale: float = 1.0,
        clip: float | None = 3.0,
        clip_denoised: tuple[float, float] | None = None,
    ):
        super().__init__(field.score_model, field.sde, field.event_shape, field.context)
        self.guidance = guidance
        self.scale = scale
        self.clip = clip
        self.clip_denoised = clip_denoised
        self.guided_calls = self.zero_gradient_calls = self.clipped_calls = 0

    def prior_score(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        r"""The prior's score; with ``clip_denoised = (a, b)`` the score whose Tweedie estimate is clamped,
        :math:`s' = (\alpha\,\mathrm{clamp}(\hat x_0, a, b) - x)/\sigma^2` (:math:`E[x_0 \mid x_t]` lies in the
        box whenever the data do, so only scores that are certainly wrong change)."""
        t = self.sde.clamp_time(t)
        s = ScoreField.__call__(self, x, t)
        if self.clip_denoised is None:
            return s
        return self.sde.score_from_denoised(x, self.sde.denoise(x, s, t).clamp(*self.clip_denoised), t)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = self.sde.clamp_time(t)
        if self.scale == 0:
            return self.prior_score(x, t)
        alpha, sigma = self.sde.marginal(t)
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            s = self.prior_score(xg, t)
            x0 = self.sde.denoise(xg, s, t)
            log_lik = self.guidance(x0.reshape((x.shape[0],) + tuple(self.event_shape)), alpha, sigma)
            grad = gradient_or_zero(log_lik, xg)
        if not torch.isfinite(grad).all():
            raise SolverError(
                f"the guidance gradient is not finite at t={float(t):.4g}; check the likelihood, or lower "
                "guidance_scale / guidance_clip, or raise num_steps"
            )
        term = self.scale * grad.to(s.dtype)
        self.guided_calls += 1
        self.zero_gradient_calls += int(not bool(term.abs().sum() > 0))
        if self.clip is not None:  # trust region: |guidance| <= clip sqrt(D) / sigma_t per particle
            term, clipped = trust_region(term, self.clip, sigma)
            self.clipped_calls += int(bool(clipped.double().mean() >= 0.5))
        return s.detach() + term
