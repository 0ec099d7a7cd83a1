"""
Hierarchical model: a diffusion prior and an unknown noise scale, inferred jointly
==================================================================================

A ``ScoreSDEPrior`` is an ordinary Pyro distribution, so it can be one level of a
hierarchical model. Here a 2-D point x has a diffusion prior, and we observe it N times
through Gaussian noise whose scale sigma is *unknown* and has its own prior::

    sigma ~ LogNormal(log 0.5, 0.5)
    x     ~ ScoreSDEPrior(...)                  # the diffusion prior
    y_i   ~ Normal(x, sigma^2 I),   i = 1..N    # repeated noisy measurements

The posterior p(x, sigma | y) couples the two: a larger sigma lets x sit further from the
measurements, where the prior is denser. Both NUTS and SVI only need log p(x, sigma, y) and
its gradient; the diffusion prior's term, log p(x), comes from ``prior.log_prob``: the
probability-flow ODE with its divergence, differentiated through the solver. Tolerances of
1e-3 (instead of the default 1e-5) make every gradient 3x cheaper and move log p by a few
1e-2 nats, far less than the posterior's own spread.

To check the answer, the prior's score is exact (``GaussianMixtureScore``: the data
distribution is a Gaussian mixture, so is every diffused p_t). Then the posterior has a
closed form up to one integral over sigma, computed here on a grid:

* the mean ybar and the scatter S = sum_i ||y_i - ybar||^2 are sufficient, and
  p(y | sigma) = [sum_k w_k N(ybar; mu_k, Sigma_k + sigma^2/N I)] * sigma^(-(N-1)D) exp(-S / 2 sigma^2)
  up to a constant, which gives p(sigma | y) ∝ p(sigma) p(y | sigma);
* p(x | y) ∝ p(x) * integral p(sigma) prod_i N(y_i; x, sigma^2 I) dsigma, on a grid of x.

The script runs NUTS and SVI (a multivariate-normal guide over (x, log sigma), vectorized
ELBO particles: all particles share one batched ODE solve), prints posterior means, standard
deviations and wall times against the exact values, and saves ``hierarchical.png``: the
posterior of x (samples over exact contours) and the posterior of sigma (NUTS histogram, SVI
and exact densities, the prior and the true value).

Run ``python examples/hierarchical.py`` (about 7 minutes on 2 CPU cores) or with ``--smoke``.
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
from pyro.infer import MCMC, NUTS, SVI, Trace_ELBO  # noqa: E402
from pyro.infer.autoguide import AutoMultivariateNormal  # noqa: E402
from pyro.ops.stats import effective_sample_size  # noqa: E402
from pyro.optim import ClippedAdam  # noqa: E402

from pyro_scoreflow import VPSDE, GaussianMixtureScore, ScoreSDEPrior  # noqa: E402

# [end-imports]

# [start-model]
# the data distribution: a mixture of three correlated Gaussians (as in the quickstart)
LOCS = torch.tensor([[-2.0, -1.0], [2.0, -1.0], [0.0, 1.8]])
SCALE_TRIL = torch.tensor([[[0.5, 0.0], [0.3, 0.4]], [[0.5, 0.0], [-0.3, 0.4]], [[0.7, 0.0], [0.0, 0.3]]])
WEIGHTS = torch.tensor([0.3, 0.3, 0.4])
# the noise scale's prior and the truth the data are simulated from
SIGMA_LOC, SIGMA_SCALE = math.log(0.5), 0.5
SIGMA_TRUE = 0.8
X_TRUE = torch.tensor([1.2, -0.2])


def model(prior: ScoreSDEPrior, y: torch.Tensor) -> None:
    """sigma ~ LogNormal, x ~ diffusion prior, y_i ~ N(x, sigma^2 I) for the N rows of ``y``.

    Written to broadcast over leading batch dimensions of x and sigma (vectorized ELBO particles).
    """
    sigma = pyro.sample("sigma", dist.LogNormal(SIGMA_LOC, SIGMA_SCALE))
    x = pyro.sample("x", prior)
    with pyro.plate("measurements", y.shape[0], dim=-1):
        # x has batch shape (..., 1): its last batch dimension is this plate's, so it broadcasts with y (N, 2)
        pyro.sample("y", dist.Normal(x, sigma[..., None]).to_event(1), obs=y)


# [end-model]


# [start-exact]
def exact_posterior(mixture: dist.MixtureSameFamily, y: torch.Tensor, sigmas: torch.Tensor, grid: torch.Tensor):
    """p(sigma | y) on ``sigmas`` (normalized density) and p(x | y) on the points ``grid`` (normalized over it)."""
    n, d = y.shape
    ybar, scatter = y.mean(0), ((y - y.mean(0)) ** 2).sum()
    log_prior_sigma = dist.LogNormal(SIGMA_LOC, SIGMA_SCALE).log_prob(sigmas)
    comp = mixture.component_distribution
    covs = comp.covariance_matrix.unsqueeze(0) + (sigmas**2 / n)[:, None, None, None] * torch.eye(d)  # (S, K, D, D)
    log_ybar = (
        dist.MultivariateNormal(comp.mean, covs).log_prob(ybar) + mixture.mixture_distribution.logits
    ).logsumexp(-1)
    log_post = log_prior_sigma + log_ybar - (n - 1) * d * sigmas.log() - scatter / (2 * sigmas**2)
    ds = sigmas[1] - sigmas[0]
    post_sigma = (log_post - log_post.logsumexp(0)).exp() / ds
    # p(x | y) ∝ p(x) sum_s p(sigma_s) prod_i N(y_i; x, sigma_s^2)
    sq = ((y.unsqueeze(0) - grid.unsqueeze(1)) ** 2).sum((-1, -2))  # (G,)
    log_lik = -n * d * sigmas.log()[:, None] - sq[None, :] / (2 * sigmas[:, None] ** 2)  # (S, G)
    log_px = mixture.log_prob(grid) + (log_lik + log_prior_sigma[:, None]).logsumexp(0)
    return post_sigma, (log_px - log_px.logsumexp(0)).exp()


# [end-exact]


# [start-helpers]
def summary(name: str, seconds: float, x: torch.Tensor, sigma: torch.Tensor, ess: float | None = None) -> dict:
    return dict(
        method=name, time=seconds, x_mean=x.mean(0), x_std=x.std(0), s_mean=float(sigma.mean()),
        s_std=float(sigma.std()), ess=ess,
    )  # fmt: skip


# [end-helpers]


# [start-prior]
def main(args: argparse.Namespace) -> None:
    if args.smoke:
        print("--smoke: tiny sizes that only check that the script runs; its numbers are not meaningful.")
    pyro.set_rng_seed(args.seed)
    torch.set_num_threads(args.num_threads)
    os.makedirs(args.output_dir, exist_ok=True)
    start = time.time()

    sde = VPSDE()
    score = GaussianMixtureScore(sde, LOCS, SCALE_TRIL, logits=WEIGHTS.log())
    prior = ScoreSDEPrior(score, sde, event_shape=(2,), rtol=args.tol, atol=args.tol)
    exact_prior = score.marginal(sde.eps)
    y = X_TRUE + SIGMA_TRUE * torch.randn(args.num_obs, 2)
    print(f"truth: x = {X_TRUE.tolist()}, sigma = {SIGMA_TRUE}; {args.num_obs} measurements, mean {y.mean(0).tolist()}")
    # [end-prior]

    # [start-exact-grid]
    # -- exact posterior (grid over sigma and over x) ---------------------------------------------
    sigmas = torch.linspace(0.05, 3.0, 1200)
    axis = torch.linspace(-4.0, 4.0, 161)
    gx, gy = torch.meshgrid(axis, axis, indexing="xy")
    grid = torch.stack([gx, gy], -1).reshape(-1, 2)
    post_sigma, post_x = exact_posterior(exact_prior, y, sigmas, grid)
    ds = float(sigmas[1] - sigmas[0])
    s_mean = float((sigmas * post_sigma).sum() * ds)
    s_std = math.sqrt(float(((sigmas - s_mean) ** 2 * post_sigma).sum() * ds))
    x_mean = post_x @ grid
    x_std = (post_x @ (grid - x_mean) ** 2).sqrt()
    rows = [dict(method="exact (grid)", time=None, x_mean=x_mean, x_std=x_std, s_mean=s_mean, s_std=s_std, ess=None)]
    # [end-exact-grid]

    # [start-nuts]
    # -- NUTS ---------------------------------------------------------------------------------------
    t0 = time.time()
    kernel = NUTS(model, max_tree_depth=args.max_tree_depth, target_accept_prob=0.8)
    mcmc = MCMC(kernel, num_samples=args.num_samples, warmup_steps=args.warmup, disable_progbar=not args.progress)
    mcmc.run(prior, y)
    nuts_time = time.time() - t0
    nuts = mcmc.get_samples()
    ess = float(effective_sample_size(nuts["sigma"].unsqueeze(0)))
    rows.append(summary(f"NUTS ({args.warmup}+{args.num_samples})", nuts_time, nuts["x"], nuts["sigma"], ess))
    # [end-nuts]

    # [start-svi]
    # -- SVI ----------------------------------------------------------------------------------------
    pyro.clear_param_store()
    guide = AutoMultivariateNormal(model, init_scale=0.3)
    optim = ClippedAdam({"lr": args.lr, "lrd": 0.1 ** (1 / args.svi_steps)})
    elbo = Trace_ELBO(num_particles=args.particles, vectorize_particles=True, max_plate_nesting=1)
    svi = SVI(model, guide, optim, elbo)
    t0 = time.time()
    for _ in range(args.svi_steps):
        svi.step(prior, y)
    svi_time = time.time() - t0
    with torch.no_grad(), pyro.plate("draws", 4000, dim=-2):  # the guide alone, vectorized as in the ELBO
        draws = guide(prior, y)
    svi_x, svi_sigma = draws["x"].reshape(-1, 2), draws["sigma"].reshape(-1)
    rows.append(summary(f"SVI ({args.svi_steps} steps, {args.particles} particles)", svi_time, svi_x, svi_sigma))

    print(f"\n{'method':<34}{'time':>8}   {'E[x]':<18}{'sd[x]':<16}{'E[sigma]':>9}{'sd[sigma]':>10}{'ESS':>7}")
    for r in rows:
        t = "" if r["time"] is None else f"{r['time']:.1f}s"
        e = "" if r["ess"] is None else f"{r['ess']:.0f}"
        xm = "(" + ", ".join(f"{v:+.2f}" for v in r["x_mean"].tolist()) + ")"
        xs = "(" + ", ".join(f"{v:.2f}" for v in r["x_std"].tolist()) + ")"
        print(f"{r['method']:<34}{t:>8}   {xm:<18}{xs:<16}{r['s_mean']:>9.3f}{r['s_std']:>10.3f}{e:>7}")
    print(f"(true sigma {SIGMA_TRUE}; NUTS Monte-Carlo error of E[sigma] ~ {rows[1]['s_std'] / math.sqrt(ess):.3f})")
    # [end-svi]

    # [start-figure]
    # -- figure -------------------------------------------------------------------------------------
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    ax = axes[0]
    density = exact_prior.log_prob(grid).exp().reshape(gx.shape)
    ax.contour(gx, gy, density, levels=6, colors="0.75", linewidths=0.7)
    ax.contour(gx, gy, post_x.reshape(gx.shape), levels=5, colors="black", linewidths=1.0)
    ax.scatter(nuts["x"][:, 0], nuts["x"][:, 1], s=4, alpha=0.4, color="tab:blue", label="NUTS draws of x")
    ax.scatter(y[:, 0], y[:, 1], marker="x", color="tab:red", label="measurements y_i")
    ax.scatter(*X_TRUE.tolist(), marker="*", s=160, color="gold", edgecolor="black", label="true x")
    ax.set_title("x: prior (grey), exact posterior (black)")
    ax.set_xlim(-4, 4)
    ax.set_ylim(-3.5, 3.5)
    ax.set_aspect("equal")
    ax.legend(loc="upper left", fontsize=8)
    ax = axes[1]
    ax.hist(nuts["sigma"].numpy(), bins=30, density=True, alpha=0.4, color="tab:blue", label="NUTS")
    ax.hist(svi_sigma.numpy(), bins=60, density=True, histtype="step", color="tab:green", label="SVI guide")
    ax.plot(sigmas, post_sigma, color="black", label="exact posterior")
    ax.plot(sigmas, dist.LogNormal(SIGMA_LOC, SIGMA_SCALE).log_prob(sigmas).exp(), "--", color="0.5", label="prior")
    ax.axvline(SIGMA_TRUE, color="tab:red", label="true sigma")
    ax.set_xlim(0, 2.2)
    ax.set_xlabel("sigma")
    ax.set_title("noise scale sigma")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(args.output_dir, "hierarchical.png")
    fig.savefig(path, dpi=args.dpi)
    plt.close(fig)
    print(f"\n[figure] saved {path}\ndone in {time.time() - start:.1f}s")
    # [end-figure]


# [start-cli]
if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description="A hierarchical model with a diffusion prior and an unknown noise scale"
    )
    parser.add_argument("--num-obs", default=5, type=int, help="noisy measurements of x")
    parser.add_argument("--tol", default=1e-3, type=float, help="rtol = atol of the probability-flow ODE")
    parser.add_argument("--num-samples", default=200, type=int, help="NUTS draws")
    parser.add_argument("--warmup", default=100, type=int, help="NUTS warm-up steps")
    parser.add_argument("--max-tree-depth", default=3, type=int)
    parser.add_argument("--svi-steps", default=400, type=int)
    parser.add_argument("--particles", default=16, type=int, help="ELBO particles (vectorized)")
    parser.add_argument("--lr", default=0.05, type=float)
    parser.add_argument("--progress", action="store_true", help="show NUTS' progress bar")
    parser.add_argument("--seed", default=0, type=int)
    parser.add_argument("--num-threads", default=1, type=int)
    parser.add_argument("--dpi", default=100, type=int)
    parser.add_argument("--output-dir", default="outputs/hierarchical")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for a quick check")
    args = parser.parse_args()
    if args.smoke:
        args.tol, args.num_samples, args.warmup, args.max_tree_depth = 1e-2, 4, 4, 1
        args.svi_steps, args.particles, args.dpi = 5, 4, 50
    main(args)
# [end-cli]
