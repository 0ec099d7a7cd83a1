"""Regression tests for silently wrong numbers (hardening issue, items 1-5): each failed before its fix."""

import numpy as np
import pyro
import pytest
import torch

from pyro_scoreflow import (
    VESDE,
    VPSDE,
    ConditionalScoreSDEPrior,
    GaussianMixtureScore,
    ScoreNet,
    ScoreSDEPrior,
    SolverError,
    fit,
)
from pyro_scoreflow.checkpoint import weights_file

from helpers import mixture_2d


@pytest.fixture
def setup():
    sde = VPSDE()
    score = mixture_2d(sde)
    return sde, score, ScoreSDEPrior(score, sde, (2,), rtol=1e-6, atol=1e-6)


# -- 1. the log_prob memo never returns a stale number -------------------------------------------
def test_memo_sees_in_place_edits_of_the_score_model(setup):
    sde, score, prior = setup
    x = score.marginal(sde.eps).sample((4,))
    before = prior.log_prob(x)
    with torch.no_grad():
        score.locs.add_(1.0)
    after = prior.log_prob(x)
    torch.testing.assert_close(after, prior.log_prob(x.clone()), rtol=0, atol=0)  # what a fresh tensor gives
    truth = score.marginal(sde.eps).log_prob(x)
    assert (after - truth).abs().max() < 0.1  # (the p_T mismatch grows with the shifted means)
    assert (after - before).abs().min() > 0.1


@pytest.mark.parametrize("edit", ["numpy", "data"])
def test_memo_sees_edits_that_bump_no_version(setup, edit):
    sde, score, prior = setup
    x = score.marginal(sde.eps).sample((4,))
    prior.log_prob(x)
    if edit == "numpy":
        x.numpy()[:] += 2.0
    else:
        x.data.add_(2.0)
    torch.testing.assert_close(prior.log_prob(x), prior.log_prob(x.clone()), rtol=0, atol=0)
    truth = score.marginal(sde.eps).log_prob(x)
    assert (prior.log_prob(x) - truth).abs().max() < 0.1


def test_memo_sees_optimizer_steps_and_option_changes():
    sde = VPSDE()
    torch.manual_seed(0)
    net = ScoreNet(sde, (2,), hidden=16, num_layers=1, embed_dim=8).double()
    prior = ScoreSDEPrior(net, sde, (2,), rtol=1e-4, atol=1e-4)
    x = torch.randn(3, 2, dtype=torch.float64)
    with torch.no_grad():
        before = prior.log_prob(x)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.5)
    prior.log_prob(x).sum().neg().backward()
    optimizer.step()
    with torch.no_grad():
        after = prior.log_prob(x)
        fresh = prior.log_prob(x.clone())
    assert not torch.equal(after, before)
    torch.testing.assert_close(after, fresh)
    prior.divergence = "hutchinson"  # an option changed in place: recomputed with the new option
    with torch.no_grad():
        assert not torch.equal(prior.log_prob(x), fresh)


def test_memo_still_serves_sample_and_log_prob_and_importance(setup):
    sde, score, prior = setup
    x, lp = prior.sample_and_log_prob((5,))
    assert prior.log_prob(x) is lp
    assert prior.expand((5,)).log_prob(x) is lp


def test_memo_skips_callables_without_state():
    sde = VPSDE()
    score = mixture_2d(sde)
    prior = ScoreSDEPrior(lambda x, t: score(x, t), sde, (2,))
    x, lp = prior.sample_and_log_prob((3,))
    assert prior.log_prob(x) is not lp  # no state to compare: recomputed, never possibly stale
    torch.testing.assert_close(prior.log_prob(x), lp, rtol=0, atol=2e-3)


# -- 2. a score model without an autograd path raises --------------------------------------------
@pytest.mark.parametrize("divergence", ["exact", "hutchinson"])
@pytest.mark.parametrize("kind", ["detach", "no_grad", "numpy"])
def test_score_without_autograd_path_raises(kind, divergence):
    if kind == "detach":

        def score(x, t):
            return (-x).detach()

    elif kind == "no_grad":

        @torch.no_grad()
        def score(x, t):
            return -x

    else:

        def score(x, t):
            return torch.from_numpy(-x.detach().numpy())

    for sde in (VPSDE(), VESDE()):
        prior = ScoreSDEPrior(score, sde, (2,), divergence=divergence)
        with pytest.raises(ValueError, match="autograd"):
            prior.log_prob(torch.zeros(1, 2))


def test_differentiable_score_matches_exact_value():
    """The example of the issue: s(x) = -x is the score of N(0, I) at every time of the VP SDE."""
    lp = ScoreSDEPrior(lambda x, t: -x, VPSDE(), (2,)).log_prob(torch.zeros(1, 2, dtype=torch.float64))
    torch.testing.assert_close(lp, torch.tensor([-np.log(2 * np.pi)], dtype=torch.float64), rtol=0, atol=1e-4)


# -- 3. gradients reach a context ------------------------------------------------------------------
@pytest.mark.parametrize("adjoint", [False, True])
def test_context_gradient_of_parameter_free_conditional_score(adjoint):
    """Data N(c, s^2 I): the exact conditional score at time t is -(x - alpha c) / (alpha^2 s^2 + sigma^2);
    d log p_eps(x | c) / dc must match the closed form (beta_max = 40 so that p_T matches the prior)."""
    sde = VPSDE(beta_max=40.0)
    s2 = 0.3**2

    def score(x, t, c):
        alpha, sigma = sde.marginal(t)
        alpha, sigma = alpha.unsqueeze(-1), sigma.unsqueeze(-1)
        return -(x - alpha * c) / (alpha**2 * s2 + sigma**2)

    cond = ConditionalScoreSDEPrior(score, sde, (2,), context_shape=(2,), adjoint=adjoint, rtol=1e-6, atol=1e-6)
    c = torch.tensor([0.4, -0.2], dtype=torch.float64, requires_grad=True)
    x = torch.tensor([[0.1, 0.3], [0.7, -0.5]], dtype=torch.float64)
    cond.condition(c).log_prob(x).sum().backward()
    alpha, sigma = (float(v) for v in sde.marginal(torch.tensor(sde.eps, dtype=torch.float64)))
    expected = (alpha * (x - alpha * c.detach()) / (alpha**2 * s2 + sigma**2)).sum(0)
    assert c.grad is not None
    torch.testing.assert_close(c.grad, expected, rtol=1e-3, atol=1e-3)


def test_svi_learns_a_context_param():
    """SVI on a pyro.param context of a frozen conditional score moves it towards the data."""
    sde = VPSDE()

    def score(x, t, c):
        alpha, sigma = sde.marginal(t)
        alpha, sigma = alpha.unsqueeze(-1), sigma.unsqueeze(-1)
        return -(x - alpha * c) / (alpha**2 * 0.25 + sigma**2)

    cond = ConditionalScoreSDEPrior(score, sde, (2,), context_shape=(2,), rtol=1e-3, atol=1e-3)
    data = torch.tensor([[1.0, 1.0], [1.2, 0.8]])

    def model():
        c = pyro.param("c", torch.zeros(2))
        with pyro.plate("data", 2):
            pyro.sample("x", cond.condition(c), obs=data)

    svi = pyro.infer.SVI(model, lambda: None, pyro.optim.Adam({"lr": 0.1}), pyro.infer.Trace_ELBO())
    for _ in range(20):
        svi.step()
    assert (pyro.param("c").detach() > 0.5).all()


# -- 4. a diverged fit raises and saves nothing --------------------------------------------------
@pytest.mark.parametrize("case", ["huge_data", "huge_lr"])
def test_diverged_fit_raises_and_restores_weights(case, tmp_path):
    sde = VPSDE()
    torch.manual_seed(0)
    net = ScoreNet(sde, (2,), hidden=16, num_layers=1, embed_dim=8)
    good = ScoreSDEPrior(net, sde, (2,))
    good.save_pretrained(tmp_path / "prior")
    saved = weights_file(tmp_path / "prior").read_bytes()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    data = torch.randn(64, 2) * (1e20 if case == "huge_data" else 1.0)
    lr = 1e30 if case == "huge_lr" else 1e-3
    with pytest.raises(ValueError, match="diverged"):
        fit(net, sde, data, steps=30, batch_size=16, lr=lr, progress=False, grad_clip=None)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])
    assert weights_file(tmp_path / "prior").read_bytes() == saved


def test_save_refuses_non_finite_weights(tmp_path):
    sde = VPSDE()
    net = ScoreNet(sde, (2,), hidden=16, num_layers=1, embed_dim=8)
    prior = ScoreSDEPrior(net, sde, (2,))
    prior.save_pretrained(tmp_path / "prior")
    saved = weights_file(tmp_path / "prior").read_bytes()
    with torch.no_grad():
        next(net.parameters()).fill_(float("nan"))
    with pytest.raises(ValueError, match="non-finite"):
        prior.save_pretrained(tmp_path / "prior")
    assert weights_file(tmp_path / "prior").read_bytes() == saved
    ScoreSDEPrior.from_pretrained(tmp_path / "prior")  # still loads


# -- 5. the ODE sampler honours max_num_steps ------------------------------------------------------
def test_ode_sampler_honours_max_num_steps():
    sde = VPSDE()
    score = GaussianMixtureScore(sde, torch.zeros(1, 2), 1e-3 * torch.eye(2).unsqueeze(0))  # stiff near eps
    calls = []

    def counted(x, t):
        calls.append(1)
        return score(x, t)

    prior = ScoreSDEPrior(counted, sde, (2,), sampler="ode", max_num_steps=20)
    with pytest.raises(SolverError):
        prior.sample((4,))
    assert len(calls) <= 6 * 20 + 2  # dopri5: 6 evaluations per attempted step


# -- 11. bounded memory for value gradients ---------------------------------------------------------------
def test_chunked_value_gradient_matches_and_keeps_no_solver_graph():
    """grad_chunk_size: the same log-densities and gradients (within the solver tolerance), and the result's graph
    keeps only the per-point gradients (D numbers a point), not the solves' graphs."""
    sde = VPSDE()
    score = mixture_2d(sde)
    x = score.marginal(sde.eps).sample((10,))
    full = ScoreSDEPrior(score, sde, (2,), rtol=1e-7, atol=1e-7, grad_chunk_size=None)
    chunked = full.with_options(grad_chunk_size=3)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    lpa, lpb = full.log_prob(xa), chunked.log_prob(xb)
    weights = torch.linspace(0.5, 2.0, 10, dtype=x.dtype)
    (lpa * weights).sum().backward()
    (lpb * weights).sum().backward()
    torch.testing.assert_close(lpb, lpa, rtol=0, atol=1e-5)
    torch.testing.assert_close(xb.grad, xa.grad, rtol=0, atol=1e-4)
    assert type(lpb.grad_fn).__name__ == "_PrecomputedGradientBackward"
    exact = torch.func.vmap(torch.func.grad(lambda v: score.marginal(sde.eps).log_prob(v)))(x)
    torch.testing.assert_close(xb.grad / weights.unsqueeze(-1), exact, rtol=0, atol=0.05)
