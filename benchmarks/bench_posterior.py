r"""Posterior benchmark (issue 9): exact and fast inference with score priors, against closed-form posteriors.

Usage (from the repository root; timings under ``flock`` so that no two benchmarks share the cores)::

    OMP_NUM_THREADS=1 flock /tmp/pyro_scoreflow_bench.lock \
        env PYTHONPATH=. python benchmarks/bench_posterior.py --output docs/benchmarks_posterior.md
    PYTHONPATH=. python benchmarks/bench_posterior.py --quick          # CI smoke, about a minute

Everything runs on one torch thread. Sections:

1. **Inverse problems with exact-mixture priors** (2-D, 16-D, 64-D; a bimodal posterior at observation noise 0.1
   and a unimodal one at 0.5). The prior is :math:`p_\epsilon` of a Gaussian mixture with its exact score, the
   observation :math:`y = A x + \varepsilon`, so the posterior and :math:`p(y)` are closed-form
   (:func:`pyro_scoreflow.infer.linear_gaussian_posterior`). Rows: exact draws (the floor), importance sampling
   with prior draws, NUTS on ``log_prob`` (2-D; a projection from the measured gradient cost in 16-D and 64-D),
   NUTS with :class:`~pyro_scoreflow.infer.ScoreFlowReparam` ("ode", "dpm-solver" 10/20), SVI in the latent space,
   :class:`~pyro_scoreflow.infer.DiffusionPosterior` (each guidance, with and without a corrector) and
   :class:`~pyro_scoreflow.infer.DiffusionSMC` (500 / 2000 / 8000 particles). Columns: component masses, the
   posterior-mean error in units of the exact-draw floor for the same number of draws, the energy distance to exact
   draws (and its floor), the log-evidence error, wall time, effective samples per second.
2. **Targets**, each with PASS/FAIL.
3. **The shipped digits prior**: inpainting (the top half observed with noise 0.1) against a long-run reference.
4. **log_prob latency of the shipped priors** (item 5): log_prob + gradient per point at rtol = atol = 1e-5
   (the default), 1e-4 and 1e-3, its error against a float64 solve at 1e-8.

Measurements, never assertions: the script exits 0 whatever the numbers are. ``--plot`` writes the
accuracy-against-wall-time figure.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pyro  # noqa: E402
import pyro.distributions as dist  # noqa: E402
from pyro import poutine  # noqa: E402
from pyro.infer import MCMC, NUTS, SVI, Predictive, Trace_ELBO  # noqa: E402
from pyro.infer.autoguide import AutoMultivariateNormal, init_to_median  # noqa: E402
from pyro.infer.mcmc.util import initialize_model  # noqa: E402
from pyro.ops.integrator import potential_grad  # noqa: E402
from pyro.ops.stats import effective_sample_size  # noqa: E402
from pyro.optim import Adam  # noqa: E402

from pyro_scoreflow import VPSDE, GaussianMixtureScore, ScoreSDEPrior, datasets  # noqa: E402
from pyro_scoreflow.infer import (  # noqa: E402
    DiffusionPosterior,
    DiffusionSMC,
    ScoreFlowReparam,
    init_to_score_prior,
    linear_gaussian_posterior,
)
from pyro_scoreflow.metrics import energy_distance  # noqa: E402

F64 = torch.float64


@dataclasses.dataclass(frozen=True)
class Settings:
    dims: tuple = (2, 16, 64)
    eval_n: int = 2000  # draws compared with exact draws (energy distance)
    is_n: int = 20000
    nuts: tuple = (100, 300, 3)  # warmup, samples, max tree depth (latent space)
    nuts_logprob: tuple = (100, 120, 3)  # the same warm-up and depth on log_prob (2-D and nuts_logprob_dims)
    nuts_logprob_dims: tuple = (16,)  # where NUTS on log_prob is run, not only projected
    nuts_ode: tuple = (20, 30, 2)  # 2-D only
    svi_steps: int = 200
    dp_n: int = 2000
    dp_steps: int = 200
    smc_sizes: tuple = (500, 2000, 8000)
    target_seeds: int = 3
    digits_ref: tuple = (4000, 400)  # particles, steps of the reference
    digits_nuts: tuple = (20, 40, 3)
    digits_dp_n: int = 1000
    latency_priors: tuple = ("moons", "checkerboard", "digits")
    latency_tols: tuple = (1e-5, 1e-4, 1e-3)
    latency_points: int = 2


FULL = Settings()
QUICK = Settings(
    dims=(2,),
    eval_n=300,
    is_n=2000,
    nuts=(10, 20, 2),
    nuts_logprob=(5, 10, 1),
    nuts_logprob_dims=(),
    nuts_ode=(3, 5, 1),
    svi_steps=10,
    dp_n=300,
    dp_steps=20,
    smc_sizes=(200,),
    target_seeds=1,
    digits_ref=(300, 30),
    digits_nuts=(3, 5, 1),
    digits_dp_n=100,
    latency_priors=("moons",),
    latency_tols=(1e-3,),
    latency_points=1,
)


# -- problems --------------------------------------------------------------------------------------------
def random_mixture(sde, K: int, D: int, seed: int = 0, scale: float = 0.3) -> GaussianMixtureScore:
    """K components in D dimensions: means N(0, I), covariances a a^T / D * scale^2 + 0.05 I (as tests/helpers.py)."""
    g = torch.Generator().manual_seed(seed)
    locs = torch.randn(K, D, generator=g, dtype=F64)
    a = torch.randn(K, D, D, generator=g, dtype=F64) * scale
    scale_tril = torch.linalg.cholesky(a @ a.transpose(-1, -2) / D + 0.05 * torch.eye(D, dtype=F64))
    return GaussianMixtureScore(sde, locs, scale_tril, torch.randn(K, generator=g, dtype=F64))


@dataclasses.dataclass
class Problem:
    name: str
    score: GaussianMixtureScore
    prior: ScoreSDEPrior
    A: torch.Tensor
    noise: float
    y: torch.Tensor
    posterior: dist.MixtureSameFamily
    log_z: float

    @property
    def dim(self) -> int:
        return self.A.shape[1]

    def model(self, y=None):
        x = pyro.sample("x", self.prior)
        return pyro.sample("y", dist.Normal(x @ self.A.T, self.noise).to_event(1), obs=y)

    def masses(self, x: torch.Tensor) -> torch.Tensor:
        p = self.score.marginal(self.prior.sde.eps)
        lj = p.component_distribution.log_prob(x.double().unsqueeze(-2)) + p.mixture_distribution.logits
        return lj.softmax(-1).mean(0)

    def floor(self, n: int) -> float:
        """The expected posterior-mean error of n exact draws, sqrt(tr Cov / n)."""
        return math.sqrt(float(self.posterior.variance.sum()) / n)


def make_problem(dim: int, bimodal: bool) -> Problem:
    sde = VPSDE()
    noise = 0.1 if bimodal else 0.5
    if dim == 2:  # the 2-D problem of tests/test_posterior.py: y = x1 + x2 + noise
        locs = torch.tensor([[-1.5, -0.5], [1.5, 0.5]], dtype=F64)
        tril = torch.tensor([[[0.6, 0.0], [0.3, 0.4]], [[0.5, 0.0], [-0.2, 0.5]]], dtype=F64)
        score = GaussianMixtureScore(sde, locs, tril)
        A = torch.tensor([[1.0, 1.0]], dtype=F64)
    else:
        score = random_mixture(sde, 2, dim, seed=0)
        g = torch.Generator().manual_seed(100)
        m = 3 if dim == 16 else 8
        A = torch.randn(m, dim, generator=g, dtype=F64) * 2 / math.sqrt(dim)
    p = score.marginal(sde.eps)
    mus = p.component_distribution.mean
    cov = noise**2 * torch.eye(A.shape[0], dtype=F64)
    if bimodal:  # y on the segment between the projected means, where the posterior masses are (0.3, 0.7)
        lo, hi = 0.0, 1.0
        for _ in range(50):
            f = 0.5 * (lo + hi)
            y = A @ (f * mus[0] + (1 - f) * mus[1])
            post, _ = linear_gaussian_posterior(p, A, y, cov)
            lo, hi = (f, hi) if post.mixture_distribution.probs[0] < 0.3 else (lo, f)
    else:  # near the heavier component's mean: one mode
        k = int(p.mixture_distribution.probs.argmax())
        y = A @ mus[k] + 0.5 * noise
    post, log_z = linear_gaussian_posterior(p, A, y, cov)
    name = f"{dim}-D {'bimodal' if bimodal else 'unimodal'}, noise {noise}"
    return Problem(name, score, ScoreSDEPrior(score, sde, (dim,)), A, noise, y, post, float(log_z))


# -- runners: each returns dict(x, wall, log_z, ess, note) ----------------------------------------------------
def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def reparam(model, sampler: str, num_steps):
    return poutine.reparam(model, config={"x": ScoreFlowReparam(sampler, num_steps)})


def mcmc_ess(x: torch.Tensor) -> float:
    return float(effective_sample_size(x.double().unsqueeze(0)).min())


def run_exact(problem: Problem, n: int) -> dict:
    x, wall = timed(lambda: problem.posterior.sample((n,)))
    return dict(x=x, wall=wall, ess=n)


def run_importance(problem: Problem, n: int) -> dict:
    """Prior draws (DPM-Solver++, 20 steps) weighted by the likelihood; resampled for the metrics."""

    def go():
        draws = problem.prior.with_options(sampler="dpm-solver", num_steps=20).sample((n,))
        log_w = dist.Normal(draws @ problem.A.T, problem.noise).to_event(1).log_prob(problem.y)
        return draws, log_w

    (draws, log_w), wall = timed(go)
    w = log_w.softmax(0)
    idx = torch.multinomial(w, n, replacement=True)
    return dict(x=draws[idx], wall=wall, ess=float(1 / (w**2).sum()), log_z=float(log_w.logsumexp(0)) - math.log(n))


def run_nuts(model, args, warmup: int, samples: int, depth: int, decode=None, init=None) -> dict:
    kernel = NUTS(model, max_tree_depth=depth, init_strategy=init or init_to_median)
    mcmc = MCMC(kernel, num_samples=samples, warmup_steps=warmup, disable_progbar=True)
    _, wall = timed(lambda: mcmc.run(*args))
    s = mcmc.get_samples()
    x = decode(s) if decode is not None else s["x"]
    return dict(x=x.detach(), wall=wall, ess=mcmc_ess(x.detach()))


def run_nuts_reparam(problem: Problem, sampler: str, num_steps, settings) -> dict:
    warmup, samples, depth = settings
    model = reparam(problem.model, sampler, num_steps)

    def decode(s):
        pred = Predictive(model, posterior_samples={"x_base": s["x_base"]}, return_sites=["x"], parallel=True)
        return pred()["x"]

    return run_nuts(model, (problem.y,), warmup, samples, depth, decode)


def run_svi(problem: Problem, steps: int, n: int) -> dict:
    model = reparam(problem.model, "dpm-solver", 10)

    def go():
        pyro.clear_param_store()
        guide = AutoMultivariateNormal(model, init_scale=0.3)
        svi = SVI(model, guide, Adam({"lr": 0.05}), Trace_ELBO(num_particles=4, vectorize_particles=True))
        for _ in range(steps):
            svi.step(problem.y)
        return Predictive(model, guide=guide, num_samples=n, return_sites=["x"], parallel=True)()["x"]

    x, wall = timed(go)
    return dict(x=x.detach(), wall=wall, ess=n, note="AutoMVN on x_base, dpm-solver 10")


def run_diffusion_posterior(problem: Problem, guidance: str, corrector: int, n: int, steps: int) -> dict:
    num_steps = steps // (1 + corrector)
    post = DiffusionPosterior(problem.model, n, guidance, num_steps=num_steps, corrector_steps=corrector)
    x, wall = timed(lambda: post.run(problem.y).get_samples()["x"])
    return dict(x=x, wall=wall, ess=n)


def run_smc(problem: Problem, n: int) -> dict:
    smc = DiffusionSMC(problem.model, n)
    x, wall = timed(lambda: smc.run(problem.y).get_samples()["x"])
    return dict(x=x, wall=wall, ess=smc.ess[-1], log_z=smc.log_evidence, note=f"min ESS {min(smc.ess):.0f}")


def metrics(problem: Problem, res: dict, ref: torch.Tensor, energy_floor: float) -> dict:
    x = res["x"].double()
    n = x.shape[0]
    exact_masses = problem.posterior.mixture_distribution.probs
    m = min(n, ref.shape[0])
    out = dict(
        mass=float((problem.masses(x) - exact_masses).abs().max()),
        mean=float((x.mean(0) - problem.posterior.mean).norm()) / problem.floor(n),
        energy=float(energy_distance(x[:m], ref[:m])),
        energy_floor=energy_floor,
        log_z=res.get("log_z"),
        wall=res["wall"],
        ess_s=res["ess"] / res["wall"] if res["wall"] > 0 else float("nan"),
        n=n,
        note=res.get("note", ""),
    )
    if out["log_z"] is not None:
        out["log_z"] = out["log_z"] - problem.log_z
    return out


def gradient_cost(model, args, repeats: int = 3, init=None) -> float:
    """Median seconds of one potential + gradient evaluation, as NUTS makes them."""
    params, potential_fn, _, _ = initialize_model(model, args, init_strategy=init or init_to_median)
    potential_grad(potential_fn, params)
    times = []
    for _ in range(repeats):
        _, t = timed(lambda: potential_grad(potential_fn, params))
        times.append(t)
    return statistics.median(times)


# -- formatting ---------------------------------------------------------------------------------------
def table(headers, rows) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(v, spec: str = ".3g") -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and not math.isfinite(v):
        return "-"
    return format(v, spec)


def verdict(ok: bool) -> str:
    return "**PASS**" if ok else "**FAIL**"


# -- section 1 -------------------------------------------------------------------------------------------
def section_problems(settings: Settings, out: list, results: dict) -> dict:
    out.append("## 1. Inverse problems with exact-mixture priors\n")
    out.append(
        "Columns: *mass err* = largest |component mass - exact| (a draw's mass is its responsibility under "
        "p_eps); *mean err* = ||sample mean - exact mean|| in units of the floor sqrt(tr Cov / n) of n exact draws "
        "(n = the method's number of draws; MCMC draws are correlated, so its floor is optimistic); *energy* = "
        "squared energy distance to as many exact draws (floor: two exact sets); *log Z err* = log-evidence "
        "estimate - exact log p(y); *ESS/s* = effective samples per second (MCMC: smallest per-coordinate ESS of "
        "pyro.ops.stats; importance sampling and SMC: Kish ESS of the final weights; i.i.d. methods: draws).\n"
    )
    costs = {}
    for dim in settings.dims:
        for bimodal in (True, False):
            problem = make_problem(dim, bimodal)
            pyro.set_rng_seed(0)
            ref = problem.posterior.sample((settings.eval_n,))
            energy_floor = float(energy_distance(problem.posterior.sample((settings.eval_n,)), ref))
            rows, res = [], {}
            res["exact draws"] = run_exact(problem, settings.eval_n)
            res[f"importance, {settings.is_n} prior draws"] = run_importance(problem, settings.is_n)
            if dim == 2 or (dim in settings.nuts_logprob_dims and not bimodal):
                lp_model_prior = problem.prior.with_options(rtol=1e-3, atol=1e-3)
                lp_problem = dataclasses.replace(problem, prior=lp_model_prior)
                w, s, d = settings.nuts_logprob
                res["NUTS on log_prob (rtol 1e-3)"] = run_nuts(
                    lp_problem.model, (problem.y,), w, s, d, init=init_to_score_prior
                )
            if dim == 2:
                res['NUTS, reparam "ode"'] = run_nuts_reparam(problem, "ode", None, settings.nuts_ode)
            res["NUTS, reparam dpm-solver 10"] = run_nuts_reparam(problem, "dpm-solver", 10, settings.nuts)
            if bimodal:
                res["NUTS, reparam dpm-solver 20"] = run_nuts_reparam(problem, "dpm-solver", 20, settings.nuts)
            res["SVI, latent"] = run_svi(problem, settings.svi_steps, settings.eval_n)
            for guidance in ("dps", "pigdm"):
                for corrector in (0, 1):
                    label = f"DiffusionPosterior {guidance}" + (" + corrector" if corrector else "")
                    res[label] = run_diffusion_posterior(problem, guidance, corrector, settings.dp_n, settings.dp_steps)
            for n in settings.smc_sizes:
                res[f"DiffusionSMC {n}"] = run_smc(problem, n)
            # the gradient costs of NUTS's potential, for the projection in 16-D and 64-D and the target
            lp_model = dataclasses.replace(problem, prior=problem.prior.with_options(rtol=1e-3, atol=1e-3)).model
            default_model = dataclasses.replace(problem, prior=problem.prior.with_options()).model
            costs[problem.name] = dict(
                log_prob_default=gradient_cost(default_model, (problem.y,), repeats=1, init=init_to_score_prior),
                log_prob=gradient_cost(lp_model, (problem.y,), init=init_to_score_prior),
                dpm10=gradient_cost(reparam(problem.model, "dpm-solver", 10), (problem.y,)),
            )
            for label, r in res.items():
                mt = metrics(problem, r, ref, energy_floor)
                results[(problem.name, label)] = mt
                rows.append(
                    [
                        label, mt["n"], fmt(mt["mass"], ".3f"), fmt(mt["mean"], ".2f"), fmt(mt["energy"], ".2e"),
                        fmt(mt["log_z"], "+.3f"), fmt(mt["wall"], ".2f"), fmt(mt["ess_s"], ".3g"), mt["note"],
                    ]
                )  # fmt: skip
            c = costs[problem.name]
            if dim > 2 and (problem.name, "NUTS on log_prob (rtol 1e-3)") not in results:
                # NUTS on log_prob: projected from its measured gradient cost
                ref_row = results[(problem.name, "NUTS, reparam dpm-solver 10")]
                proj = ref_row["ess_s"] * c["dpm10"] / c["log_prob"]
                results[(problem.name, "NUTS on log_prob (projected)")] = dict(ess_s=proj)
                rows.append(
                    [
                        "NUTS on log_prob (rtol 1e-3), projected", "-", "-", "-", "-", "-", "-", fmt(proj, ".3g"),
                        "same mixing per gradient as the latent chain (optimistic)",
                    ]
                )  # fmt: skip
            post = problem.posterior
            out.append(f"### {problem.name}\n")
            out.append(
                f"D = {dim}, {problem.A.shape[0]} observations; exact masses "
                f"{', '.join(f'{v:.3f}' for v in post.mixture_distribution.probs.tolist())}; exact log p(y) = "
                f"{problem.log_z:.3f}; floor of the mean error at {settings.eval_n} draws "
                f"{problem.floor(settings.eval_n):.4f}; energy floor {energy_floor:.2e}. One potential + gradient "
                f"evaluation: log_prob (exact divergence) {1e3 * c['log_prob_default']:.0f} ms at the default rtol = "
                f"atol = 1e-5, {1e3 * c['log_prob']:.0f} ms at 1e-3; latent "
                f"dpm-solver 10 steps {1e3 * c['dpm10']:.1f} ms (x{c['log_prob'] / c['dpm10']:.0f}).\n"
            )
            out.append(
                table(
                    ["method", "draws", "mass err", "mean err / floor", "energy", "log Z err", "wall (s)", "ESS/s", ""],
                    rows,
                )
                + "\n"
            )
            print(out[-2], out[-1], sep="\n", flush=True)
    return costs


# -- section 2: targets ------------------------------------------------------------------------------------
def moons_potential_ratio(repeats: int) -> tuple[float, float, int]:
    """One 2-D point, the shipped moons prior: potential + gradient through log_prob at default options vs through
    ScoreFlowReparam(dpm-solver, 10). Interleaved rounds, medians."""
    prior = ScoreSDEPrior.from_pretrained("moons")

    def model(y=None):
        x = pyro.sample("x", prior)
        return pyro.sample("y", dist.Normal(x[..., :1], 0.2).to_event(1), obs=y)

    y = torch.zeros(1)
    pots, nfe = {}, {}
    for label, m in (("log_prob", model), ("dpm10", reparam(model, "dpm-solver", 10))):
        params, potential_fn, _, _ = initialize_model(m, (y,), init_strategy=init_to_score_prior)
        potential_grad(potential_fn, params)
        pots[label], nfe[label] = (potential_fn, params), prior.last_nfe
    times = {k: [] for k in pots}
    for _ in range(repeats):
        for k, (fn, params) in pots.items():
            _, t = timed(lambda fn=fn, params=params: potential_grad(fn, params))
            times[k].append(t)
    lp, dpm = statistics.median(times["log_prob"]), statistics.median(times["dpm10"])
    return lp, dpm, nfe["log_prob"]


def section_targets(settings: Settings, out: list, results: dict, costs: dict) -> None:
    out.append("## 2. Targets\n")
    rows = []
    # a. DiffusionSMC, 16-D bimodal, 4000 particles
    if 16 in settings.dims:
        problem = make_problem(16, True)
        detail = []
        oks = []
        for seed in range(settings.target_seeds):
            pyro.set_rng_seed(seed)
            smc = DiffusionSMC(problem.model, 4000)
            x, wall = timed(lambda smc=smc: smc.run(problem.y).get_samples()["x"])
            mass = float((problem.masses(x) - problem.posterior.mixture_distribution.probs).abs().max())
            mean = float((x.double().mean(0) - problem.posterior.mean).norm()) / problem.floor(4000)
            dz = smc.log_evidence - problem.log_z
            oks.append(mass <= 0.03 and mean <= 2 and abs(dz) <= 0.1)
            detail.append(f"seed {seed}: masses {mass:.3f}, mean {mean:.2f} floors, log Z {dz:+.3f}, {wall:.1f} s")
        rows.append(
            [
                "DiffusionSMC, 16-D bimodal, 4000 particles",
                "masses within 0.03, mean error <= 2 floors, log Z within 0.1 nats",
                "; ".join(detail),
                verdict(all(oks)) + f" ({sum(oks)}/{len(oks)} seeds)",
            ]
        )
    # b. NUTS latent dpm-solver 10 vs NUTS on log_prob, ESS/s
    for name, c in costs.items():
        if name.startswith("2-D"):
            continue
        latent = results[(name, "NUTS, reparam dpm-solver 10")]
        measured = results.get((name, "NUTS on log_prob (rtol 1e-3)"))
        if measured is not None:  # both chains run: ESS/s as measured
            lp_ess_s, how = measured["ess_s"], "measured"
        else:  # same mixing per gradient as the latent chain
            lp_ess_s, how = latent["ess_s"] * c["dpm10"] / c["log_prob"], "projected from the gradient cost"
        lp_default_ess_s = lp_ess_s * c["log_prob"] / c["log_prob_default"]  # same chain, each gradient dearer
        ratio, ratio_loose = latent["ess_s"] / lp_default_ess_s, latent["ess_s"] / lp_ess_s
        accurate = latent["mass"] <= 0.1
        rows.append(
            [
                f"NUTS latent dpm-solver 10 vs NUTS on log_prob, {name}",
                ">= 10x ESS/s at matching accuracy",
                f"x{ratio:.1f} against log_prob at its default tolerance (1e-5), x{ratio_loose:.1f} at rtol 1e-3 "
                f"(log_prob chain {how}; gradients {1e3 * c['log_prob_default']:.0f} / {1e3 * c['log_prob']:.0f} ms "
                f"vs {1e3 * c['dpm10']:.1f} ms); latent chain: mass err {latent['mass']:.3f}, mean "
                f"{latent['mean']:.1f} floors, ESS/s {latent['ess_s']:.2g}",
                verdict(ratio >= 10 and accurate)
                + (
                    ""
                    if accurate
                    else " (the latent chain stays in one mode: no NUTS chain, in either space, matches the exact "
                    "masses of this well-separated bimodal posterior; DiffusionSMC is the route there)"
                ),
            ]
        )
    # c. moons potential + gradient
    lp, dpm, nfe = moons_potential_ratio(3 if settings is FULL else 1)
    rows.append(
        [
            "moons, one 2-D point: potential + gradient",
            ">= 20x cheaper through ScoreFlowReparam(dpm-solver, 10) than log_prob at default options",
            f"log_prob {1e3 * lp:.0f} ms ({nfe} score evaluations), latent {1e3 * dpm:.1f} ms: x{lp / dpm:.1f}",
            verdict(lp / dpm >= 20),
        ]
    )
    out.append(table(["target", "requirement", "measured", "verdict"], rows) + "\n")
    print(out[-1], flush=True)


# -- section 3: digits inpainting -------------------------------------------------------------------------
def section_digits(settings: Settings, out: list) -> None:
    out.append("## 3. The shipped digits prior: inpainting\n")
    prior = ScoreSDEPrior.from_pretrained("digits")
    clean = datasets.load("digits", split="test")[3]
    noise = 0.1
    y = clean[:32] + noise * torch.randn(32, generator=torch.Generator().manual_seed(0))

    def model(y=None):
        x = pyro.sample("x", prior)
        return pyro.sample("y", dist.Normal(x[..., :32], noise).to_event(1), obs=y)

    n_ref, steps_ref = settings.digits_ref
    pyro.set_rng_seed(0)
    ref_smc = DiffusionSMC(model, n_ref, num_steps=steps_ref, batch_size=2000)
    ref, ref_wall = timed(lambda: ref_smc.run(y).get_samples()["x"])
    half = n_ref // 2
    ref_mean = ref.mean(0)
    ref_std = ref.std(0)
    split_err = float((ref[:half].mean(0) - ref[half:].mean(0)).pow(2).mean().sqrt()) / 2
    rows = []

    def add(label, x, wall, log_z=None, note=""):
        m = min(len(x), half)
        rows.append(
            [
                label, len(x), fmt(float((x.mean(0) - ref_mean)[32:].pow(2).mean().sqrt()), ".3f"),
                fmt(float((x.std(0)[32:] / ref_std[32:]).mean()), ".2f"),
                fmt(float(energy_distance(x[:m], ref[half : half + m])), ".3f"),
                fmt(None if log_z is None else log_z - ref_smc.log_evidence, "+.2f"), fmt(wall, ".1f"), note,
            ]
        )  # fmt: skip

    add(f"reference: DiffusionSMC {n_ref} x {steps_ref} steps", ref[:half], ref_wall, ref_smc.log_evidence, "half")
    for n in settings.smc_sizes[:2]:
        pyro.set_rng_seed(1)
        smc = DiffusionSMC(model, n)
        x, wall = timed(lambda smc=smc: smc.run(y).get_samples()["x"])
        add(f"DiffusionSMC {n}", x, wall, smc.log_evidence, f"min ESS {min(smc.ess):.0f}")
    for corrector in (0, 1):
        pyro.set_rng_seed(1)
        post = DiffusionPosterior(model, settings.digits_dp_n, "pigdm", num_steps=settings.dp_steps // (1 + corrector),
                                  corrector_steps=corrector, clip_denoised=(-1, 1))  # fmt: skip
        x, wall = timed(lambda post=post: post.run(y).get_samples()["x"])
        add("DiffusionPosterior pigdm" + (" + corrector" if corrector else ""), x, wall)
    warmup, samples, depth = settings.digits_nuts
    latent = reparam(model, "dpm-solver", 10)
    kernel = NUTS(latent, max_tree_depth=depth, init_strategy=init_to_median)
    mcmc = MCMC(kernel, num_samples=samples, warmup_steps=warmup, disable_progbar=True)
    _, wall = timed(lambda: mcmc.run(y))
    x = Predictive(latent, posterior_samples=mcmc.get_samples(), return_sites=["x"], parallel=True)(y)["x"]
    add(f"NUTS, reparam dpm-solver 10 ({warmup} + {samples})", x, wall, note=f"ESS {mcmc_ess(x[:, 32:]):.0f}")
    out.append(
        f"Test digit 3, top half (32 pixels) observed with noise {noise}; the bottom half is inferred. Reference: "
        f"DiffusionSMC with {n_ref} particles and {steps_ref} steps ({ref_wall:.0f} s, log p(y) = "
        f"{ref_smc.log_evidence:.2f}); its two halves' posterior means differ by {2 * split_err:.3f} RMS (so a "
        "mean's own noise at this size is about half that). Columns: RMS error of the posterior mean of the "
        "unobserved pixels against the reference's, the mean ratio of posterior stds (unobserved pixels), energy "
        "distance to the reference's other half, log-evidence difference, wall time.\n"
    )
    out.append(
        table(["method", "draws", "mean RMSE", "std ratio", "energy", "log Z diff", "wall (s)", ""], rows) + "\n"
    )
    print(out[-2], out[-1], sep="\n", flush=True)


# -- section 4: log_prob latency of the shipped priors ----------------------------------------------------------
def section_latency(settings: Settings, out: list) -> None:
    out.append("## 4. log_prob latency and accuracy of the shipped priors\n")
    rows = []
    for name in settings.latency_priors:
        base = ScoreSDEPrior.from_pretrained(name)
        x = datasets.load(name, num_samples=settings.latency_points, seed=1, split="test")
        ref_prior = ScoreSDEPrior.from_pretrained(name, rtol=1e-8, atol=1e-8).with_options()
        ref_prior.score_model.double()
        with torch.no_grad():
            ref = ref_prior.log_prob(x.double())
        for tol in settings.latency_tols:
            prior = base.with_options(rtol=tol, atol=tol)
            with torch.no_grad():
                err = (prior.log_prob(x.clone()).double() - ref).abs()
            times, nfes = [], []
            for i in range(settings.latency_points):
                v = x[i : i + 1].clone().requires_grad_(True)
                t0 = time.perf_counter()
                lp = prior.log_prob(v)
                lp.sum().backward()
                times.append(time.perf_counter() - t0)
                nfes.append(prior.last_nfe)
            default = " (default)" if tol == 1e-5 else ""
            rows.append(
                [
                    name, f"{tol:g}{default}", f"{statistics.median(times):.2f}", f"{statistics.median(nfes):.0f}",
                    f"{float(err.max()):.1e}", f"{float(err.mean()):.1e}",
                ]
            )  # fmt: skip
            print(rows[-1], flush=True)
    out.append(
        "One point, log_prob + gradient (exact divergence, float32), median over points of the test split; error "
        "of log p against a float64 solve at rtol = atol = 1e-8 (the same points, no gradient).\n"
    )
    out.append(
        table(
            ["prior", "rtol = atol", "seconds per point", "NFE (forward)", "max error (nats)", "mean error (nats)"],
            rows,
        )
        + "\n"
    )
    print(out[-1], flush=True)


# -- plot ----------------------------------------------------------------------------------------------------
def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    problems = sorted({k[0] for k in results}, key=lambda s: (int(s.split("-")[0]), s))
    cols = 2
    rows = math.ceil(len(problems) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4 * rows), squeeze=False)
    families = {"exact": "k", "importance": "tab:gray", "NUTS": "tab:blue", "SVI": "tab:cyan"}
    families.update({"DiffusionPosterior": "tab:orange", "DiffusionSMC": "tab:green"})
    for ax, name in zip(axes.flat, problems):
        for (pname, label), mt in results.items():
            if pname != name or "wall" not in mt:
                continue
            color = next((c for k, c in families.items() if label.startswith(k)), "tab:red")
            ax.scatter(mt["wall"], max(mt["mean"], 1e-2), color=color, s=25)
            ax.annotate(label.replace("DiffusionPosterior", "DP").replace("reparam ", ""), (mt["wall"], mt["mean"]),
                        fontsize=6, xytext=(3, 2), textcoords="offset points")  # fmt: skip
        ax.axhline(1.0, color="k", lw=0.6, ls="--")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("wall time (s)")
        ax.set_ylabel("posterior-mean error / exact-draw floor")
    for ax in list(axes.flat)[len(problems) :]:
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of every section")
    parser.add_argument("--output", type=Path, help="write the Markdown report here")
    parser.add_argument("--plot", type=Path, help="write the accuracy-against-time figure here (PNG)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["problems", "targets", "digits", "latency"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    settings = QUICK if args.quick else FULL
    start = time.perf_counter()
    out = [
        "# Posterior inference benchmark\n",
        "Generated by `OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/bench_posterior.py --output "
        "docs/benchmarks_posterior.md --plot docs/_static/benchmarks/posterior.png`. Which method to use when: "
        "{doc}`inference` and {doc}`posterior`. Measurements, not assertions.\n",
        f"Mode: {'quick' if args.quick else 'full'}; torch {torch.__version__}, pyro {pyro.__version__}, 1 thread; "
        f"load average at start {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores.\n",
    ]
    if args.plot and args.output and "problems" not in args.skip:
        figure = os.path.relpath(args.plot.resolve(), args.output.resolve().parent)
        out.append(
            f"![Posterior-mean error (in units of the exact-draw floor) against wall time, per problem and method]"
            f"({figure})\n"
        )
    results: dict = {}
    costs: dict = {}
    if "problems" not in args.skip:
        costs = section_problems(settings, out, results)
    if "targets" not in args.skip:
        section_targets(settings, out, results, costs)
    if "digits" not in args.skip:
        section_digits(settings, out)
    if "latency" not in args.skip:
        section_latency(settings, out)
    out.append(f"Total wall time: {time.perf_counter() - start:.0f} s; load average at the end "
               f"{os.getloadavg()[0]:.1f}.\n")  # fmt: skip
    print(out[-1])
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.output.with_suffix(".tmp")
        tmp.write_text("\n".join(out))
        os.replace(tmp, args.output)
    if args.plot and results:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
