"""
Bayesian inverse problems with a diffusion prior: denoising and inpainting 8x8 digits
=====================================================================================

A trained score model is a prior over images. Given a measurement y of a clean image x, the
posterior p(x | y) ∝ p(x) p(y | x) combines what the prior knows about digits with what the
measurement says. This tutorial uses the shipped ``digits`` prior (a VP-SDE score network
trained on the 1500 training images, event shape (64,), pixels in [-1, 1)) on held-out test
images, in three tasks written as Pyro models::

    x ~ ScoreSDEPrior.from_pretrained("digits")
    y ~ Normal(x[observed pixels], sigma_y)          # observed sites

* **denoise**: every pixel observed with noise sigma_y = 0.3;
* **inpaint**: the bottom half missing, the top half observed with sigma_y = 0.05;
* **crop**: a 3x3 hole in the middle missing, the rest observed with sigma_y = 0.05.

**Clipping the denoiser.** Guided diffusion differentiates Tweedie's estimate
x0_hat(x_t) = (x_t + sigma_t^2 s(x_t, t)) / alpha_t of the clean image. Near t = T the VP SDE has
alpha_T = 0.0066, so the network's small errors are multiplied by 150: for the shipped prior
x0_hat has an RMS of 7 at t = T (for images in [-1, 1)) and a Jacobian of RMS 360, and the guided
reverse SDE overflows in its first steps. The exact E[x_0 | x_t] always lies in the data's
bounding box [-1, 1]^64, so the score is wrapped to clamp x0_hat into it (``ClippedScore``, the
"clip denoised" step of DDPM samplers). It changes the score only where it is certainly wrong;
all methods below use the same clipped prior.

The script compares four ways to get at the posterior:

1. ``DiffusionPosterior`` (``pyro_scoreflow.infer``): the reverse-time SDE of the prior with the
   score replaced by an estimate of the posterior score, guided by ΠGDM (exact for linear-Gaussian
   observations of a Gaussian prior; here it reads A and sigma_y from the model) or DPS (any
   differentiable likelihood). One pass costs as much as sampling the prior. Both guidances are
   approximations: they do not sample the exact posterior even with an exact score.
2. **SVI with the ODE log-density**: ``AutoNormal`` (a mean-field Gaussian) fitted by the ELBO,
   the prior term ``prior.log_prob`` differentiated through the probability-flow solver. In 64-D
   the exact divergence (64 vector-Jacobian products per step, then backpropagated) costs tens
   of seconds per gradient on a CPU, so the ELBO uses Hutchinson's estimator (4 probes; unbiased,
   so the ELBO gradient stays unbiased) at loose tolerances (1e-2).
3. **SVI with the score-matching lower bound** as a surrogate prior: ``pyro.factor("prior",
   prior.log_prob_lower_bound(x))``, no ODE at all, a few score evaluations per particle
   (Feng & Bouman 2023). The bound is not log p (the gap varies with x), so this is a
   different, cheaper objective, not the same posterior.
4. **NUTS on the crop**: Hamiltonian Monte Carlo over the 9 hole pixels only, the other pixels
   fixed at their observed values (sigma_y = 0.05 is small next to the prior's spread). HMC
   needs a potential that is a smooth, deterministic function of x. The ODE log-density is
   neither at affordable settings: an adaptive solver changes its steps from one x to the next
   (at rtol = 1e-2 the log-density jumps by ~0.3 nats between points 0.005 apart), and NUTS'
   step size collapses to ~2e-3. So NUTS samples the surrogate posterior of method 3 with
   *frozen* noise (common random numbers: the bound's times and noises drawn from a fixed seed),
   which is smooth in x and costs 32 score evaluations per gradient.

**The data box.** The pixels lie in [-1, 1), and the prior p_eps is the data blurred by
sigma(eps) = 1e-3: its density drops by orders of magnitude within a few 1e-3 of the box's
faces. A Gaussian guide or an HMC trajectory in pixel space hits these walls. Methods 2-4
therefore work in u = atanh(x) (``box_model``, ``crop_model``: x = tanh(u), plus log|dx/du|),
where the walls are far out and gentle; the guide is Gaussian in u.

The script prints a table of wall time, RMSE of the posterior mean to the clean image (all
pixels, and the unobserved ones), the mean posterior standard deviation on the unobserved
pixels and the share of pixels whose clean value lies within two posterior standard
deviations of the mean, and saves ``digits_inverse_problems.png`` (posterior means and
standard deviations per method and task).

Run ``python examples/digits_inverse_problems.py`` (about 5 minutes on 2 idle CPU cores, most of
it SVI with the ODE; over 25 minutes when other jobs share the cores) or with ``--smoke``.
"""

# [start-imports]
from __future__ import annotations

import argparse
import functools
import os
import time
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pyro  # noqa: E402
import pyro.distributions as dist  # noqa: E402
import torch  # noqa: E402
from pyro.infer import MCMC, NUTS, SVI, Trace_ELBO  # noqa: E402
from pyro.infer.autoguide import AutoNormal  # noqa: E402
from pyro.infer.autoguide.initialization import init_to_value  # noqa: E402
from pyro.optim import ClippedAdam  # noqa: E402
from torch import nn  # noqa: E402
from torch.distributions import constraints  # noqa: E402

from pyro_scoreflow import ScoreSDEPrior, datasets  # noqa: E402
from pyro_scoreflow.infer import DiffusionPosterior  # noqa: E402

# [end-imports]

# [start-prior]
D = 64


class ClippedScore(nn.Module):
    """s(x, t) whose Tweedie estimate (x + sigma^2 s) / alpha is clamped into the data range [lo, hi]."""

    def __init__(self, score_model: nn.Module, sde, lo: float = -1.0, hi: float = 1.0):
        super().__init__()
        self.score_model, self.sde, self.lo, self.hi = score_model, sde, lo, hi

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = (v.reshape(-1, *([1] * (x.dim() - 1))) for v in self.sde.marginal(t))
        x0 = ((x + sigma**2 * self.score_model(x, t)) / alpha).clamp(self.lo, self.hi)
        return (alpha * x0 - x) / sigma**2


# [end-prior]


# [start-tasks]
@dataclass
class Task:
    name: str
    image: int  # index into the test split
    observed: torch.Tensor  # bool mask (64,)
    sigma: float

    @property
    def hidden(self) -> torch.Tensor:
        return ~self.observed


def make_tasks() -> list[Task]:
    rows = torch.arange(D) // 8
    cols = torch.arange(D) % 8
    hole = (rows >= 3) & (rows <= 5) & (cols >= 2) & (cols <= 4)
    return [
        Task("denoise", 3, torch.ones(D, dtype=torch.bool), 0.3),
        Task("inpaint", 11, rows < 4, 0.05),
        Task("crop", 5, ~hole, 0.05),
    ]


# [end-tasks]


# [start-models]
def model(prior: ScoreSDEPrior, y: torch.Tensor, observed: torch.Tensor, sigma: float) -> None:
    """x ~ diffusion prior; the observed pixels of x are measured with Gaussian noise."""
    x = pyro.sample("x", prior)
    pyro.sample("y", dist.Normal(x[..., observed], sigma).to_event(1), obs=y)


def box_model(log_prior, y: torch.Tensor, observed: torch.Tensor, sigma: float) -> None:
    """The same model for SVI, with x = tanh(u) inside the data box and ``log_prior(x)`` as the prior term.

    The prior density p_eps has walls at -1 and 1 about sigma(eps) = 1e-3 wide (the data are pixels in
    [-1, 1) blurred by the SDE up to eps); in u the walls are far out and smooth. log|dx/du| is added.
    """
    u = pyro.sample("u", dist.ImproperUniform(constraints.real, (), (D,)))
    x = torch.tanh(u)
    pyro.factor("prior", log_prior(x) + torch.log1p(-(x**2)).sum(-1))
    pyro.sample("y", dist.Normal(x[..., observed], sigma).to_event(1), obs=y)


def frozen_bound(prior: ScoreSDEPrior, num_samples: int, seed: int):
    """The DSM lower bound with common random numbers: a deterministic, smooth function of x (for HMC)."""

    def log_prior(x: torch.Tensor) -> torch.Tensor:
        with torch.random.fork_rng():  # leaves the global RNG (NUTS' momenta) untouched
            torch.manual_seed(seed)
            return prior.log_prob_lower_bound(x, num_samples=num_samples)

    return log_prior


def crop_model(log_prior, known: torch.Tensor, hidden: torch.Tensor) -> None:
    """Only the hidden pixels are latent (x = tanh(u) there); the others are fixed to ``known``."""
    u = pyro.sample("u", dist.ImproperUniform(constraints.real, (), (int(hidden.sum()),)))
    z = torch.tanh(u)
    pyro.factor("prior", log_prior(known.masked_scatter(hidden, z)) + torch.log1p(-(z**2)).sum(-1))


# [end-models]


# [start-svi]
def fit_svi(log_prior, init: torch.Tensor, steps: int, particles: int, lr: float, *data) -> tuple[torch.Tensor, ...]:
    """AutoNormal over u by the ELBO (vectorized particles); mean and standard deviation of x = tanh(u)."""
    pyro.clear_param_store()
    u0 = torch.atanh(init.clamp(-0.95, 0.95))
    guide = AutoNormal(box_model, init_loc_fn=init_to_value(values={"u": u0}), init_scale=0.1)
    elbo = Trace_ELBO(num_particles=particles, vectorize_particles=True, max_plate_nesting=0)
    svi = SVI(box_model, guide, ClippedAdam({"lr": lr, "lrd": 0.1 ** (1 / steps)}), elbo)
    for _ in range(steps):
        svi.step(log_prior, *data)
    with torch.no_grad():
        x = torch.tanh(guide.locs.u + guide.scales.u * torch.randn(4000, D))
    return x.mean(0), x.std(0)


# [end-svi]


# [start-scores]
def scores(clean: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, hidden: torch.Tensor) -> dict:
    err = mean - clean
    region = hidden if hidden.any() else torch.ones_like(hidden)
    return dict(
        rmse=float(err.pow(2).mean().sqrt()),
        rmse_hidden=float(err[region].pow(2).mean().sqrt()),
        std_hidden=float(std[region].mean()),
        coverage=float((err.abs() <= 2 * std).float().mean()),
    )


# [end-scores]


# [start-setup]
def main(args: argparse.Namespace) -> None:
    if args.smoke:
        print("--smoke: tiny sizes that only check that the script runs; its numbers are not meaningful.")
    pyro.set_rng_seed(args.seed)
    torch.set_num_threads(args.num_threads)
    os.makedirs(args.output_dir, exist_ok=True)
    start = time.time()

    shipped = ScoreSDEPrior.from_pretrained("digits")
    prior = ScoreSDEPrior(ClippedScore(shipped.score_model, shipped.sde), shipped.sde, (D,), num_steps=args.num_steps)
    test = datasets.load("digits", split="test", seed=args.seed)
    # the ODE log-density for SVI and NUTS: loose tolerances, Hutchinson's trace
    ode_prior = prior.with_options(rtol=args.tol, atol=args.tol, divergence="hutchinson", hutchinson_samples=4)
    mean_image = datasets.load("digits", split="train", seed=args.seed).mean(0)
    tasks = make_tasks()
    results: dict[str, dict[str, dict]] = {}
    pictures: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}

    for task in tasks:
        clean = test[task.image]
        y = clean[task.observed] + task.sigma * torch.randn(int(task.observed.sum()))
        observation = torch.full((D,), float("nan")).masked_scatter(task.observed, y)
        data = (y, task.observed, task.sigma)
        res, pics = {}, {"clean": (clean, None), "observed": (observation, None)}
        print(
            f"[{task.name}] test image {task.image}: {int(task.observed.sum())} pixels observed, sigma_y {task.sigma}"
        )
        # [end-setup]

        # [start-diffusion-posterior]
        for guidance in ("pigdm", "dps"):
            t0 = time.time()
            post = DiffusionPosterior(model, args.num_samples, guidance=guidance, num_steps=args.num_steps)
            x = post.run(prior, *data).get_samples()["x"]
            name = f"DiffusionPosterior {guidance}"
            res[name] = dict(time=time.time() - t0, **scores(clean, x.mean(0), x.std(0), task.hidden))
            pics[name] = (x.mean(0), x.std(0))
        # [end-diffusion-posterior]

        # [start-svi-runs]
        # SVI: start at the observation, unobserved pixels at the training images' mean
        init = mean_image.masked_scatter(task.observed, y)
        t0 = time.time()
        mean, std = fit_svi(ode_prior.log_prob, init, args.svi_ode_steps, args.svi_ode_particles, args.lr, *data)
        name = "SVI, ODE log p"
        res[name] = dict(time=time.time() - t0, **scores(clean, mean, std, task.hidden))
        pics[name] = (mean, std)

        t0 = time.time()
        bound = functools.partial(prior.log_prob_lower_bound, num_samples=args.bound_samples)
        mean, std = fit_svi(bound, init, args.svi_bound_steps, args.svi_bound_particles, args.lr, *data)
        name = "SVI, DSM bound"
        res[name] = dict(time=time.time() - t0, **scores(clean, mean, std, task.hidden))
        pics[name] = (mean, std)
        # [end-svi-runs]

        # [start-nuts]
        if task.name == "crop":
            known = clean.masked_fill(task.hidden, 0.0).masked_scatter(task.observed, y)
            init_u = torch.atanh(mean_image[task.hidden].clamp(-0.95, 0.95))
            kernel = NUTS(
                crop_model, max_tree_depth=args.max_tree_depth, max_plate_nesting=0,
                init_strategy=init_to_value(values={"u": init_u}),
            )  # fmt: skip
            t0 = time.time()
            mcmc = MCMC(kernel, num_samples=args.nuts_samples, warmup_steps=args.nuts_warmup, disable_progbar=True)
            mcmc.run(frozen_bound(prior, args.nuts_bound_samples, args.seed), known, task.hidden)
            z = torch.tanh(mcmc.get_samples()["u"])
            mean = known.masked_scatter(task.hidden, z.mean(0))
            std = torch.full((D,), task.sigma).masked_scatter(task.hidden, z.std(0))  # observed: their noise
            name = f"NUTS on the crop ({args.nuts_warmup}+{args.nuts_samples})"
            res[name] = dict(time=time.time() - t0, **scores(clean, mean, std, task.hidden))
            res[name]["step_size"] = kernel.step_size
            pics["NUTS (crop)"] = (mean, std)
        results[task.name], pictures[task.name] = res, pics
        # [end-nuts]

    # [start-table]
    # -- table ----------------------------------------------------------------------------------
    print(f"\n{'task':<9}{'method':<32}{'time':>8}{'RMSE':>7}{'RMSE unobs.':>12}{'sd unobs.':>10}{'within 2 sd':>12}")
    for task_name, res in results.items():
        for name, r in res.items():
            print(
                f"{task_name:<9}{name:<32}{r['time']:>7.1f}s{r['rmse']:>7.3f}{r['rmse_hidden']:>12.3f}"
                f"{r['std_hidden']:>10.3f}{r['coverage']:>11.0%}"
            )
    print("(unobserved = all pixels for denoising; RMSE of the posterior mean to the clean image, pixels in [-1, 1))")
    # [end-table]

    # [start-figure]
    # -- figure: per task, clean and observed image, then the mean and sd of each method ---------
    methods = ["DiffusionPosterior pigdm", "DiffusionPosterior dps", "SVI, ODE log p", "SVI, DSM bound", "NUTS (crop)"]
    labels = {
        "DiffusionPosterior pigdm": "ΠGDM",
        "DiffusionPosterior dps": "DPS",
        "SVI, ODE log p": "SVI, ODE",
        "SVI, DSM bound": "SVI, bound",
        "NUTS (crop)": "NUTS",
    }
    ncols = 2 + 2 * len(methods)
    fig, axes = plt.subplots(
        len(tasks), ncols, figsize=(1.35 * ncols + 1.2, 1.75 * len(tasks) + 0.6), layout="constrained"
    )
    images = {}  # one image per colour map, for the colour bars
    for r, task in enumerate(tasks):
        pics = pictures[task.name]
        panels = [("clean", pics["clean"][0], "gray_r"), ("observed\n(cyan: missing)", pics["observed"][0], "gray_r")]
        for m in methods:
            mean, std = pics.get(m, (None, None))
            panels += [(f"{labels[m]}\nmean", mean, "gray_r"), (f"{labels[m]}\nsd", std, "magma")]
        for c, (title, img, cmap) in enumerate(panels):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if img is None:
                ax.axis("off")
                continue
            vmin, vmax = (-1, 1) if cmap == "gray_r" else (0, 0.6)
            colors = matplotlib.colormaps[cmap].copy()
            colors.set_bad("tab:cyan")  # unobserved pixels of the observation
            images[cmap] = ax.imshow(img.reshape(8, 8).numpy(), cmap=colors, vmin=vmin, vmax=vmax)
            if r == 0 or task.name == "crop" and c >= ncols - 2:
                ax.set_title(title, fontsize=10)
        axes[r, 0].set_ylabel(task.name, fontsize=12)
    fig.colorbar(images["gray_r"], ax=axes, shrink=0.8, pad=0.01, label="pixel value (mean panels)")
    fig.colorbar(images["magma"], ax=axes, shrink=0.8, pad=0.01, label="posterior sd (sd panels)")
    fig.suptitle(
        "Posterior means and standard deviations: ΠGDM and DPS (DiffusionPosterior), SVI with the ODE log-density, "
        "SVI with the score-matching bound, NUTS",
        fontsize=11,
    )
    path = os.path.join(args.output_dir, "digits_inverse_problems.png")
    fig.savefig(path, dpi=args.dpi)
    plt.close(fig)
    print(f"\n[figure] saved {path}\ndone in {time.time() - start:.1f}s")
    # [end-figure]


# [start-cli]
if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Denoising and inpainting digits with a diffusion prior")
    parser.add_argument("--num-samples", default=128, type=int, help="DiffusionPosterior draws")
    parser.add_argument("--num-steps", default=500, type=int, help="reverse-SDE steps of DiffusionPosterior")
    parser.add_argument("--tol", default=1e-2, type=float, help="rtol = atol of the ODE log-density (SVI, NUTS)")
    parser.add_argument("--svi-ode-steps", default=100, type=int)
    parser.add_argument("--svi-ode-particles", default=2, type=int)
    parser.add_argument("--svi-bound-steps", default=400, type=int)
    parser.add_argument("--svi-bound-particles", default=16, type=int)
    parser.add_argument("--bound-samples", default=8, type=int, help="time samples of the DSM bound per particle")
    parser.add_argument("--lr", default=0.05, type=float)
    parser.add_argument("--nuts-warmup", default=200, type=int)
    parser.add_argument("--nuts-samples", default=400, type=int)
    parser.add_argument("--nuts-bound-samples", default=32, type=int, help="time samples of NUTS' frozen bound")
    parser.add_argument("--max-tree-depth", default=3, type=int)
    parser.add_argument("--seed", default=0, type=int)
    parser.add_argument("--num-threads", default=1, type=int)
    parser.add_argument("--dpi", default=90, type=int)
    parser.add_argument("--output-dir", default="outputs/digits_inverse_problems")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for a quick check")
    args = parser.parse_args()
    if args.smoke:
        args.num_samples, args.num_steps, args.tol, args.svi_ode_steps, args.svi_ode_particles = 4, 50, 1e-1, 1, 1
        args.svi_bound_steps, args.svi_bound_particles, args.bound_samples = 3, 2, 2
        args.nuts_warmup, args.nuts_samples, args.max_tree_depth, args.nuts_bound_samples, args.dpi = 2, 2, 1, 2, 40
    main(args)
# [end-cli]
