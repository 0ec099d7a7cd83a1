r"""The Fokker–Planck link, numerically, for Gaussian mixtures with closed-form :math:`p_t`.

(a) The density :math:`p_t` of :class:`~pyro_scoreflow.GaussianMixtureScore` solves the Fokker–Planck equation of
    the forward SDE :math:`dx = f\,dt + g\,dw`, and the continuity equation of the probability-flow field
    :math:`\tilde f = f - \tfrac12 g^2 \nabla\log p_t` (the package's :func:`~pyro_scoreflow.dynamics.score_drift`
    with the closed-form score):

    .. math::

        \partial_t p + \nabla\cdot(f p) - \tfrac12 g^2 \Delta p = 0, \qquad
        \partial_t p + \nabla\cdot(\tilde f p) = 0,

    to round-off at random points and times (float64, every derivative by autograd), while a wrong
    :math:`g` or a dropped :math:`\tfrac12` leaves residuals many orders of magnitude larger.
(b) Hence the forward SDE (torchsde, from draws of :math:`p_\epsilon`) and the probability-flow ODE
    (:meth:`ProbabilityFlowTransform.solve` on the same draws) transport :math:`p_\epsilon` to the same
    :math:`p_t`: both match exact draws of :math:`p_t` within the two-sample noise floor of the energy distance.
(c) Langevin dynamics with the exact score converges to :math:`p_\epsilon`; its bias grows with the step size.
"""

from __future__ import annotations

import math

import pytest
import torch
import torchsde
from torchdiffeq import odeint

from pyro_scoreflow import VESDE, VPSDE, GaussianMixtureScore, ScoreSDEPrior
from pyro_scoreflow.dynamics import score_drift
from pyro_scoreflow.metrics import energy_distance

from helpers import component_masses, mixture_2d, random_mixture

SDES = [VPSDE(), VESDE()]
SDE_IDS = ["VPSDE", "VESDE"]


# -- (a) the PDEs, pointwise ------------------------------------------------------------------------------------
def _grad(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.autograd.grad(y.sum(), x, create_graph=True)[0]


def _divergence(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """:math:`\\nabla\\cdot v` of a field ``v`` ``(N, D)`` of ``x`` ``(N, D)`` (the points are independent)."""
    return sum(_grad(v[:, i], x)[:, i] for i in range(x.shape[1]))


def pde_terms(score: GaussianMixtureScore, x: torch.Tensor, t: torch.Tensor, *, g_scale=1.0, half=0.5):
    r"""The terms of both residuals at points ``x`` ``(N, D)`` and times ``t`` ``(N,)``.

    Returns ``(fp, continuity)``: each a list of the terms whose sum is the residual (to compare a residual
    with the size of its terms). ``g_scale`` and ``half`` corrupt :math:`g` and the :math:`\tfrac12` of the
    Fokker–Planck equation and of :math:`\tilde f`, to show that the check has power.
    """
    sde = score.sde
    x = x.clone().requires_grad_(True)
    t = t.clone().requires_grad_(True)
    p = score.log_density(x, t).exp()
    dp_dt = torch.autograd.grad(p.sum(), t, create_graph=True)[0]
    g2 = (g_scale * sde.diffusion(t)) ** 2
    # Fokker–Planck: d/dt p + div(f p) - 1/2 g^2 lap p
    div_fp = _divergence(sde.drift(x, t) * p.unsqueeze(-1), x)
    lap_p = _divergence(_grad(p, x), x)
    fp = [dp_dt, div_fp, -half * g2 * lap_p]
    # continuity of the probability flow, with the package's drift and the closed-form score (not autograd)
    if g_scale == 1.0:
        v = score_drift(sde, x, t, score(x, t), half)
    else:
        v = sde.drift(x, t) - half * g2.unsqueeze(-1) * score(x, t)
    continuity = [dp_dt, _divergence(v * p.unsqueeze(-1), x)]
    return fp, continuity


def relative_residual(terms: list[torch.Tensor]) -> torch.Tensor:
    """Max over points of :math:`|\\sum_i a_i| / \\sum_i |a_i|`: 0 when the equation holds, O(1) when not."""
    total = sum(terms)
    scale = sum(a.abs() for a in terms)
    return (total.abs() / scale).max().detach()


def points_and_times(score: GaussianMixtureScore, n: int, seed: int):
    """Times uniform in log t on [1e-3, T] (small times matter), points drawn from p_t, every other one
    scaled by 1.5 (tails), one time per point."""
    g = torch.Generator().manual_seed(seed)
    sde = score.sde
    u = torch.rand(n, generator=g, dtype=torch.float64)
    t = torch.exp(math.log(1e-3) + u * (math.log(sde.T) - math.log(1e-3)))
    torch.manual_seed(seed)
    x = torch.stack([score.marginal(float(ti)).sample() for ti in t])
    widen = (torch.arange(n) % 2 == 0).double().unsqueeze(-1) * 0.5 + 1
    return x * widen, t


MIXTURES = [("mixture_2d", lambda sde: mixture_2d(sde)), ("random_3d", lambda sde: random_mixture(sde, 4, 3, seed=1))]


@pytest.mark.parametrize("sde", SDES, ids=SDE_IDS)
@pytest.mark.parametrize("name, make", MIXTURES, ids=[m[0] for m in MIXTURES])
def test_fokker_planck_and_continuity_residuals_vanish(sde, name, make):
    """Both residuals, relative to the size of their terms, are below 1e-9 at 64 random points and times
    (measured: 1.3e-15 to 7.9e-14 for Fokker–Planck, 1.0e-14 to 3.9e-13 for the continuity equation; float64
    round-off amplified by the cancellation of the terms)."""
    score = make(sde)
    x, t = points_and_times(score, 64, seed=0)
    fp, continuity = pde_terms(score, x, t)
    assert relative_residual(fp) < 1e-9
    assert relative_residual(continuity) < 1e-9
    # the time derivative is not negligible: the equation balances real terms
    assert (fp[0].abs() / sum(a.abs() for a in fp)).median() > 0.05


@pytest.mark.parametrize("sde", SDES, ids=SDE_IDS)
@pytest.mark.parametrize(
    "corruption", [{"g_scale": 1.05}, {"half": 1.0}, {"half": 0.0}], ids=["g*1.05", "no-half", "no-diffusion"]
)
def test_residual_check_has_power(sde, corruption):
    """A 5% error in g, or the reverse SDE's weight 1 (or 0) instead of 1/2, leaves relative residuals >= 1e-3
    at some point (measured: 1e-2 to 1, i.e. >= 1e7 times the tolerance of the test above)."""
    score = mixture_2d(sde)
    x, t = points_and_times(score, 64, seed=0)
    fp, continuity = pde_terms(score, x, t, **corruption)
    assert relative_residual(fp) > 1e-3
    assert relative_residual(continuity) > 1e-3


# -- (b) the SDE and the probability-flow ODE transport p_eps to the same p_t -------------------------------------
class ForwardSDEModule(torch.nn.Module):
    """The forward SDE :math:`dx = f\\,dt + g\\,dw` for ``torchsde.sdeint`` (Itô, diagonal noise)."""

    noise_type = "diagonal"
    sde_type = "ito"

    def __init__(self, sde):
        super().__init__()
        self.sde = sde

    def f(self, t, x):
        return self.sde.drift(x, t)

    def g(self, t, x):
        return self.sde.diffusion(t).to(x.dtype).expand_as(x)


N_B = 2000


def floor(exact, n: int = N_B, repeats: int = 4) -> float:
    """Two-sample noise floor: mean energy distance between two independent exact samples of size ``n``."""
    return sum(float(energy_distance(exact.sample((n,)), exact.sample((n,)))) for _ in range(repeats)) / repeats


def forward_sde(sde, x: torch.Tensor, t0: float, t1: float, num_steps: int = 200) -> torch.Tensor:
    """Euler–Maruyama of the forward SDE from ``t0`` to ``t1`` with torchsde."""
    ts = torch.tensor([t0, t1], dtype=x.dtype)
    return torchsde.sdeint(ForwardSDEModule(sde), x, ts, method="euler", dt=(t1 - t0) / num_steps)[-1]


def flow_push(score: GaussianMixtureScore, x: torch.Tensor, t0: float, t1: float) -> torch.Tensor:
    """The probability-flow map from ``t0`` to ``t1`` (dopri5, tolerances 1e-6), the prior's :attr:`flow`."""
    prior = ScoreSDEPrior(score, score.sde, (score.dim,), rtol=1e-6, atol=1e-6)
    return prior.flow.solve(x, t0, t1, divergence=False)[0]


def time_at_sigma(sde, sigma: float) -> float:
    """The time at which the SDE's marginal std is ``sigma`` (with :math:`\\alpha^2 + \\sigma^2 = 1` for VP)."""
    alpha = 1.0 if isinstance(sde, VESDE) else math.sqrt(1 - sigma**2)
    return float(sde.inverse_log_snr(torch.tensor(math.log(alpha / sigma), dtype=torch.float64)))


@pytest.mark.parametrize("sde", SDES, ids=SDE_IDS)
@pytest.mark.parametrize("sigma", [0.2, 0.6])
def test_sde_and_probability_flow_transport_the_same_marginals(sde, sigma):
    """From the same 2000 draws of p_eps, the forward SDE (200 Euler–Maruyama steps, torchsde) and the
    probability-flow ODE (dopri5) both land on p_t, at the t where sigma(t) = 0.2 and 0.6 (the data's scale is
    ~0.3 within a mode, ~1 overall): energy distance to 2000 exact draws of p_t below 4x the two-sample noise
    floor (mean of 4 exact-vs-exact distances; measured floor 1.1e-3 to 2.8e-3, ratios 0.4-2.4 over two seeds;
    for exact-vs-exact pairs the 99% quantile of the ratio is 2.9); the two also match each other (ratio
    0.2-0.7: they start from the same draws)."""
    score = mixture_2d(sde)
    t = time_at_sigma(sde, sigma)
    exact = score.marginal(t)
    noise = floor(exact)
    x0 = score.marginal(sde.eps).sample((N_B,))
    by_sde = forward_sde(sde, x0, sde.eps, t)
    by_ode = flow_push(score, x0, sde.eps, t)
    assert float(energy_distance(by_sde, exact.sample((N_B,)))) < 4 * noise
    assert float(energy_distance(by_ode, exact.sample((N_B,)))) < 4 * noise
    assert float(energy_distance(by_sde, by_ode)) < 4 * noise


@pytest.mark.parametrize("sde", SDES, ids=SDE_IDS)
def test_transport_check_has_power(sde):
    """The same draws pushed to sigma(t) = 0.6 by the field with weight 1 instead of 1/2 (the reverse SDE's
    drift without its noise) miss p_t by far: measured 58-210x the noise floor (at sigma = 0.2, only 3-4x)."""
    score = mixture_2d(sde)
    t = time_at_sigma(sde, 0.6)
    exact = score.marginal(t)
    x0 = score.marginal(sde.eps).sample((N_B,))

    def wrong(s, y):  # f - g^2 s instead of f - 1/2 g^2 s
        return score_drift(sde, y, s, score(y, s.expand(y.shape[0])), 1.0)

    ts = torch.tensor([sde.eps, t], dtype=torch.float64)
    by_wrong = odeint(wrong, x0, ts, rtol=1e-6, atol=1e-6)[-1]
    assert float(energy_distance(by_wrong, exact.sample((N_B,)))) > 20 * floor(exact)


# -- (c) Langevin dynamics with the exact score --------------------------------------------------------------------
def langevin(score: GaussianMixtureScore, x: torch.Tensor, t: float, delta: float, num_steps: int) -> torch.Tensor:
    r"""Unadjusted Langevin dynamics on :math:`p_t`:
    :math:`x \leftarrow x + \delta\,\nabla\log p_t(x) + \sqrt{2\delta}\,z`."""
    tt = torch.full((x.shape[0],), t, dtype=x.dtype)
    for _ in range(num_steps):
        x = x + delta * score(x, tt) + math.sqrt(2 * delta) * torch.randn_like(x)
    return x


@pytest.mark.parametrize("sde", SDES, ids=SDE_IDS)
def test_langevin_converges_to_p_eps(sde):
    """From draws of p_t at sigma(t) = 0.5 (the data blurred: 24-47x the noise floor away from p_eps), 666
    Langevin steps of size 0.003 with the exact score of p_eps (Langevin time 2) reach p_eps: energy distance
    below 4x the noise floor (measured 0.4-2.3x over four seeds), every mode's mass within 0.05 of its weight
    (measured <= 0.024). From far away (N(0, 2^2 I)) the same needs a Langevin time of ~20: crossing between
    the modes is slow, which is why samplers anneal."""
    score = mixture_2d(sde)
    exact = score.marginal(sde.eps)
    x = score.marginal(time_at_sigma(sde, 0.5)).sample((N_B,))
    noise = floor(exact)
    assert float(energy_distance(x, exact.sample((N_B,)))) > 10 * noise  # the start is far from p_eps
    x = langevin(score, x, sde.eps, 0.003, 666)
    assert float(energy_distance(x, exact.sample((N_B,)))) < 4 * noise
    assert (component_masses(score, x) - torch.softmax(score.logits, 0)).abs().max() < 0.05


def test_langevin_bias_grows_with_step_size():
    """At a fixed Langevin time (2, from the same start), the stationary bias of the discretisation grows with
    the step. Measured with 8000 samples over three seeds, energy distance / noise floor: 1.3-3.4 at step 0.003,
    23-33 at 0.03, 890-1420 at 0.1 (largest mode-mass error 0.006-0.016, 0.04, 0.28; the smallest component
    variance is 0.035, and steps near it distort the narrow modes). With the 4000 samples asserted here, over
    four seeds: 0.8-3.2, 3.8-18, 280-820 (the middle step's bias is near the noise, so only its order is
    asserted)."""
    n = 4000
    sde = VPSDE()
    score = mixture_2d(sde)
    exact = score.marginal(sde.eps)
    noise = floor(exact, n, 2)
    x0 = score.marginal(time_at_sigma(sde, 0.5)).sample((n,))
    ratios, mass_errors = [], []
    for delta in (0.003, 0.03, 0.1):
        x = langevin(score, x0, sde.eps, delta, int(2 / delta))
        ratios.append(float(energy_distance(x, exact.sample((n,)))) / noise)
        mass_errors.append(float((component_masses(score, x) - torch.softmax(score.logits, 0)).abs().max()))
    assert ratios[0] < 4
    assert ratios[0] < ratios[1] < ratios[2]
    assert ratios[2] > 100 and mass_errors[2] > 0.2 > 0.05 > mass_errors[0]


@pytest.mark.parametrize("delta", [0.01, 0.05])
def test_langevin_stationary_variance_of_a_gaussian(delta):
    r"""For :math:`\mathcal N(0, v I)` the Langevin chain is linear, :math:`x \leftarrow (1 - \delta/v) x +
    \sqrt{2\delta} z`, and its stationary variance is :math:`v / (1 - \delta/(2v))`: the bias is first order in
    :math:`\delta`. With v = 0.1 and 20,000 chains (relative standard error of the variance ~0.7%) the measured
    variance matches that formula within 3% and is off the exact v by 5% (delta 0.01) and 33% (delta 0.05)."""
    v = 0.1
    sde = VPSDE()
    score = GaussianMixtureScore(
        sde, torch.zeros(1, 2, dtype=torch.float64), math.sqrt(v) * torch.eye(2).double()[None]
    )
    alpha, sigma = sde.marginal(torch.tensor(sde.eps, dtype=torch.float64))
    v_eps = float(alpha**2 * v + sigma**2)
    x = langevin(score, math.sqrt(v_eps) * torch.randn(20_000, 2, dtype=torch.float64), sde.eps, delta, 300)
    predicted = v_eps / (1 - delta / (2 * v_eps))
    measured = float(x.var(0).mean())
    assert abs(measured / predicted - 1) < 0.03
    assert measured / v_eps - 1 > 0.5 * (predicted / v_eps - 1)
