r"""The ``pyro-scoreflow demo`` command: the shipped moons prior, its samples and density, and a small
Bayesian inference, checked against the data distribution itself.

The numbers need only the package's dependencies; the two figures need matplotlib
(``pip install 'pyro_scoreflow[plots]'``) and are skipped, with a message, without it.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from pyro.infer.importance import vectorized_importance_weights

from . import datasets, plotting
from ._files import check_writable
from .commands import PROG, sampler_text
from .distribution import ScoreSDEPrior

__all__ = ["run_demo"]


def run_demo(
    output_dir: str | os.PathLike, *, num_samples: int = 2000, seed: int = 0, smoke: bool = False
) -> dict[str, float]:
    r"""Run the demo, print its summary, write ``prior.png`` and ``posterior.png`` to ``output_dir`` when
    matplotlib is installed, and return the summary numbers.

    Inference: :math:`y = x_0 + \mathcal N(0, \sigma^2)` is observed; the posterior of :math:`x` under the
    prior is drawn by importance sampling with the prior as proposal
    (``pyro.infer.importance.vectorized_importance_weights``: the prior terms of model and guide cancel, the
    weights are the likelihood, :math:`w_i \propto p(y \mid x_i)`, :math:`x_i \sim p`) and resampling, then
    compared with the exact posterior of the data distribution itself (200000 fresh data points reweighted by
    the same likelihood). The effective sample size is
    :math:`(\sum_i w_i)^2 / \sum_i w_i^2`. ``smoke=True`` is a seconds-long run on a coarse grid (for tests).
    """
    output_dir = Path(output_dir)
    draw = plotting.available()
    if draw:
        check_writable(output_dir / "prior.png", "--output-dir")  # fail now, not after the computation
    total_start = time.perf_counter()
    grid_size, num_reference, num_held_out = (16, 20_000, 100) if smoke else (60, 200_000, 500)
    if smoke:
        num_samples = min(num_samples, 200)
    steps = {"num_steps": 50} if smoke else {}
    y_obs, noise = -0.5, 0.1
    pyro.set_rng_seed(seed)

    prior = ScoreSDEPrior.from_pretrained("moons", **steps)
    fast = prior.with_options(rtol=1e-3, atol=1e-3)  # loose ODE tolerance for the plots: errors ~1e-3 nats
    size = sum(p.numel() for p in prior.score_model.parameters())
    print(f"{PROG} demo: the shipped 'moons' prior ({prior.sde!r}, ScoreNet with {size} parameters)")

    start = time.perf_counter()
    samples = prior.sample((num_samples,))
    print(f"  samples: {num_samples} draws ({sampler_text(prior)}) in {time.perf_counter() - start:.1f} s")

    start = time.perf_counter()
    xs, ys = torch.linspace(-2.6, 2.6, grid_size), torch.linspace(-1.9, 1.9, grid_size)
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).reshape(-1, 2)
    with torch.no_grad():
        log_density = fast.log_prob(grid).reshape(grid_size, grid_size)
    mass = log_density.exp().sum().item() * (xs[1] - xs[0]).item() * (ys[1] - ys[0]).item()
    print(
        f"  density: log p on a {grid_size}x{grid_size} grid (probability-flow ODE, rtol=atol=1e-3) in "
        f"{time.perf_counter() - start:.1f} s; it integrates to {mass:.3f} over the plotted box"
    )

    held_out = datasets.load("moons", num_held_out, seed=123)
    fit_data = datasets.load("moons", 10_000, seed=124)
    gaussian = dist.MultivariateNormal(fit_data.mean(0), torch.cov(fit_data.T))
    with torch.no_grad():
        held_out_lp = fast.log_prob(held_out).mean().item()
    gaussian_lp = gaussian.log_prob(held_out).mean().item()
    print(
        f"  held-out log-likelihood: {held_out_lp:.3f} nats/point vs {gaussian_lp:.3f} for a fitted Gaussian "
        f"({num_held_out} fresh points; {-held_out_lp / (2 * math.log(2)):.3f} vs "
        f"{-gaussian_lp / (2 * math.log(2)):.3f} bits/dim)"
    )

    # Bayesian inference: y = x[0] + N(0, noise^2), y observed; the prior is the importance proposal, so the
    # prior's log density (the same deterministic ODE solve in model and guide) cancels exactly in the weights.
    def model(y):
        x = pyro.sample("x", fast)
        pyro.sample("y", dist.Normal(x[..., 0], noise), obs=y)

    def guide(y):
        pyro.sample("x", fast)

    start = time.perf_counter()
    with torch.no_grad():
        log_w, _, guide_trace = vectorized_importance_weights(
            model, guide, torch.tensor(y_obs), num_samples=num_samples, max_plate_nesting=0
        )
    particles = guide_trace.nodes["x"]["value"]
    log_w = log_w.detach()
    ess = math.exp(2 * torch.logsumexp(log_w, 0).item() - torch.logsumexp(2 * log_w, 0).item())
    posterior = particles[dist.Categorical(logits=log_w).sample((num_samples,))]
    weights = torch.softmax(log_w, 0)
    is_upper = (weights * (particles[:, 1] > 0)).sum().item()
    is_mean = (weights * particles[:, 1]).sum().item()
    seconds = time.perf_counter() - start

    reference = datasets.load("moons", num_reference, seed=125)
    ref_w = torch.softmax(dist.Normal(reference[:, 0], noise).log_prob(torch.tensor(y_obs)), 0)
    ref_upper = (ref_w * (reference[:, 1] > 0)).sum().item()
    ref_mean = (ref_w * reference[:, 1]).sum().item()
    prior_upper = (samples[:, 1] > 0).double().mean().item()
    print(f"  inference: observe y = x[0] + N(0, {noise}^2) = {y_obs}; importance sampling with the prior as proposal")
    print(f"    {num_samples} weighted particles in {seconds:.1f} s, effective sample size {ess:.0f}")
    print(
        f"    P(x[1] > 0 | y) = {is_upper:.3f}, E[x[1] | y] = {is_mean:.3f}   "
        f"(exact posterior of the data distribution: {ref_upper:.3f}, {ref_mean:.3f}; prior: P(x[1] > 0) = "
        f"{prior_upper:.3f})"
    )

    if draw:
        extent = (xs[0].item(), xs[-1].item(), ys[0].item(), ys[-1].item())
        prior_png = plotting.plot_density(
            samples, log_density, extent, output_dir / "prior.png", title="pyro_scoreflow: the shipped 'moons' prior"
        )
        posterior_png = plotting.plot_posterior(
            samples, posterior, particles, weights, reference, ref_w, y_obs, noise, output_dir / "posterior.png"
        )
        figures = f"wrote {prior_png} and {posterior_png}"
    else:
        figures = f"no figures: {plotting.MISSING_MATPLOTLIB}"
    total = time.perf_counter() - total_start
    print(f"  {figures} (total {total:.1f} s)")
    return {
        "held_out_log_lik": held_out_lp, "gaussian_log_lik": gaussian_lp, "ess": ess,
        "posterior_upper": is_upper, "reference_upper": ref_upper, "posterior_mean": is_mean,
        "reference_mean": ref_mean, "seconds": total,
    }  # fmt: skip
