r""":class:`DiffusionPosterior`: posterior sampling with a score-based prior by guided reverse diffusion.

For a Pyro model with a :class:`~pyro_scoreflow.ScoreSDEPrior` site :math:`x` and observations
:math:`y`, the posterior's diffused marginals :math:`p_t(x \mid y)` have the score

.. math::

    \nabla_x \log p_t(x \mid y) = \nabla_x \log p_t(x) + \nabla_x \log p_t(y \mid x),
    \qquad p_t(y \mid x_t) = \int p(y \mid x_0)\, p(x_0 \mid x_t)\, dx_0 ,

so the reverse-time SDE of the posterior (Song et al. 2021, Sec. 5) is the prior's with the
score :math:`s_\theta` replaced by :math:`s_\theta + \zeta\,\nabla_x \log \hat p_t(y \mid x)`.
The intractable :math:`p_t(y \mid x_t)` is estimated by DPS or ΠGDM
(:mod:`pyro_scoreflow.infer.guidance`) and :math:`\zeta` is ``guidance_scale`` (1 is the
unscaled posterior score of the approximation). Both approximations are biased: with an exact
prior score they do not sample the exact posterior (see ``docs/posterior.md`` for measured biases).

References:

[1] Y. Song, J. Sohl-Dickstein, D. P. Kingma, A. Kumar, S. Ermon, B. Poole, "Score-Based
    Generative Modeling through Stochastic Differential Equations", ICLR 2021.
[2] H. Chung, J. Kim, M. T. Mccann, M. L. Klasky, J. C. Ye, "Diffusion Posterior Sampling for
    General Noisy Inverse Problems", ICLR 2023.
[3] J. Song, A. Vahdat, M. Mardani, J. Kautz, "Pseudoinverse-Guided Diffusion Models for
    Inverse Problems", ICLR 2023.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from ..checks import ArgumentTypeError, check_choice, check_int, check_interval, check_optional, check_real
from ..distribution import ScoreSDEPrior
from ..dynamics import model_dtype_device
from ..samplers import pc_sample
from .guidance import DPSGuidance, GuidedScoreField, PiGDMGuidance
from .likelihood import ModelLikelihood, ModelSampler
from .linear_gaussian import NotLinearGaussian, linear_gaussian

__all__ = ["DiffusionPosterior", "GUIDANCES"]

GUIDANCES = ("dps", "pigdm", "auto")


class DiffusionPosterior(ModelSampler):
    r"""Approximate posterior samples of a score-prior site by guided reverse-time diffusion.

    The model must contain one latent sample site whose distribution is a
    :class:`~pyro_scoreflow.ScoreSDEPrior` (``site``; found automatically when ``None``) and
    observed sites whose log densities are differentiable in it. The likelihood is read from the
    model itself with :mod:`pyro.poutine`: the model is traced with the prior site conditioned on
    a batch of candidate values under an outer particle plate, so, as for
    ``Trace_ELBO(vectorize_particles=True)``, the model must broadcast over a leading batch
    dimension of the prior site (write ``x @ A.T`` rather than ``A @ x``, ``(x * w).sum(-1)``
    rather than ``x.dot(w)``). The prior site must not be inside a plate.

    **Restriction:** the prior site must be the model's only latent site. Fix any other latent
    site with ``pyro.condition(model, data={...})`` (its log density then counts as an
    observation) before passing the model.

    **Sampler.** Euler–Maruyama in reversed time on a uniform grid of ``num_steps`` steps from
    :math:`T` to :math:`\epsilon` (the prior's SDE), from :math:`x_T \sim` ``sde.prior``:

    .. math::

        x \leftarrow x - [f(x, t) - g(t)^2 S(x, t)]\,\Delta t + g(t)\sqrt{\Delta t}\, z,
        \qquad S = s_\theta(x, t) + \zeta\, \nabla_x \log \hat p_t(y \mid x),

    optionally preceded at each time by ``corrector_steps`` Langevin steps on :math:`S`
    (predictor–corrector sampling, Song et al. 2021, Alg. 5):
    :math:`x \leftarrow x + \delta S + \sqrt{2\delta} z` with
    :math:`\delta = 2 a_t (r \|z\| / \|S\|)^2` (batch-mean norms, ``snr`` :math:`r`,
    :math:`a_t = 1 - \beta(t)\Delta t` for the VP and sub-VP SDEs and 1 for the VE SDE).
    The loop is written here rather than handed to ``torchsde``: the guidance needs a
    vector-Jacobian product through the score model at every step, and the corrector is not an
    SDE step. Like the prior's sampler it returns :math:`x_\epsilon` (plus Tweedie's denoising
    step, with the unguided score, when the prior has ``denoise=True``).

    **Guidance** (``guidance``), with Tweedie's :math:`\hat x_0 = (x_t + \sigma_t^2 s_\theta)/\alpha_t`:

    * ``"dps"`` (Chung et al. 2023): :math:`\nabla_{x_t} \log p(y \mid \hat x_0(x_t))`, the model's
      own likelihood at :math:`\hat x_0`, any differentiable likelihood. Chung et al.'s image
      experiments instead step by :math:`\zeta' / \|y - A\hat x_0\|` times
      :math:`\nabla \|y - A \hat x_0\|^2`, a step-size-dependent normalisation tuned per task;
      this class uses the unnormalised posterior score, which needs no tuning
      (``guidance_scale=1``) and converges as ``num_steps`` grows.
    * ``"pigdm"`` (Song et al. 2023): every observed site must be ``Normal`` or
      ``MultivariateNormal`` with a mean affine in :math:`x` and a noise scale independent of
      :math:`x` (checked numerically; ``ValueError`` otherwise). Then
      :math:`\log p(y \mid x_t) \approx \log \mathcal N(y;\, A \hat x_0 + b,\, \Sigma_y + r_t^2 A A^\top)`,
      :math:`r_t^2 = d^2\sigma_t^2/(\alpha_t^2 d^2 + \sigma_t^2)` with ``data_std`` :math:`d`,
      differentiated exactly through :math:`\hat x_0`.
    * ``"auto"``: ``"pigdm"`` when the observations are linear-Gaussian, else ``"dps"``
      (:attr:`method` says which ran).

    **Trust region** (``guidance_clip`` :math:`\kappa`, default 3): the guidance term
    :math:`\zeta\nabla_x\log\hat p_t(y \mid x)` of each particle is scaled down to norm at most
    :math:`\kappa\sqrt{D}/\sigma_t` (:math:`D` the event size). The exact
    :math:`\nabla\log p_t(y \mid x) = \nabla\log p_t(x \mid y) - \nabla\log p_t(x)` has a norm of
    order :math:`\sqrt{D}/\sigma_t` at points typical of :math:`p_t(x \mid y)`, whose spread is at
    least :math:`\sigma_t`, so the cap leaves it alone (on the exact-score test problems it changes
    nothing measurable). A *learned* score's error is amplified by :math:`1/\alpha_t` in
    :math:`\hat x_0` (:math:`\alpha_T \approx 0.0066` for the default VP SDE) and more in its
    Jacobian: without the cap, particles in the tails of :math:`x_T` receive guidance of order
    :math:`10^3` at the first steps and diverge (measured with the shipped ``"moons"`` prior).

    Each step costs one score evaluation and one vector-Jacobian product through the score model
    (plus one trace of the model for ``"dps"``) per particle, and as many again per corrector step.

    :param callable model: a Pyro model.
    :param int num_samples: number of posterior draws.
    :param str guidance: ``"dps"``, ``"pigdm"`` or ``"auto"``.
    :param str site: the name of the ``ScoreSDEPrior`` site; the only one when ``None``.
    :param int num_steps: Euler–Maruyama steps; the prior's ``num_steps`` when ``None``.
    :param float guidance_scale: :math:`\zeta \ge 0`; 0 samples the prior.
    :param clip_denoised: ``(low, high)``: clamp the Tweedie estimate :math:`\hat x_0` into the data's
        range (e.g. ``(-1, 1)`` for the digits prior), which tames a learned score's errors near
        :math:`T`, where :math:`\hat x_0` divides them by :math:`\alpha_T \approx 0.0066`.
    :param float guidance_clip: :math:`\kappa`: cap the guidance term's norm per particle at
        :math:`\kappa\sqrt{D}/\sigma_t`; ``None`` disables the cap.
    :param int corrector_steps: Langevin corrector steps per time step.
    :param float snr: the corrector's signal-to-noise ratio :math:`r` (0.16, Song et al.'s default).
    :param int batch_size: particles integrated together (bounds memory); all at once when ``None``.
    :param bool progress: show a progress bar over time steps.
    :param float data_std: :math:`d` in ΠGDM's :math:`r_t^2` (the data's per-coordinate scale).
    :param int max_plate_nesting: the model's plate nesting; guessed from a trace when ``None``.
    """

    def __init__(
        self,
        model: Callable,
        num_samples: int,
        guidance: str = "dps",
        site: str | None = None,
        *,
        num_steps: int | None = None,
        guidance_scale: float = 1.0,
        guidance_clip: float | None = 3.0,
        clip_denoised: tuple[float, float] | None = None,
        corrector_steps: int = 0,
        snr: float = 0.16,
        batch_size: int | None = None,
        progress: bool = False,
        data_std: float = 1.0,
        max_plate_nesting: int | None = None,
    ):
        if not callable(model):
            raise ArgumentTypeError(f"model must be a callable Pyro model, got {type(model).__name__}")
        self.model = model
        self.num_samples = check_int("num_samples", num_samples)
        self.guidance = check_choice("guidance", guidance, GUIDANCES)
        if site is not None and not isinstance(site, str):
            raise ArgumentTypeError(f"site must be a site name (str) or None, got {type(site).__name__}")
        self.site = site
        self.num_steps = check_optional(check_int, "num_steps", num_steps)
        self.guidance_scale = check_real("guidance_scale", guidance_scale, nonnegative=True)
        self.guidance_clip = check_optional(check_real, "guidance_clip", guidance_clip, positive=True)
        self.clip_denoised = check_optional(check_interval, "clip_denoised", clip_denoised)
        self.corrector_steps = check_int("corrector_steps", corrector_steps, minimum=0)
        self.snr = check_real("snr", snr, positive=True)
        self.batch_size = check_optional(check_int, "batch_size", batch_size)
        self.progress = bool(progress)
        self.data_std = check_real("data_std", data_std, positive=True)
        self.max_plate_nesting = check_optional(check_int, "max_plate_nesting", max_plate_nesting, minimum=0)
        self.method: str | None = None
        self.nfe: int = 0
        self.wall_time: float = 0.0
        self._samples: dict[str, torch.Tensor] | None = None

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_samples={self.num_samples}, guidance={self.guidance!r}, site={self.site!r}, "
            f"num_steps={self.num_steps}, guidance_scale={self.guidance_scale}, guidance_clip={self.guidance_clip}, "
            f"corrector_steps={self.corrector_steps})"
        )

    # -- public -----------------------------------------------------------------------------
    def _sample(self, likelihood: ModelLikelihood) -> torch.Tensor:
        prior = likelihood.prior
        guidance, self.method = self._make_guidance(likelihood)
        num_steps = prior.num_steps if self.num_steps is None else self.num_steps
        chunk = self.num_samples if self.batch_size is None else self.batch_size
        draws, fields = [], []
        with torch.no_grad():
            for lo in range(0, self.num_samples, chunk):
                n = min(chunk, self.num_samples - lo)
                x, field = self._sample_chunk(prior, guidance, n, num_steps)
                draws.append(x)
                fields.append(field)
        self._warn_if_unguided(fields)
        self.nfe = num_steps * (1 + self.corrector_steps) + int(prior.denoise)
        return torch.cat(draws).reshape((self.num_samples,) + tuple(prior.event_shape))

    # -- internals ----------------------------------------------------------------------------
    def _make_guidance(self, likelihood: ModelLikelihood):
        if self.guidance == "dps":
            return DPSGuidance(likelihood), "dps"
        try:
            observation = linear_gaussian(likelihood)
        except NotLinearGaussian as err:
            if self.guidance == "auto":
                return DPSGuidance(likelihood), "dps"
            raise ValueError(f"guidance='pigdm' needs linear-Gaussian observations: {err}; use guidance='dps'") from err
        return PiGDMGuidance(observation, self.data_std), "pigdm"

    def _sample_chunk(self, prior: ScoreSDEPrior, guidance, n: int, num_steps: int):
        dtype, device = model_dtype_device(prior.score_model)
        x = prior.sde.prior((prior.event_dim_size,), dtype=dtype, device=device).sample((n,))
        field = GuidedScoreField(
            prior._score_field(torch.Size([n]), dtype, device), guidance, self.guidance_scale, self.guidance_clip,
            self.clip_denoised,
        )  # fmt: skip
        x = pc_sample(
            field, x, num_steps=num_steps, corrector_steps=self.corrector_steps, snr=self.snr,
            predictor="euler-maruyama", progress=self.progress,
        )  # fmt: skip
        if prior.denoise:  # Tweedie's step with the unguided score
            t = torch.tensor(prior.sde.eps, dtype=x.dtype, device=x.device)
            x = prior.sde.denoise(x, field.prior_score(x, t), t)
        return x, field

    def _warn_if_unguided(self, fields: list[GuidedScoreField]) -> None:
        """Say so when the samples are prior draws in disguise: no guidance gradient, or a clip active throughout."""
        calls = sum(f.guided_calls for f in fields)
        if calls == 0:
            return
        if sum(f.zero_gradient_calls for f in fields) == calls:
            warnings.warn(
                "DiffusionPosterior: the likelihood's gradient with respect to the prior site was zero at every "
                "step (observations that do not depend on it, or a detached likelihood): the samples are prior "
                "draws",
                RuntimeWarning,
                stacklevel=3,
            )
        elif sum(f.clipped_calls for f in fields) == calls:
            warnings.warn(
                f"DiffusionPosterior: guidance_clip={self.guidance_clip} capped the guidance of most particles at "
                "every step (a very small observation noise?), so the samples under-weight the observations; raise "
                "guidance_clip (or pass None), raise num_steps, or use DiffusionSMC",
                RuntimeWarning,
                stacklevel=3,
            )
