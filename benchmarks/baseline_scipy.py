r"""Baseline likelihood in the style of score_sde's ``likelihood.py`` (Song et al. 2021).

This is the approach users copy today: the probability-flow ODE augmented with
its divergence, integrated by ``scipy.integrate.solve_ivp`` (RK45,
``rtol = atol = 1e-5``) over *one flattened NumPy state* holding every point's
``x`` and log-det accumulator, with a NumPy -> torch -> NumPy round trip at
every evaluation and the exact trace computed by a per-dimension autograd loop.

Because the solver sees one long vector, its error norm is the RMS over the
whole batch: easy points let hard ones drift past the tolerance.

It is a benchmark baseline, not part of the package.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.integrate import solve_ivp

__all__ = ["scipy_log_prob"]


def _probability_flow(score_model, sde, x: torch.Tensor, t: float) -> torch.Tensor:
    r""":math:`\tilde f(x, t) = f(x, t) - \tfrac12 g(t)^2 s(x, t)` for ``x`` ``(N, D)``."""
    t_vec = torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)
    g2 = sde.diffusion(t_vec) ** 2
    return sde.drift(x, t_vec) - 0.5 * g2[:, None] * score_model(x, t_vec)


def scipy_log_prob(score_model, sde, x: torch.Tensor, *, rtol: float = 1e-5, atol: float = 1e-5, method: str = "RK45"):
    r""":math:`\log p_\epsilon(x)` by ``solve_ivp`` over the flattened batch, score_sde style.

    :param score_model: ``score_model(x, t)`` with ``x`` ``(N, D)``, ``t`` ``(N,)``.
    :param sde: the forward SDE (``drift``, ``diffusion``, ``eps``, ``T``, ``prior_std``).
    :param torch.Tensor x: points ``(N, D)``; evaluations run in ``x.dtype``.
    :returns: ``(log_prob, nfe, x_T)``: float64 tensor ``(N,)``, the number of
        field evaluations, and the terminal points ``(N, D)`` (float64).
    """
    dtype, device = x.dtype, x.device
    n, d = x.shape
    nfe = 0

    def ode_func(t: float, y: np.ndarray) -> np.ndarray:
        nonlocal nfe
        nfe += 1
        xs = torch.from_numpy(y[: n * d].reshape(n, d)).to(dtype=dtype, device=device).requires_grad_(True)
        with torch.enable_grad():
            drift = _probability_flow(score_model, sde, xs, float(t))
            div = torch.zeros(n, dtype=dtype, device=device)
            for i in range(d):  # exact trace, one backward pass per dimension
                (grad,) = torch.autograd.grad(drift[:, i].sum(), xs, retain_graph=True)
                div = div + grad[:, i]
        return np.concatenate([drift.detach().cpu().numpy().ravel(), div.cpu().numpy()]).astype(np.float64)

    y0 = np.concatenate([x.detach().cpu().numpy().astype(np.float64).ravel(), np.zeros(n)])
    sol = solve_ivp(ode_func, (sde.eps, sde.T), y0, rtol=rtol, atol=atol, method=method)
    if not sol.success:
        raise RuntimeError(f"solve_ivp failed: {sol.message}")
    y1 = sol.y[:, -1]
    x_T = torch.from_numpy(y1[: n * d].reshape(n, d).copy())
    delta = torch.from_numpy(y1[n * d :].copy())
    std = sde.prior_std()
    prior_lp = -0.5 * (x_T**2).sum(-1) / std**2 - d * (math.log(std) + 0.5 * math.log(2 * math.pi))
    return prior_lp + delta, nfe, x_T
