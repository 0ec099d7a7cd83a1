r"""Estimates of the likelihood :math:`\log p(y \mid x_t)` of a noisy state, for guided diffusion.

Both rest on Tweedie's formula for the posterior mean of the clean value,

.. math::

    \hat x_0(x_t) = E[x_0 \mid x_t] = \frac{x_t + \sigma_t^2\, s(x_t, t)}{\alpha_t},

with :math:`x_t \mid x_0 \sim \mathcal N(\alpha_t x_0, \sigma_t^2 I)`, and are differentiated with
respect to :math:`x_t` through :math:`\hat x_0` (hence through the score model) by autograd.

* :class:`DPSGuidance` (Chung et al. 2023): :math:`\log p(y \mid x_t) \approx \log p(y \mid \hat x_0(x_t))`,
  any differentiable likelihood, read from the Pyro model.
* :class:`PiGDMGuidance` (Song et al. 2023): for :math:`y = A x_0 + b + \epsilon`,
  :math:`\epsilon \sim \mathcal N(0, \Sigma_y)`, the Gaussian approximation
  :math:`p(x_0 \mid x_t) \approx \mathcal N(\hat x_0, r_t^2 I)` gives
  :math:`p(y \mid x_t) \approx \mathcal N(y;\ A \hat x_0 + b,\ \Sigma_y + r_t^2 A A^\top)`.

References:

[1] H. Chung, J. Kim, M. T. Mccann, M. L. Klasky, J. C. Ye, "Diffusion Posterior Sampling for
    General Noisy Inverse Problems", ICLR 2023.
[2] J. Song, A. Vahdat, M. Mardani, J. Kautz, "Pseudoinverse-Guided Diffusion Models for
    Inverse Problems", ICLR 2023.
"""

from __future__ import annotations

import torch

from ._model import LinearGaussian, ModelLikelihood

__all__ = ["DPSGuidance", "PiGDMGuidance"]


class DPSGuidance:
    r"""Diffusion posterior sampling: :math:`\log p(y \mid x_t) \approx \log p(y \mid \hat x_0(x_t))`.

    The plug-in estimate ignores the spread of :math:`p(x_0 \mid x_t)`, so it is over-confident
    at large :math:`t` (where :math:`\hat x_0` is close to the prior mean); its gradient is
    nevertheless small there because :math:`\partial \hat x_0 / \partial x_t = \alpha_t
    \operatorname{Cov}[x_0 \mid x_t] / \sigma_t^2` is.

    :param ModelLikelihood likelihood: the model's :math:`\log p(y \mid x)`.
    """

    def __init__(self, likelihood: ModelLikelihood):
        self.likelihood = likelihood

    def __call__(self, x0: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """:math:`\\log p(y \\mid \\hat x_0)` per row of ``x0`` ``(B, *event_shape)``: ``(B,)``."""
        return self.likelihood.log_likelihood(x0)


class PiGDMGuidance:
    r"""Pseudoinverse-guided (:math:`\Pi`\ GDM) likelihood for linear-Gaussian observations.

    In whitened coordinates (:math:`\Sigma_y = I`, :class:`~pyro_scoreflow.infer._model.LinearGaussian`),

    .. math::

        \log p(y \mid x_t) \approx -\tfrac12 e^\top (I + r_t^2 A A^\top)^{-1} e + \text{const},
        \qquad e = y - A \hat x_0(x_t) - b,

    evaluated with the thin SVD :math:`A = U \operatorname{diag}(s) V^\top` computed once:
    :math:`e^\top (I + r^2 A A^\top)^{-1} e = \|e\|^2 - \sum_k \frac{r^2 s_k^2}{1 + r^2 s_k^2} (u_k^\top e)^2`.
    The variance of :math:`p(x_0 \mid x_t)` is that of data :math:`\mathcal N(0, d^2 I)` diffused
    to time :math:`t`,

    .. math::

        r_t^2 = \frac{d^2 \sigma_t^2}{\alpha_t^2 d^2 + \sigma_t^2},

    which for :math:`d = 1` (``data_std``, the default) is ΠGDM's
    :math:`r_t^2 = \sigma_t^2 / (1 + \sigma_t^2)` in the variance-exploding parameterisation.
    The constant (the log-determinant) does not depend on :math:`x_t`, so it is dropped.

    :param LinearGaussian observation: whitened :math:`A, b, y`.
    :param float data_std: the assumed per-coordinate standard deviation of the data.
    """

    def __init__(self, observation: LinearGaussian, data_std: float = 1.0):
        self.matrix = observation.matrix
        self.target = observation.value - observation.offset
        u, s, _ = torch.linalg.svd(self.matrix, full_matrices=False)
        self.u, self.s2 = u, s**2
        self.data_var = float(data_std) ** 2

    def variance(self, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        r""":math:`r_t^2 = d^2\sigma_t^2 / (\alpha_t^2 d^2 + \sigma_t^2)`."""
        return self.data_var * sigma**2 / (alpha**2 * self.data_var + sigma**2)

    def __call__(self, x0: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        r"""The approximate :math:`\log p(y \mid x_t)` (up to a constant) per row of ``x0``: ``(B,)``."""
        flat = x0.reshape(x0.shape[0], -1).to(self.matrix.dtype)
        e = self.target - flat @ self.matrix.T  # (B, M)
        r2 = self.variance(alpha, sigma).to(self.matrix.dtype)
        shrink = r2 * self.s2 / (1 + r2 * self.s2)
        quad = (e**2).sum(-1) - ((e @ self.u) ** 2 * shrink).sum(-1)
        return -0.5 * quad
