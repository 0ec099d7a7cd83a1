import math

import pytest
import torch

from pyro_scoreflow import VESDE, VPSDE, SubVPSDE

SDES = [VPSDE(), SubVPSDE(), VESDE()]


@pytest.mark.parametrize("sde", SDES, ids=lambda s: type(s).__name__)
def test_marginal_matches_moment_odes(sde):
    r"""The marginal solves the moment ODEs of a linear SDE dx = f(t) x dt + g dw:
    d alpha/dt = f alpha and d std^2/dt = 2 f std^2 + g^2 (checked by central differences)."""
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    h = 1e-6
    alpha, std = sde.marginal(t)
    a_p, s_p = sde.marginal(t + h)
    a_m, s_m = sde.marginal(t - h)
    f = sde.drift(torch.ones_like(t), t)  # f(t) * 1
    g2 = sde.diffusion(t) ** 2
    torch.testing.assert_close((a_p - a_m) / (2 * h), f * alpha, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close((s_p**2 - s_m**2) / (2 * h), 2 * f * std**2 + g2, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sde", SDES, ids=lambda s: type(s).__name__)
def test_marginal_starts_at_data_and_shapes(sde):
    alpha, std = sde.marginal(torch.tensor(0.0, dtype=torch.float64))
    assert float(alpha) == pytest.approx(1.0)
    assert float(std) == pytest.approx(0.0, abs=1e-12)
    t = torch.rand(7)
    x = torch.randn(7, 3, 2)
    assert sde.drift(x, t).shape == x.shape
    assert sde.drift(x, 0.3).shape == x.shape
    assert sde.diffusion(t).shape == t.shape
    assert all(m.shape == t.shape for m in sde.marginal(t))
    prior = sde.prior((3, 2))
    assert prior.batch_shape == () and prior.event_shape == (3, 2)
    # the prior matches the marginal at T for data at the origin
    _, std_T = sde.marginal(torch.tensor(sde.T, dtype=torch.float64))
    assert prior.base_dist.scale.reshape(-1)[0].item() == pytest.approx(float(std_T), rel=1e-2)


def test_vp_and_subvp_formulas():
    sde = VPSDE(beta_min=0.1, beta_max=20.0)
    t = torch.tensor(0.5, dtype=torch.float64)
    b = 0.1 * 0.5 + 0.5 * 0.25 * 19.9
    alpha, std = sde.marginal(t)
    assert float(alpha) == pytest.approx(math.exp(-0.5 * b))
    assert float(std) == pytest.approx(math.sqrt(1 - math.exp(-b)))
    assert float(sde.diffusion(t)) == pytest.approx(math.sqrt(0.1 + 0.5 * 19.9))
    alpha_s, std_s = SubVPSDE().marginal(t)
    assert float(alpha_s) == pytest.approx(float(alpha))
    assert float(std_s) == pytest.approx(1 - math.exp(-b))
    assert float(std_s) < float(std)


def test_ve_formulas():
    sde = VESDE(sigma_min=0.01, sigma_max=50.0)
    t = torch.tensor(0.3, dtype=torch.float64)
    sigma = 0.01 * 5000**0.3
    _, std = sde.marginal(t)
    assert float(std) == pytest.approx(math.sqrt(sigma**2 - 0.01**2))
    assert float(sde.diffusion(t)) == pytest.approx(sigma * math.sqrt(2 * math.log(5000)))
    assert torch.equal(sde.drift(torch.ones(3), t), torch.zeros(3))


def test_clamp_time():
    sde = VPSDE(eps=1e-3)
    t = torch.tensor([-0.5, 0.5, 1.5])
    torch.testing.assert_close(sde.clamp_time(t), torch.tensor([1e-3, 0.5, 1.0]))


@pytest.mark.parametrize(
    "factory, kwargs, name",
    [
        (VPSDE, {"beta_min": 0.0}, "beta_min"),
        (VPSDE, {"beta_min": -1.0}, "beta_min"),
        (VPSDE, {"beta_max": 0.05}, "beta_max"),
        (SubVPSDE, {"beta_min": 0.0}, "beta_min"),
        (VESDE, {"sigma_min": 0.0}, "sigma_min"),
        (VESDE, {"sigma_max": 0.005}, "sigma_max"),
        (VESDE, {"sigma_max": 0.01}, "sigma_max"),
        (VPSDE, {"eps": 0.0}, "eps"),
        (VPSDE, {"eps": -1e-3}, "eps"),
        (VESDE, {"eps": 1.0}, "eps"),
        (SubVPSDE, {"eps": 2.0}, "eps"),
        (VPSDE, {"T": float("nan")}, "T"),
    ],
)
def test_bad_parameters_raise(factory, kwargs, name):
    with pytest.raises(ValueError, match=name):
        factory(**kwargs)


def test_config_round_trip():
    from pyro_scoreflow.sde import sde_from_config

    for sde in [VPSDE(beta_max=15.0), SubVPSDE(eps=1e-3), VESDE(sigma_max=20.0, T=2.0)]:
        assert sde_from_config(sde.config()) == sde


@pytest.mark.parametrize("sde", [VPSDE(), SubVPSDE(), VESDE(), VPSDE(beta_min=2.0, beta_max=2.0)], ids=repr)
def test_log_snr_inverse_and_transition_are_exact(sde):
    """The closed-form inverse of the half log-SNR and the exact transition kernel, against the marginals."""
    t = torch.linspace(sde.eps, sde.T, 501, dtype=torch.float64)
    lam = sde.log_snr(t)
    assert (lam[1:] < lam[:-1]).all()
    torch.testing.assert_close(sde.inverse_log_snr(lam), t, rtol=0, atol=1e-12)
    a, v = sde.transition(t[:-1], t[1:])
    alpha, sigma = sde.marginal(t)
    torch.testing.assert_close(a * alpha[:-1], alpha[1:], rtol=1e-12, atol=0)
    torch.testing.assert_close(a**2 * sigma[:-1] ** 2 + v**2, sigma[1:] ** 2, rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("sde", [VPSDE(), VESDE()], ids=repr)
def test_tweedie_denoiser_is_the_posterior_mean(sde):
    """For data N(m, s^2 I): E[x_0 | x_t] = m + alpha s^2 (x_t - alpha m) / (alpha^2 s^2 + sigma^2)."""
    m, s2 = 0.7, 0.2
    t = torch.tensor([0.1, 0.5], dtype=torch.float64)
    x = torch.tensor([[0.3, -1.0], [2.0, 0.5]], dtype=torch.float64)
    alpha, sigma = (v.unsqueeze(-1) for v in sde.marginal(t))
    score = -(x - alpha * m) / (alpha**2 * s2 + sigma**2)
    expected = m + alpha * s2 * (x - alpha * m) / (alpha**2 * s2 + sigma**2)
    torch.testing.assert_close(sde.denoise(x, score, t), expected)
    torch.testing.assert_close(sde.score_from_denoised(x, expected, t), score)
