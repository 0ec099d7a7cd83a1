"""Pyro inference with a :class:`ScoreSDEPrior`, checked against the exact posterior.

The model is a 2-D Gaussian mixture prior (exact score) with a noisy linear observation::

    x ~ ScoreSDEPrior(GaussianMixtureScore(...), VPSDE(), (2,))
    y ~ Normal(w . x, sigma)          (observed)

Its posterior is known in closed form (a Gaussian mixture, one Kalman update per
component) and is also computed on a fine grid from
``GaussianMixtureScore.marginal(sde.eps).log_prob`` times the likelihood; the two
are checked against each other first, then every Pyro inference route is checked
against them with a tolerance of a few Monte-Carlo standard errors (each test
states its noise floor) plus the small measured systematic error of the solvers.

Two observations are used:

* ``Y_BIMODAL``: the posterior keeps both mixture components (masses about
  0.27 / 0.73): importance sampling (sequential and vectorized) and Predictive.
* ``Y_UNIMODAL``: one component keeps 99.98% of the mass, so the posterior is
  (almost exactly) Gaussian: SVI with a Gaussian autoguide and NUTS, which are
  local methods and are not expected to weigh separated modes correctly.

Both posteriors are far from the prior (prior mean (0, 0), std (1.6, 0.72)).

All runs use ``torch.set_num_threads(1)``: the tensors are tiny (batches of 1 to
a few thousand 2-D points), and on a loaded 2-core machine intra-op threading
made the single-point ODE solves that NUTS and SVI do about 10x slower.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import MCMC, NUTS, SVI, EmpiricalMarginal, Importance, Predictive, Trace_ELBO
from pyro.infer.autoguide import AutoMultivariateNormal, init_to_median
from pyro.infer.importance import vectorized_importance_weights
from pyro.ops.stats import effective_sample_size
from pyro.optim import ClippedAdam

from pyro_scoreflow import VPSDE, GaussianMixtureScore, ScoreSDEPrior

SDE = VPSDE()
LOCS = torch.tensor([[-1.5, -0.5], [1.5, 0.5]])
SCALE_TRIL = torch.tensor([[[0.6, 0.0], [0.3, 0.4]], [[0.5, 0.0], [-0.2, 0.5]]])
W = torch.tensor([1.0, 1.0])
SIGMA = 0.5
Y_BIMODAL = torch.tensor(0.5)
Y_UNIMODAL = torch.tensor(2.5)
PRIOR_MEAN = torch.zeros(2)  # equal weights, locs symmetric about 0

# the grid for the exact posterior: 451 x 451 points, cell 0.02 x 0.02; the
# posterior mass outside [-4, 5]^2 is < 1e-12 for both observations
GRID = torch.linspace(-4.0, 5.0, 451, dtype=torch.float64)


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(num_threads)


@pytest.fixture(scope="module")
def score() -> GaussianMixtureScore:
    return GaussianMixtureScore(SDE, LOCS, SCALE_TRIL)


def model(prior: ScoreSDEPrior, y: torch.Tensor | None = None) -> torch.Tensor:
    x = pyro.sample("x", prior)
    return pyro.sample("y", dist.Normal((x * W).sum(-1), SIGMA), obs=y)


def prior_guide(prior: ScoreSDEPrior, y: torch.Tensor | None = None) -> None:
    """The prior as proposal: the importance weights are then the likelihood."""
    pyro.sample("x", prior)


# -- ground truth -------------------------------------------------------------------------
@dataclass
class Posterior:
    mean: torch.Tensor  # (2,)
    cov: torch.Tensor  # (2, 2)
    masses: torch.Tensor  # (K,): P(component k | y)
    log_evidence: float  # log p(y)

    @property
    def std(self) -> torch.Tensor:
        return self.cov.diagonal().sqrt()


def _exact_prior(dtype=torch.float64) -> dist.MixtureSameFamily:
    """p_eps, the distribution a ScoreSDEPrior with the exact score represents."""
    return GaussianMixtureScore(SDE, LOCS.to(dtype), SCALE_TRIL.to(dtype)).marginal(SDE.eps)


def responsibilities(x: torch.Tensor) -> torch.Tensor:
    """P(component k | x) under p_eps, shape ``(..., K)``; P(k | y) = E[P(k | x) | y]."""
    p = _exact_prior()
    x = x.double()
    log_joint = p.component_distribution.log_prob(x.unsqueeze(-2)) + p.mixture_distribution.logits
    return log_joint.softmax(-1)


def grid_posterior(y: torch.Tensor) -> Posterior:
    """The posterior on the grid: p_eps(x) N(y; w.x, sigma^2), normalised over the cells."""
    x1, x2 = torch.meshgrid(GRID, GRID, indexing="ij")
    pts = torch.stack([x1, x2], -1).reshape(-1, 2)
    cell = float((GRID[1] - GRID[0]) ** 2)
    log_joint = _exact_prior().log_prob(pts) + dist.Normal(pts @ W.double(), SIGMA).log_prob(y.double())
    log_z = log_joint.logsumexp(0)
    p = (log_joint - log_z).exp()
    mean = p @ pts
    centred = pts - mean
    cov = (p[:, None] * centred).T @ centred
    masses = p @ responsibilities(pts)
    return Posterior(mean.float(), cov.float(), masses.float(), float(log_z) + math.log(cell))


def closed_form_posterior(y: torch.Tensor) -> Posterior:
    """The same posterior in closed form: one Kalman update per component of p_eps."""
    p = _exact_prior()
    w, y = W.double(), y.double()
    mus = p.component_distribution.mean  # (K, 2)
    covs = p.component_distribution.covariance_matrix  # (K, 2, 2)
    s2 = torch.einsum("i,kij,j->k", w, covs, w) + SIGMA**2  # Var(y | k)
    gain = covs @ w / s2[:, None]  # (K, 2)
    resid = y - mus @ w
    means = mus + gain * resid[:, None]
    covs_post = covs - gain[:, :, None] * (w @ covs)[:, None, :]
    log_marg = p.mixture_distribution.logits.log_softmax(-1) + dist.Normal(mus @ w, s2.sqrt()).log_prob(y)
    masses = log_marg.softmax(-1)
    mean = masses @ means
    dev = means - mean
    cov = (masses[:, None, None] * (covs_post + dev[:, :, None] * dev[:, None, :])).sum(0)
    return Posterior(mean.float(), cov.float(), masses.float(), float(log_marg.logsumexp(-1)))


@pytest.fixture(scope="module")
def posterior_bimodal() -> Posterior:
    return grid_posterior(Y_BIMODAL)


@pytest.fixture(scope="module")
def posterior_unimodal() -> Posterior:
    return grid_posterior(Y_UNIMODAL)


def weighted_stats(x: torch.Tensor, log_w: torch.Tensor):
    """Self-normalised importance estimates: mean, cov, component masses, ESS."""
    w = log_w.detach().double().softmax(0)
    x = x.detach().double()
    mean = w @ x
    centred = x - mean
    cov = (w[:, None] * centred).T @ centred
    masses = w @ responsibilities(x)
    ess = float(1.0 / (w**2).sum())
    return mean.float(), cov.float(), masses.float(), ess


@pytest.mark.parametrize("y", [Y_BIMODAL, Y_UNIMODAL], ids=["bimodal", "unimodal"])
def test_grid_posterior_matches_closed_form(y):
    grid, exact = grid_posterior(y), closed_form_posterior(y)
    # the grid's quadrature error is far below every Monte-Carlo tolerance used below
    assert torch.allclose(grid.mean, exact.mean, atol=1e-4)
    assert torch.allclose(grid.cov, exact.cov, atol=1e-4)
    assert torch.allclose(grid.masses, exact.masses, atol=1e-4)
    assert grid.log_evidence == pytest.approx(exact.log_evidence, abs=1e-4)
    # and the observation moves the posterior well away from the prior
    assert (grid.mean - PRIOR_MEAN).norm() > 0.7
    assert grid.std.max() < 0.85


def test_problem_is_informative(posterior_bimodal, posterior_unimodal):
    torch.testing.assert_close(posterior_bimodal.masses, torch.tensor([0.2654, 0.7346]), atol=1e-3, rtol=0)
    assert posterior_unimodal.masses[1] > 0.999
    torch.testing.assert_close(posterior_unimodal.mean, torch.tensor([1.6269, 0.6611]), atol=1e-3, rtol=0)


# -- importance sampling ------------------------------------------------------------------
PROPOSAL = dist.Normal(torch.tensor([0.5, 0.2]), torch.tensor([1.2, 1.0])).to_event(1)


def gaussian_guide(prior: ScoreSDEPrior, y: torch.Tensor | None = None) -> None:
    """A wide Gaussian proposal: the weights then contain ``prior.log_prob`` (the ODE)."""
    pyro.sample("x", PROPOSAL)


@pytest.mark.slow
def test_importance_sequential(score, posterior_bimodal):
    """``pyro.infer.Importance``: one particle (one single-point ODE solve) at a time."""
    pyro.set_rng_seed(0)
    prior = ScoreSDEPrior(score, SDE, (2,), rtol=1e-3, atol=1e-3)
    num_samples = 200
    importance = Importance(model, guide=gaussian_guide, num_samples=num_samples).run(prior, Y_BIMODAL)
    ess = float(importance.get_ESS())
    assert ess > 40  # ~30% of the particles for this proposal
    mean = EmpiricalMarginal(importance, sites="x").mean
    # noise floor: posterior std / sqrt(ESS) = (0.80, 0.47) / sqrt(~60) ~ (0.10, 0.06);
    # 4 standard errors (0.41 in x1) still exclude the prior mean, 0.72 away in x1.
    # Systematic: the rtol = 1e-3 log_prob error (~0.03 nats) moves the mean by < 0.01.
    tol = 4 * posterior_bimodal.std / math.sqrt(ess) + 0.01
    assert ((mean - posterior_bimodal.mean).abs() < tol).all(), (mean, posterior_bimodal.mean, tol)
    assert (PRIOR_MEAN - posterior_bimodal.mean).abs()[0] > tol[0]
    # log p(y): the relative variance of the mean weight is ~ 1/ESS - 1/N
    log_z = float(importance.get_log_normalizer())
    se_log_z = math.sqrt(1 / ess - 1 / num_samples)
    assert log_z == pytest.approx(posterior_bimodal.log_evidence, abs=4 * se_log_z + 0.03)


def test_importance_default_guide_weights_are_the_likelihood(score):
    """With ``guide=None`` Importance proposes from the prior (a reverse-SDE solve per particle);
    the model's and the guide's log p(x) (one prior object, so the second is served from its
    ``log_prob`` cache) cancel exactly, leaving the likelihood as the weight."""
    pyro.set_rng_seed(6)
    prior = ScoreSDEPrior(score, SDE, (2,), num_steps=100, rtol=1e-3, atol=1e-3)
    importance = Importance(model, guide=None, num_samples=20).run(prior, Y_BIMODAL)
    xs = torch.stack([trace.nodes["x"]["value"] for trace in importance.exec_traces])
    assert xs.shape == (20, 2) and xs.std(0).min() > 0.3  # distinct prior draws
    log_lik = dist.Normal((xs * W).sum(-1), SIGMA).log_prob(Y_BIMODAL)
    torch.testing.assert_close(torch.stack(importance.log_weights), log_lik)


@pytest.fixture(scope="module")
def vectorized_prior_run(score):
    """``vectorized_importance_weights`` with the prior as proposal: all particles in one solve."""
    pyro.set_rng_seed(1)
    prior = ScoreSDEPrior(score, SDE, (2,))  # default solvers: 500 SDE steps, rtol = atol = 1e-5
    num_samples = 10_000
    log_w, model_trace, _ = vectorized_importance_weights(
        model, prior_guide, prior, Y_BIMODAL, num_samples=num_samples, max_plate_nesting=0
    )
    x = model_trace.nodes["x"]["value"]
    assert x.shape == (num_samples, 2) and log_w.shape == (num_samples,)
    return x, log_w


@pytest.mark.slow
def test_vectorized_importance_prior_proposal(vectorized_prior_run, posterior_bimodal):
    x, log_w = vectorized_prior_run
    exact = posterior_bimodal
    mean, cov, masses, ess = weighted_stats(x, log_w)
    assert ess > 800  # ~13% of 10000
    # noise floors, with ESS ~ 1300:
    #   mean:   std / sqrt(ESS) ~ (0.022, 0.013)
    #   std:    std / sqrt(2 ESS) ~ (0.016, 0.009) (the Gaussian value; 5 se for the bimodal x1)
    #   masses: sqrt(m (1 - m) / ESS) ~ 0.012 (an upper bound for averaged responsibilities)
    # systematic: starting the reverse SDE from N(0, I) instead of the exact p_T, and 500
    # Euler-Maruyama steps, move these by < 0.01 (measured with 40000 particles): the + 0.01.
    se_mean = exact.std / math.sqrt(ess)
    assert ((mean - exact.mean).abs() < 4 * se_mean + 0.01).all(), (mean, exact.mean)
    se_std = exact.std / math.sqrt(2 * ess)
    assert ((cov.diagonal().sqrt() - exact.std).abs() < 5 * se_std + 0.01).all(), (cov, exact.cov)
    se_mass = (exact.masses * (1 - exact.masses) / ess).sqrt()
    assert ((masses - exact.masses).abs() < 4 * se_mass + 0.01).all(), (masses, exact.masses)
    # log p(y) = log E_prior[likelihood]: relative se ~ sqrt(1/ESS - 1/N)
    log_z = float(log_w.logsumexp(0) - math.log(len(log_w)))
    assert log_z == pytest.approx(exact.log_evidence, abs=4 * math.sqrt(1 / ess - 1 / len(log_w)))


@pytest.mark.slow
def test_vectorized_importance_gaussian_proposal(score, posterior_bimodal):
    """A Gaussian proposal: now the weights contain ``prior.log_prob`` (the probability-flow ODE)."""
    pyro.set_rng_seed(2)
    prior = ScoreSDEPrior(score, SDE, (2,))
    num_samples = 10_000
    log_w, model_trace, guide_trace = vectorized_importance_weights(
        model, gaussian_guide, prior, Y_BIMODAL, num_samples=num_samples, max_plate_nesting=0
    )
    x = model_trace.nodes["x"]["value"]
    # the model's log p(x) is the ODE's, and it matches the exact density per particle
    # (rtol = atol = 1e-5 and the p_T approximation: errors ~1e-2 nats at most)
    lp = model_trace.nodes["x"]["log_prob"]
    assert (lp - _exact_prior(torch.float32).log_prob(x)).abs().max() < 0.03
    mean, cov, masses, ess = weighted_stats(x, log_w)
    assert ess > 2000  # ~30% of 10000
    exact = posterior_bimodal
    # noise floors as above with ESS ~ 3000: mean (0.015, 0.009), masses 0.008
    assert ((mean - exact.mean).abs() < 4 * exact.std / math.sqrt(ess) + 0.01).all(), (mean, exact.mean)
    se_mass = (exact.masses * (1 - exact.masses) / ess).sqrt()
    assert ((masses - exact.masses).abs() < 4 * se_mass + 0.01).all(), (masses, exact.masses)
    # log p(y) now depends on the normalisation of log_prob: a density off by a constant c
    # would shift it by c; se ~ sqrt(1/ESS - 1/N) ~ 0.015
    log_z = float(log_w.logsumexp(0) - math.log(num_samples))
    assert log_z == pytest.approx(exact.log_evidence, abs=4 * math.sqrt(1 / ess - 1 / num_samples) + 0.01)


# -- variational inference -----------------------------------------------------------------
@pytest.mark.slow
def test_svi_autoguide(score, posterior_unimodal):
    """SVI with ``Trace_ELBO`` and ``AutoMultivariateNormal``: the posterior is Gaussian here."""
    pyro.set_rng_seed(3)
    pyro.clear_param_store()
    # rtol = atol = 1e-3: log_prob errors ~0.03 nats, gradients ~2x cheaper than at 1e-5
    prior = ScoreSDEPrior(score, SDE, (2,), rtol=1e-3, atol=1e-3)
    guide = AutoMultivariateNormal(model, init_loc_fn=init_to_median, init_scale=0.3)
    num_steps = 150
    optim = ClippedAdam({"lr": 0.1, "lrd": 0.1 ** (1 / num_steps)})  # lr 0.1 -> 0.01
    elbo = Trace_ELBO(num_particles=8, vectorize_particles=True, max_plate_nesting=0)
    svi = SVI(model, guide, optim, elbo)
    losses = [svi.step(prior, Y_UNIMODAL) for _ in range(num_steps)]
    assert all(math.isfinite(loss) for loss in losses)
    # the loss estimates -ELBO >= -log p(y) = 1.56: ~9.5 over the first 10 steps, ~1.56 at the end
    assert sum(losses[-20:]) / 20 < sum(losses[:10]) / 10 - 5
    exact = posterior_unimodal
    with torch.no_grad():
        q = guide.get_posterior()
        mean, std = q.mean, q.variance.sqrt()
    # the optimum of this Gaussian family is the exact posterior up to the 2e-4 mass of
    # the other component and the ODE's log_prob error (~0.03 nats): its mean is exact to
    # ~0.005. What remains is SGD noise: Adam moves each parameter by ~lr per step, so
    # with noisy 8-particle gradients the final iterate jitters by a few times the final
    # lr (0.01); measured |mean error| <= 0.05 and |std error| <= 0.03 over seeds 3-7.
    # Tolerance 0.2 posterior std (0.09) for the mean, 0.15 (0.07) for the std; the
    # prior mean is 1.8 away and the prior std 1.6 / 0.72.
    assert ((mean - exact.mean).abs() < 0.2 * exact.std).all(), (mean, exact.mean)
    assert ((std - exact.std).abs() < 0.15 * exact.std).all(), (std, exact.std)
    # the guide plugs into Predictive
    pred = Predictive(model, guide=guide, num_samples=500, return_sites=["x", "y"])(prior)
    assert pred["x"].shape == (500, 2) and pred["y"].shape == (500,)


# -- MCMC ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_nuts(score, posterior_unimodal):
    """``MCMC(NUTS)``: gradients of ``log_prob`` through the probability-flow ODE."""
    pyro.set_rng_seed(4)
    # every leapfrog step is one single-point log_prob + gradient (~30 ms at rtol = 1e-3
    # against ~60 ms at 1e-5): keep the tolerances loose and the trees shallow. The
    # posterior is correlated (-0.67): a dense mass matrix lets depth-2 trees mix well
    # (measured ESS 40-220 per 100 draws, against 11-45 with the diagonal default).
    prior = ScoreSDEPrior(score, SDE, (2,), rtol=1e-3, atol=1e-3)
    kernel = NUTS(model, jit_compile=False, init_strategy=init_to_median, max_tree_depth=2, full_mass=True)
    mcmc = MCMC(kernel, num_samples=100, warmup_steps=60, disable_progbar=True)
    mcmc.run(prior, Y_UNIMODAL)
    x = mcmc.get_samples()["x"]
    assert x.shape == (100, 2)
    ess = effective_sample_size(x.unsqueeze(0))  # per coordinate, chain autocorrelation included
    assert (ess > 20).all(), ess  # the chain mixes
    exact = posterior_unimodal
    # noise floors: mean std / sqrt(ESS) ~ 0.07, std ~ std / sqrt(2 ESS) ~ 0.05 (ESS ~ 40);
    # the rtol = 1e-3 log_prob error (~0.03 nats) moves the posterior by < 0.01
    se_mean = exact.std / ess.sqrt()
    assert ((x.mean(0) - exact.mean).abs() < 4 * se_mean + 0.01).all(), (x.mean(0), exact.mean)
    se_std = exact.std / (2 * ess).sqrt()
    assert ((x.std(0) - exact.std).abs() < 4 * se_std + 0.01).all(), (x.std(0), exact.std)


# -- posterior predictive ---------------------------------------------------------------------
@pytest.mark.slow
def test_predictive(vectorized_prior_run, posterior_bimodal):
    """``Predictive(model, posterior_samples=...)`` from resampled importance particles."""
    x, log_w = vectorized_prior_run
    pyro.set_rng_seed(5)
    num_draws = 1000
    idx = dist.Categorical(logits=log_w).sample((num_draws,))
    samples = {"x": x[idx]}
    prior = ScoreSDEPrior(GaussianMixtureScore(SDE, LOCS, SCALE_TRIL), SDE, (2,))
    for parallel in (False, True):
        pred = Predictive(model, posterior_samples=samples, parallel=parallel)(prior)
        assert set(pred) == {"y"} and pred["y"].shape == (num_draws,)
    y = pred["y"]
    exact = posterior_bimodal
    # exact posterior predictive: E[y] = w.m, Var[y] = w' C w + sigma^2
    y_mean = float(W @ exact.mean)
    y_var = float(W @ exact.cov @ W) + SIGMA**2
    # noise floor: 1000 draws resampled from particles with ESS ~ 1300 act like ~570
    # independent draws (1 / (1/1000 + 1/1300)), so se(mean) ~ sqrt(Var / 570) ~ 0.034 and
    # se(var) ~ Var sqrt(2 / 570) ~ 0.04 (Var ~ 0.67, mean ~ 0.83)
    n_eff = 1 / (1 / num_draws + 1 / weighted_stats(x, log_w)[3])
    assert float(y.mean()) == pytest.approx(y_mean, abs=4 * math.sqrt(y_var / n_eff))
    assert float(y.var()) == pytest.approx(y_var, abs=4 * y_var * math.sqrt(2 / n_eff))
    # the predictive mean follows the data: the prior predictive mean would be 0
    assert abs(y_mean) > 4 * math.sqrt(y_var / n_eff)
