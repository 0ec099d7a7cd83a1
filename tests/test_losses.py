"""The training objective and the likelihood bound (pyro_scoreflow.losses) against ground truth."""

import math

import pytest
import torch

from pyro_scoreflow import VESDE, VPSDE, ScoreSDEPrior, SubVPSDE, training
from pyro_scoreflow.losses import TimeSampler, dsm_bound, dsm_loss, weighted_dsm_loss

from helpers import mixture_2d

SDES = [VPSDE(), SubVPSDE(), VESDE(), VPSDE(beta_min=0.5, beta_max=5.0, T=2.0, eps=1e-3), VESDE(0.1, 5.0, eps=1e-4)]
SDE_IDS = ["vp", "subvp", "ve", "vp-T2", "ve-small"]


def bisection_times(sde, u: torch.Tensor, steps: int = 64) -> torch.Tensor:
    """The sampler of earlier versions: bisection for log(alpha^2/sigma^2)(t) = target on the SDE's marginal."""

    def log_snr(t):
        alpha, sigma = sde.marginal(t)
        return 2 * (torch.log(alpha) - torch.log(sigma))

    lam_eps, lam_T = log_snr(torch.tensor([sde.eps, sde.T], dtype=torch.float64))
    target = lam_eps - u * (lam_eps - lam_T)
    lo, hi = torch.full_like(target, sde.eps), torch.full_like(target, sde.T)
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        above = log_snr(mid) > target
        lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
    return 0.5 * (lo + hi)


@pytest.mark.parametrize("sde", SDES, ids=SDE_IDS)
def test_likelihood_times_match_the_old_bisection(sde):
    """The closed-form inverse log-SNR draws the same times as the 64-step bisection it replaces."""
    u = torch.cat([torch.tensor([0.0, 0.5, 1 - 2**-40]), torch.rand(5000, dtype=torch.float64)])
    t, weight = TimeSampler(sde, "likelihood")(u)
    torch.testing.assert_close(t, bisection_times(sde, u), rtol=1e-12, atol=0)
    lam = 2 * sde.log_snr(torch.tensor([sde.eps, sde.T], dtype=torch.float64))  # the full log-SNR
    assert weight == pytest.approx((lam[0] - lam[1]).item() / (sde.T - sde.eps), rel=1e-12)
    t32, _ = TimeSampler(sde, "likelihood")(u.float())
    assert t32.dtype == torch.float32 and (t32 >= sde.eps).all() and (t32 <= sde.T).all()


@pytest.mark.parametrize("sde", SDES, ids=SDE_IDS)
def test_likelihood_time_density_is_g2_over_sigma2(sde):
    """q(t) = g^2/sigma^2 / Z, against the numerical derivative of the full log-SNR 2*lambda and for normalisation."""
    sampler = TimeSampler(sde, "likelihood")
    t = torch.logspace(math.log10(sde.eps), math.log10(sde.T), 2001, dtype=torch.float64)
    q = sampler.density(t)
    h = 1e-7 * t
    dlam = 2 * (sde.log_snr(t + h) - sde.log_snr(t - h)) / (2 * h)
    g2 = sde.diffusion(t) ** 2 / sde.marginal(t)[1] ** 2
    torch.testing.assert_close(-dlam, g2, rtol=1e-5, atol=0)
    assert torch.trapezoid(q, t).item() == pytest.approx(1, abs=1e-3)
    # the empirical distribution of the drawn times has this density: CDF at a few points, 2e5 draws (s.e. <= 1.2e-3)
    draws, _ = sampler(torch.rand(200_000, dtype=torch.float64))
    for cut in (sde.eps * 10, 0.01 * sde.T, 0.3 * sde.T):
        grid = torch.logspace(math.log10(sde.eps), math.log10(cut), 4001, dtype=torch.float64)
        cdf = torch.trapezoid(sampler.density(grid), grid).item()
        assert (draws <= cut).double().mean().item() == pytest.approx(cdf, abs=6e-3)


@pytest.mark.parametrize("sde", SDES, ids=SDE_IDS)
def test_likelihood_time_sampler_inverts_the_cdf(sde):
    """The times are uniform in the log-SNR: lambda(t(u)) = lambda(eps) - u (lambda(eps) - lambda(T)), increasing."""
    u = torch.linspace(0, 1, 101, dtype=torch.float64)[:-1]
    t, _ = TimeSampler(sde, "likelihood")(u)
    assert (t >= sde.eps).all() and (t <= sde.T).all() and (t.diff() > 0).all()
    lam_eps, lam_T = sde.log_snr(torch.tensor([sde.eps, sde.T], dtype=torch.float64))
    torch.testing.assert_close(sde.log_snr(t), lam_eps - u * (lam_eps - lam_T), rtol=0, atol=1e-9)


@pytest.mark.parametrize("weighting", ["score", "likelihood"])
def test_importance_weights_are_unbiased(weighting):
    r"""E_u[w h(t(u))] = E_{t ~ U[eps, T]}[w(t)/sigma(t)^2 h(t)] for h = sigma^2: the integral of the weight w(t)."""
    sde = VPSDE()
    sampler = TimeSampler(sde, weighting)
    u = (torch.arange(200_000, dtype=torch.float64) + 0.5) / 200_000
    t, weight = sampler(u)
    estimate = (weight * sde.marginal(t)[1] ** 2).mean().item()
    grid = torch.linspace(sde.eps, sde.T, 100_001, dtype=torch.float64)
    lam = sde.marginal(grid)[1] ** 2 if weighting == "score" else sde.diffusion(grid) ** 2
    exact = torch.trapezoid(lam, grid).item() / (sde.T - sde.eps)
    assert estimate == pytest.approx(exact, rel=1e-3)


def test_time_sampler_checks_its_arguments():
    with pytest.raises(ValueError, match="weighting"):
        TimeSampler(VPSDE(), "elbo")
    with pytest.raises(TypeError, match="weighting"):
        TimeSampler(VPSDE(), 1)
    with pytest.raises(TypeError, match="sde"):
        TimeSampler("vp")


def test_dsm_loss_of_the_exact_score():
    """Data N(0, I) under the VP SDE stay N(0, I), s(x) = -x, and E||sigma s + z||^2 / D = alpha(t)^2."""
    sde = VPSDE()
    x0 = torch.randn(200_000, 2, dtype=torch.float64)
    for t in (0.05, 0.3, 0.8):
        tt = torch.full((x0.shape[0],), t, dtype=torch.float64)
        loss = dsm_loss(lambda x, _: -x, sde, x0, tt, torch.randn_like(x0)).mean().item()
        assert loss == pytest.approx(sde.marginal(torch.tensor(t))[0].item() ** 2, abs=0.01)


def test_weighted_loss_of_the_exact_score():
    """J for data N(0, I), exact score -x: E_t[w(t) alpha(t)^2 / sigma(t)^2], by quadrature, for both weightings."""
    sde = VPSDE()
    x0 = torch.randn(200_000, 2, dtype=torch.float64)
    grid = torch.linspace(sde.eps, sde.T, 200_001, dtype=torch.float64)
    alpha2 = sde.marginal(grid)[0] ** 2
    for weighting, w in (("score", sde.marginal(grid)[1] ** 2), ("likelihood", sde.diffusion(grid) ** 2)):
        exact = torch.trapezoid(w * alpha2 / sde.marginal(grid)[1] ** 2, grid).item() / (sde.T - sde.eps)
        u = (torch.randperm(x0.shape[0]).double() + torch.rand(x0.shape[0], dtype=torch.float64)) / x0.shape[0]
        loss = weighted_dsm_loss(TimeSampler(sde, weighting), lambda x, _: -x, x0, u=u).item()
        assert loss == pytest.approx(exact, rel=0.02), weighting  # Monte Carlo over z: measured < 0.5%


def test_training_reexports_the_losses():
    assert training.TimeSampler is TimeSampler and training.dsm_loss is dsm_loss


# -- the likelihood bound -----------------------------------------------------------------------------------
@pytest.mark.parametrize("sde", [VPSDE(), VESDE()], ids=["vp", "ve"])
def test_dsm_bound_is_the_priors_lower_bound(sde):
    """dsm_bound(score, sde, x) gives the numbers of ScoreSDEPrior.log_prob_lower_bound (same random draws)."""
    score = mixture_2d(sde)
    x = score.marginal(sde.eps).sample((50,))
    torch.manual_seed(7)
    expected = ScoreSDEPrior(score, sde, (2,)).log_prob_lower_bound(x, num_samples=16)
    torch.manual_seed(7)
    bound = dsm_bound(score, sde, x, num_samples=16)
    torch.testing.assert_close(bound, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sde", [VPSDE(), SubVPSDE(), VESDE()], ids=["vp", "subvp", "ve"])
def test_dsm_bound_is_tight_for_the_exact_score_and_below_for_a_wrong_one(sde):
    """Exact score: the variational gap is zero, so the bound equals log p up to Monte Carlo noise; a shrunk score's
    bound lies clearly below (Gibbs)."""
    score = mixture_2d(sde)
    exact = score.marginal(sde.eps)
    torch.manual_seed(0)
    x = exact.sample((1000,))
    truth = exact.log_prob(x)
    gap = truth - dsm_bound(score, sde, x, num_samples=64)
    se = gap.std() / 1000**0.5
    assert gap.mean().abs() < 4 * se + 0.02, (gap.mean(), se)
    wrong = dsm_bound(lambda y, t: 0.7 * score(y, t), sde, x, num_samples=64)
    assert (truth - wrong).mean() > 0.5


def test_dsm_bound_gradient_and_arguments():
    sde = VPSDE()
    score = mixture_2d(sde)
    x = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(dsm_bound(score, sde, x, num_samples=3).sum(), x)
    assert g.shape == (4, 2) and torch.isfinite(g).all()
    with pytest.raises(ValueError, match="num_samples"):
        dsm_bound(score, sde, x, num_samples=0)
    with pytest.raises(TypeError, match="num_samples"):
        dsm_bound(score, sde, x, num_samples=2.0)
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        dsm_bound(score, sde, x[0], num_samples=2)
