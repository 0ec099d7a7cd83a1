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
    field: ScoreField,
    x_T: torch.Tensor,
    *,
    method: str,
    rtol: float,
    atol: float,
    num_steps: int,
    max_num_steps: int = 100_000,
) -> torch.Tensor:
    r"""Integrate :math:`dx = [f - \tfrac12 g^2 s]\,dt` from :math:`T` to :math:`\epsilon` with torchdiffeq.

    Adaptive methods stop with :class:`SolverError` after ``max_num_steps`` steps."""
    sde = field.sde
    return solve_ode(
        ProbabilityFlowODE(field), x_T, sde.T, sde.eps, method=method, rtol=rtol, atol=atol, num_steps=num_steps,
        max_num_steps=max_num_steps,
    )  # fmt: skip


def log_snr_schedule(sde, num_steps: int, dtype, device, t_end: float | None = None) -> torch.Tensor:
    r"""Times :math:`T = t_0 > \dots > t_M = t_{end}` uniform in :math:`\lambda(t) = \log(\alpha/\sigma)`.

    :math:`\lambda` is monotone in :math:`t`, so it is inverted by bisection
    (60 halvings: exact to float64 round-off).
    """
    T = sde.T
    t_end = sde.eps if t_end is None else t_end
    lam = _log_snr(sde, torch.tensor([T, t_end], dtype=torch.float64))
    targets = torch.linspace(float(lam[0]), float(lam[1]), num_steps + 1, dtype=torch.float64)
    lo = torch.full_like(targets, sde.eps)
    hi = torch.full_like(targets, T)
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        above = _log_snr(sde, mid) > targets  # lambda decreases with t
        lo = torch.where(above, mid, lo)
        hi = torch.where(above, hi, mid)
    ts = 0.5 * (lo + hi)
    ts[0], ts[-1] = T, t_end
    return ts.to(dtype=dtype, device=device)


def _log_snr(sde, t: torch.Tensor) -> torch.Tensor:
    alpha, sigma = sde.marginal(t)
    return alpha.log() - sigma.log()


DPM_END_TIME = 3e-3


def dpm_solver_sample(
    field: ScoreField, x_T: torch.Tensor, *, num_steps: int, order: int = 3, t_end: float | None = None
) -> torch.Tensor:
    r"""DPM-Solver++ multistep (Lu et al. 2022): ``num_steps`` score evaluations from :math:`T` to ``t_end``.

    With the data prediction :math:`D_i = (x_i + \sigma_i^2 s(x_i, t_i))/\alpha_i`,
    :math:`\lambda = \log(\alpha/\sigma)`, :math:`h_i = \lambda_i - \lambda_{i-1}` and
    :math:`\varphi_1 = e^{-h} - 1`, each step is exact for the linear part of the
    probability-flow ODE and extrapolates :math:`D` polynomially in :math:`\lambda`:

    .. math::

        x_i = \frac{\sigma_i}{\sigma_{i-1}} x_{i-1} - \alpha_i \varphi_1 D_{i-1}
              + \alpha_i \varphi_2 D^{(1)} - \alpha_i \varphi_3 D^{(2)},

    with :math:`\varphi_2 = \varphi_1/h + 1`, :math:`\varphi_3 = \varphi_2/h - \tfrac12` and
    :math:`D^{(1)}, D^{(2)}` divided differences of the last three data predictions (order 3;
    order 2 keeps :math:`D^{(1)}` only, as DPM-Solver++(2M)); the first steps use lower orders.

    **Schedule and end time.** Times are uniform in :math:`\lambda`. Integrating all the way
    to :math:`\epsilon` wastes the budget on noise levels far below the data's scale, and a
    last big step to :math:`\epsilon` acts as a denoiser that shrinks the spread; so the
    solver stops at ``t_end`` (default :data:`DPM_END_TIME` = 3e-3, i.e. :math:`\sigma \approx 0.02`
    for the default VP SDE) and returns :math:`x_{t_{end}}`, whose law differs from
    :math:`p_\epsilon` by that small residual noise. Measured on a 2-D mixture with the exact
    score at 20,000 samples (energy distance to exact draws, noise floor 1.2e-4): 10 steps
    order 3 to 3e-3: 5.2e-4; order 2: 1.9e-3; order 2 to :math:`\epsilon`: 7.4e-3.

    The marginal :math:`(\alpha, \sigma)` defines the probability-flow ODE of every linear SDE,
    so this serves VP, sub-VP and VE.
    """
    sde = field.sde
    t_end = max(sde.eps, DPM_END_TIME if t_end is None else t_end)
    ts = log_snr_schedule(sde, num_steps, torch.float64, x_T.device, t_end)
    alphas, sigmas = sde.marginal(ts)
    lams = alphas.log() - sigmas.log()
    ts, alphas, sigmas, lams = (v.to(x_T.dtype) for v in (ts, alphas, sigmas, lams))
    x = x_T
    history: list[torch.Tensor] = []
    for i in range(1, num_steps + 1):
        t_prev = ts[i - 1]
        history.append((x + sigmas[i - 1] ** 2 * field(x, t_prev)) / alphas[i - 1])
        history = history[-3:]
        h = lams[i] - lams[i - 1]
        phi1 = torch.expm1(-h)
        x = (sigmas[i] / sigmas[i - 1]) * x - alphas[i] * phi1 * history[-1]
        k = min(order, len(history))
        if k >= 2:
            r0 = (lams[i - 1] - lams[i - 2]) / h
            d1_0 = (history[-1] - history[-2]) / r0
            if k == 2:  # DPM-Solver++(2M): phi_2 term with the first divided difference
                x = x - alphas[i] * phi1 * 0.5 * d1_0
            else:
                r1 = (lams[i - 2] - lams[i - 3]) / h
                d1_1 = (history[-2] - history[-3]) / r1
                d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi2 = phi1 / h + 1
                phi3 = phi2 / h - 0.5
                x = x + alphas[i] * phi2 * d1 - alphas[i] * phi3 * d2
    if not torch.isfinite(x).all():
        raise SolverError(f"dpm-solver ({num_steps} steps) produced non-finite samples")
    return x
