r"""Forward SDEs :math:`dx = f(x, t)\,dt + g(t)\,dw` on :math:`[\epsilon, T]`.

Each SDE is linear in :math:`x`, so :math:`x_t \mid x_0 \sim
\mathcal{N}(\alpha(t) x_0, \sigma(t)^2 I)`; :meth:`ForwardSDE.marginal` returns
:math:`(\alpha(t), \sigma(t))`. All formulas follow Song et al. (2021).

Times are accepted as Python floats, 0-d tensors or tensors of shape ``(N,)``
(one time per batch element); :meth:`ForwardSDE.drift` broadcasts them over
the trailing dimensions of ``x``.

References:

[1] Y. Song, J. Sohl-Dickstein, D. P. Kingma, A. Kumar, S. Ermon, B. Poole,
    "Score-Based Generative Modeling through Stochastic Differential
    Equations", ICLR 2021.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from pyro.distributions import Normal
from pyro.distributions.torch_distribution import TorchDistribution

from .checks import check_real

__all__ = ["ForwardSDE", "VPSDE", "SubVPSDE", "VESDE", "sde_from_config"]


def _as_tensor(t, like: torch.Tensor | None = None) -> torch.Tensor:
    if isinstance(t, torch.Tensor):
        if like is not None and (t.dtype != like.dtype or t.device != like.device):
            t = t.to(dtype=like.dtype, device=like.device)
        return t
    if like is not None:
        return torch.as_tensor(t, dtype=like.dtype, device=like.device)
    return torch.as_tensor(t, dtype=torch.get_default_dtype())


def _broadcast_time(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape ``t`` (0-d or ``(N,)``) so it broadcasts against ``x`` of shape ``(N, ...)``."""
    if t.dim() == 0:
        return t
    return t.reshape(t.shape + (1,) * (x.dim() - t.dim()))


class ForwardSDE:
    r"""Base class of the linear forward SDEs :math:`dx = f(t) x\,dt + g(t)\,dw`.

    Subclasses implement :meth:`drift_coeff` (:math:`f(t)` with
    :math:`f(x, t) = f(t) x`), :meth:`diffusion`, :meth:`marginal` and
    :meth:`prior_std`.

    :param float T: end time of the forward process.
    :param float eps: start time; the model's data distribution is
        :math:`p_\epsilon`, the smallest time solvers integrate to.
    """

    def __init__(self, T: float = 1.0, eps: float = 1e-5):
        self.T = check_real("T", T, positive=True)
        self.eps = check_real("eps", eps, positive=True)
        if self.eps >= self.T:
            raise ValueError(f"eps must be smaller than T, got eps={self.eps} and T={self.T}")

    # -- to implement -----------------------------------------------------
    def drift_coeff(self, t):  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} must implement drift_coeff(t)")

    def diffusion(self, t):  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} must implement diffusion(t)")

    def marginal(self, t):  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} must implement marginal(t)")

    def prior_std(self) -> float:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} must implement prior_std()")

    def inverse_log_snr(self, lam: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        r"""The time :math:`t` with :math:`\lambda(t) =` ``lam`` (closed form), see :meth:`log_snr`."""
        raise NotImplementedError(f"{type(self).__name__} must implement inverse_log_snr(lam)")

    # -- shared -----------------------------------------------------------
    def drift(self, x: torch.Tensor, t) -> torch.Tensor:
        r""":math:`f(x, t)`, shaped like ``x``; ``t`` is a scalar or of shape ``x.shape[:1]``."""
        t = _as_tensor(t, x)
        return _broadcast_time(self.drift_coeff(t), x) * x

    def clamp_time(self, t):
        r"""Clamp ``t`` into :math:`[\epsilon, T]` (adaptive solvers probe outside it)."""
        if isinstance(t, torch.Tensor):
            return t.clamp(self.eps, self.T)
        return min(max(float(t), self.eps), self.T)

    def log_snr(self, t) -> torch.Tensor:
        r"""The half log signal-to-noise ratio :math:`\lambda(t) = \log\alpha(t) - \log\sigma(t)`, decreasing in
        :math:`t`; the one convention of the package (the log-SNR :math:`\log(\alpha^2/\sigma^2)` of
        Kingma et al. 2021 is :math:`2\lambda`). :meth:`inverse_log_snr` inverts it in closed form."""
        alpha, sigma = self.marginal(_as_tensor(t))
        return torch.log(alpha) - torch.log(sigma)

    def denoise(self, x: torch.Tensor, score: torch.Tensor, t) -> torch.Tensor:
        r"""Tweedie's formula :math:`E[x_0 \mid x_t] = (x_t + \sigma_t^2\, \nabla\log p_t(x_t))/\alpha_t`.

        ``x`` and ``score`` are ``(N, ...)``; ``t`` a scalar or ``(N,)``."""
        alpha, sigma = self.marginal(_as_tensor(t, x))
        alpha, sigma = _broadcast_time(alpha, x), _broadcast_time(sigma, x)
        return (x + sigma**2 * score) / alpha

    def score_from_denoised(self, x: torch.Tensor, x0: torch.Tensor, t) -> torch.Tensor:
        r"""The score whose Tweedie estimate is ``x0``: :math:`(\alpha_t \hat x_0 - x_t)/\sigma_t^2`
        (inverse of :meth:`denoise`)."""
        alpha, sigma = self.marginal(_as_tensor(t, x))
        alpha, sigma = _broadcast_time(alpha, x), _broadcast_time(sigma, x)
        return (alpha * x0 - x) / sigma**2

    def transition(self, s, t) -> tuple[torch.Tensor, torch.Tensor]:
        r"""The exact transition from time ``s`` to ``t > s``: :math:`x_t \mid x_s \sim
        \mathcal N(a\,x_s, v^2 I)` with :math:`a = \alpha_t/\alpha_s` and :math:`v^2 = \sigma_t^2 - a^2\sigma_s^2`.

        Returns ``(a, v)``. It is the discretisation of the SDE used by the reverse-diffusion predictor
        and the transition density of sequential Monte Carlo."""
        alpha_s, sigma_s = self.marginal(_as_tensor(s))
        alpha_t, sigma_t = self.marginal(_as_tensor(t, alpha_s))
        a = alpha_t / alpha_s
        return a, (sigma_t**2 - a**2 * sigma_s**2).clamp_min(0).sqrt()

    def corrector_step_factor(self, t, dt) -> torch.Tensor:
        r"""The factor :math:`a_t` of the Langevin corrector's step size :math:`2 a_t (r\|z\|/\|s\|)^2`
        (Song et al. 2021, Alg. 5): :math:`1 - \beta(t)\,\Delta t` (clamped at 0) for the VP and sub-VP
        SDEs, 1 for the VE SDE."""
        return torch.ones_like(_as_tensor(t))

    def prior_log_prob(self, x: torch.Tensor, event_dim: int = 1) -> torch.Tensor:
        r""":math:`\log \mathcal N(x; 0, \sigma_T^2 I)` of the prior, summed over the last ``event_dim`` dimensions."""
        std = self.prior_std()
        d = math.prod(x.shape[x.dim() - event_dim :])
        sq = x.pow(2).flatten(x.dim() - event_dim).sum(-1) if event_dim else x.pow(2)
        return -0.5 * sq / std**2 - d * (math.log(std) + 0.5 * math.log(2 * math.pi))

    def prior(self, event_shape: Sequence[int] = (), *, dtype=None, device=None) -> TorchDistribution:
        r"""The reference distribution of :math:`x_T`: :math:`\mathcal{N}(0, \sigma_T^2 I)`.

        Batch shape ``()``, event shape ``event_shape``.
        """
        event_shape = torch.Size(event_shape)
        dtype = dtype or torch.get_default_dtype()
        loc = torch.zeros((), dtype=dtype, device=device)
        scale = torch.full((), self.prior_std(), dtype=dtype, device=device)
        return Normal(loc, scale).expand(event_shape).to_event(len(event_shape))

    def _params(self) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} must implement _params()")

    def config(self) -> dict:
        """A JSON-serialisable description, ``type(sde)(**config['params'])`` rebuilds it."""
        return {"type": type(self).__name__, "params": self._params()}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._params().items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and self._params() == other._params()

    def __hash__(self) -> int:
        return hash((type(self).__name__, tuple(sorted(self._params().items()))))


#: beyond this B(T) the signal is gone long before T (alpha(T) = exp(-B/2) < 1e-43): refuse such an SDE
_MAX_INTEGRATED_BETA = 200.0


class _BetaSchedule(ForwardSDE):
    r"""Shared linear schedule :math:`\beta(t) = \beta_0 + t(\beta_1 - \beta_0)`."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, T: float = 1.0, eps: float = 1e-5):
        super().__init__(T=T, eps=eps)
        self.beta_min = check_real("beta_min", beta_min, positive=True)
        self.beta_max = check_real("beta_max", beta_max, positive=True)
        if self.beta_max < self.beta_min:
            raise ValueError(f"beta_max must be >= beta_min, got beta_max={self.beta_max} and beta_min={self.beta_min}")
        total = float(self.integrated_beta(torch.tensor(self.T, dtype=torch.float64)))
        if total > _MAX_INTEGRATED_BETA:
            raise ValueError(
                f"T={self.T:g} is too large for beta_min={self.beta_min:g}, beta_max={self.beta_max:g}: the noise "
                f"integrated up to T is B(T) = {total:.3g} > {_MAX_INTEGRATED_BETA} (alpha(T) = exp(-B/2) would "
                "underflow and the probability-flow ODE would need millions of steps); the schedule is made for "
                "T of order 1"
            )

    def beta(self, t: torch.Tensor) -> torch.Tensor:
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def integrated_beta(self, t: torch.Tensor) -> torch.Tensor:
        r""":math:`B(t) = \int_0^t \beta(s)\,ds = \beta_0 t + \tfrac12 t^2 (\beta_1 - \beta_0)`."""
        return self.beta_min * t + 0.5 * t**2 * (self.beta_max - self.beta_min)

    def drift_coeff(self, t):
        return -0.5 * self.beta(_as_tensor(t))

    def time_of_integrated_beta(self, b: torch.Tensor) -> torch.Tensor:
        r"""The inverse of :math:`B(t)`: :math:`t = 2B / (\beta_0 + \sqrt{\beta_0^2 + 2(\beta_1 - \beta_0) B})`
        (the stable root of the quadratic)."""
        return 2 * b / (self.beta_min + (self.beta_min**2 + 2 * (self.beta_max - self.beta_min) * b).sqrt())

    def corrector_step_factor(self, t, dt) -> torch.Tensor:
        return (1 - self.beta(_as_tensor(t)) * dt).clamp_min(0)

    def _params(self) -> dict:
        return {"beta_min": self.beta_min, "beta_max": self.beta_max, "T": self.T, "eps": self.eps}


class VPSDE(_BetaSchedule):
    r"""Variance-preserving SDE (the continuous DDPM):

    .. math::

        dx = -\tfrac12 \beta(t) x\,dt + \sqrt{\beta(t)}\,dw, \qquad
        \alpha(t) = e^{-B(t)/2}, \quad \sigma(t)^2 = 1 - e^{-B(t)},

    with :math:`\beta(t) = \beta_0 + t(\beta_1 - \beta_0)` and
    :math:`B(t) = \int_0^t \beta`. Prior :math:`\mathcal{N}(0, I)`.
    """

    def diffusion(self, t):
        return self.beta(_as_tensor(t)).sqrt()

    def marginal(self, t):
        b = self.integrated_beta(_as_tensor(t))
        return torch.exp(-0.5 * b), (-torch.expm1(-b)).sqrt()

    def inverse_log_snr(self, lam: torch.Tensor) -> torch.Tensor:
        r""":math:`e^{-2\lambda} = \sigma^2/\alpha^2 = e^{B} - 1`, so :math:`B = \log(1 + e^{-2\lambda})`."""
        return self.time_of_integrated_beta(torch.nn.functional.softplus(-2 * _as_tensor(lam)))

    def prior_std(self) -> float:
        return 1.0


class SubVPSDE(_BetaSchedule):
    r"""Sub-variance-preserving SDE:

    .. math::

        dx = -\tfrac12 \beta(t) x\,dt + \sqrt{\beta(t)\,(1 - e^{-2B(t)})}\,dw, \qquad
        \alpha(t) = e^{-B(t)/2}, \quad \sigma(t) = 1 - e^{-B(t)}.

    Its variance is below the VP SDE's at every time. Prior :math:`\mathcal{N}(0, I)`.
    """

    def diffusion(self, t):
        t = _as_tensor(t)
        return (self.beta(t) * -torch.expm1(-2.0 * self.integrated_beta(t))).sqrt()

    def marginal(self, t):
        b = self.integrated_beta(_as_tensor(t))
        return torch.exp(-0.5 * b), -torch.expm1(-b)

    def inverse_log_snr(self, lam: torch.Tensor) -> torch.Tensor:
        r""":math:`e^{-\lambda} = \sigma/\alpha = 2\sinh(B/2)`, so :math:`B = 2\operatorname{asinh}(e^{-\lambda}/2)`."""
        return self.time_of_integrated_beta(2 * torch.asinh(0.5 * torch.exp(-_as_tensor(lam))))

    def prior_std(self) -> float:
        return 1.0


class VESDE(ForwardSDE):
    r"""Variance-exploding SDE (continuous SMLD / NCSN):

    .. math::

        \sigma_*(t) = \sigma_{min} (\sigma_{max}/\sigma_{min})^t, \qquad
        dx = \sigma_*(t) \sqrt{2 \log(\sigma_{max}/\sigma_{min})}\,dw.

    **Marginal convention**: this class uses the *exact* transition of the SDE,
    :math:`\alpha(t) = 1` and :math:`\sigma(t)^2 = \sigma_*(t)^2 - \sigma_{min}^2`
    (so :math:`\sigma(0) = 0`), not score_sde's :math:`\sigma_*(t)^2`.
    :class:`~pyro_scoreflow.GaussianMixtureScore` uses the same convention, so the
    exact score is consistent with the SDE's drift and diffusion. The prior is
    :math:`\mathcal{N}(0, \sigma(T)^2 I)`.
    """

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, T: float = 1.0, eps: float = 1e-5):
        super().__init__(T=T, eps=eps)
        self.sigma_min = check_real("sigma_min", sigma_min, positive=True)
        self.sigma_max = check_real("sigma_max", sigma_max, positive=True)
        if self.sigma_max <= self.sigma_min:
            raise ValueError(
                f"sigma_max must be > sigma_min, got sigma_max={self.sigma_max} and sigma_min={self.sigma_min}"
            )
        self._log_ratio = math.log(self.sigma_max / self.sigma_min)

    def sigma(self, t) -> torch.Tensor:
        r""":math:`\sigma_*(t) = \sigma_{min} (\sigma_{max}/\sigma_{min})^{t/T}`."""
        return self.sigma_min * torch.exp(_as_tensor(t) / self.T * self._log_ratio)

    def drift_coeff(self, t):
        return torch.zeros_like(_as_tensor(t))

    def drift(self, x: torch.Tensor, t) -> torch.Tensor:
        return torch.zeros_like(x)

    def diffusion(self, t):
        return self.sigma(t) * math.sqrt(2.0 * self._log_ratio / self.T)

    def marginal(self, t):
        t = _as_tensor(t)
        # sigma_*(t)^2 - sigma_min^2 = sigma_min^2 * expm1(2 t log r / T), accurate as t -> 0
        std = self.sigma_min * torch.expm1(2.0 * t / self.T * self._log_ratio).sqrt()
        return torch.ones_like(t), std

    def inverse_log_snr(self, lam: torch.Tensor) -> torch.Tensor:
        r""":math:`\sigma^2 = e^{-2\lambda} = \sigma_{min}^2 \operatorname{expm1}(2tL/T)` with
        :math:`L = \log(\sigma_{max}/\sigma_{min})`, so
        :math:`t = \tfrac{T}{2L}\log(1 + e^{-2\lambda}/\sigma_{min}^2)`."""
        lam = _as_tensor(lam)
        return self.T / (2 * self._log_ratio) * torch.nn.functional.softplus(-2 * lam - 2 * math.log(self.sigma_min))

    def prior_std(self) -> float:
        return math.sqrt(self.sigma_max**2 - self.sigma_min**2)

    def _params(self) -> dict:
        return {"sigma_min": self.sigma_min, "sigma_max": self.sigma_max, "T": self.T, "eps": self.eps}


SDE_TYPES = {cls.__name__: cls for cls in (VPSDE, SubVPSDE, VESDE)}


def sde_from_config(config: dict) -> ForwardSDE:
    """Rebuild an SDE from :meth:`ForwardSDE.config`."""
    try:
        cls = SDE_TYPES[config["type"]]
    except KeyError as err:
        raise ValueError(f"unknown SDE type {config.get('type')!r}; expected one of {sorted(SDE_TYPES)}") from err
    return cls(**config["params"])
