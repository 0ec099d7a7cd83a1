"""Samples of every sampler against exact draws of the diffused mixture p_eps."""

import pyro
import pytest
import torch

from pyro_scoreflow import VESDE, VPSDE, GaussianMixtureScore, ScoreSDEPrior, SubVPSDE
from pyro_scoreflow.dynamics import ScoreField
from pyro_scoreflow.metrics import energy_distance
from pyro_scoreflow.samplers import dpm_end_time, dpm_solver_sample

from helpers import component_masses, mixture_2d

SDES = [VPSDE(), SubVPSDE(), VESDE()]
N = 3000


def noise_floor(exact, n: int, reps: int = 6) -> float:
    """Mean energy distance between independent exact sample sets of size n (measured: about 1e-3 at
    n = 3000 for this mixture, with a standard deviation about as large; its 99th percentile is ~4x the mean)."""
    return sum(float(energy_distance(exact.sample((n,)), exact.sample((n,)))) for _ in range(reps)) / reps


@pytest.mark.parametrize("sde", SDES, ids=lambda s: type(s).__name__)
@pytest.mark.parametrize(
    "options",
    [
        {"sampler": "sde", "num_steps": 500},
        {"sampler": "ode"},
        {"sampler": "dpm-solver", "num_steps": 25},
    ],
    ids=["sde", "ode", "dpm-solver"],
)
def test_samples_match_exact(sde, options):
    score = mixture_2d(sde, torch.float32)
    exact = score.marginal(sde.eps)
    prior = ScoreSDEPrior(score, sde, (2,), **options)
    x = prior.sample((N,))
    assert x.shape == (N, 2) and torch.isfinite(x).all()
    ref = exact.sample((N,))
    floor = noise_floor(exact, N)
    assert float(energy_distance(x, ref)) < 5 * floor
    # each component's mass: binomial std sqrt(p(1-p)/N) <= 0.009 per set, compared set vs set
    masses, ref_masses = component_masses(score, x), component_masses(score, ref)
    assert (masses - ref_masses).abs().max() < 0.04, (masses, ref_masses)
    # mean within 5 standard errors
    se = ref.std(0) * (2 / N) ** 0.5
    assert ((x.mean(0) - ref.mean(0)).abs() < 5 * se).all()


def test_sampler_detects_wrong_distribution():
    """The check above has power: samples of a mixture with shifted means fail it."""
    sde = VPSDE()
    score = mixture_2d(sde, torch.float32)
    exact = score.marginal(sde.eps)
    shifted = exact.sample((N,)) + torch.tensor([0.15, 0.0])
    assert float(energy_distance(shifted, exact.sample((N,)))) > 5 * noise_floor(exact, N)


@pytest.mark.parametrize("sampler", ["sde", "ode", "dpm-solver"])
def test_reproducible_under_seed(sampler):
    sde = VPSDE()
    prior = ScoreSDEPrior(mixture_2d(sde), sde, (2,), sampler=sampler, num_steps=20)
    pyro.set_rng_seed(7)
    a = prior.sample((50,))
    pyro.set_rng_seed(7)
    b = prior.sample((50,))
    c = prior.sample((50,))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("method", ["euler", "milstein", "srk", "euler_heun", "heun", "midpoint", "log_ode"])
def test_every_diagonal_noise_sde_method_runs(method):
    sde = VPSDE()
    score = mixture_2d(sde)
    prior = ScoreSDEPrior(score, sde, (2,), sde_method=method, num_steps=40)
    x = prior.sample((200,))
    assert x.shape == (200, 2) and torch.isfinite(x).all()
    # coarse but real: 40 steps still put the mean within 0.25 of the truth (std of the mean ~0.07)
    assert (x.mean(0) - score.marginal(sde.eps).mean).abs().max() < 0.25


def test_reversible_heun_runs():
    """Accepted (valid for diagonal noise) but only weakly stable on the stiff reverse drift near eps:
    documented in SDE_METHODS; here only that it runs and returns finite samples."""
    sde = VPSDE()
    x = ScoreSDEPrior(mixture_2d(sde), sde, (2,), sde_method="reversible_heun", num_steps=40).sample((20,))
    assert x.shape == (20, 2) and torch.isfinite(x).all()


def test_nfe_counts():
    sde = VPSDE()
    score = mixture_2d(sde)
    prior = ScoreSDEPrior(score, sde, (2,), sampler="dpm-solver", num_steps=10)
    prior.sample((10,))
    assert prior.last_nfe == 10
    prior = ScoreSDEPrior(score, sde, (2,), sampler="sde", num_steps=50)
    prior.sample((10,))
    assert prior.last_nfe == 50  # exactly num_steps equal steps, no extra shape-check call


def test_denoise_option_applies_tweedie():
    sde = VPSDE(eps=1e-2)
    score = mixture_2d(sde)
    prior = ScoreSDEPrior(score, sde, (2,), sampler="ode", denoise=True)
    plain = ScoreSDEPrior(score, sde, (2,), sampler="ode")
    pyro.set_rng_seed(0)
    a = prior.sample((500,))
    pyro.set_rng_seed(0)
    b = plain.sample((500,))
    alpha, std = sde.marginal(torch.tensor(sde.eps, dtype=torch.float64))
    expected = (b + std**2 * score(b, torch.full((500,), sde.eps, dtype=torch.float64))) / alpha
    torch.testing.assert_close(a, expected)
    # denoised samples are less spread than x_eps (Tweedie shrinks toward the posterior mean)
    assert a.var(0).sum() < b.var(0).sum()


@pytest.mark.parametrize("sde", [VPSDE(), SubVPSDE(), VESDE()], ids=["vp", "subvp", "ve"])
def test_dpm_solver_matches_the_closed_form_flow(sde):
    """For Gaussian data N(mu, s^2 I) the probability-flow map from T is affine in closed form:
    x_t = alpha_t mu + sqrt((alpha_t^2 s^2 + sigma_t^2) / (alpha_T^2 s^2 + sigma_T^2)) (x_T - alpha_T mu).
    dpm-solver reaches it at its end time (measured max error, VP / sub-VP / VE: 10 steps 5.5-6.3e-3, 40 steps
    6-8e-5); the UniC corrector raises the order (error ratio 20 -> 40 steps 9.4-9.6 with it, 5.3-5.4 without)
    and divides the 10-step error by about 3."""
    f64 = torch.float64
    mu, s = torch.tensor([[0.5, -1.0, 2.0]], dtype=f64), 0.3
    score = GaussianMixtureScore(sde, mu, (s * torch.eye(3, dtype=f64))[None], torch.zeros(1, dtype=f64))
    torch.manual_seed(0)
    x_T = torch.randn(500, 3, dtype=torch.float64) * sde.prior_std()
    a_T, s_T = sde.marginal(torch.tensor(sde.T, dtype=torch.float64))
    a, sigma = sde.marginal(torch.tensor(dpm_end_time(sde), dtype=torch.float64))
    exact = a * mu + ((a**2 * s**2 + sigma**2) / (a_T**2 * s**2 + s_T**2)).sqrt() * (x_T - a_T * mu)

    def error(num_steps, corrector=True):
        x = dpm_solver_sample(ScoreField(score, sde, (3,)), x_T, num_steps=num_steps, corrector=corrector)
        return float((x - exact).abs().max())

    assert error(10) < 1e-2 and error(40) < 2e-4
    assert error(20) / error(40) > 7 and error(20, False) / error(40, False) < 7
    assert error(10) < error(10, False) / 2


def test_dpm_solver_rejects_bad_arguments():
    sde = VPSDE()
    field = ScoreField(mixture_2d(sde), sde, (2,))
    x_T = torch.randn(4, 2, dtype=torch.float64)
    for kwargs, name in [({"power": 0.0}, "power"), ({"power": float("nan")}, "power"), ({"order": 4}, "order"),
                         ({"corrector": "yes"}, "corrector"), ({"num_steps": 0}, "num_steps")]:  # fmt: skip
        with pytest.raises((ValueError, TypeError), match=name):
            dpm_solver_sample(field, x_T, **{"num_steps": 5, **kwargs})
