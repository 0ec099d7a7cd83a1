r"""Linear-Gaussian observations read from a Pyro model: :math:`y = A x + b + \epsilon`, :math:`\epsilon \sim
\mathcal N(0, \Sigma_y)`, whitened to :math:`\Sigma_y = I`.

ΠGDM guidance (:class:`~pyro_scoreflow.infer.guidance.PiGDMGuidance`) and the Gaussian twist of
:class:`~pyro_scoreflow.infer.DiffusionSMC` need :math:`A`, :math:`b` and :math:`y` explicitly;
:func:`linear_gaussian` extracts them from the model's observed sites, numerically, and says why
when the observations are not linear-Gaussian.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.distributions import Independent, MultivariateNormal, Normal

from .likelihood import ModelLikelihood

__all__ = ["LinearGaussian", "NotLinearGaussian", "linear_gaussian"]


class NotLinearGaussian(ValueError):
    """The observations are not Gaussian with a mean linear in the prior site's value."""


@dataclass
class LinearGaussian:
    r"""Whitened linear-Gaussian observations :math:`y_w = A_w x + b_w + \epsilon`, :math:`\epsilon \sim N(0, I)`.

    ``matrix`` is :math:`A_w` ``(M, D)`` (``D`` = the flattened event size), ``offset`` :math:`b_w`
    and ``value`` :math:`y_w` are ``(M,)``. Whitening divides each observation by its noise scale
    (a ``Normal``) or applies :math:`L^{-1}` (a ``MultivariateNormal`` with ``scale_tril`` :math:`L`),
    and multiplies by :math:`\sqrt{\text{scale}}` of a ``poutine.scale``-d site.
    """

    matrix: torch.Tensor
    offset: torch.Tensor
    value: torch.Tensor


def linear_gaussian(likelihood: ModelLikelihood) -> LinearGaussian:
    r"""Extract :math:`A_w, b_w, y_w` of whitened linear-Gaussian observations.

    The observation means are evaluated at :math:`x = 0`, at the ``D`` unit vectors (which gives
    :math:`A` exactly for a linear map) and at two random points, where the linear prediction
    must hold to :math:`\sqrt{\epsilon_{\text{machine}}}` relative accuracy; the noise scales
    must not depend on ``x``.

    :raises NotLinearGaussian: if some observed site is not ``Normal``/``MultivariateNormal``
        (possibly ``.to_event``), is masked, or its mean is not affine or its noise depends on ``x``.
    """
    d = math.prod(likelihood.event_shape)
    gen = torch.Generator().manual_seed(0)
    probes = torch.randn(2, d, generator=gen, dtype=torch.float64)
    eye = torch.eye(d, dtype=torch.float64)
    flat = torch.cat([torch.zeros(1, d, dtype=torch.float64), eye, probes]).to(likelihood.dtype).to(likelihood.device)
    b = flat.shape[0]
    with torch.no_grad():
        trace = likelihood.trace(flat.reshape((b,) + tuple(likelihood.event_shape)))
    locs, values, scales = [], [], []
    for name in likelihood.observed:
        loc, value, noise = _whitened(likelihood, name, trace.nodes[name], b)
        locs.append(loc)
        values.append(value)
        scales.append(noise)
    if not locs:
        raise NotLinearGaussian("the model has no observed sites")
    loc = torch.cat(locs, -1)  # (b, M)
    value = torch.cat(values, -1)[0]
    offset = loc[0]
    matrix = (loc[1 : d + 1] - offset).T  # (M, D)
    predicted = offset + flat[d + 1 :] @ matrix.T
    tol = math.sqrt(torch.finfo(loc.dtype).eps) * (1 + loc.abs().max())
    err = (predicted - loc[d + 1 :]).abs().max()
    if not err <= tol:
        raise NotLinearGaussian(
            f"the observation mean is not linear in {likelihood.site!r} (error {float(err):.3g} of the linear "
            f"prediction at a random point)"
        )
    for name, noise in zip(likelihood.observed, scales):
        if not torch.allclose(noise, noise[:1].expand_as(noise), rtol=1e-6, atol=0):
            raise NotLinearGaussian(f"the noise scale of observed site {name!r} depends on {likelihood.site!r}")
    return LinearGaussian(matrix=matrix, offset=offset, value=value)


def _whitened(likelihood: ModelLikelihood, name: str, node: dict, b: int):
    """Whitened means, values and the noise factors of one observed site, as ``(b, -1)`` rows."""
    fn = node["fn"]
    if node.get("mask") is not None and not (isinstance(node["mask"], bool) and node["mask"]):
        mask = node["mask"]
        if not (isinstance(mask, torch.Tensor) and bool(mask.all())):
            raise NotLinearGaussian(f"observed site {name!r} is masked")
    scale = node.get("scale", 1.0)
    if isinstance(scale, torch.Tensor):
        if not bool((scale == scale.reshape(-1)[0]).all()):
            raise NotLinearGaussian(f"observed site {name!r} has a non-uniform poutine.scale")
        scale = float(scale.reshape(-1)[0])
    root = math.sqrt(float(scale))
    base = fn
    while isinstance(base, Independent):
        base = base.base_dist
    value = node["value"]
    batch_dims = len(fn.batch_shape)
    full = fn.batch_shape + fn.event_shape
    if isinstance(base, Normal):
        loc, std = base.loc, base.scale
        loc_w = (loc / std).expand(full) * root
        val_w = (value / std).expand(full) * root
        noise = std.expand(full)
    elif isinstance(base, MultivariateNormal):
        tril = base.scale_tril
        k = tril.shape[-1]
        full_batch = fn.batch_shape + fn.event_shape[:-1]
        tril_full = tril.expand(full_batch + (k, k))
        loc_w = torch.linalg.solve_triangular(tril_full, base.loc.expand(full).unsqueeze(-1), upper=False)
        val_w = torch.linalg.solve_triangular(tril_full, value.expand(full).unsqueeze(-1), upper=False)
        loc_w, val_w = loc_w.squeeze(-1) * root, val_w.squeeze(-1) * root
        noise = tril_full.reshape(full_batch + (k * k,))
        full = full_batch + (k * k,)
    else:
        raise NotLinearGaussian(
            f"observed site {name!r} has distribution {type(base).__name__}; Normal or MultivariateNormal needed"
        )
    rows = [likelihood.particle_rows(name, t, batch_dims, b) for t in (loc_w, val_w, noise)]
    return rows[0], rows[1], rows[2]
