import pytest
import torch
from pyro.distributions import MixtureSameFamily, MultivariateNormal

from pyro_scoreflow import VESDE, VPSDE, GaussianMixtureScore, SubVPSDE

from helpers import random_mixture

SDES = [VPSDE(), SubVPSDE(), VESDE()]


@pytest.mark.parametrize("sde", SDES, ids=lambda s: type(s).__name__)
@pytest.mark.parametrize("D", [1, 2, 5])
def test_score_is_gradient_of_exact_marginal(sde, D):
    """The closed form equals autograd of log p_t from the explicit MixtureSameFamily, at per-point times."""
    score = random_mixture(sde, K=3, D=D, seed=D)
    t = torch.tensor([1e-3, 0.01, 0.1, 0.5, 0.9, 1.0], dtype=torch.float64)
    x = torch.randn(6, D, dtype=torch.float64) * 2
    s = score(x, t)
    for i in range(6):
        xi = x[i].clone().requires_grad_()
        (g,) = torch.autograd.grad(score.marginal(float(t[i])).log_prob(xi), xi)
        torch.testing.assert_close(s[i], g, rtol=1e-6, atol=1e-8)
    # log_density agrees with the distribution
    torch.testing.assert_close(
        score.log_density(x, t), torch.stack([score.marginal(float(t[i])).log_prob(x[i]) for i in range(6)])
    )


def test_scalar_time_and_dtype_follow_x():
    score = random_mixture(VPSDE(), K=2, D=3)
    x = torch.randn(4, 3)
    s = score(x, 0.2)
    assert s.dtype == torch.float32 and s.shape == (4, 3)
    torch.testing.assert_close(s, score(x.double(), torch.full((4,), 0.2, dtype=torch.float64)).float())


def test_marginal_is_mixture_same_family():
    score = random_mixture(VESDE(), K=4, D=2)
    p = score.marginal(0.5)
    assert isinstance(p, MixtureSameFamily)
    assert isinstance(p.component_distribution, MultivariateNormal)
    assert p.event_shape == (2,) and p.batch_shape == ()
    # at t ~ 0 it is the data mixture itself
    p0 = score.marginal(0.0)
    torch.testing.assert_close(p0.component_distribution.loc, score.locs)


def test_uniform_logits_default():
    score = GaussianMixtureScore(VPSDE(), torch.zeros(3, 2), torch.eye(2).expand(3, 2, 2))
    torch.testing.assert_close(score.logits.exp(), torch.full((3,), 1 / 3))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"locs": torch.zeros(3), "scale_tril": torch.eye(3)}, "locs"),
        ({"locs": torch.zeros(2, 3), "scale_tril": torch.eye(3)}, "scale_tril"),
        ({"locs": torch.zeros(2, 3), "scale_tril": torch.eye(3).expand(2, 3, 3), "logits": torch.zeros(3)}, "logits"),
        ({"locs": torch.full((2, 3), float("nan")), "scale_tril": torch.eye(3).expand(2, 3, 3)}, "locs"),
        ({"locs": torch.zeros(2, 3), "scale_tril": torch.zeros(2, 3, 3)}, "scale_tril"),
    ],
)
def test_bad_mixture_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GaussianMixtureScore(VPSDE(), **kwargs)


def test_bad_sde_type():
    with pytest.raises(TypeError, match="sde"):
        GaussianMixtureScore("vp", torch.zeros(1, 2), torch.eye(2).expand(1, 2, 2))
