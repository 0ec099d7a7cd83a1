r"""Samplers: integrate from the SDE's prior at :math:`T` down to :math:`\epsilon`.

* :func:`reverse_sde_sample` — the reverse-time SDE with ``torchsde.sdeint``;
* :func:`probability_flow_sample` — the probability-flow ODE with ``torchdiffeq``;
* :func:`dpm_solver_sample` — DPM-Solver++(2M) (Lu et al. 2022), an exponential
  integrator of the probability-flow ODE in the log-SNR variable
  :math:`\lambda = \log(\alpha/\sigma)`, for few-step sampling.

All take and return flat states ``(N, D)``.

References:

[1] C. Lu, Y. Zhou, F. Bao, J. Chen, C. Li, J. Zhu, "DPM-Solver++: Fast Solver
    for Guided Sampling of Diffusion Probabilistic Models", 2022.
"""

from __future__ import annotations

import torch
import torchsde

from .dynamics import ProbabilityFlowODE, ReverseTimeSDE, ScoreField, SolverError, solve_ode

__all__ = ["SDE_METHODS", "reverse_sde_sample", "probability_flow_sample", "dpm_solver_sample"]

# torchsde methods valid for diagonal noise, with the SDE type and Levy-area
# approximation each needs. The noise is additive, so Ito == Stratonovich.
# "reversible_heun" is accepted but is only weakly stable: on the stiff reverse
# drift near eps it needs many more steps than "euler" (measured: 200 steps still
# biased on a 2-D mixture), so prefer "euler", "heun" or "srk".
SDE_METHODS = {
    "euler": ("ito", "none"),
    "milstein": ("ito", "none"),
    "srk": ("ito", "space-time"),
    "euler_heun": ("stratonovich", "none"),
    "heun": ("stratonovich", "none"),
    "midpoint": ("stratonovich", "none"),
    "reversible_heun": ("stratonovich", "none"),
    "log_ode": ("stratonovich", "foster"),
}


def reverse_sde_sample(field: ScoreField, x_T: torch.Tensor, *, num_steps: int, method: str) -> torch.Tensor:
    r"""Integrate :math:`dx = [f - g^2 s]\,dt + g\,d\bar w` from :math:`T` to :math:`\epsilon` with torchsde.

    The solver time is :math:`\tau = -t`. The Brownian motion is a
    ``BrownianInterval`` seeded from torch's RNG (so ``pyro.set_rng_seed``
    makes samples reproducible) and given the step size as its ``dt`` hint,
    which keeps its interval tree shallow (about 6x faster at 100 Euler steps).
    """
    sde = field.sde
    sde_type, levy_area = SDE_METHODS[method]
    # solver time in float64 whatever the state's dtype: float32 sums of num_steps steps drift by
    # ~1e-6 and would add a sliver of a step at the end; the fields cast t back to x's dtype
    ts = torch.tensor([-sde.T, -sde.eps], dtype=torch.float64, device=x_T.device)
    t0, t1 = -sde.T, -sde.eps
    dt = (t1 - t0) / num_steps * (1 + 1e-9)
    entropy = int(torch.randint(0, 2**31 - 1, ()).item())
    bm = torchsde.BrownianInterval(
        t0=t0,
        t1=t1,
        size=x_T.shape,
        dtype=x_T.dtype,
        device=x_T.device,
        entropy=entropy,
        dt=dt,
        levy_area_approximation=levy_area,
    )
    ys = torchsde.sdeint(ReverseTimeSDE(field, sde_type), x_T, ts, bm=bm, method=method, dt=dt)
    x = ys[-1]
    if not torch.isfinite(x).all():
        raise SolverError(f"reverse SDE ('{method}', {num_steps} steps) produced non-finite samples")
    return x


def probability_flow_sample(
    field: ScoreField, x_T: torch.Tensor, *, method: str, rtol: float, atol: float, num_steps: int
) -> torch.Tensor:
    r"""Integrate :math:`dx = [f - \tfrac12 g^2 s]\,dt` from :math:`T` to :math:`\epsilon` with torchdiffeq."""
    sde = field.sde
    return solve_ode(
        ProbabilityFlowODE(field), x_T, sde.T, sde.eps, method=method, rtol=rtol, atol=atol, num_steps=num_steps
    )


def log_snr_schedule(sde, num_steps: int, dtype, device) -> torch.Tensor:
    r"""Times :math:`T = t_0 > \dots > t_M = \epsilon` uniform in :math:`\lambda(t) = \log(\alpha/\sigma)`.

    :math:`\lambda` is monotone in :math:`t`, so it is inverted by bisection
    (60 halvings: exact to float64 round-off).
    """
    T, eps = sde.T, sde.eps
    tt = torch.tensor([T, eps], dtype=torch.float64)
    lam = _log_snr(sde, tt)
    targets = torch.linspace(float(lam[0]), float(lam[1]), num_steps + 1, dtype=torch.float64)
    lo = torch.full_like(targets, eps)
    hi = torch.full_like(targets, T)
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        above = _log_snr(sde, mid) > targets  # lambda decreases with t
        lo = torch.where(above, mid, lo)
        hi = torch.where(above, hi, mid)
    ts = 0.5 * (lo + hi)
    ts[0], ts[-1] = T, eps
    return ts.to(dtype=dtype, device=device)


def _log_snr(sde, t: torch.Tensor) -> torch.Tensor:
    alpha, sigma = sde.marginal(t)
    return alpha.log() - sigma.log()


def dpm_solver_sample(field: ScoreField, x_T: torch.Tensor, *, num_steps: int) -> torch.Tensor:
    r"""DPM-Solver++(2M): ``num_steps`` score evaluations from :math:`T` to :math:`\epsilon`.

    With the data prediction :math:`D(x, t) = (x + \sigma^2 s(x, t))/\alpha` and
    :math:`h_i = \lambda_i - \lambda_{i-1}`,

    .. math::

        x_i = \frac{\sigma_i}{\sigma_{i-1}} x_{i-1} - \alpha_i (e^{-h_i} - 1)
              \Big[(1 + \tfrac{1}{2r_i}) D_{i-1} - \tfrac{1}{2r_i} D_{i-2}\Big],
        \quad r_i = h_{i-1}/h_i,

    first order on the first step. The marginal :math:`(\alpha, \sigma)` defines
    the probability-flow ODE of every linear SDE, so this serves VP, sub-VP and VE.
    """
    sde = field.sde
    ts = log_snr_schedule(sde, num_steps, x_T.dtype, x_T.device)
    alphas, sigmas = sde.marginal(ts)
    lams = alphas.log() - sigmas.log()
    x = x_T
    d_prev = None
    for i in range(1, num_steps + 1):
        t_prev = ts[i - 1]
        s = field(x, t_prev)
        d_cur = (x + sigmas[i - 1] ** 2 * s) / alphas[i - 1]
        h = lams[i] - lams[i - 1]
        if d_prev is None:
            d = d_cur
        else:
            r = (lams[i - 1] - lams[i - 2]) / h
            d = (1 + 0.5 / r) * d_cur - (0.5 / r) * d_prev
        x = (sigmas[i] / sigmas[i - 1]) * x - alphas[i] * torch.expm1(-h) * d
        d_prev = d_cur
    if not torch.isfinite(x).all():
        raise SolverError(f"dpm-solver ({num_steps} steps) produced non-finite samples")
    return x
