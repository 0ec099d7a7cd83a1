"""
Quickstart: a score-based diffusion model as a Pyro distribution
================================================================

A score-based diffusion model describes a distribution through its *score*
s(x, t) ~ grad_x log p_t(x), the gradient of the log-density of the data after
it has been blurred by a forward SDE (here the variance-preserving SDE) for a
time t. ``ScoreSDEPrior`` turns a score model and the SDE into an ordinary Pyro
distribution:

* ``prior.sample()`` integrates the reverse-time SDE (or, with ``sampler="ode"``,
  the deterministic probability-flow ODE) from Gaussian noise at t = T down to
  t = eps;
* ``prior.log_prob(x)`` integrates the probability-flow ODE with its divergence
  (the instantaneous change of variables), which gives an exact, differentiable
  log-density.

So the prior can sit in a ``pyro.sample`` statement and be used by importance
sampling, SVI, NUTS and Predictive like any other distribution.

To be able to *check* every number, this tutorial uses a score we know exactly:
for a Gaussian-mixture data distribution the diffused densities p_t are
Gaussian mixtures too, and ``GaussianMixtureScore`` computes their score in
closed form. With a trained network (``ScoreNet`` + ``fit``) the code is the same.

The tutorial

1. draws samples with the reverse SDE and with the probability-flow ODE and
   compares their moments with the exact ones;
2. evaluates ``log_prob`` on a grid, checks that exp(log_prob) integrates to 1,
   and measures its error against the exact density;
3. saves one figure (samples and density side by side);
4. does a small Bayesian inference: x has the diffusion prior, we observe a
   noisy linear measurement y = w . x + noise, and compare the posterior mean
   from vectorized importance sampling and from SVI with the exact one. (The
   observation is chosen so that the posterior keeps one mixture component: a
   Gaussian guide can only describe one mode, while importance sampling weighs
   all of them. See docs/inference.md for NUTS and Predictive.)

Run ``python examples/quickstart.py`` (2-3 minutes on 2 busy CPU cores) or
``python examples/quickstart.py --smoke`` (tiny sizes, a few seconds).
"""

# [start-imports]
from __future__ import annotations

import argparse
import math
import os
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pyro  # noqa: E402
import pyro.distributions as dist  # noqa: E402
import torch  # noqa: E402
from pyro.infer import SVI, Trace_ELBO  # noqa: E402
from pyro.infer.autoguide import AutoMultivariateNormal  # noqa: E402
from pyro.infer.importance import vectorized_importance_weights  # noqa: E402
from pyro.optim import ClippedAdam  # noqa: E402

from pyro_scoreflow import VPSDE, GaussianMixtureScore, ScoreSDEPrior  # noqa: E402

# [end-imports]

# [start-model]
# A 2-D mixture of three correlated Gaussians.
LOCS = torch.tensor([[-2.0, -1.0], [2.0, -1.0], [0.0, 1.8]])
SCALE_TRIL = torch.tensor(
    [
        [[0.5, 0.0], [0.3, 0.4]],
        [[0.5, 0.0], [-0.3, 0.4]],
        [[0.7, 0.0], [0.0, 0.3]],
    ]
)
WEIGHTS = torch.tensor([0.3, 0.3, 0.4])

# The observation model of the inference section: y ~ Normal(w . x, sigma).
W = torch.tensor([1.0, 1.0])
SIGMA = 0.5
Y_OBS = torch.tensor(-2.0)  # the posterior sits on the lower-left component


def model(prior: ScoreSDEPrior, y: torch.Tensor | None = None) -> torch.Tensor:
    """x has the diffusion prior; y is a noisy measurement of x1 + x2."""
    x = pyro.sample("x", prior)
    return pyro.sample("y", dist.Normal((x * W).sum(-1), SIGMA), obs=y)


def prior_guide(prior: ScoreSDEPrior, y: torch.Tensor | None = None) -> None:
    """Propose from the prior: the importance weights are then the likelihood."""
    pyro.sample("x", prior)


# [end-model]


# [start-helpers]
def moments(x: torch.Tensor, weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(Weighted) mean and covariance of points ``x`` ``(N, D)``."""
    w = torch.full(x.shape[:1], 1.0 / len(x), dtype=x.dtype) if weights is None else weights
    mean = w @ x
    centred = x - mean
    return mean, (w[:, None] * centred).T @ centred


def mixture_moments(mixture: dist.MixtureSameFamily) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact mean and covariance of a Gaussian mixture."""
    probs = mixture.mixture_distribution.probs
    locs = mixture.component_distribution.mean
    covs = mixture.component_distribution.covariance_matrix
    mean = probs @ locs
    dev = locs - mean
    cov = (probs[:, None, None] * (covs + dev[:, :, None] * dev[:, None, :])).sum(0)
    return mean, cov


def exact_posterior(mixture: dist.MixtureSameFamily, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and component masses for the linear-Gaussian observation (one Kalman update per component)."""
    mus = mixture.component_distribution.mean
    covs = mixture.component_distribution.covariance_matrix
    s2 = torch.einsum("i,kij,j->k", W, covs, W) + SIGMA**2
    means = mus + covs @ W / s2[:, None] * (y - mus @ W)[:, None]
    log_masses = mixture.mixture_distribution.logits.log_softmax(-1) + dist.Normal(mus @ W, s2.sqrt()).log_prob(y)
    masses = log_masses.softmax(-1)
    return masses @ means, masses


def component_masses(mixture: dist.MixtureSameFamily, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Estimated P(component | y) = E[P(component | x) | y]."""
    log_joint = mixture.component_distribution.log_prob(x.unsqueeze(-2)) + mixture.mixture_distribution.logits
    return weights @ log_joint.softmax(-1)


def fmt(v: torch.Tensor) -> str:
    return "(" + ", ".join(f"{float(a):+.3f}" for a in v.detach()) + ")"


# [end-helpers]


# [start-prior]
def main(args: argparse.Namespace) -> None:
    if args.smoke:
        print("--smoke: tiny sizes that only check that the script runs; its numbers are not meaningful.")
    pyro.set_rng_seed(args.seed)
    torch.set_num_threads(args.num_threads)
    os.makedirs(args.output_dir, exist_ok=True)
    start = time.time()

    # -- 1. the prior ---------------------------------------------------------------------------
    sde = VPSDE()
    score = GaussianMixtureScore(sde, LOCS, SCALE_TRIL, logits=WEIGHTS.log())
    prior = ScoreSDEPrior(score, sde, event_shape=(2,), num_steps=args.num_steps)
    exact = score.marginal(sde.eps)  # the exact p_eps that the prior represents
    exact_mean, exact_cov = mixture_moments(exact)
    print(f"prior: {prior}")
    # [end-prior]

    # [start-sampling]
    # -- 2. sampling ----------------------------------------------------------------------------
    print(f"\n[sampling] {args.num_samples} draws each")
    print(f"  {'sampler':<22}{'time':>7}   {'mean':<18}{'std':<18}")
    print(f"  {'exact':<22}{'':>7}   {fmt(exact_mean):<18}{fmt(exact_cov.diagonal().sqrt()):<18}")
    samples = {}
    for name, sampler in [("reverse SDE", prior), ("probability-flow ODE", prior.with_options(sampler="ode"))]:
        t0 = time.time()
        x = sampler.sample((args.num_samples,))
        elapsed = time.time() - t0
        mean, cov = moments(x)
        samples[name] = x
        print(f"  {name:<22}{elapsed:>6.2f}s   {fmt(mean):<18}{fmt(cov.diagonal().sqrt()):<18}")
    se = exact_cov.diagonal().sqrt() / math.sqrt(args.num_samples)
    print(f"  (Monte-Carlo standard error of the means: {fmt(se)})")
    # [end-sampling]

    # [start-log-prob]
    # -- 3. log_prob on a grid ------------------------------------------------------------------
    lo, hi = -4.5, 4.5
    axis = torch.linspace(lo, hi, args.grid_size)
    cell = float(axis[1] - axis[0]) ** 2
    gx, gy = torch.meshgrid(axis, axis, indexing="xy")
    grid = torch.stack([gx, gy], -1).reshape(-1, 2)
    t0 = time.time()
    with torch.no_grad():
        log_p = prior.log_prob(grid)
    elapsed = time.time() - t0
    log_p_exact = exact.log_prob(grid)
    total = float(log_p.exp().sum() * cell)
    total_exact = float(log_p_exact.exp().sum() * cell)
    # where the density matters: p > 1e-3 * max p
    mask = log_p_exact > log_p_exact.max() - math.log(1e3)
    err = (log_p - log_p_exact)[mask].abs()
    print(f"\n[log_prob] {len(grid)} grid points in {elapsed:.2f}s (probability-flow ODE, exact divergence)")
    print(f"  sum exp(log_prob) * cell area = {total:.5f}   (exact density on the same grid: {total_exact:.5f})")
    print(f"  |log_prob - exact log p| where p > 1e-3 max p: max {float(err.max()):.1e}, mean {float(err.mean()):.1e}")
    # [end-log-prob]

    # [start-figure]
    # -- 4. one figure --------------------------------------------------------------------------
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8))
    density = log_p.exp().reshape(args.grid_size, args.grid_size)
    density_exact = log_p_exact.exp().reshape(args.grid_size, args.grid_size)
    levels = torch.linspace(0.02, float(density_exact.max()), 6).tolist()
    for ax, (name, x) in zip(axes[:2], samples.items(), strict=True):
        ax.scatter(x[:, 0], x[:, 1], s=2, alpha=0.3, color="tab:blue")
        ax.contour(gx, gy, density_exact, levels=levels, colors="black", linewidths=0.8)
        ax.set_title(f"{name} samples (contours: exact density)")
    im = axes[2].pcolormesh(gx, gy, density, shading="auto", cmap="viridis")
    axes[2].set_title(f"exp(log_prob), integral = {total:.3f}")
    fig.colorbar(im, ax=axes[2])
    for ax in axes:
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_aspect("equal")
    fig.tight_layout()
    path = os.path.join(args.output_dir, "quickstart.png")
    fig.savefig(path, dpi=args.dpi)
    plt.close(fig)
    print(f"\n[figure] saved {path}")
    # [end-figure]

    # [start-inference]
    # -- 5. Bayesian inference with the prior ---------------------------------------------------
    post_mean, post_masses = exact_posterior(exact, Y_OBS)
    print(f"\n[inference] x ~ prior, y ~ Normal(x1 + x2, {SIGMA}), observed y = {float(Y_OBS)}")
    print(f"  {'method':<40}{'time':>7}   {'posterior mean':<18}")
    print(f"  {'exact (closed form)':<40}{'':>7}   {fmt(post_mean):<18}  component masses {fmt(post_masses)}")

    # (a) vectorized importance sampling, proposing from the prior: all particles in one
    # reverse-SDE solve and one batched log_prob solve per trace (model and guide)
    t0 = time.time()
    log_w, model_trace, _ = vectorized_importance_weights(
        model, prior_guide, prior, Y_OBS, num_samples=args.num_particles, max_plate_nesting=0
    )
    elapsed = time.time() - t0
    x = model_trace.nodes["x"]["value"]
    weights = log_w.softmax(0)
    ess = float(1.0 / (weights**2).sum())
    is_mean, is_cov = moments(x, weights)
    is_masses = component_masses(exact, x, weights)
    label = f"importance ({args.num_particles} particles)"
    print(f"  {label:<40}{elapsed:>6.2f}s   {fmt(is_mean):<18}  component masses {fmt(is_masses)}, ESS {ess:.0f}")

    # (b) SVI with a Gaussian guide; log_prob is differentiated through the ODE solver,
    # and looser tolerances make the gradient steps cheaper
    pyro.clear_param_store()
    svi_prior = prior.with_options(rtol=1e-3, atol=1e-3)
    guide = AutoMultivariateNormal(model, init_scale=0.3)
    optim = ClippedAdam({"lr": 0.1, "lrd": 0.1 ** (1 / args.svi_steps)})
    svi = SVI(model, guide, optim, Trace_ELBO(num_particles=8, vectorize_particles=True, max_plate_nesting=0))
    t0 = time.time()
    for _ in range(args.svi_steps):
        svi.step(svi_prior, Y_OBS)
    elapsed = time.time() - t0
    with torch.no_grad():
        svi_mean = guide.get_posterior().mean.detach()
    label = f"SVI, AutoMultivariateNormal ({args.svi_steps} steps)"
    print(f"  {label:<40}{elapsed:>6.2f}s   {fmt(svi_mean):<18}")
    print(
        f"  errors vs exact: importance {float((is_mean - post_mean).norm()):.3f}, "
        f"SVI {float((svi_mean - post_mean).norm()):.3f} "
        f"(importance standard error ~ {float((is_cov.diagonal().sum() / ess).sqrt()):.3f})"
    )
    if args.smoke:
        print("  (--smoke sizes: too few SVI steps to converge; run without --smoke for the real numbers)")

    print(f"\ndone in {time.time() - start:.1f}s")
    # [end-inference]


# [start-cli]
if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Quickstart: a score-based diffusion prior in Pyro")
    parser.add_argument("--num-samples", default=5000, type=int, help="draws per sampler")
    parser.add_argument("--num-steps", default=500, type=int, help="Euler-Maruyama steps of the reverse SDE")
    parser.add_argument("--grid-size", default=120, type=int, help="grid points per axis for log_prob")
    parser.add_argument("--num-particles", default=20000, type=int, help="importance-sampling particles")
    parser.add_argument("--svi-steps", default=200, type=int, help="SVI steps")
    parser.add_argument("--seed", default=0, type=int)
    parser.add_argument("--num-threads", default=1, type=int, help="torch threads (the tensors are tiny: 1 is fastest)")
    parser.add_argument("--dpi", default=110, type=int)
    parser.add_argument("--output-dir", default="outputs", help="where to save quickstart.png")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for a quick check")
    args = parser.parse_args()
    if args.smoke:
        args.num_samples, args.num_steps, args.grid_size = 300, 100, 40
        args.num_particles, args.svi_steps, args.dpi = 1000, 10, 60
    main(args)
# [end-cli]
