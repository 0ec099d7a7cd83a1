"""The probability-flow transform, sample_and_log_prob, the DSM lower bound and conditional priors."""

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_scoreflow import VESDE, VPSDE, ConditionalScoreSDEPrior, ProbabilityFlowTransform, ScoreSDEPrior

from helpers import mixture_2d


@pytest.fixture
def setup():
    sde = VPSDE()
    score = mixture_2d(sde)
    return sde, score, ScoreSDEPrior(score, sde, (2,))


def test_flow_round_trip_and_transformed_distribution(setup):
    sde, score, prior = setup
    flow = prior.flow
    assert isinstance(flow, ProbabilityFlowTransform) and flow.bijective
    z = torch.randn(50, 2, dtype=torch.float64)
    x = flow(z)
    torch.testing.assert_close(flow.inv(x.clone()), z, rtol=1e-3, atol=1e-3)  # fresh solve back
    # decoded noise is distributed like the data
    assert (x.mean(0) - score.marginal(sde.eps).mean).abs().max() < 0.4
    td = dist.TransformedDistribution(sde.prior((2,), dtype=torch.float64), [flow])
    y = score.marginal(sde.eps).sample((30,))
    torch.testing.assert_close(td.log_prob(y), prior.log_prob(y), rtol=0, atol=1e-3)


def test_flow_log_det_is_consistent(setup):
    """log|det dx/dz| from _call equals minus the one from the inverse solve, and matches autograd."""
    sde, score, prior = setup
    flow = prior.flow
    z = torch.randn(3, 2, dtype=torch.float64)
    x = flow(z)
    ladj = flow.log_abs_det_jacobian(z, x)
    flow_inv_ladj = flow.inv.log_abs_det_jacobian(x, z)  # calls _inverse's cached value or a fresh solve
    torch.testing.assert_close(flow_inv_ladj, -ladj, rtol=0, atol=2e-3)
    jac = torch.autograd.functional.jacobian(lambda v: prior.with_options(rtol=1e-7, atol=1e-7).flow(v), z[0])
    torch.testing.assert_close(ladj[0], torch.linalg.slogdet(jac)[1], rtol=0, atol=2e-3)


def test_sample_and_log_prob_matches_exact(setup):
    sde, score, prior = setup
    x, lp = prior.sample_and_log_prob((200,))
    assert (lp - score.marginal(sde.eps).log_prob(x)).abs().mean() < 0.01


@pytest.mark.parametrize("divergence", ["exact", "hutchinson"])
def test_importance_weights_prior_terms_cancel(divergence):
    """With the prior as proposal, log w = log p(y|x) exactly: model and guide share the prior's
    log-density (cached by tensor identity), also with Hutchinson's estimator."""
    sde = VPSDE()
    prior = ScoreSDEPrior(mixture_2d(sde), sde, (2,), divergence=divergence, num_steps=20)
    y = torch.tensor(0.7, dtype=torch.float64)

    def model():
        x = pyro.sample("x", prior)
        pyro.sample("y", dist.Normal(x.sum(-1), 0.5), obs=y)

    def guide():
        pyro.sample("x", prior)

    importance = pyro.infer.Importance(model, guide, num_samples=5).run()
    for tr, log_w in zip(importance.exec_traces, importance.log_weights):
        x = tr.nodes["x"]["value"]
        torch.testing.assert_close(log_w, dist.Normal(x.sum(-1), 0.5).log_prob(y), rtol=0, atol=1e-12)


def test_hutchinson_seed_makes_estimates_repeatable():
    sde = VPSDE()
    score = mixture_2d(sde)
    x = score.marginal(sde.eps).sample((20,))
    a = ScoreSDEPrior(score, sde, (2,), divergence="hutchinson", hutchinson_seed=5).log_prob(x)
    b = ScoreSDEPrior(score, sde, (2,), divergence="hutchinson", hutchinson_seed=5).log_prob(x.clone())
    c = ScoreSDEPrior(score, sde, (2,), divergence="hutchinson", hutchinson_seed=6).log_prob(x.clone())
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)


def test_log_prob_cache_respects_in_place_changes_and_grad(setup):
    sde, score, prior = setup
    x = score.marginal(sde.eps).sample((5,))
    lp = prior.log_prob(x)
    assert prior.log_prob(x) is lp
    x.add_(0.1)  # in-place edit bumps the version: recomputed
    assert not torch.equal(prior.log_prob(x), lp)
    x.requires_grad_()
    assert prior.log_prob(x).requires_grad  # never a cached value without its graph


@pytest.mark.parametrize("sde", [VPSDE(), VESDE()], ids=["VPSDE", "VESDE"])
def test_lower_bound_is_tight_for_exact_score_and_below_for_wrong_score(sde):
    """For the exact score the DSM bound equals log p up to Monte Carlo noise (the variational gap is
    zero); for a wrong score E_data[bound] <= E_data[log p_theta^SDE] <= E_data[log p_data] (Gibbs)."""
    score = mixture_2d(sde)
    exact = score.marginal(sde.eps)
    x = exact.sample((2000,))
    truth = exact.log_prob(x)
    bound = ScoreSDEPrior(score, sde, (2,)).log_prob_lower_bound(x, num_samples=64)
    assert bound.shape == (2000,)
    gap = truth - bound
    se = gap.std() / 2000**0.5  # per-point Monte Carlo std ~3 nats at 64 samples in 2-D
    assert gap.mean().abs() < 4 * se + 0.02, (gap.mean(), se)

    class Shrunk(torch.nn.Module):
        def forward(self, x, t):
            return 0.7 * score(x, t)

    wrong = ScoreSDEPrior(Shrunk(), sde, (2,)).log_prob_lower_bound(x, num_samples=64)
    assert (truth - wrong).mean() > 0.5  # measured ~0.9-1.1 nats


def test_lower_bound_shapes_and_gradient(setup):
    sde, score, prior = setup
    x = torch.randn(4, 1, 2, dtype=torch.float64, requires_grad=True)
    b = prior.expand((3,)).log_prob_lower_bound(x, num_samples=8)
    assert b.shape == (4, 3)
    (g,) = torch.autograd.grad(b.sum(), x)
    assert torch.isfinite(g).all()
    with pytest.raises(ValueError, match="num_samples"):
        prior.log_prob_lower_bound(x, num_samples=0)


class LabelScore(torch.nn.Module):
    """p(x | c) = N(mu_c, s^2 I) diffused: an exact conditional score."""

    def __init__(self, sde, mus, s=0.3):
        super().__init__()
        self.sde, self.s = sde, s
        self.register_buffer("mus", mus)

    def forward(self, x, t, c):
        alpha, std = self.sde.marginal(t)
        alpha, std = alpha.unsqueeze(-1), std.unsqueeze(-1)
        return -(x - alpha * self.mus[c]) / (alpha**2 * self.s**2 + std**2)


def test_conditional_prior():
    sde = VPSDE()
    mus = torch.tensor([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.0]])
    cond = ConditionalScoreSDEPrior(LabelScore(sde, mus), sde, (2,), context_shape=(), sampler="ode")
    prior = cond.condition(torch.tensor([0, 1, 2]))
    assert prior.batch_shape == (3,)
    x = prior.sample((400,))
    assert x.shape == (400, 3, 2)
    torch.testing.assert_close(x.mean(0), mus, rtol=0, atol=0.1)
    lp = prior.log_prob(mus)  # each class's mean under its own class
    exact = dist.Normal(mus, (0.09 + sde.marginal(torch.tensor(sde.eps))[1] ** 2) ** 0.5).to_event(1).log_prob(mus)
    torch.testing.assert_close(lp, exact, rtol=0, atol=0.02)
    # one context for many points broadcasts
    single = cond.condition(torch.tensor(1))
    assert single.batch_shape == () and single.sample((5,)).shape == (5, 2)
    # plates work
    with pyro.plate("p", 3):
        assert pyro.sample("x", prior).shape == (3, 2)


def test_cache_is_shared_by_expanded_copies(setup):
    """pyro.plate expands the prior at every call: model and guide copies share the memo."""
    sde, score, prior = setup
    x = score.marginal(sde.eps).sample((4,))
    lp = prior.expand((4,)).log_prob(x)
    assert prior.expand((4,)).log_prob(x) is lp
    assert prior.expand((2, 4)).log_prob(x).shape == (2, 4)  # another batch shape: not the memo
