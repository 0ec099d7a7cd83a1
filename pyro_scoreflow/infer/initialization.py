r"""Cheap initialization of HMC/NUTS and SVI for models with :class:`~pyro_scoreflow.ScoreSDEPrior` sites.

Pyro's default strategies draw ``site["fn"].sample()`` to learn a site's shape or to pick a
starting point; for a score prior that is a full reverse-SDE solve (500 score evaluations per
draw by default). :func:`init_to_score_prior` instead starts each score-prior site at a draw of
``num_steps`` DPM-Solver++ steps (10 score evaluations: a point on the data manifold, so NUTS
starts where the prior has mass), and hands every other site to ``fallback``.
"""

from __future__ import annotations

import functools

import torch
from pyro.infer.autoguide.initialization import init_to_median

from ..distribution import ScoreSDEPrior

__all__ = ["init_to_score_prior"]


def init_to_score_prior(site: dict | None = None, num_steps: int = 10, fallback=init_to_median):
    """An ``init_strategy`` for :class:`pyro.infer.NUTS`, :class:`pyro.infer.HMC` and autoguides.

    Usage: ``NUTS(model, init_strategy=init_to_score_prior)`` or
    ``init_to_score_prior(num_steps=20, fallback=init_to_feasible)``.

    :param int num_steps: DPM-Solver++ steps (score evaluations) per initial draw.
    :param fallback: the strategy for sites that are not score priors.
    """
    if site is None:
        return functools.partial(init_to_score_prior, num_steps=num_steps, fallback=fallback)
    fn = site["fn"]
    if isinstance(fn, ScoreSDEPrior):
        with torch.no_grad():
            return fn.with_options(sampler="dpm-solver", num_steps=num_steps).sample().detach()
    return fallback(site)
