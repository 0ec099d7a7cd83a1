"""``pyro_scoreflow.infer.DiffusionPosterior`` against the exact posterior of a 2-D mixture prior.

The prior is p_eps of a 2-component Gaussian mixture (exact score) and the observations are
linear-Gaussian, ``y ~ Normal(A x, sigma)``, so the posterior is again a Gaussian mixture in
closed form: each component gets its Kalman update and is reweighted by its evidence
``N(y; A mu_k, A C_k A' + sigma^2 I)``. The closed form is checked against a grid first.

DPS and PiGDM are *approximations* of the posterior score, so they are biased even with an exact
prior score and many steps. The assertions bound the measured biases (docs/posterior.md tabulates
them, seeds 0-3, 2000 samples) with margin: they hold what each method honestly achieves, and each
states how far from the prior the exact posterior is, so that the bounds have power. Noise floors
with 2000 samples: posterior mean ~0.02 per coordinate, energy distance ~1e-3 (two exact sample sets).
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import Predictive

from pyro_scoreflow import VESDE, VPSDE, GaussianMixtureScore, ScoreSDEPrior, SubVPSDE
from pyro_scoreflow.infer import DiffusionPosterior, ModelLikelihood, linear_gaussian
from pyro_scoreflow.infer.guidance import DPSGuidance, PiGDMGuidance
from pyro_scoreflow.metrics import energy_distance

from helpers import random_mixture

SDE = VPSDE()
LOCS = torch.tensor([[-1.5, -0.5], [1.5, 0.5]])
SCALE_TRIL = torch.tensor([[[0.6, 0.0], [0.3, 0.4]], [[0.5, 0.0], [-0.2, 0.5]]])
SIGMA = 0.5
W = torch.tensor([[1.0, 1.0]])  # y = x1 + x2 + noise
A2 = torch.tensor([[1.0, 0.5], [0.0, 1.0]])  # a 2-D observation
PROBLEMS = {
    # name: (A, y); the posterior masses are (0.27, 0.73), (0.0002, 0.9998), (0.40, 0.60)
    "bimodal": (W, torch.tensor([0.5])),
    "unimodal": (W, torch.tensor([2.5])),
    "2d": (A2, torch.tensor([0.3, 0.4])),
}
N = 2000


@pytest.fixture(scope="module")
def prior() -> ScoreSDEPrior:
    return ScoreSDEPrior(GaussianMixtureScore(SDE, LOCS, SCALE_TRIL), SDE, (2,))


def model(prior: ScoreSDEPrior, A: torch.Tensor, sigma: float, y: torch.Tensor | None = None) -> torch.Tensor:
    x = pyro.sample("x", prior)
    return pyro.sample("y", dist.Normal(x @ A.T, sigma).to_event(1), obs=y)


# -- ground truth ----------------------------------------------------------------------------
def exact_prior() -> dist.MixtureSameFamily:
    """p_eps, the distribution a ScoreSDEPrior with the exact score represents."""
    return GaussianMixtureScore(SDE, LOCS.double(), SCALE_TRIL.double()).marginal(SDE.eps)


def exact_posterior(A: torch.Tensor, sigma: float, y: torch.Tensor) -> dist.MixtureSameFamily:
    """p(x | y) for x ~ p_eps and y ~ N(A x, sigma^2 I): one Kalman update per component."""
    p = exact_prior()
    A, y = A.double(), y.double()
    mus = p.component_distribution.mean  # (K, D)
    covs = p.component_distribution.covariance_matrix  # (K, D, D)
    s = A @ covs @ A.T + sigma**2 * torch.eye(A.shape[0], dtype=torch.float64)  # Cov(y | k)
    gain = covs @ A.T @ torch.linalg.inv(s)
    means = mus + (gain @ (y - mus @ A.T).unsqueeze(-1)).squeeze(-1)
    covs_post = covs - gain @ A @ covs
    log_evidence = p.mixture_distribution.logits.log_softmax(-1) + dist.MultivariateNormal(mus @ A.T, s).log_prob(y)
    return dist.MixtureSameFamily(
        dist.Categorical(logits=log_evidence), dist.MultivariateNormal(means, 0.5 * (covs_post + covs_post.mT))
    )


def mixture_moments(p: dist.MixtureSameFamily) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    masses = p.mixture_distribution.probs
    means, covs = p.component_distribution.mean, p.component_distribution.covariance_matrix
    mean = masses @ means
    dev = means - mean
    cov = (masses[:, None, None] * (covs + dev[:, :, None] * dev[:, None, :])).sum(0)
    return mean, cov, masses


def responsibilities(x: torch.Tensor) -> torch.Tensor:
    """P(k | x) under p_eps, ``(N, K)``; the posterior's P(k | y) is E[P(k | x) | y]."""
    p = exact_prior()
    log_joint = p.component_distribution.log_prob(x.double().unsqueeze(-2)) + p.mixture_distribution.logits
    return log_joint.softmax(-1)


def component_masses(x: torch.Tensor) -> torch.Tensor:
    """Posterior component masses estimated from samples as the mean responsibility."""
    return responsibilities(x).mean(0)


def test_closed_form_matches_grid():
    grid = torch.linspace(-4.0, 5.0, 451, dtype=torch.float64)
    pts = torch.stack(torch.meshgrid(grid, grid, indexing="ij"), -1).reshape(-1, 2)
    for A, y in PROBLEMS.values():
        log_joint = exact_prior().log_prob(pts) + dist.Normal(pts @ A.T.double(), SIGMA).to_event(1).log_prob(y)
        w = log_joint.softmax(0)
        mean = w @ pts
        cov = (w[:, None] * (pts - mean)).T @ (pts - mean)
        exact_mean, exact_cov, exact_masses = mixture_moments(exact_posterior(A, SIGMA, y))
        torch.testing.assert_close(mean, exact_mean, atol=1e-4, rtol=0)
        torch.testing.assert_close(cov, exact_cov, atol=1e-4, rtol=0)
        torch.testing.assert_close(w @ responsibilities(pts), exact_masses, atol=1e-4, rtol=0)


# -- bias against the exact posterior ---------------------------------------------------------
def run(prior, problem: str, guidance: str, num_steps: int, corrector_steps: int = 0, seed: int = 0):
    A, y = PROBLEMS[problem]
    pyro.set_rng_seed(seed)
    posterior = DiffusionPosterior(model, N, guidance, num_steps=num_steps, corrector_steps=corrector_steps)
    x = posterior.run(prior, A, SIGMA, y).get_samples()["x"]
    assert x.shape == (N, 2) and torch.isfinite(x).all()
    exact = exact_posterior(A, SIGMA, y)
    mean, cov, masses = mixture_moments(exact)
    stats = {
        "mean_error": float((x.double().mean(0) - mean).norm()),
        "cov_error": float((torch.cov(x.double().T) - cov).abs().max()),
        "mass_error": float((component_masses(x) - masses).abs().max()),
        "energy": float(energy_distance(x, exact.sample((N,)))),
        "shift": float((mean - exact_prior().mean).norm()),  # how far the data move the prior
        "prior_energy": float(energy_distance(exact_prior().sample((N,)), exact.sample((N,)))),
    }
    return posterior, x, stats


# (problem, guidance, num_steps, corrector_steps, bounds): bounds on the posterior-mean error (Euclidean),
# the largest covariance-entry error, the largest component-mass error, the energy distance to exact
# draws, and the mean error as a fraction of the prior-to-posterior shift of the mean. The comments give
# the range measured over seeds 0-3; over seeds 0-11 every statistic stayed below 0.9 of its bound.
BIAS_CASES = [
    # PiGDM, bimodal: mean 0.088-0.107, cov 0.016-0.061, masses 0.003-0.034, energy 0.007-0.014
    ("bimodal", "pigdm", 200, 0, dict(mean=0.18, cov=0.12, mass=0.07, energy=0.03, shift=0.25)),
    # PiGDM + 1 Langevin corrector step: mean 0.053-0.072, masses <= 0.021, energy 0.003-0.006
    ("bimodal", "pigdm", 100, 1, dict(mean=0.13, cov=0.07, mass=0.05, energy=0.015, shift=0.18)),
    # DPS over-weights the far component (its plug-in likelihood ignores Cov[x0 | x_t], so the guidance is
    # too strong at intermediate t): mean 0.37-0.39 of a 0.73 shift, masses 0.43 / 0.57 instead of
    # 0.27 / 0.73, energy 0.13-0.15. The bounds record the bias; they only say DPS gets half-way.
    ("bimodal", "dps", 200, 0, dict(mean=0.46, cov=0.35, mass=0.22, energy=0.25, shift=0.65)),
    # unimodal (the prior mean is 1.76 away): DPS mean 0.157-0.166, with the corrector 0.054-0.072
    ("unimodal", "dps", 200, 0, dict(mean=0.24, cov=0.05, mass=0.01, energy=0.05, shift=0.14)),
    ("unimodal", "dps", 100, 1, dict(mean=0.12, cov=0.03, mass=0.01, energy=0.015, shift=0.07)),
    # PiGDM, unimodal: mean 0.059-0.072
    ("unimodal", "pigdm", 200, 0, dict(mean=0.12, cov=0.04, mass=0.01, energy=0.012, shift=0.07)),
    # 2-D observation (0.50 shift): PiGDM mean 0.019-0.054, cov 0.047-0.074, masses <= 0.025, energy <= 0.008;
    # DPS mean 0.19-0.21, cov 0.28-0.30, masses 0.14-0.15, energy 0.07-0.09
    ("2d", "pigdm", 200, 0, dict(mean=0.1, cov=0.12, mass=0.06, energy=0.02, shift=0.2)),
    ("2d", "dps", 200, 0, dict(mean=0.28, cov=0.37, mass=0.2, energy=0.13, shift=0.55)),
]


@pytest.mark.parametrize(
    "problem,guidance,num_steps,corrector_steps,bounds",
    BIAS_CASES,
    ids=[f"{p}-{g}-{n}x{1 + c}" for p, g, n, c, _ in BIAS_CASES],
)
def test_bias_against_exact_posterior(prior, problem, guidance, num_steps, corrector_steps, bounds):
    posterior, _, stats = run(prior, problem, guidance, num_steps, corrector_steps)
    assert posterior.method == guidance and posterior.nfe == num_steps * (1 + corrector_steps)
    assert stats["mean_error"] < bounds["mean"], stats
    assert stats["cov_error"] < bounds["cov"], stats
    assert stats["mass_error"] < bounds["mass"], stats
    assert stats["energy"] < bounds["energy"], stats
    # power: the exact posterior is far from the prior on these scales
    assert stats["prior_energy"] > 1.5 * bounds["energy"], stats
    # the remaining error as a fraction of the distance the observation moves the prior's mean
    assert stats["mean_error"] < bounds["shift"] * stats["shift"], stats


def test_unobserved_model_samples_the_prior(prior):
    """With no observation the guided sampler is the prior's Euler-Maruyama sampler (plus the corrector)."""

    def unobserved(prior):
        return pyro.sample("x", prior)

    exact = exact_prior()
    floor = sum(float(energy_distance(exact.sample((N,)), exact.sample((N,)))) for _ in range(4)) / 4
    for corrector_steps in (0, 1):
        x = DiffusionPosterior(unobserved, N, num_steps=200, corrector_steps=corrector_steps).run(prior)
        x = x.get_samples()["x"]
        assert float(energy_distance(x, exact.sample((N,)))) < 6 * floor


# -- the likelihood read from the model ----------------------------------------------------------
def test_dps_and_pigdm_likelihoods_agree_without_noise(prior):
    """The model's log p(y | x) (DPS) equals the whitened linear-Gaussian form (PiGDM) at r_t = 0."""
    A, y = torch.tensor([[1.0, 0.5], [0.0, 2.0], [2.0, -1.0]]), torch.tensor([0.3, 0.4, 0.1])
    likelihood = ModelLikelihood(model, (prior, A, SIGMA, y))
    linear = linear_gaussian(likelihood)
    torch.testing.assert_close(linear.matrix, A / SIGMA)
    x0 = torch.randn(7, 2)
    dps = DPSGuidance(likelihood)(x0, None, None)
    pigdm = PiGDMGuidance(linear)(x0, torch.tensor(1.0), torch.tensor(0.0))
    expected = dist.Normal(x0 @ A.T, SIGMA).to_event(1).log_prob(y)
    torch.testing.assert_close(dps, expected)
    torch.testing.assert_close(dps - pigdm, (dps - pigdm)[:1].expand(7))  # a constant apart


def split_model(prior, A, sigma, y=None):
    """One site per component of y."""
    x = pyro.sample("x", prior)
    for i in range(A.shape[0]):
        pyro.sample(f"y{i}", dist.Normal(x @ A[i], sigma), obs=None if y is None else y[i])


def mvn_model(prior, A, sigma, y=None):
    x = pyro.sample("x", prior)
    cov = sigma**2 * torch.eye(A.shape[0])
    pyro.deterministic("ax", x @ A.T)
    return pyro.sample("y", dist.MultivariateNormal(x @ A.T, covariance_matrix=cov), obs=y)


@pytest.mark.parametrize("guidance", ["dps", "pigdm"])
@pytest.mark.parametrize("other", [split_model, mvn_model], ids=["split", "mvn"])
def test_equivalent_models_give_the_same_samples(prior, guidance, other):
    A, y = PROBLEMS["2d"]
    samples = []
    for m in (model, other):
        pyro.set_rng_seed(3)
        samples.append(DiffusionPosterior(m, 50, guidance, num_steps=30).run(prior, A, SIGMA, y).get_samples()["x"])
    torch.testing.assert_close(samples[0], samples[1], atol=1e-4, rtol=1e-4)


def test_nested_plates_and_scaled_sites(prior):
    """Nested plates (dims -2 and -1) and poutine.scale are read like any Pyro ELBO reads them."""
    w, offsets = torch.tensor([1.0, 1.0]), torch.tensor([0.0, 1.0, -1.0])

    def grouped(prior, y=None):
        x = pyro.sample("x", prior)
        with pyro.plate("groups", 3, dim=-2), pyro.plate("repeats", 4, dim=-1):
            return pyro.sample("y", dist.Normal((x * w).sum(-1) + offsets[:, None], 2 * SIGMA), obs=y)

    y = torch.randn(3, 4)
    likelihood = ModelLikelihood(grouped, (prior, y))
    assert likelihood.max_plate_nesting == 2
    x0 = torch.randn(5, 2)
    loc = (x0 @ w)[:, None, None] + offsets[:, None]
    expected = dist.Normal(loc, 2 * SIGMA).log_prob(y).sum((-1, -2))
    torch.testing.assert_close(likelihood.log_likelihood(x0), expected)
    linear = linear_gaussian(likelihood)  # 12 rows w / (2 sigma)
    torch.testing.assert_close(linear.matrix, (w / (2 * SIGMA)).expand(12, 2))
    torch.testing.assert_close(linear.offset, (offsets[:, None] / (2 * SIGMA)).expand(3, 4).reshape(12))
    A, y = PROBLEMS["2d"]
    scaled = poutine.scale(model, scale=4.0)  # four times the log density of noise 2 sigma: noise sigma
    linear = linear_gaussian(ModelLikelihood(scaled, (prior, A, 2 * SIGMA, y)))
    torch.testing.assert_close(linear.matrix, A / SIGMA)


def test_auto_guidance_and_nonlinear_likelihood(prior):
    def nonlinear(prior, y=None):
        x = pyro.sample("x", prior)
        return pyro.sample("y", dist.Normal((x**2).sum(-1), 0.3), obs=y)

    y = torch.tensor(1.0)
    with pytest.raises(ValueError, match="pigdm.*linear"):
        DiffusionPosterior(nonlinear, 10, "pigdm", num_steps=5).run(prior, y)
    posterior = DiffusionPosterior(nonlinear, 500, "auto", num_steps=100).run(prior, y)
    assert posterior.method == "dps"
    radius2 = posterior.get_samples()["x"].pow(2).sum(-1)
    assert abs(float(radius2.mean()) - 1.0) < 0.3  # the prior's E|x|^2 is 3.1
    A, y = PROBLEMS["2d"]
    assert DiffusionPosterior(model, 10, "auto", num_steps=5).run(prior, A, SIGMA, y).method == "pigdm"


def test_bernoulli_likelihood_runs(prior):
    def classifier(prior, labels=None):
        x = pyro.sample("x", prior)
        with pyro.plate("data", 5):
            return pyro.sample("label", dist.Bernoulli(logits=4 * x[..., 0]), obs=labels)

    posterior = DiffusionPosterior(classifier, 300, num_steps=50).run(prior, torch.ones(5))
    x = posterior.get_samples()["x"]
    assert (x[:, 0] > 0).float().mean() > 0.9  # five positive labels: x1 > 0 (the prior: 50%)


@pytest.mark.parametrize("sde", [SubVPSDE(), VESDE()], ids=["subvp", "ve"])
def test_other_sdes(sde):
    prior = ScoreSDEPrior(GaussianMixtureScore(sde, LOCS, SCALE_TRIL), sde, (2,))
    A, y = PROBLEMS["unimodal"]
    pyro.set_rng_seed(0)
    x = DiffusionPosterior(model, 1000, "pigdm", num_steps=200).run(prior, A, SIGMA, y).get_samples()["x"]
    assert torch.isfinite(x).all()
    mean, _, _ = mixture_moments(exact_posterior(A, SIGMA, y))
    assert float((x.double().mean(0) - mean).norm()) < 0.25  # 1.76 from the prior mean


def test_trust_region_is_inert_for_the_exact_score(prior):
    """guidance_clip caps the guidance at 3 sqrt(D) / sigma_t; with the exact score it (almost) never binds."""
    A, y = PROBLEMS["2d"]
    draws = []
    for clip in (None, 3.0):
        pyro.set_rng_seed(0)
        posterior = DiffusionPosterior(model, 500, "pigdm", num_steps=100, guidance_clip=clip)
        draws.append(posterior.run(prior, A, SIGMA, y).get_samples()["x"])
    moved = ((draws[0] - draws[1]).abs().max(-1).values > 1e-3).float().mean()
    assert moved < 0.01


def test_trained_network_prior():
    """The shipped "moons" ScoreNet: a learned score's Tweedie estimate is off by up to ~50 at t = T
    (errors / alpha_T), and without the trust region the first guided steps send tail particles to
    infinity. With it, observing x1 = 0 +- 0.2 gives the posterior of an importance-resampling
    reference (measured over 3 seeds: x1 std 0.16-0.23 vs 0.21, upper-moon fraction 0.47-0.53 vs 0.50-0.52,
    energy distance 0.001-0.014 vs a reference self-distance of 0.001-0.003)."""
    prior = ScoreSDEPrior.from_pretrained("moons")

    def observe_x1(y=None):
        x = pyro.sample("x", prior)
        return pyro.sample("y", dist.Normal(x[..., 0], 0.2), obs=y)

    for guidance in ("dps", "pigdm"):
        posterior = DiffusionPosterior(observe_x1, 500, guidance, num_steps=100, corrector_steps=1)
        x = posterior.run(torch.tensor(0.0)).get_samples()["x"]
        assert x.shape == (500, 2) and x.abs().max() < 3  # the prior's draws lie in [-2.5, 2.5] x [-1.5, 1.4]
        assert abs(float(x[:, 0].mean())) < 0.06
        assert 0.1 < float(x[:, 0].std()) < 0.3  # the prior's x1 std: 1.22
        assert 0.35 < float((x[:, 1] > 0).float().mean()) < 0.65  # both moons cross x1 = 0


def test_image_event_shape():
    """Multi-dimensional events: samples are (num_samples, *event_shape)."""
    mixture = random_mixture(SDE, K=2, D=4, dtype=torch.float32)

    def score(x, t):
        return mixture(x.reshape(x.shape[0], 4), t).reshape(x.shape)

    prior = ScoreSDEPrior(score, SDE, (1, 2, 2))

    def image_model(prior, y=None):
        x = pyro.sample("x", prior)
        return pyro.sample("y", dist.Normal(x.flatten(-3)[..., :2], 0.3).to_event(1), obs=y)

    for guidance in ("dps", "pigdm"):
        posterior = DiffusionPosterior(image_model, 20, guidance, num_steps=20, batch_size=8)
        x = posterior.run(prior, torch.tensor([0.5, -0.5])).get_samples()["x"]
        assert x.shape == (20, 1, 2, 2) and torch.isfinite(x).all()


# -- Pyro integration -------------------------------------------------------------------------------
def test_samples_shape_keys_and_predictive(prior):
    A, y = PROBLEMS["2d"]
    posterior = DiffusionPosterior(model, 64, "pigdm", num_steps=20, batch_size=25).run(prior, A, SIGMA, y)
    samples = posterior.get_samples()
    assert set(samples) == {"x"} and samples["x"].shape == (64, 2) and not samples["x"].requires_grad
    for parallel in (False, True):
        pred = Predictive(model, posterior_samples=samples, parallel=parallel)(prior, A, SIGMA)
        assert set(pred) == {"y"} and pred["y"].shape == (64, 2)
    # posterior predictive y = A x + noise: its mean is A times the samples' mean
    assert torch.allclose(pred["y"].mean(0), samples["x"].mean(0) @ A.T, atol=4 * SIGMA / math.sqrt(64))


def test_reproducible_under_seed(prior):
    A, y = PROBLEMS["bimodal"]
    draws = []
    for seed in (5, 5, 6):
        pyro.set_rng_seed(seed)
        posterior = DiffusionPosterior(model, 30, "dps", num_steps=20, corrector_steps=1)
        draws.append(posterior.run(prior, A, SIGMA, y).get_samples()["x"])
    assert torch.equal(draws[0], draws[1])
    assert not torch.equal(draws[0], draws[2])


def test_get_samples_before_run():
    with pytest.raises(RuntimeError, match="run"):
        DiffusionPosterior(model, 10).get_samples()


# -- site detection -------------------------------------------------------------------------------
def test_site_detection(prior):
    def named(prior, y=None):
        z = pyro.sample("z", prior)
        return pyro.sample("y", dist.Normal(z.sum(-1), 1.0), obs=y)

    y = torch.tensor(0.0)
    assert set(DiffusionPosterior(named, 4, num_steps=2).run(prior, y).get_samples()) == {"z"}
    assert set(DiffusionPosterior(named, 4, site="z", num_steps=2).run(prior, y).get_samples()) == {"z"}

    def no_prior(y=None):
        x = pyro.sample("x", dist.Normal(0.0, 1.0))
        return pyro.sample("y", dist.Normal(x, 1.0), obs=y)

    with pytest.raises(ValueError, match="no latent sample site with a ScoreSDEPrior"):
        DiffusionPosterior(no_prior, 4).run(y)

    def two_priors(prior, y=None):
        a = pyro.sample("a", prior)
        b = pyro.sample("b", prior)
        return pyro.sample("y", dist.Normal((a + b).sum(-1), 1.0), obs=y)

    with pytest.raises(ValueError, match=r"several ScoreSDEPrior sites \['a', 'b'\]"):
        DiffusionPosterior(two_priors, 4).run(prior, y)
    with pytest.raises(ValueError, match="latent sites other than 'a'.*'b'.*pyro.condition"):
        DiffusionPosterior(two_priors, 4, site="a").run(prior, y)
    # fixing the other one works
    fixed = pyro.condition(two_priors, data={"b": torch.zeros(2)})
    assert set(DiffusionPosterior(fixed, 4, site="a", num_steps=2).run(prior, y).get_samples()) == {"a"}
    with pytest.raises(ValueError, match="site='y' is observed"):
        DiffusionPosterior(named, 4, site="y").run(prior, y)
    with pytest.raises(ValueError, match="site='nope' is not a sample site"):
        DiffusionPosterior(named, 4, site="nope").run(prior, y)
    with pytest.raises(ValueError, match="site='x' has distribution Normal, not a ScoreSDEPrior"):
        DiffusionPosterior(no_prior, 4, site="x").run(y)


def test_other_latent_sites_and_batched_prior_are_rejected(prior):
    def extra_latent(prior, y=None):
        x = pyro.sample("x", prior)
        s = pyro.sample("s", dist.LogNormal(0.0, 1.0))
        return pyro.sample("y", dist.Normal(x.sum(-1), s), obs=y)

    y = torch.tensor(0.0)
    with pytest.raises(ValueError, match=r"latent sites other than 'x': \['s'\]"):
        DiffusionPosterior(extra_latent, 4).run(prior, y)
    conditioned = pyro.condition(extra_latent, data={"s": torch.tensor(0.5)})
    assert DiffusionPosterior(conditioned, 4, num_steps=2).run(prior, y).get_samples()["x"].shape == (4, 2)

    def in_plate(prior, y=None):
        with pyro.plate("items", 3):
            x = pyro.sample("x", prior)
        return pyro.sample("y", dist.Normal(x.sum(-1), 1.0).to_event(1), obs=y)

    with pytest.raises(ValueError, match="outside plates"):
        DiffusionPosterior(in_plate, 4).run(prior, torch.zeros(3))


def test_non_vectorised_model_is_a_clear_error(prior):
    """A plate over the components of A x does not broadcast over a particle dimension of x (as with Pyro's
    vectorize_particles); the error says so and names the fix."""

    def plate_over_event(prior, A, sigma, y=None):
        x = pyro.sample("x", prior)
        with pyro.plate("data", A.shape[0]):
            return pyro.sample("y", dist.Normal(x @ A.T, sigma), obs=y)

    A, y = PROBLEMS["2d"]
    with pytest.raises(ValueError, match="broadcast over a leading batch dimension.*to_event"):
        DiffusionPosterior(plate_over_event, 4, num_steps=2).run(prior, A, SIGMA, y)


# -- arguments ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"num_samples": 0}, "num_samples"),
        ({"num_samples": -3}, "num_samples"),
        ({"guidance": "magic"}, "guidance"),
        ({"num_steps": 0}, "num_steps"),
        ({"guidance_scale": -1.0}, "guidance_scale"),
        ({"guidance_scale": float("nan")}, "guidance_scale"),
        ({"corrector_steps": -1}, "corrector_steps"),
        ({"snr": 0.0}, "snr"),
        ({"batch_size": 0}, "batch_size"),
        ({"data_std": 0.0}, "data_std"),
        ({"guidance_clip": 0.0}, "guidance_clip"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, name):
    args = {"num_samples": 10, **kwargs}
    with pytest.raises(ValueError, match=name):
        DiffusionPosterior(model, **args)


def test_bad_argument_types_raise_type_error():
    with pytest.raises(TypeError, match="num_samples"):
        DiffusionPosterior(model, 2.5)
    with pytest.raises(TypeError, match="model"):
        DiffusionPosterior("not a model", 10)
    with pytest.raises(TypeError, match="site"):
        DiffusionPosterior(model, 10, site=3)


def test_clip_denoised_on_shipped_digits_prior():
    """clip_denoised=(-1, 1) keeps the Tweedie estimate in the pixel range; the posterior mean denoises."""
    from pyro_scoreflow import ScoreSDEPrior, datasets

    prior = ScoreSDEPrior.from_pretrained("digits")
    clean = datasets.load("digits", split="test")[3]
    y = clean + 0.3 * torch.randn(64, generator=torch.Generator().manual_seed(0))

    def model(y):
        x = pyro.sample("x", prior)
        pyro.sample("y", dist.Normal(x, 0.3).to_event(1), obs=y)

    post = DiffusionPosterior(model, 16, guidance="pigdm", num_steps=100, clip_denoised=(-1, 1)).run(y)
    mean = post.get_samples()["x"].mean(0)
    assert (mean - clean).pow(2).mean().sqrt() < 0.8 * (y - clean).pow(2).mean().sqrt()  # measured ~0.18 vs 0.27
    with pytest.raises(ValueError, match="clip_denoised"):
        DiffusionPosterior(model, 4, clip_denoised=(1, -1))
    with pytest.raises(TypeError, match="clip_denoised"):
        DiffusionPosterior(model, 4, clip_denoised=1.0)


@pytest.mark.parametrize("guidance", ["dps", "pigdm"])
def test_runs_under_inference_mode(prior, guidance):
    """Guidance gradients need autograd; under torch.inference_mode() the samples are the same as without it."""
    A, y = PROBLEMS["2d"]
    samples = []
    for inference in (False, True):
        pyro.set_rng_seed(3)
        with torch.inference_mode(inference):
            samples.append(
                DiffusionPosterior(model, 20, guidance, num_steps=10).run(prior, A, SIGMA, y).get_samples()["x"]
            )
    torch.testing.assert_close(samples[1], samples[0])
