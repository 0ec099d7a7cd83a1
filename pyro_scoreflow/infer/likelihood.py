r"""Reading a Pyro model: find its score-prior site and evaluate its likelihood for a batch of values.

The model is traced once with every :class:`~pyro_scoreflow.ScoreSDEPrior` site
stubbed (given a zero value, so no sampler runs) to find the sites. After that,
:math:`\log p(y \mid x)` for a batch of ``B`` candidate values of the prior site
is one trace of the model under an outer ``pyro.plate`` of size ``B`` (the
particle plate, left of the model's own plates, as in
:func:`pyro.infer.importance.vectorized_importance_weights`) with the prior site
conditioned on the batch: the model must broadcast over a leading batch
dimension of its prior site, exactly as ``vectorize_particles=True`` requires.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pyro
import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from ..distribution import ScoreSDEPrior
from ..dynamics import model_dtype_device

__all__ = ["ModelLikelihood", "ModelSampler", "unwrap_score_prior"]

PARTICLE_PLATE = "_diffusion_posterior_particles"


def unwrap_score_prior(fn) -> ScoreSDEPrior | None:
    """The :class:`ScoreSDEPrior` inside ``fn`` (through ``base_dist`` wrappers), or ``None``."""
    for _ in range(16):
        if isinstance(fn, ScoreSDEPrior):
            return fn
        fn = getattr(fn, "base_dist", None)
        if fn is None:
            return None
    return None


def _has_no_density(node: dict) -> bool:
    """Deterministic sites and plates' subsample sites: no density to sample or to count."""
    return bool(node.get("infer", {}).get("_deterministic", False)) or site_is_subsample(node)


class _StubScorePriors(Messenger):
    """Give every unobserved ``ScoreSDEPrior`` site a zero value, so tracing the model never samples it."""

    def _pyro_sample(self, msg) -> None:
        if msg["value"] is not None or msg["is_observed"]:
            return
        prior = unwrap_score_prior(msg["fn"])
        if prior is None:
            return
        dtype, device = model_dtype_device(prior.score_model)
        msg["value"] = torch.zeros(msg["fn"].shape(), dtype=dtype, device=device)


def _guess_max_plate_nesting(trace) -> int:
    dims = [
        -frame.dim
        for node in trace.nodes.values()
        if node["type"] == "sample"
        for frame in node["cond_indep_stack"]
        if frame.vectorized and frame.dim is not None
    ]
    return max(dims, default=0)


class ModelLikelihood:
    r"""The likelihood :math:`\log p(y \mid x)` of a Pyro model, as a function of its prior site ``x``.

    :param callable model: the Pyro model.
    :param tuple args: its positional arguments.
    :param dict kwargs: its keyword arguments.
    :param str site: the :class:`ScoreSDEPrior` site, or ``None`` for the only one.
    :param int max_plate_nesting: the model's plate nesting; guessed from a trace when ``None``.
    :raises ValueError: if there is no such site, several and ``site`` is ``None``, the named site is
        not a ``ScoreSDEPrior``, it is batched (inside a plate), or the model has other latent sites.
    """

    def __init__(
        self,
        model: Callable,
        args: tuple = (),
        kwargs: dict | None = None,
        site: str | None = None,
        max_plate_nesting: int | None = None,
    ):
        self.model = model
        self.args = tuple(args)
        self.kwargs = dict(kwargs or {})
        trace = poutine.trace(_StubScorePriors()(model)).get_trace(*self.args, **self.kwargs)
        self.site = self._find_site(trace, site)
        node = trace.nodes[self.site]
        self.prior: ScoreSDEPrior = unwrap_score_prior(node["fn"])
        fn = node["fn"]
        if fn.batch_shape != torch.Size() or fn.event_shape != self.prior.event_shape:
            raise ValueError(
                f"site {self.site!r} must be a single draw of its ScoreSDEPrior (batch shape (), event shape "
                f"{tuple(self.prior.event_shape)}), got batch shape {tuple(fn.batch_shape)} and event shape "
                f"{tuple(fn.event_shape)}: keep it outside plates and do not expand or reinterpret it"
            )
        others = [
            name
            for name, n in trace.nodes.items()
            if n["type"] == "sample" and not n["is_observed"] and name != self.site and not _has_no_density(n)
        ]
        if others:
            raise ValueError(
                f"the model has latent sites other than {self.site!r}: {others}; DiffusionPosterior samples one "
                "score-prior site given observations. Fix the others with pyro.condition(model, data={...}) "
                "(they then count as observations) or observe them"
            )
        self.observed = [
            name
            for name, n in trace.nodes.items()
            if n["type"] == "sample" and n["is_observed"] and name != self.site and not _has_no_density(n)
        ]
        if max_plate_nesting is None:
            max_plate_nesting = _guess_max_plate_nesting(trace)
        self.max_plate_nesting = int(max_plate_nesting)
        self.event_shape = self.prior.event_shape
        self.dtype, self.device = model_dtype_device(self.prior.score_model)

    @staticmethod
    def _find_site(trace, site: str | None) -> str:
        candidates = [
            name
            for name, n in trace.nodes.items()
            if n["type"] == "sample" and not n["is_observed"] and unwrap_score_prior(n["fn"]) is not None
        ]
        if site is None:
            if not candidates:
                raise ValueError("site=None, but the model has no latent sample site with a ScoreSDEPrior distribution")
            if len(candidates) > 1:
                raise ValueError(f"site=None, but the model has several ScoreSDEPrior sites {candidates}: pass site=")
            return candidates[0]
        if not isinstance(site, str):
            raise TypeError(f"site must be a site name (str) or None, got {type(site).__name__}")
        samples = [name for name, n in trace.nodes.items() if n["type"] == "sample" and not site_is_subsample(n)]
        if site not in samples:
            raise ValueError(f"site={site!r} is not a sample site of the model; its sample sites are {samples}")
        node = trace.nodes[site]
        if node["is_observed"]:
            raise ValueError(f"site={site!r} is observed; it must be the latent ScoreSDEPrior site")
        if unwrap_score_prior(node["fn"]) is None:
            raise ValueError(
                f"site={site!r} has distribution {type(node['fn']).__name__}, not a ScoreSDEPrior"
                + (f"; the ScoreSDEPrior sites are {candidates}" if candidates else "")
            )
        return site

    # -- vectorised evaluation ---------------------------------------------------------------
    def trace(self, x: torch.Tensor):
        """Trace the model with the prior site conditioned on ``x`` ``(B, *event_shape)``, under a particle plate."""
        b = x.shape[0]
        mpn = self.max_plate_nesting
        value = x.reshape((b,) + (1,) * mpn + tuple(self.event_shape))
        model = self.model

        def vectorized(*args, **kwargs):
            with pyro.plate(PARTICLE_PLATE, b, dim=-(mpn + 1)):
                return model(*args, **kwargs)

        trace = poutine.trace(poutine.condition(vectorized, data={self.site: value})).get_trace(
            *self.args, **self.kwargs
        )
        latent = [
            name
            for name, n in trace.nodes.items()
            if n["type"] == "sample" and not n["is_observed"] and not _has_no_density(n)
        ]
        if latent:
            raise ValueError(f"the model sampled latent sites {latent} when its prior site was conditioned")
        return trace

    def particle_rows(self, name: str, tensor: torch.Tensor, batch_dims: int, b: int) -> torch.Tensor:
        """``tensor`` with ``batch_dims`` batch dims (the particle plate leftmost), as ``(b, -1)`` rows."""
        mpn = self.max_plate_nesting
        if batch_dims > mpn + 1:
            raise ValueError(
                f"observed site {name!r} has batch dimensions left of the model's {mpn} plate dim(s): the model "
                "must broadcast over a leading batch dimension of its prior site (as for vectorize_particles=True). "
                "A plate over the components of a vector computed from the prior site does not: declare them as "
                "event dimensions instead (e.g. Normal(x @ A.T, s).to_event(1)); or pass max_plate_nesting if the "
                f"model nests more than {mpn} plates"
            )
        while batch_dims < mpn + 1:
            tensor, batch_dims = tensor.unsqueeze(0), batch_dims + 1
        if tensor.shape[0] not in (1, b):
            raise ValueError(
                f"observed site {name!r}: its particle dimension has size {tensor.shape[0]}, expected {b}; the model "
                "must broadcast over a leading batch dimension of its prior site"
            )
        tensor = tensor.expand((b,) + tensor.shape[1:])
        return tensor.reshape(b, -1)

    def log_likelihood(self, x: torch.Tensor) -> torch.Tensor:
        r""":math:`\sum_{\text{observed}} \log p(y \mid x)` for each row of ``x`` ``(B, *event_shape)``: ``(B,)``.

        Scales and masks (``poutine.scale``, subsampling plates, ``obs_mask``) apply as in any Pyro
        ELBO. Differentiable with respect to ``x``.
        """
        b = x.shape[0]
        trace = self.trace(x)
        observed = set(self.observed)
        trace.compute_log_prob(site_filter=lambda name, node: name in observed)
        total = x.new_zeros(b)
        for name in self.observed:
            lp = trace.nodes[name]["log_prob"]
            rows = self.particle_rows(name, lp, lp.dim(), b)
            total = total + rows.sum(-1).to(total.dtype)
        return total


class ModelSampler:
    """What :class:`~pyro_scoreflow.infer.DiffusionPosterior` and :class:`~pyro_scoreflow.infer.DiffusionSMC` share:
    ``run`` reads the model's likelihood (leaving inference mode: guidance needs autograd), ``get_samples``
    returns the draws. Subclasses set ``model``, ``site``, ``max_plate_nesting`` and implement
    ``_sample(likelihood) -> x (N, *event_shape)``."""

    model: Callable
    site: str | None
    max_plate_nesting: int | None
    _samples: dict[str, torch.Tensor] | None = None
    wall_time: float = 0.0

    def run(self, *args, **kwargs):
        """Sample for the model called with ``(*args, **kwargs)``; returns ``self``.

        Reproducible under ``pyro.set_rng_seed``: all randomness comes from torch's global RNG."""
        if torch.is_inference_mode_enabled():  # guidance gradients need autograd, which inference mode forbids
            with torch.inference_mode(False):
                return self.run(*args, **kwargs)
        start = time.perf_counter()
        likelihood = ModelLikelihood(self.model, args, kwargs, self.site, self.max_plate_nesting)
        x = self._sample(likelihood)
        self._samples = {likelihood.site: x}
        self.wall_time = time.perf_counter() - start
        return self

    def _sample(self, likelihood: ModelLikelihood) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def get_samples(self) -> dict[str, torch.Tensor]:
        """``{site: tensor (num_draws, *event_shape)}``, for ``Predictive(model, posterior_samples=...)``."""
        if self._samples is None:
            raise RuntimeError("no samples yet: call run(*model_args, **model_kwargs) first")
        return dict(self._samples)
