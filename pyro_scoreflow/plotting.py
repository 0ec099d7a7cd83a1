"""Figures of samples, densities and posteriors, written as PNG files (needs the optional matplotlib).

Install it with ``pip install 'pyro_scoreflow[plots]'``. Nothing here touches matplotlib's global state
(no ``pyplot``, no backend switch): each figure is a :class:`matplotlib.figure.Figure` rendered straight to
its file, which is written atomically.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from ._files import write_atomically

__all__ = [
    "MISSING_MATPLOTLIB",
    "MissingMatplotlibError",
    "available",
    "plot_density",
    "plot_posterior",
    "plot_samples",
]

MISSING_MATPLOTLIB = "plotting needs matplotlib: pip install 'pyro_scoreflow[plots]'"
DPI = 110


class MissingMatplotlibError(ImportError):
    """Raised by every plotting function when matplotlib is not installed."""


def _figure_class():
    # matplotlib is optional: it is imported when a figure is drawn, not when the package is.
    try:
        import matplotlib  # noqa: F401  (first, so that a missing package fails here, not on a cached submodule)
        from matplotlib.figure import Figure
    except ImportError as err:
        raise MissingMatplotlibError(MISSING_MATPLOTLIB) from err
    return Figure


def available() -> bool:
    """Whether matplotlib can be imported, i.e. whether the functions of this module can draw."""
    try:
        _figure_class()
    except MissingMatplotlibError:
        return False
    return True


def _save(fig, path: str | os.PathLike) -> Path:
    return write_atomically(path, lambda f: fig.savefig(f, format="png", dpi=DPI))


def plot_samples(samples: torch.Tensor, path: str | os.PathLike, title: str = "") -> Path:
    """A PNG of samples ``(N, *event_shape)``: a scatter plot of 2-D points, an image grid of the first 64
    samples when the event size is a square other than 4, else the first two coordinates."""
    Figure = _figure_class()
    x = samples.detach().cpu().reshape(samples.shape[0], -1).numpy()
    D = x.shape[1]
    side = math.isqrt(D)
    if D != 2 and side * side == D:
        n = min(64, x.shape[0])
        cols = math.ceil(math.sqrt(n))
        rows = math.ceil(n / cols)
        fig = Figure(figsize=(cols * 0.9, rows * 0.9 + 0.4))
        axes = fig.subplots(rows, cols, squeeze=False)
        for i, ax in enumerate(axes.flat):
            ax.axis("off")
            if i < n:
                ax.imshow(x[i].reshape(side, side), cmap="gray_r", vmin=-1, vmax=1)
    else:
        fig = Figure(figsize=(5, 5))
        ax = fig.subplots()
        ax.scatter(x[:, 0], x[:, 1] if D > 1 else [0] * len(x), s=2, alpha=0.5)
        ax.set_aspect("equal")
        ax.set_xlabel("x[0]")
        ax.set_ylabel("x[1]" if D > 1 else "")
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_density(
    samples: torch.Tensor, log_density: torch.Tensor, extent: tuple[float, float, float, float], path, title: str = ""
) -> Path:
    """A PNG of 2-D samples next to an image of ``log_density`` (a grid, rows along ``x[1]``) over
    ``extent = (x0_min, x0_max, x1_min, x1_max)``, clipped below at -10."""
    fig = _figure_class()(figsize=(11, 4.4), layout="constrained")
    axes = fig.subplots(1, 2)
    axes[0].scatter(samples[:, 0], samples[:, 1], s=2, alpha=0.5)
    axes[0].set_title(f"{samples.shape[0]} samples")
    image = axes[1].imshow(log_density.clamp(min=-10).numpy(), origin="lower", extent=extent, cmap="viridis")
    axes[1].set_title("log p(x) (probability-flow ODE)")
    fig.colorbar(image, ax=axes[1], label="log p")
    for ax in axes:
        ax.set_xlim(extent[:2])
        ax.set_ylim(extent[2:])
        ax.set_aspect("equal")
        ax.set_xlabel("x[0]")
    axes[0].set_ylabel("x[1]")
    fig.suptitle(title)
    return _save(fig, path)


def plot_posterior(
    prior_samples: torch.Tensor,
    posterior_samples: torch.Tensor,
    particles: torch.Tensor,
    weights: torch.Tensor,
    reference: torch.Tensor,
    reference_weights: torch.Tensor,
    y_obs: float,
    noise: float,
    path,
) -> Path:
    r"""A PNG of the demo's inference :math:`y = x_0 + \mathcal N(0, \sigma^2)`: prior samples and
    ``posterior_samples`` (resampled particles) in the plane, and histograms of :math:`x_1` under the prior,
    the ``particles`` with their normalised importance ``weights``, and a ``reference`` sample of the exact
    posterior with its weights. The title gives the effective sample size :math:`1 / \sum_i w_i^2`."""
    fig = _figure_class()(figsize=(11, 4.4), layout="constrained")
    axes = fig.subplots(1, 2)
    axes[0].scatter(prior_samples[:, 0], prior_samples[:, 1], s=2, alpha=0.25, color="0.6", label="prior samples")
    x = posterior_samples
    axes[0].scatter(x[:, 0], x[:, 1], s=4, alpha=0.5, color="C3", label="posterior (resampled)")
    axes[0].axvspan(y_obs - noise, y_obs + noise, color="C1", alpha=0.15, label=f"y = {y_obs} +/- {noise}")
    axes[0].set_aspect("equal")
    axes[0].set_xlabel("x[0]")
    axes[0].set_ylabel("x[1]")
    axes[0].legend(loc="upper right", fontsize=8)
    axes[0].set_title("observe y = x[0] + noise")
    bins = torch.linspace(-2, 2, 41).numpy()
    axes[1].hist(prior_samples[:, 1].numpy(), bins=bins, density=True, alpha=0.4, color="0.5", label="prior")
    axes[1].hist(
        particles[:, 1].numpy(), bins=bins, weights=weights.numpy(), density=True, alpha=0.5, color="C3",
        label="posterior: score prior + importance sampling",
    )  # fmt: skip
    axes[1].hist(
        reference[:, 1].numpy(), bins=bins, weights=reference_weights.numpy(), density=True, histtype="step",
        color="k", linewidth=1.5, label="exact posterior (data distribution)",
    )  # fmt: skip
    axes[1].set_xlabel("x[1]")
    axes[1].legend(loc="upper left", fontsize=8)
    ess = 1.0 / weights.pow(2).sum().item()
    axes[1].set_title(f"p(x[1] | y = {y_obs}), ESS {ess:.0f} of {particles.shape[0]}")
    return _save(fig, path)
