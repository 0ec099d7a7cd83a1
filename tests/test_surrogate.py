"""The Gaussian-mixture surrogate twist of ``DiffusionSMC`` (``pyro_scoreflow.infer.surrogate``).

Ground truth: for a Gaussian-mixture prior, (x_t, y) is jointly a Gaussian mixture, so p_t(y | x_t) =
p(x_t, y) / p_t(x_t) in closed form, computed here from the joint covariance (independently of the module's
eigenbasis formulas); exact draws of a mixture for the EM fit.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Categorical, MixtureSameFamily, MultivariateNormal

from pyro_scoreflow import VESDE, VPSDE
from pyro_scoreflow.infer.linear_gaussian import LinearGaussian
from pyro_scoreflow.infer.surrogate import GaussianMixtureFit, MixtureTwist, fit_gaussian_mixture

from helpers import random_mixture

F64 = torch.float64


def exact_log_twist(score, sde, A, b, y, noise, x, t):
    """log p_t(y | x_t) of the mixture prior from the joint Gaussian mixture of (x_t, y)."""
    alpha, sigma = sde.marginal(torch.tensor(t, dtype=F64))
    cov0 = score.scale_tril @ score.scale_tril.transpose(-1, -2)
    d, m = A.shape[1], A.shape[0]
    top = torch.cat([alpha**2 * cov0 + sigma**2 * torch.eye(d, dtype=F64), alpha * cov0 @ A.T], -1)
    bottom = torch.cat([alpha * A @ cov0, A @ cov0 @ A.T + noise**2 * torch.eye(m, dtype=F64)], -1)
    joint_cov = torch.cat([top, bottom], -2)
    joint_loc = torch.cat([alpha * score.locs, score.locs @ A.T + b], -1)
    mix = Categorical(logits=score.logits)
    joint = MixtureSameFamily(mix, MultivariateNormal(joint_loc, covariance_matrix=joint_cov))
    marginal = MixtureSameFamily(mix, MultivariateNormal(alpha * score.locs, covariance_matrix=joint_cov[:, :d, :d]))
    return joint.log_prob(torch.cat([x, y.expand(len(x), m)], -1)) - marginal.log_prob(x)


@pytest.mark.parametrize("sde", [VPSDE(), VESDE()], ids=["vp", "ve"])
def test_mixture_twist_is_exact_for_a_mixture_prior(sde):
    score = random_mixture(sde, 3, 5, seed=1)
    g = torch.Generator().manual_seed(2)
    A = torch.randn(2, 5, generator=g, dtype=F64)
    b = torch.randn(2, generator=g, dtype=F64)
    y = torch.randn(2, generator=g, dtype=F64)
    noise = 0.3
    cov0 = score.scale_tril @ score.scale_tril.transpose(-1, -2)
    evals, evecs = torch.linalg.eigh(cov0)
    fit = GaussianMixtureFit(score.logits, score.locs, evals, evecs, bic=0.0)
    twist = MixtureTwist(fit, LinearGaussian(A / noise, b / noise, y / noise))  # whitened observations
    for t in (0.02, 0.3, 0.9):
        alpha, sigma = sde.marginal(torch.tensor(t, dtype=F64))
        x = alpha * score.marginal(0.0).sample((50,)) + sigma * torch.randn(50, 5, dtype=F64)
        # whitening divides the observation density by noise^M
        expected = exact_log_twist(score, sde, A, b, y, noise, x, t) + 2 * math.log(noise)
        torch.testing.assert_close(twist(x, alpha, sigma), expected, atol=1e-9, rtol=0)


def test_fit_recovers_a_mixture_and_chooses_its_size():
    score = random_mixture(VPSDE(), 2, 4, seed=3, scale=0.3)
    p = score.marginal(0.0)
    torch.manual_seed(0)
    fit = fit_gaussian_mixture(p.sample((4000,)))
    assert fit.num_components == 2
    order = fit.locs[:, 0].argsort()
    truth = p.component_distribution.mean[:, 0].argsort()
    torch.testing.assert_close(fit.logits.exp()[order], p.mixture_distribution.probs[truth], atol=0.03, rtol=0)
    torch.testing.assert_close(fit.locs[order], p.component_distribution.mean[truth], atol=0.1, rtol=0)
    mixing = torch.tensor([[1.0, 0, 0, 0], [0.5, 0.5, 0, 0], [0, 0, 2, 0], [0, 0, 0, 1]], dtype=F64)
    gaussian = torch.randn(4000, 4, dtype=F64) @ mixing
    assert fit_gaussian_mixture(gaussian).num_components == 1


def test_fit_rejects_bad_draws_and_fits_few_draws():
    with pytest.raises(ValueError, match="at least 2 draws"):
        fit_gaussian_mixture(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="1 of 3 draws are not finite"):
        fit_gaussian_mixture(torch.tensor([[0.0, 1.0], [float("nan"), 0.0], [1.0, 2.0]]))
    few = fit_gaussian_mixture(torch.randn(5, 8, dtype=F64))  # fewer draws than dimensions: one ridged component
    assert few.num_components == 1 and torch.isfinite(few.evals).all() and bool((few.evals > 0).all())
