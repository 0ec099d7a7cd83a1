"""Shared ground-truth fixtures for the tests."""

from __future__ import annotations

import torch

from pyro_scoreflow import GaussianMixtureScore


def mixture_2d(sde, dtype=torch.float64) -> GaussianMixtureScore:
    """A three-component 2-D mixture of about unit scale, with correlated and unequal components."""
    locs = torch.tensor([[-1.0, 0.5], [1.0, -0.5], [0.3, 1.2]], dtype=dtype)
    scale_tril = torch.tensor(
        [[[0.3, 0.0], [0.1, 0.2]], [[0.25, 0.0], [0.0, 0.25]], [[0.2, 0.0], [-0.1, 0.3]]], dtype=dtype
    )
    logits = torch.tensor([0.0, 0.5, -0.3], dtype=dtype)
    return GaussianMixtureScore(sde, locs, scale_tril, logits)


def two_mode_mixture(sde, dtype=torch.float64) -> GaussianMixtureScore:
    """Two correlated, equally weighted 2-D components at (-1.5, -0.5) and (1.5, 0.5): the posterior tests' prior."""
    locs = torch.tensor([[-1.5, -0.5], [1.5, 0.5]], dtype=dtype)
    scale_tril = torch.tensor([[[0.6, 0.0], [0.3, 0.4]], [[0.5, 0.0], [-0.2, 0.5]]], dtype=dtype)
    return GaussianMixtureScore(sde, locs, scale_tril)


def random_mixture(sde, K: int, D: int, seed: int = 0, dtype=torch.float64, scale: float = 0.3) -> GaussianMixtureScore:
    g = torch.Generator().manual_seed(seed)
    locs = torch.randn(K, D, generator=g, dtype=dtype)
    a = torch.randn(K, D, D, generator=g, dtype=dtype) * scale
    scale_tril = torch.linalg.cholesky(a @ a.transpose(-1, -2) / D + 0.05 * torch.eye(D, dtype=dtype))
    return GaussianMixtureScore(sde, locs, scale_tril, torch.randn(K, generator=g, dtype=dtype))


def component_masses(score: GaussianMixtureScore, x: torch.Tensor) -> torch.Tensor:
    """Fraction of points whose most likely component (under the exact data mixture) is k."""
    comp = score.marginal(0.0).component_distribution
    labels = comp.log_prob(x.unsqueeze(-2).double()).argmax(-1)
    return torch.bincount(labels, minlength=score.num_components).double() / x.shape[0]
