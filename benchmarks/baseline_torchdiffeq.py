r"""A straightforward differentiable likelihood with ``torchdiffeq`` (benchmark baseline).

What one writes on a first attempt: ``torchdiffeq.odeint`` (dopri5, default
RMS norm over the whole state, no per-point norm) on the probability-flow ODE
augmented with its divergence, the exact trace by a per-dimension autograd
loop with ``create_graph=True`` so the result can be backpropagated.

It is a benchmark baseline, not part of the package.
"""

from __future__ import annotations

import math

import torch
import torchdiffeq
from torch import nn

__all__ = ["NaiveAugmentedODE", "divergence_loop", "loop_vjp", "torchdiffeq_log_prob"]


def loop_vjp(v: torch.Tensor, x: torch.Tensor, cotangents: torch.Tensor, create_graph: bool) -> torch.Tensor:
    """Vector-Jacobian products ``(S, N, D)`` by one backward pass per cotangent (no batching)."""
    return torch.stack(
        [torch.autograd.grad(v, x, c, create_graph=create_graph, retain_graph=True)[0] for c in cotangents]
    )


def divergence_loop(v: torch.Tensor, x: torch.Tensor, create_graph: bool) -> torch.Tensor:
    r"""Exact divergence by ``D`` separate backward passes (the textbook implementation)."""
    div = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    for i in range(x.shape[1]):
        (g,) = torch.autograd.grad(v[:, i].sum(), x, create_graph=create_graph, retain_graph=True)
        div = div + g[:, i]
    return div


class NaiveAugmentedODE(nn.Module):
    """Field of the state ``(N, D + 1)``: probability flow and its exact divergence."""

    def __init__(self, score_model, sde):
        super().__init__()
        self.score_model = score_model
        self.sde = sde
        self.nfe = 0

    def forward(self, t: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        self.nfe += 1
        x = state[:, :-1]
        with torch.enable_grad():
            if not x.requires_grad:
                x = x.detach().requires_grad_(True)
            t_vec = t.clamp(self.sde.eps, self.sde.T).expand(x.shape[0])
            g2 = self.sde.diffusion(t_vec) ** 2
            v = self.sde.drift(x, t_vec) - 0.5 * g2[:, None] * self.score_model(x, t_vec)
            div = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
            for i in range(x.shape[1]):
                (grad,) = torch.autograd.grad(v[:, i].sum(), x, create_graph=True)
                div = div + grad[:, i]
        return torch.cat([v, div[:, None]], dim=-1)


def torchdiffeq_log_prob(score_model, sde, x: torch.Tensor, *, rtol: float = 1e-5, atol: float = 1e-5):
    r""":math:`\log p_\epsilon(x)`, differentiable with respect to ``x`` (backpropagation through dopri5).

    :returns: ``(log_prob, nfe)``, ``log_prob`` of shape ``(N,)`` in ``x.dtype``.
    """
    func = NaiveAugmentedODE(score_model, sde)
    y0 = torch.cat([x, x.new_zeros(x.shape[0], 1)], dim=-1)
    ts = torch.tensor([sde.eps, sde.T], dtype=x.dtype, device=x.device)
    y1 = torchdiffeq.odeint(func, y0, ts, rtol=rtol, atol=atol, method="dopri5")[-1]
    x_T, delta = y1[:, :-1], y1[:, -1]
    d, std = x.shape[-1], sde.prior_std()
    prior_lp = -0.5 * (x_T**2).sum(-1) / std**2 - d * (math.log(std) + 0.5 * math.log(2 * math.pi))
    return prior_lp + delta, func.nfe
