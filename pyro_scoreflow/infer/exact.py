r"""Closed-form posteriors for checking inference: a Gaussian-mixture prior and linear-Gaussian observations.

For :math:`x \sim \sum_k w_k \mathcal N(\mu_k, \Sigma_k)` and :math:`y = A x + b + \varepsilon`,
:math:`\varepsilon \sim \mathcal N(0, \Sigma_y)`, the posterior is again a Gaussian mixture: with
:math:`S_k = \Sigma_y + A \Sigma_k A^\top` and the gain :math:`K_k = \Sigma_k A^\top S_k^{-1}`,

.. math::

    p(x \mid y) = \sum_k \tilde w_k\, \mathcal N\big(x;\ \mu_k + K_k (y - A\mu_k - b),\ \Sigma_k - K_k A \Sigma_k\big),
    \qquad \tilde w_k \propto w_k\, \mathcal N(y;\ A\mu_k + b,\ S_k),

and the evidence is :math:`p(y) = \sum_k w_k\, \mathcal N(y;\ A\mu_k + b,\ S_k)`.

The prior a :class:`~pyro_scoreflow.ScoreSDEPrior` with the exact score of a
:class:`~pyro_scoreflow.GaussianMixtureScore` represents is its marginal at :math:`\epsilon`,
``score.marginal(sde.eps)``; pass that as ``mixture``.
"""

from __future__ import annotations

import torch
from pyro.distributions import Categorical, MixtureSameFamily, MultivariateNormal

__all__ = ["linear_gaussian_posterior"]


def linear_gaussian_posterior(
    mixture: MixtureSameFamily,
    matrix: torch.Tensor,
    y: torch.Tensor,
    noise_cov: torch.Tensor,
    offset: torch.Tensor | None = None,
) -> tuple[MixtureSameFamily, torch.Tensor]:
    r"""The exact posterior :math:`p(x \mid y)` and :math:`\log p(y)` (module docstring), in float64.

    :param mixture: the prior, a ``MixtureSameFamily`` of ``MultivariateNormal`` with event shape ``(D,)``.
    :param matrix: :math:`A`, ``(M, D)``.
    :param y: the observation, ``(M,)``.
    :param noise_cov: :math:`\Sigma_y`, ``(M, M)``.
    :param offset: :math:`b`, ``(M,)`` (zero when ``None``).
    :returns: ``(posterior, log_evidence)``: a ``MixtureSameFamily`` of ``MultivariateNormal`` and a 0-d tensor.
    """
    if not isinstance(mixture, MixtureSameFamily) or not isinstance(mixture.component_distribution, MultivariateNormal):
        raise TypeError(f"mixture must be a MixtureSameFamily of MultivariateNormal, got {type(mixture).__name__}")
    f64 = torch.float64
    comp = mixture.component_distribution
    mus, covs = comp.mean.to(f64), comp.covariance_matrix.to(f64)  # (K, D), (K, D, D)
    A = torch.as_tensor(matrix, dtype=f64)
    y = torch.as_tensor(y, dtype=f64)
    noise_cov = torch.as_tensor(noise_cov, dtype=f64)
    m, d = A.shape
    if mus.shape[-1] != d:
        raise ValueError(f"matrix must have shape (M, {mus.shape[-1]}), got {tuple(A.shape)}")
    if y.shape != (m,):
        raise ValueError(f"y must have shape ({m},), got {tuple(y.shape)}")
    if noise_cov.shape != (m, m):
        raise ValueError(f"noise_cov must have shape ({m}, {m}), got {tuple(noise_cov.shape)}")
    b = torch.zeros(m, dtype=f64) if offset is None else torch.as_tensor(offset, dtype=f64)
    pred = mus @ A.T + b  # (K, M)
    s = noise_cov + A @ covs @ A.T  # (K, M, M)
    s = 0.5 * (s + s.mT)
    gain = torch.linalg.solve(s, A @ covs).mT  # Sigma_k A^T S_k^{-1}, (K, D, M)
    means = mus + (gain @ (y - pred).unsqueeze(-1)).squeeze(-1)
    post_covs = covs - gain @ A @ covs
    post_covs = 0.5 * (post_covs + post_covs.mT)
    log_w = mixture.mixture_distribution.logits.to(f64).log_softmax(-1)
    log_joint = log_w + MultivariateNormal(pred, covariance_matrix=s).log_prob(y)  # (K,)
    posterior = MixtureSameFamily(Categorical(logits=log_joint), MultivariateNormal(means, covariance_matrix=post_covs))
    return posterior, log_joint.logsumexp(-1)
