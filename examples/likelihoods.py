"""
Likelihoods: bits/dim, Hutchinson's estimator, and comparing models on held-out data
====================================================================================

``ScoreSDEPrior.log_prob`` integrates the probability-flow ODE with its divergence,

    log p_eps(x) = log p_T(x_T) + integral_eps^T div f~(x_t, t) dt,

so a score-based model has an exact (up to solver tolerance) log-likelihood, like a normalizing
flow. This tutorial uses it three ways:

1. **bits per dimension** of the shipped ``digits`` prior on the 297 held-out test images:
   bpd = -log p(x) / (D ln 2), D = 64. The images are uniformly dequantized 17-level pixels
   mapped to [-1, 1), so the number on the data's scale is shifted by log2(17/2) = 3.09 to get
   bits per discrete pixel (a bound on the discrete model's code length). A Gaussian fitted to
   the training images is the baseline. A tolerance study on a few images shows how much
   ``rtol``/``atol`` move the answer.
2. **exact trace vs Hutchinson.** ``divergence="exact"`` gets the trace of the 64x64 Jacobian
   from 64 vector-Jacobian products per step; ``divergence="hutchinson"`` uses the unbiased
   estimate eps^T J eps with ``hutchinson_samples`` random probes (fixed along a trajectory).
   Repeating the Hutchinson estimate shows its spread per image and across the test set, and
   its cost, for 1, 4 and 16 probes.
3. **model comparison by held-out likelihood** on fresh ``moons`` data: the shipped ``moons``
   prior, a small network trained briefly with ``fit``, and a Gaussian. Paired differences
   (the same held-out points under each model) with standard errors say which model is
   better and by how much; the denoising score-matching lower bound
   (``log_prob_lower_bound``, no ODE) of the shipped prior is shown next to its exact value.

Prints the tables and saves ``likelihoods_digits.png`` and ``likelihoods_moons.png``.
Run ``python examples/likelihoods.py`` (3-5 minutes on 2 CPU cores) or with ``--smoke``.
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
import torch  # noqa: E402
from torch.distributions import MultivariateNormal  # noqa: E402

from pyro_scoreflow import VPSDE, ScoreNet, ScoreSDEPrior, datasets, fit  # noqa: E402

LOG2_17_OVER_2 = math.log2(17 / 2)  # bits/dim on the [-1, 1) scale -> bits per 17-level pixel
# [end-imports]


# [start-helpers]
def bpd(log_p: torch.Tensor, dim: int) -> torch.Tensor:
    return -log_p / (dim * math.log(2))


def log_prob_batched(prior: ScoreSDEPrior, x: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, int]:
    """log p for ``x`` in chunks (under ``no_grad``), and the total number of score evaluations."""
    out, nfe = [], 0
    with torch.no_grad():
        for chunk in x.split(batch_size):
            out.append(prior.log_prob(chunk))
            nfe += prior.last_nfe
    return torch.cat(out), nfe


def gaussian_fit(train: torch.Tensor, jitter: float = 1e-4) -> MultivariateNormal:
    cov = torch.cov(train.T) + jitter * torch.eye(train.shape[1])
    return MultivariateNormal(train.mean(0), covariance_matrix=cov)


def mean_se(v: torch.Tensor) -> str:
    return f"{float(v.mean()):+.3f} +- {float(v.std() / math.sqrt(len(v))):.3f}"


# [end-helpers]


# [start-bits-per-dim]
def digits_section(args: argparse.Namespace) -> dict:
    prior = ScoreSDEPrior.from_pretrained("digits", rtol=args.tol, atol=args.tol)
    test = datasets.load("digits", split="test", seed=args.seed)[: args.num_test]
    train = datasets.load("digits", split="train", seed=args.seed)
    d = test.shape[1]

    print(f"[1] digits prior on {len(test)} test images (exact trace, rtol = atol = {args.tol:g})")
    t0 = time.time()
    lp, nfe = log_prob_batched(prior, test, args.batch_size)
    elapsed = time.time() - t0
    lp_gauss = gaussian_fit(train).log_prob(test)
    print(f"  {'model':<26}{'log p (nats/image)':>22}{'bits/dim':>10}{'bits/pixel (17 levels)':>24}{'time':>8}")
    for name, v, tt in [("diffusion prior", lp, f"{elapsed:.0f}s"), ("Gaussian (train fit)", lp_gauss, "")]:
        b = float(bpd(v, d).mean())
        print(f"  {name:<26}{mean_se(v):>22}{b:>10.3f}{b + LOG2_17_OVER_2:>24.3f}{tt:>8}")
    diff = lp - lp_gauss
    batches = math.ceil(len(test) / args.batch_size)
    print(f"  paired difference prior - Gaussian: {mean_se(diff)} nats/image ({len(test)} images)")
    print(f"  {nfe} score evaluations in all ({batches} batches of up to {args.batch_size} images)")
    # [end-bits-per-dim]

    # [start-tolerance]
    # how much the tolerance matters: a few images at each tolerance against the tightest
    sub = test[: args.num_tol]
    print(f"\n  tolerance study on {len(sub)} images (reference rtol = atol = {args.tols[-1]:g})")
    results = {}
    for tol in args.tols:
        p = prior.with_options(rtol=tol, atol=tol)
        t0 = time.time()
        v, n = log_prob_batched(p, sub, args.batch_size)
        results[tol] = (v, n, time.time() - t0)
    ref = results[args.tols[-1]][0]
    print(f"  {'rtol = atol':>12}{'NFE':>7}{'time':>8}{'max |error| (nats)':>20}{'mean error':>12}")
    for tol, (v, n, tt) in results.items():
        err = v - ref
        print(f"  {tol:>12g}{n:>7}{tt:>7.1f}s{float(err.abs().max()):>20.2e}{float(err.mean()):>+12.2e}")
    # [end-tolerance]

    # [start-hutchinson]
    # exact trace vs Hutchinson: repeated estimates on the same images
    sub = test[: args.num_hutch]
    p_exact = prior.with_options(rtol=args.hutch_tol, atol=args.hutch_tol)
    t0 = time.time()
    exact, nfe = log_prob_batched(p_exact, sub, args.batch_size)
    exact_time = time.time() - t0
    print(
        f"\n[2] exact trace vs Hutchinson on {len(sub)} images, {args.repeats} repeats, "
        f"rtol = atol = {args.hutch_tol:g}"
    )
    print(
        f"  {'divergence':<22}{'time/pass':>10}{'NFE':>6}{'sd per image':>14}{'bias (nats)':>18}{'sd of mean bpd':>16}"
    )
    print(f"  {'exact (64 VJPs)':<22}{exact_time:>9.1f}s{nfe:>6}{0.0:>14.3f}{'0':>18}{0.0:>16.4f}")
    errors = {}
    for s in args.probes:
        p = p_exact.with_options(divergence="hutchinson", hutchinson_samples=s)
        draws, tt = [], 0.0
        for _ in range(args.repeats):
            t0 = time.time()
            v, nfe = log_prob_batched(p, sub, args.batch_size)
            tt += time.time() - t0
            draws.append(v)
        err = torch.stack(draws) - exact  # (repeats, images)
        errors[s] = err
        sd = err.std(0).mean()  # spread of one estimate of one image
        # spread of the mean over the images (independent probes per image), in bits/dim
        sd_mean_bpd = err.var(0).mean().sqrt() / math.sqrt(len(sub)) / (d * math.log(2))
        label = f"hutchinson ({s} probe{'s' if s > 1 else ''})"
        print(f"  {label:<22}{tt / args.repeats:>9.1f}s{nfe:>6}{float(sd):>14.3f}{mean_se(err.flatten()):>18}"
              f"{float(sd_mean_bpd):>16.4f}")  # fmt: skip
    return dict(lp=lp, lp_gauss=lp_gauss, errors=errors, dim=d)
    # [end-hutchinson]


# [start-comparison]
def moons_section(args: argparse.Namespace) -> dict:
    sde = VPSDE()
    train = datasets.load("moons", args.train_size, seed=1)
    held_out = datasets.load("moons", args.num_held_out, seed=12345)
    print(f"\n[3] model comparison on {len(held_out)} fresh moons points (held out; rtol = atol = {args.moons_tol:g})")
    shipped = ScoreSDEPrior.from_pretrained("moons", rtol=args.moons_tol, atol=args.moons_tol)
    t0 = time.time()
    net = ScoreNet(sde, (2,), hidden=64, num_layers=2, embed_dim=32)
    net = fit(net, sde, train, steps=args.train_steps, batch_size=256, lr=3e-3, seed=0, progress=False)
    train_time = time.time() - t0
    brief = ScoreSDEPrior(net, sde, (2,), rtol=args.moons_tol, atol=args.moons_tol)
    gauss = gaussian_fit(train, jitter=0.0)
    models = {"shipped moons prior": shipped, f"brief fit ({args.train_steps} steps)": brief, "Gaussian": gauss}
    lps = {}
    for name, model in models.items():
        if isinstance(model, ScoreSDEPrior):
            lps[name] = log_prob_batched(model, held_out, 4096)[0]
        else:
            lps[name] = model.log_prob(held_out)
    base = lps["shipped moons prior"]
    print(f"  (brief fit: ScoreNet(hidden=64, num_layers=2) on {len(train)} points, {train_time:.0f}s)")
    print(f"  {'model':<30}{'log p (nats/point)':>22}{'bits/dim':>10}{'difference to shipped':>26}")
    for name, v in lps.items():
        diff = "" if v is base else mean_se(v - base)
        print(f"  {name:<30}{mean_se(v):>22}{float(bpd(v, 2).mean()):>10.3f}{diff:>26}")
    torch.manual_seed(args.seed)
    with torch.no_grad():
        bound = shipped.log_prob_lower_bound(held_out, num_samples=args.bound_samples)
    gap = base - bound
    print(f"  {'shipped, DSM lower bound':<30}{mean_se(bound):>22}{float(bpd(bound, 2).mean()):>10.3f}"
          f"{mean_se(-gap):>26}   ({args.bound_samples} time samples per point)")  # fmt: skip
    return dict(models=models, lps=lps, held_out=held_out)


# [end-comparison]


# [start-figures]
def figures(args: argparse.Namespace, digits: dict, moons: dict) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    d = digits["dim"]
    bins = 30
    axes[0].hist(bpd(digits["lp"], d).numpy(), bins=bins, alpha=0.6, label="diffusion prior")
    axes[0].hist(bpd(digits["lp_gauss"], d).numpy(), bins=bins, alpha=0.6, label="Gaussian")
    axes[0].set_xlabel("bits/dim of a test image (pixels on [-1, 1))")
    axes[0].set_title("held-out digits")
    axes[0].legend()
    errs = digits["errors"]
    axes[1].boxplot([e.flatten().numpy() for e in errs.values()], showfliers=False)
    axes[1].set_xticks(range(1, len(errs) + 1), [f"{s} probe{'s' if s > 1 else ''}" for s in errs])
    axes[1].axhline(0, color="black", lw=0.8)
    axes[1].set_ylabel("Hutchinson log p - exact log p (nats)")
    axes[1].set_title("Hutchinson's estimator: error per image")
    fig.tight_layout()
    fig.savefig(os.path.join(args.output_dir, "likelihoods_digits.png"), dpi=args.dpi)
    plt.close(fig)

    axis = torch.linspace(-3, 3, args.grid_size)
    gx, gy = torch.meshgrid(axis, axis, indexing="xy")
    grid = torch.stack([gx, gy], -1).reshape(-1, 2)
    fig, axes = plt.subplots(
        1, len(moons["models"]), figsize=(4.2 * len(moons["models"]) + 1.0, 4.4), layout="constrained"
    )
    densities = {}
    for name, model in moons["models"].items():
        if isinstance(model, ScoreSDEPrior):
            lp = log_prob_batched(model.with_options(rtol=1e-3, atol=1e-3), grid, 8192)[0]
        else:
            lp = model.log_prob(grid)
        densities[name] = lp.exp().reshape(gx.shape)
    vmax = max(float(d.max()) for d in densities.values())  # one colour scale for all panels
    for ax, (name, density) in zip(axes, densities.items()):
        mesh = ax.pcolormesh(gx, gy, density, shading="auto", cmap="viridis", vmin=0.0, vmax=vmax)
        held = moons["held_out"][:300]
        ax.scatter(held[:, 0], held[:, 1], s=1, color="white", alpha=0.5)
        ax.set_title(f"{name}\n{float(bpd(moons['lps'][name], 2).mean()):.3f} bits/dim held out", fontsize=11)
        ax.set_aspect("equal")
        ax.set_xlabel("$x_1$")
        ax.set_ylabel("$x_2$")
    fig.colorbar(mesh, ax=axes, shrink=0.85, label="density $p(x)$ (white: 300 held-out points)")
    fig.savefig(os.path.join(args.output_dir, "likelihoods_moons.png"), dpi=args.dpi)
    plt.close(fig)
    print(f"\n[figures] saved likelihoods_digits.png and likelihoods_moons.png in {args.output_dir}")


# [end-figures]


# [start-cli]
def main(args: argparse.Namespace) -> None:
    if args.smoke:
        print("--smoke: tiny sizes that only check that the script runs; its numbers are not meaningful.")
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.num_threads)
    os.makedirs(args.output_dir, exist_ok=True)
    start = time.time()
    digits = digits_section(args)
    moons = moons_section(args)
    figures(args, digits, moons)
    print(f"done in {time.time() - start:.1f}s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Likelihoods of score-based priors: bits/dim, Hutchinson, comparison")
    parser.add_argument("--num-test", default=297, type=int, help="digits test images (297: the whole split)")
    parser.add_argument("--tol", default=1e-3, type=float, help="rtol = atol for the digits bits/dim")
    parser.add_argument("--tols", default=[1e-2, 1e-3, 1e-4, 1e-5], type=float, nargs="+", help="tolerance study")
    parser.add_argument("--num-tol", default=8, type=int, help="images in the tolerance study")
    parser.add_argument("--num-hutch", default=32, type=int, help="images in the Hutchinson study")
    parser.add_argument("--hutch-tol", default=1e-3, type=float, help="rtol = atol in the Hutchinson study")
    parser.add_argument("--probes", default=[1, 4, 16], type=int, nargs="+", help="Hutchinson probes per point")
    parser.add_argument("--repeats", default=4, type=int, help="independent Hutchinson estimates per image")
    parser.add_argument("--batch-size", default=100, type=int, help="images per log_prob call")
    parser.add_argument("--train-size", default=20000, type=int, help="moons training points (brief fit, Gaussian)")
    parser.add_argument("--train-steps", default=300, type=int, help="steps of the brief fit")
    parser.add_argument("--num-held-out", default=2000, type=int, help="fresh moons points")
    parser.add_argument("--moons-tol", default=1e-4, type=float, help="rtol = atol for the moons log-likelihoods")
    parser.add_argument("--bound-samples", default=64, type=int, help="time samples of the DSM lower bound")
    parser.add_argument("--grid-size", default=80, type=int, help="density grid points per axis")
    parser.add_argument("--seed", default=0, type=int)
    parser.add_argument("--num-threads", default=1, type=int)
    parser.add_argument("--dpi", default=90, type=int)
    parser.add_argument("--output-dir", default="outputs/likelihoods")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for a quick check")
    args = parser.parse_args()
    if args.smoke:
        args.num_test, args.tol, args.tols, args.num_tol, args.num_hutch = 4, 1e-2, [1e-1, 1e-2], 2, 2
        args.hutch_tol, args.probes, args.repeats, args.train_size, args.train_steps = 1e-1, [1, 4], 2, 512, 5
        args.num_held_out, args.moons_tol, args.bound_samples, args.grid_size, args.dpi = 50, 1e-2, 4, 12, 40
    main(args)
# [end-cli]
