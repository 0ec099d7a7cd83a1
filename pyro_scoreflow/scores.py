r"""Score models: the callable protocol and the exact score of a Gaussian mixture.

A *score model* is any callable ``score_model(x, t)`` with ``x`` of shape
``(N, *event_shape)`` and ``t`` of shape ``(N,)`` that returns an estimate of
:math:`\nabla_x \log p_t(x)` shaped like ``x``.
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import torch
from pyro.distributions import Categorical, MixtureSameFamily, MultivariateNormal
from torch import nn

from .sde import ForwardSDE, _as_tensor

__all__ = ["ScoreModel", "GaussianMixtureScore"]


@runtime_checkable
class ScoreModel(Protocol):
    """``score_model(x, t) -> grad_x log p_t(x)``, ``x`` ``(N, *event_shape)``, ``t`` ``(N,)``; a conditional
    model takes the context ``(N, *context_shape)`` as a third argument."""

    def __call__(self, x: torch.Tensor, t: torch.Tensor, /, *context: torch.Tensor) -> torch.Tensor: ...


class GaussianMixtureScore(nn.Module):
    r"""The exact score of a Gaussian mixture diffused by a linear SDE.

    For data :math:`p_0 = \sum_k w_k \mathcal{N}(\mu_k, \Sigma_k)` and the SDE's
    marginal :math:`x_t = \alpha(t) x_0 + \sigma(t) z`,

    .. math::

        p_t = \sum_k w_k \mathcal{N}(\alpha \mu_k, C_k), \qquad C_k = \alpha^2 \Sigma_k + \sigma^2 I,

        \nabla_x \log p_t(x) = -\sum_k r_k(x)\, C_k^{-1} (x - \alpha \mu_k),

    with responsibilities :math:`r_k(x) \propto w_k \mathcal{N}(x; \alpha\mu_k, C_k)`.
    Each :math:`\Sigma_k = U_k \operatorname{diag}(\lambda_k) U_k^\top` is
    eigendecomposed once, so :math:`C_k^{-1}` at any time costs
    :math:`O(D^2)` per point and component: batched over points with different
    times, any dimension.

    It has no parameters (only buffers), so it computes in the dtype of ``x``;
    build it in float64 and pass float64 values for reference-grade numbers.

    :param ForwardSDE sde: the forward SDE.
    :param torch.Tensor locs: component means, shape ``(K, D)``.
    :param torch.Tensor scale_tril: lower Cholesky factors of the component
        covariances, shape ``(K, D, D)``.
    :param torch.Tensor logits: unnormalised component log-weights ``(K,)``;
        uniform when ``None``.
    """

    def __init__(self, sde: ForwardSDE, locs: torch.Tensor, scale_tril: torch.Tensor, logits=None):
        super().__init__()
        if not isinstance(sde, ForwardSDE):
            raise TypeError(f"sde must be a ForwardSDE, got {type(sde).__name__}")
        locs = torch.as_tensor(locs)
        if not locs.is_floating_point():
            locs = locs.to(torch.get_default_dtype())
        scale_tril = torch.as_tensor(scale_tril, dtype=locs.dtype, device=locs.device)
        if locs.dim() != 2:
            raise ValueError(f"locs must have shape (K, D), got {tuple(locs.shape)}")
        K, D = locs.shape
        if scale_tril.shape != (K, D, D):
            raise ValueError(f"scale_tril must have shape (K, D, D) = {(K, D, D)}, got {tuple(scale_tril.shape)}")
        if logits is None:
            logits = torch.zeros(K, dtype=locs.dtype, device=locs.device)
        logits = torch.as_tensor(logits, dtype=locs.dtype, device=locs.device)
        if logits.shape != (K,):
            raise ValueError(f"logits must have shape (K,) = {(K,)}, got {tuple(logits.shape)}")
        for name, value in (("locs", locs), ("scale_tril", scale_tril), ("logits", logits)):
            if not torch.isfinite(value).all():
                raise ValueError(f"{name} must be finite")
        scale_tril = scale_tril.tril()
        diag = scale_tril.diagonal(dim1=-2, dim2=-1)
        if not (diag.abs() > 0).all():
            raise ValueError("scale_tril must have a non-zero diagonal (positive-definite covariances)")
        cov = scale_tril @ scale_tril.transpose(-1, -2)
        evals, evecs = torch.linalg.eigh(cov)
        self.sde = sde
        self.register_buffer("locs", locs)
        self.register_buffer("scale_tril", scale_tril)
        self.register_buffer("logits", logits - logits.logsumexp(0))
        self.register_buffer("_evals", evals.clamp_min(0))
        self.register_buffer("_evecs", evecs)

    @property
    def num_components(self) -> int:
        return self.locs.shape[0]

    @property
    def dim(self) -> int:
        return self.locs.shape[1]

    def _components_at(self, x: torch.Tensor, t):
        """Per-point, per-component log densities ``(K, N)`` and :math:`C_k^{-1}(x - \\alpha\\mu_k)` ``(K, N, D)``."""
        dtype, device = x.dtype, x.device
        t = _as_tensor(t, x)
        if t.dim() == 1 and t.numel() > 1 and t.stride(0) == 0:
            t = t[0]  # one time for the whole batch (expanded): share C_k across points
        alpha, sigma = self.sde.marginal(t)
        alpha = alpha.reshape(-1, 1, 1).transpose(0, 1)  # (1, N or 1, 1)
        sigma = sigma.reshape(-1, 1, 1).transpose(0, 1)
        locs = self.locs.to(dtype=dtype, device=device)
        evals = self._evals.to(dtype=dtype, device=device).unsqueeze(1)  # (K, 1, D)
        evecs = self._evecs.to(dtype=dtype, device=device)  # (K, D, D)
        logits = self.logits.to(dtype=dtype, device=device)
        c = alpha**2 * evals + sigma**2  # (K, N or 1, D): eigenvalues of C_k
        resid = x.unsqueeze(0) - alpha * locs.unsqueeze(1)  # (K, N, D)
        z = torch.matmul(resid, evecs)  # U_k^T (x - alpha mu_k), as rows
        D = x.shape[-1]
        log_norm = -0.5 * ((z**2 / c).sum(-1) + c.log().sum(-1) + D * math.log(2 * math.pi))  # (K, N)
        prec_resid = torch.matmul(z / c, evecs.transpose(-1, -2))  # (K, N, D)
        return logits.unsqueeze(-1) + log_norm, prec_resid

    def forward(self, x: torch.Tensor, t) -> torch.Tensor:
        r""":math:`\nabla_x \log p_t(x)` for ``x`` of shape ``(N, D)`` (or ``(D,)``)."""
        squeeze = x.dim() == 1
        if squeeze:
            x = x.unsqueeze(0)
        if x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape (N, {self.dim}), got {tuple(x.shape)}")
        log_w, prec_resid = self._components_at(x, t)
        resp = torch.softmax(log_w, dim=0)  # (K, N)
        score = -(resp.unsqueeze(-1) * prec_resid).sum(0)
        return score.squeeze(0) if squeeze else score

    def log_density(self, x: torch.Tensor, t) -> torch.Tensor:
        r""":math:`\log p_t(x)` for ``x`` of shape ``(N, D)``, batched over per-point times."""
        log_w, _ = self._components_at(x, t)
        return log_w.logsumexp(0)

    def marginal(self, t: float = 0.0) -> MixtureSameFamily:
        r"""The exact :math:`p_t` as a ``MixtureSameFamily`` of ``MultivariateNormal`` (event shape ``(D,)``)."""
        t = _as_tensor(float(t), self.locs)
        alpha, sigma = self.sde.marginal(t)
        cov = alpha**2 * (self.scale_tril @ self.scale_tril.transpose(-1, -2))
        cov = cov + sigma**2 * torch.eye(self.dim, dtype=cov.dtype, device=cov.device)
        components = MultivariateNormal(alpha * self.locs, covariance_matrix=cov)
        return MixtureSameFamily(Categorical(logits=self.logits), components)

    def extra_repr(self) -> str:
        return f"sde={self.sde!r}, num_components={self.num_components}, dim={self.dim}"
