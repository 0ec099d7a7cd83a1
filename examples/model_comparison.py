"""
Model comparison with score priors: the evidence from DiffusionSMC, and HMC in the latent space
=================================================================================================

Bayesian model comparison ranks models by their evidence p(y | M) = E_{p(x | M)}[p(y | x, M)]. With a
score prior the expectation runs over a diffusion model, and ``DiffusionSMC`` estimates it: its
``log_evidence`` is the log of an unbiased estimate of p(y) (twisted sequential Monte Carlo along the
reverse diffusion, Wu et al. 2023). This tutorial asks two questions of data and answers both with the
log evidence:

1. **Which prior explains the points?** Five points of the moons data set, each observed with noise 0.1:
   is the shipped ``moons`` prior or the shipped ``checkerboard`` prior the better model? The log Bayes
   factor is the sum of the points' log evidences (each point is its own inference), checked against
   importance sampling with 20,000 prior draws (reliable in 2-D).
2. **Which noise level?** A test digit observed with noise of standard deviation 0.2 on every pixel: the
   evidence of the shipped ``digits`` prior with noise 0.1, 0.2 and 0.4 picks the right one.

Then it draws the posterior of an inpainting problem (the top half of a digit observed) in two exact ways:
NUTS in the latent space of the prior's flow (``ScoreFlowReparam``: x = decode(x_base), x_base ~ N(0, I),
decoded by 10 DPM-Solver++ steps; no divergence, so a gradient costs 10 score evaluations and their
backward pass) and ``DiffusionSMC``, and saves ``model_comparison.png``.

Run ``python examples/model_comparison.py`` (a few minutes on one core) or with ``--smoke`` (seconds).
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
from pyro import poutine  # noqa: E402
from pyro.infer import MCMC, NUTS, Predictive  # noqa: E402
from pyro.infer.autoguide import init_to_median  # noqa: E402

from pyro_scoreflow import ScoreSDEPrior, datasets  # noqa: E402
from pyro_scoreflow.infer import DiffusionSMC, ScoreFlowReparam  # noqa: E402

# [end-imports]


# [start-models]
def point_model(prior, noise, y=None):
    """One 2-D point x from the prior, observed with Gaussian noise."""
    x = pyro.sample("x", prior)
    return pyro.sample("y", dist.Normal(x, noise).to_event(1), obs=y)


def pixel_model(prior, noise, observed: int, y=None):
    """A digit x from the prior; its first ``observed`` pixels are observed with Gaussian noise."""
    x = pyro.sample("x", prior)
    return pyro.sample("y", dist.Normal(x[..., :observed], noise).to_event(1), obs=y)


# [end-models]


# [start-main]
def importance_log_evidence(draws: torch.Tensor, noise: float, y: torch.Tensor) -> float:
    """log (1/n) sum_i p(y | x_i) over prior draws x_i: the plain Monte Carlo estimate of log p(y)."""
    log_lik = dist.Normal(draws, noise).to_event(1).log_prob(y)
    return float(log_lik.logsumexp(0)) - math.log(len(draws))


def main(args: argparse.Namespace) -> None:
    pyro.set_rng_seed(args.seed)
    torch.set_num_threads(args.num_threads)
    os.makedirs(args.output_dir, exist_ok=True)
    start = time.time()
    # [end-main]

    # [start-evidence]
    # -- 1. which prior explains the points? --------------------------------------------------------------
    noise = 0.1
    truth = datasets.load("moons", num_samples=args.num_points, seed=args.seed + 1)
    y = truth + noise * torch.randn_like(truth)
    priors = {name: ScoreSDEPrior.from_pretrained(name) for name in ("moons", "checkerboard")}
    evidence = {name: [] for name in priors}
    check = {name: [] for name in priors}
    with torch.no_grad():  # prior draws for the importance-sampling check (reverse SDE, 500 steps), for all points
        draws = {name: prior.sample((args.is_draws,)) for name, prior in priors.items()}
    print(f"1. log evidence of {args.num_points} points (noise {noise}) under each shipped prior")
    print(f"{'point':>6} {'y':>16} " + " ".join(f"{n + ' SMC':>16} {n + ' IS':>16}" for n in priors))
    for i in range(args.num_points):
        row = []
        for name, prior in priors.items():
            smc = DiffusionSMC(point_model, args.particles, num_steps=args.steps).run(prior, noise, y[i])
            evidence[name].append(smc.log_evidence)
            check[name].append(importance_log_evidence(draws[name], noise, y[i]))
            row.append(f"{evidence[name][-1]:>16.3f} {check[name][-1]:>16.3f}")
        print(f"{i:>6} {str([round(v, 2) for v in y[i].tolist()]):>16} " + " ".join(row))
    totals = {name: sum(v) for name, v in evidence.items()}
    bayes = totals["moons"] - totals["checkerboard"]
    is_bayes = sum(check["moons"]) - sum(check["checkerboard"])
    print(
        f"log Bayes factor moons : checkerboard = {bayes:.2f} (importance sampling: {is_bayes:.2f}): with even prior "
        f"odds, the moons prior is {math.exp(min(bayes, 700)):.3g} times as probable as the checkerboard prior"
    )

    # [end-evidence]

    # [start-noise]
    # -- 2. which noise level? --------------------------------------------------------------------------
    digits = ScoreSDEPrior.from_pretrained("digits")
    clean = datasets.load("digits", split="test", seed=args.seed)[args.digit]
    true_noise = 0.2
    y_digit = clean + true_noise * torch.randn(64, generator=torch.Generator().manual_seed(args.seed))
    levels = (0.1, 0.2, 0.4)
    noise_evidence = {}
    print(f"\n2. a test digit observed with noise {true_noise} on all 64 pixels: log evidence per noise level")
    for s in levels:
        smc = DiffusionSMC(pixel_model, args.particles, num_steps=args.steps).run(digits, s, 64, y_digit)
        noise_evidence[s] = smc.log_evidence
        print(f"   noise {s:<4}: log p(y) = {smc.log_evidence:8.2f}   (smallest ESS {min(smc.ess):.0f})")
    best = max(noise_evidence, key=noise_evidence.get)
    print(f"   the evidence picks noise {best} (true: {true_noise})")

    # [end-noise]

    # [start-latent]
    # -- 3. inpainting: NUTS in the latent space and DiffusionSMC -------------------------------------------
    observed, inpaint_noise = 32, 0.1
    y_top = clean[:observed] + inpaint_noise * torch.randn(observed, generator=torch.Generator().manual_seed(1))
    latent_model = poutine.reparam(pixel_model, config={"x": ScoreFlowReparam("dpm-solver", num_steps=10)})
    kernel = NUTS(latent_model, max_tree_depth=args.tree_depth, init_strategy=init_to_median)
    mcmc = MCMC(kernel, num_samples=args.nuts_samples, warmup_steps=args.nuts_warmup, disable_progbar=True)
    t0 = time.time()
    mcmc.run(digits, inpaint_noise, observed, y_top)
    nuts_time = time.time() - t0
    samples = mcmc.get_samples()
    hmc_x = Predictive(latent_model, posterior_samples=samples, return_sites=["x"], parallel=True)(
        digits, inpaint_noise, observed
    )["x"]
    t0 = time.time()
    smc = DiffusionSMC(pixel_model, args.particles, num_steps=args.steps).run(digits, inpaint_noise, observed, y_top)
    smc_time = time.time() - t0
    smc_x = smc.get_samples()["x"]
    gap = float((hmc_x.mean(0) - smc_x.mean(0))[observed:].pow(2).mean().sqrt())
    print(
        f"\n3. inpainting the bottom half: NUTS in the latent space ({args.nuts_warmup} + {args.nuts_samples} draws, "
        f"{nuts_time:.0f} s) and DiffusionSMC ({args.particles} particles, {smc_time:.0f} s, log p(y) = "
        f"{smc.log_evidence:.1f}); their posterior means of the unobserved pixels differ by {gap:.3f} RMS"
    )

    # [end-latent]

    # [start-figure]
    # -- figure ---------------------------------------------------------------------------------------
    fig = plt.figure(figsize=(13, 5.5))
    grid = fig.add_gridspec(2, 8, height_ratios=[1.6, 1])
    ax = fig.add_subplot(grid[0, :3])
    for name, prior in priors.items():
        with torch.no_grad():
            draws = prior.with_options(sampler="dpm-solver", num_steps=20).sample((2000,))
        ax.scatter(draws[:, 0], draws[:, 1], s=1, alpha=0.3, label=f"{name} prior")
    ax.scatter(y[:, 0], y[:, 1], c="k", marker="x", s=40, label="observations")
    # the data's range: a learned score is poor far from its data, so a few draws land far out
    ax.set_xlim(-3, 3)
    ax.set_ylim(-3, 3)
    ax.set_aspect("equal")
    ax.set_title(f"log Bayes factor moons : checkerboard = {bayes:.1f}", fontsize=9)
    legend = ax.legend(fontsize=7, loc="upper left")
    for handle in legend.legend_handles:
        handle.set_sizes([20])
        handle.set_alpha(1)
    ax = fig.add_subplot(grid[0, 3:5])
    width = 0.38
    idx = torch.arange(args.num_points).float()
    for k, name in enumerate(priors):
        ax.bar(idx + (k - 0.5) * width, evidence[name], width, label=name)
    ax.set_xticks(idx.tolist())
    ax.set_xlabel("point")
    ax.set_ylabel("log p(y | prior)")
    ax.legend(fontsize=7)
    ax = fig.add_subplot(grid[0, 5:])
    ax.plot(levels, [noise_evidence[s] for s in levels], "o-")
    ax.axvline(true_noise, color="k", ls="--", lw=0.8, label="true noise")
    ax.set_xscale("log")
    ax.set_xlabel("assumed noise std")
    ax.set_ylabel("log p(y | noise)")
    ax.legend(fontsize=7)
    panels = [("truth", clean), ("observed top", torch.cat([y_top, torch.full((64 - observed,), float("nan"))]))]
    panels += [("HMC mean", hmc_x.mean(0)), ("SMC mean", smc_x.mean(0))]
    panels += [("HMC draw", hmc_x[len(hmc_x) // 2]), ("HMC draw", hmc_x[-1])]
    panels += [("SMC draw", smc_x[0]), ("SMC draw", smc_x[1])]
    for k, (title, img) in enumerate(panels):
        ax = fig.add_subplot(grid[1, k])
        ax.imshow(img.reshape(8, 8).clamp(-1, 1).numpy(), cmap="gray_r", vmin=-1, vmax=1)
        ax.set_title(title, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    path = os.path.join(args.output_dir, "model_comparison.png")
    tmp = os.path.join(args.output_dir, ".model_comparison.tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    print(f"\nsaved {path} ({time.time() - start:.0f} s in all)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--output-dir", default=".", help="where to write model_comparison.png")
    parser.add_argument("--smoke", action="store_true", help="tiny settings: a smoke test")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-threads", type=int, default=1)
    parser.add_argument("--num-points", type=int, default=5)
    parser.add_argument("--particles", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--is-draws", type=int, default=20000)
    parser.add_argument("--digit", type=int, default=3, help="index of the test digit")
    parser.add_argument("--nuts-warmup", type=int, default=100)
    parser.add_argument("--nuts-samples", type=int, default=100)
    parser.add_argument("--tree-depth", type=int, default=4)
    args = parser.parse_args()
    if args.smoke:
        print("--smoke: tiny sizes that only check that the script runs; its numbers are not meaningful.")
        args.num_points, args.particles, args.steps, args.is_draws = 2, 100, 20, 200
        args.nuts_warmup, args.nuts_samples, args.tree_depth = 3, 4, 1
    main(args)
# [end-figure]
