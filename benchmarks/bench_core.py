r"""Core benchmarks of ``pyro_scoreflow``: log_prob accuracy and cost, baselines, samplers.

Usage (from the repository root)::

    PYTHONPATH=. python benchmarks/bench_core.py            # full mode (a few minutes on 2 cores)
    PYTHONPATH=. python benchmarks/bench_core.py --quick    # CI smoke, well under a minute
    PYTHONPATH=. python benchmarks/bench_core.py --output docs/benchmarks.md

Everything is measured against ground truth: the data are Gaussian mixtures,
whose diffused score (:class:`~pyro_scoreflow.GaussianMixtureScore`) and
marginals ``p_t`` are exact. Baselines are measured in the same run and
ratios are reported against them. These are measurements, never assertions:
the script exits 0 whatever the numbers are.

Sections:

1. ``log_prob`` accuracy and cost (2-D and 16-D; exact and Hutchinson
   divergence; float32 and float64; default tolerances).
2. Baselines: a score_sde-style ``scipy.integrate.solve_ivp`` likelihood
   (:mod:`baseline_scipy`) on the same points, one point without gradient,
   and one point with gradient against a straightforward differentiable
   ``torchdiffeq`` implementation (:mod:`baseline_torchdiffeq`); then the
   cost of one field evaluation by divergence implementation.
3. Sampling: NFE, wall time, energy distance to exact samples (with its
   noise floor) and per-component mass error for the reverse SDE, the
   probability-flow ODE and DPM-Solver++(2M).

Timings use ``time.perf_counter`` after one warm-up call and report the median
of a few repeats where a run is cheap. They run with torch's default thread
count (2 on the reference machine) unless a short probe finds the cores busy
with other processes, where multi-thread torch ops stall waiting for
descheduled threads (10-100x slowdowns were seen); then with 1 thread.
``--threads N`` forces a count. The report header records the choice, the
probe and the load average. ``log_prob`` remembers its last result by tensor
identity, so every timed call gets a fresh tensor.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _path in (str(ROOT), str(HERE)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from baseline_scipy import scipy_log_prob  # noqa: E402
from baseline_torchdiffeq import divergence_loop, torchdiffeq_log_prob  # noqa: E402

from pyro_scoreflow import VPSDE, GaussianMixtureScore, ScoreSDEPrior  # noqa: E402
from pyro_scoreflow.dynamics import (  # noqa: E402
    ProbabilityFlowODE,
    ScoreField,
    exact_divergence,
    hutchinson_divergence,
    make_probes,
    solve_ode,
)

DTYPE_NAMES = {torch.float32: "float32", torch.float64: "float64"}
WEIGHTS = (0.4, 0.3, 0.2, 0.1)  # mixture weights of every benchmark problem


@dataclass(frozen=True)
class Settings:
    """Problem sizes and repeat counts of one benchmark mode."""

    n_points: int  # points per log_prob batch
    dims: tuple  # data dimensions of the log_prob benchmarks
    dtypes: tuple
    probes: tuple  # Hutchinson probe counts
    repeats: int  # timed repeats of a batch (median reported)
    single_repeats: int  # timed repeats of the one-point benchmarks
    n_samples: int  # samples per sampler run
    sample_dims: tuple
    sde_steps: tuple
    dpm_steps: tuple
    sample_repeats: int  # repeats of a sampler run cheaper than `cheap_s`
    floor_pairs: int  # independent exact-sample pairs for the noise floors
    cheap_s: float  # a run slower than this is not repeated
    x_T_tol: float  # tolerance of the reference float64 solve for x_T
    check: tuple  # (points, tolerance) of the check of the solver-error formula
    field_sizes: tuple  # batch sizes of the one-field-evaluation breakdown


FULL = Settings(
    n_points=1000, dims=(2, 16), dtypes=(torch.float32, torch.float64), probes=(1, 4), repeats=3,
    single_repeats=11, n_samples=2000, sample_dims=(2, 16), sde_steps=(100, 500, 1000), dpm_steps=(10, 20),
    sample_repeats=3, floor_pairs=10, cheap_s=3.0, x_T_tol=1e-9, check=(100, 1e-10), field_sizes=(100, 1000),
)  # fmt: skip
QUICK = Settings(
    n_points=100, dims=(2, 16), dtypes=(torch.float32, torch.float64), probes=(1, 4), repeats=1,
    single_repeats=1, n_samples=400, sample_dims=(2,), sde_steps=(20, 50), dpm_steps=(10, 20),
    sample_repeats=1, floor_pairs=2, cheap_s=1.0, x_T_tol=1e-7, check=(20, 1e-8), field_sizes=(100,),
)  # fmt: skip


# -- problems -------------------------------------------------------------------------------------------------------
def make_mixture(dim: int):
    """A fixed 4-component Gaussian mixture of about unit scale: ``(locs, scale_tril, logits)`` in float64.

    2-D: components on a circle of radius 1.5, anisotropic (std 0.35 x 0.15),
    randomly rotated. 16-D: standard-normal means, random full covariances
    (per-coordinate std about 0.45). Weights 0.4, 0.3, 0.2, 0.1.
    """
    gen = torch.Generator().manual_seed(1234 + dim)
    k = len(WEIGHTS)
    f64 = torch.float64
    if dim == 2:
        angles = torch.tensor([0.25, 0.75, 1.25, 1.75], dtype=f64) * math.pi
        locs = 1.5 * torch.stack([angles.cos(), angles.sin()], dim=-1)
        rot = torch.rand(k, generator=gen, dtype=f64) * math.pi
        c, s = rot.cos(), rot.sin()
        rotation = torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)
        cov = rotation @ torch.diag(torch.tensor([0.35, 0.15], dtype=f64) ** 2) @ rotation.transpose(-1, -2)
    else:
        locs = torch.randn(k, dim, generator=gen, dtype=f64)
        a = torch.randn(k, dim, dim, generator=gen, dtype=f64) * (0.4 / math.sqrt(dim))
        cov = a @ a.transpose(-1, -2) + 0.04 * torch.eye(dim, dtype=f64)
    return locs, torch.linalg.cholesky(cov), torch.tensor(WEIGHTS, dtype=f64).log()


class Problem:
    """A mixture in ``dim`` dimensions: exact scores per dtype, the float64 reference and its test points."""

    def __init__(self, sde, dim: int, n_points: int, x_T_tol: float, seed: int = 0):
        self.sde, self.dim = sde, dim
        locs, scale_tril, logits = make_mixture(dim)
        self.ref = GaussianMixtureScore(sde, locs, scale_tril, logits)
        self.scores = {
            dtype: GaussianMixtureScore(sde, locs.to(dtype), scale_tril.to(dtype), logits.to(dtype))
            for dtype in (torch.float32, torch.float64)
        }
        self.p_eps = self.ref.marginal(sde.eps)
        torch.manual_seed(seed)
        self.points = self.p_eps.sample((n_points,))
        self.exact = self.p_eps.log_prob(self.points)
        self.x_T, self.mismatch = self.terminal_mismatch(self.points, x_T_tol)

    def terminal_mismatch(self, x: torch.Tensor, tol: float):
        r"""``x_T`` and :math:`\log\mathcal N(x_T; 0, I) - \log p_T(x_T)`, the prior-mismatch part of log_prob's error.

        ``x_T`` comes from a separate float64 probability-flow solve with the
        exact score (``ProbabilityFlowODE`` without divergence and
        ``solve_ode``, dopri5, ``rtol = atol = tol``).
        """
        field = ScoreField(self.ref, self.sde, (self.dim,))
        x_T = solve_ode(
            ProbabilityFlowODE(field), x, self.sde.eps, self.sde.T, method="dopri5", rtol=tol, atol=tol, num_steps=1
        )
        prior = self.sde.prior((self.dim,), dtype=torch.float64)
        return x_T, prior.log_prob(x_T) - self.ref.marginal(self.sde.T).log_prob(x_T)


# -- measurement helpers --------------------------------------------------------------------------------------------
def measure(fn, repeats: int, cheap_s: float | None = None):
    """Call ``fn`` up to ``repeats`` times; ``(median seconds, outputs, runs)``.

    The caller warms up first. When the first run takes longer than
    ``cheap_s`` it is not repeated.
    """
    times, outputs = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        outputs.append(fn())
        times.append(time.perf_counter() - t0)
        if cheap_s is not None and times[0] > cheap_s:
            break
    return statistics.median(times), outputs, len(times)


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    r"""Energy distance :math:`2E|X-Y| - E|X-X'| - E|Y-Y'|` (V-statistic, float64, ``torch.cdist``).

    The V-statistic is positive with a small-sample bias, the same for the
    noise floor it is compared with.
    """
    x, y = x.double().reshape(x.shape[0], -1), y.double().reshape(y.shape[0], -1)
    return float(2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean())


def component_mass_error(p: torch.distributions.MixtureSameFamily, x: torch.Tensor) -> float:
    """Max over components of |fraction of samples whose most likely component is k - weight_k|."""
    comp = p.component_distribution.log_prob(x.double().unsqueeze(-2))  # (n, K)
    log_w = p.mixture_distribution.logits
    assign = (comp + log_w).argmax(-1)
    frac = torch.bincount(assign, minlength=log_w.shape[0]).double() / x.shape[0]
    return float((frac - log_w.exp()).abs().max())


def abs_stats(err: torch.Tensor):
    """``(mean |err|, max |err|)`` as floats."""
    a = err.abs()
    return float(a.mean()), float(a.max())


# -- formatting -----------------------------------------------------------------------------------------------------
def fmt_e(v: float) -> str:
    return f"{v:.2e}"


def fmt_t(seconds: float) -> str:
    return f"{seconds:.3f}" if seconds < 10 else f"{seconds:.1f}"


def fmt_r(v: float) -> str:
    return f"{v:.3g}"


def table(headers, rows) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def check_solver_error_method(problems, n: int, tol: float) -> str:
    """The solver-error formula applied to a tight float64 solve (should be near 0): validates the correction."""
    parts = []
    for dim, problem in problems.items():
        prior = ScoreSDEPrior(problem.scores[torch.float64], problem.sde, (dim,), rtol=tol, atol=tol)
        with torch.no_grad():
            lp = prior.log_prob(problem.points[:n].clone())
        solver = lp - problem.exact[:n] - problem.mismatch[:n]
        parts.append(f"{dim}-D: max {fmt_e(float(solver.abs().max()))} ({prior.last_nfe} NFE)")
    return "; ".join(parts)


# -- 1. log_prob accuracy and cost ----------------------------------------------------------------------------------
def bench_log_prob(problems, cfg: Settings, out: list):
    """Section 1: log_prob of ``n_points`` points, every divergence and dtype."""
    rows = []
    divergences = [("exact", 1)] + [("hutchinson", s) for s in cfg.probes]
    for dim, problem in problems.items():
        for dtype in cfg.dtypes:
            x = problem.points.to(dtype)
            for div, probes in divergences:
                prior = ScoreSDEPrior(
                    problem.scores[dtype], problem.sde, (dim,), divergence=div, hutchinson_samples=probes
                )
                label = "exact" if div == "exact" else f"hutchinson ({probes} probe{'s' if probes > 1 else ''})"

                def run(prior=prior, x=x):
                    with torch.no_grad():
                        lp = prior.log_prob(x.clone())  # a fresh tensor: log_prob caches by identity
                    return lp.double(), prior.last_nfe

                torch.manual_seed(1)
                run(x=x[:8])  # warm-up
                seconds, outputs, _ = measure(run, cfg.repeats)
                lp, nfe = outputs[0]
                err = lp - problem.exact
                solver = err - problem.mismatch
                rows.append([
                    dim, label, DTYPE_NAMES[dtype], fmt_t(seconds), nfe, f"{x.shape[0] / seconds:.0f}",
                    *map(fmt_e, abs_stats(err)), *map(fmt_e, abs_stats(solver)), f"{float(solver.mean()):+.1e}",
                ])  # fmt: skip
                print(f"  log_prob dim={dim} {label} {DTYPE_NAMES[dtype]}: {seconds:.3f}s nfe={nfe}", file=sys.stderr)
    headers = [
        "dim", "divergence", "dtype", "time (s)", "NFE", "points/s", "mean abs err", "max abs err",
        "mean abs solver err", "max abs solver err", "solver err mean (signed)",
    ]  # fmt: skip
    sde = next(iter(problems.values())).sde
    alpha_T = float(sde.marginal(torch.tensor(sde.T, dtype=torch.float64))[0])
    mism = ", ".join(
        f"{dim}-D: mean {fmt_e(float(p.mismatch.abs().mean()))}, max {fmt_e(float(p.mismatch.abs().max()))}"
        for dim, p in problems.items()
    )
    n_check, tol_check = min(cfg.check[0], cfg.n_points), cfg.check[1]
    check = check_solver_error_method(problems, n_check, tol_check)
    text = [
        f"## 1. log_prob accuracy and cost ({cfg.n_points} points, exact score)",
        "",
        f"`ScoreSDEPrior(GaussianMixtureScore(...), {sde!r}, (dim,), divergence=...)` with the default "
        "dopri5, rtol = atol = 1e-5, one batched call under `torch.no_grad()`; time is the median of "
        f"{cfg.repeats} run(s) after a warm-up, NFE is `prior.last_nfe` (score evaluations). "
        "Errors are against the exact `GaussianMixtureScore.marginal(sde.eps).log_prob` (float64), in nats.",
        "",
        f"*Prior mismatch.* With the default VPSDE (beta_max = 20), alpha(T) = {alpha_T:.4f}, so p_T is not "
        "exactly the N(0, I) prior: its means are alpha(T) * mu (about 0.01 here) and its covariance differs by "
        "O(alpha(T)^2); replacing p_T by N(0, I) costs a few 1e-3 nats per point "
        f"(measured |log N(x_T; 0, I) - log p_T(x_T)|: {mism}). The *err* columns include it.",
        "",
        "*Solver error* removes it: solver err = log_prob - log p_eps(x) - [log N(x_T; 0, I) - log p_T(x_T)], "
        "where x_T comes from a separate float64 probability-flow solve of the same points with the exact score "
        "(`pyro_scoreflow.dynamics.ProbabilityFlowODE` without divergence + `solve_ode`, dopri5, "
        f"rtol = atol = {cfg.x_T_tol:g}); x_T's own error enters the correction times a gradient of about 1e-2, "
        "i.e. below 1e-7 nats. Check of the formula: the package's float64 `log_prob` at rtol = atol = "
        f"{tol_check:g} on the first {n_check} points gives a solver error of {check}. The signed mean shows the "
        "bias (Hutchinson is unbiased: its mean is near 0 while its per-point error is the estimator's spread).",
        "",
        table(headers, rows),
    ]
    out.append("\n".join(text))
    print(out[-1] + "\n")


# -- 2. baselines -----------------------------------------------------------------------------------------------------
def bench_baselines(problems, cfg: Settings, out: list):
    """Section 2: ours versus the score_sde-style scipy likelihood, and the one-point comparisons."""
    rows = []
    for dim, problem in problems.items():
        for dtype in cfg.dtypes:
            x = problem.points.to(dtype)
            score = problem.scores[dtype]
            prior = ScoreSDEPrior(score, problem.sde, (dim,))

            def ours(prior=prior, x=x):
                with torch.no_grad():
                    lp = prior.log_prob(x.clone())  # fresh tensor (identity cache)
                return lp.double(), prior.last_nfe

            def base(score=score, problem=problem, x=x):
                lp, nfe, _ = scipy_log_prob(score, problem.sde, x)
                return lp, nfe

            ours(x=x[:8])  # warm-ups
            base(x=x[:8])
            t_ours, t_base, res_ours, res_base = [], [], None, None
            for r in range(cfg.repeats):  # interleaved, so load drift hits both alike
                t, o, _ = measure(ours, 1)
                t_ours.append(t)
                res_ours = res_ours or o[0]
                if r == 0 or t_base[0] <= 4 * cfg.cheap_s:
                    t, o, _ = measure(base, 1)
                    t_base.append(t)
                    res_base = res_base or o[0]
            t_o, t_b = statistics.median(t_ours), statistics.median(t_base)
            e_o, e_b = res_ours[0] - problem.exact, res_base[0] - problem.exact
            (mo, xo), (mb, xb) = abs_stats(e_o), abs_stats(e_b)
            so, sb = abs_stats(e_o - problem.mismatch)[1], abs_stats(e_b - problem.mismatch)[1]
            rows.append([
                dim, DTYPE_NAMES[dtype], fmt_t(t_b), res_base[1], fmt_e(mb), fmt_e(xb), fmt_e(sb),
                fmt_t(t_o), res_ours[1], fmt_e(mo), fmt_e(xo), fmt_e(so),
                fmt_r(t_o / t_b), fmt_r(xo / xb), fmt_r(so / sb),
            ])  # fmt: skip
            print(f"  baseline dim={dim} {DTYPE_NAMES[dtype]}: ours {t_o:.3f}s scipy {t_b:.3f}s", file=sys.stderr)
    headers = [
        "dim", "dtype", "scipy time (s)", "scipy NFE", "scipy mean abs err", "scipy max abs err",
        "scipy max solver err", "ours time (s)", "ours NFE", "ours mean abs err", "ours max abs err",
        "ours max solver err", "time ratio (ours/scipy)", "max err ratio", "max solver err ratio",
    ]  # fmt: skip
    text = [
        f"## 2. Baseline: score_sde-style scipy likelihood ({cfg.n_points} points, exact divergence)",
        "",
        "`benchmarks/baseline_scipy.py`: `scipy.integrate.solve_ivp(RK45, rtol = atol = 1e-5)` over one "
        "flattened NumPy state (all points' x and log-det accumulators), a NumPy/torch round trip at every "
        "evaluation and a per-dimension autograd loop for the trace, as in score_sde's `likelihood.py`. "
        "Its error norm is the RMS over the whole batch; ours holds the tolerance per point. Same points, same "
        "exact score, same dtype for the score evaluations (scipy's state is float64). Times are medians of "
        f"up to {cfg.repeats} interleaved runs; NFE counts field evaluations (scipy: calls of the right-hand "
        "side). Ratios are ours / scipy (below 1: ours is faster or more accurate). The per-point norm takes "
        "more steps than the batch-RMS norm (the hardest point sets the step), which is what buys the smaller "
        "worst-point error.",
        "",
        table(headers, rows),
    ]
    out.append("\n".join(text))
    print(out[-1] + "\n")
    if 2 in problems:
        bench_single_point(problems[2], cfg, out)
    bench_field_cost(problems, cfg, out)


def bench_single_point(problem: Problem, cfg: Settings, out: list):
    """One 2-D float32 point: no-gradient cost against scipy, log_prob + gradient against plain torchdiffeq."""
    dtype = torch.float32
    score, sde = problem.scores[dtype], problem.sde
    x64 = problem.points[:1]
    x = x64.to(dtype)
    exact = float(problem.exact[0])
    x_req = x64.clone().requires_grad_(True)
    (grad_exact,) = torch.autograd.grad(problem.p_eps.log_prob(x_req).sum(), x_req)
    prior = ScoreSDEPrior(score, sde, (2,))

    def ours_nograd():
        with torch.no_grad():
            lp = prior.log_prob(x.clone())  # fresh tensor (identity cache)
        return float(lp[0]), prior.last_nfe

    def scipy_nograd():
        lp, nfe, _ = scipy_log_prob(score, sde, x)
        return float(lp[0]), nfe

    def naive_nograd():
        with torch.no_grad():
            lp, nfe = torchdiffeq_log_prob(score, sde, x)
        return float(lp[0]), nfe

    def ours_grad():
        xr = x.clone().requires_grad_(True)
        lp = prior.log_prob(xr)
        (g,) = torch.autograd.grad(lp.sum(), xr)
        return float(lp.detach()[0]), prior.last_nfe, g

    def naive_grad():
        xr = x.clone().requires_grad_(True)
        lp, nfe = torchdiffeq_log_prob(score, sde, xr)
        (g,) = torch.autograd.grad(lp.sum(), xr)
        return float(lp.detach()[0]), nfe, g

    results = {}
    for name, fn in [
        ("ours", ours_nograd), ("scipy baseline", scipy_nograd), ("plain torchdiffeq (info)", naive_nograd),
        ("ours + grad", ours_grad), ("plain torchdiffeq + grad", naive_grad),
    ]:  # fmt: skip
        fn()  # warm-up
        results[name] = measure(fn, cfg.single_repeats)
    rows = []
    for name, ref in [
        ("ours", "scipy baseline"), ("scipy baseline", None), ("plain torchdiffeq (info)", None),
        ("ours + grad", "plain torchdiffeq + grad"), ("plain torchdiffeq + grad", None),
    ]:  # fmt: skip
        seconds, outputs, runs = results[name]
        first = outputs[0]
        grad_err = fmt_e(float((first[2].double() - grad_exact).abs().max())) if len(first) > 2 else "-"
        ratio = fmt_r(seconds / results[ref][0]) + f" (vs {ref})" if ref else "-"
        rows.append([name, f"{1e3 * seconds:.1f}", first[1], fmt_e(abs(first[0] - exact)), grad_err, runs, ratio])
    headers = ["implementation", "time (ms)", "NFE", "abs err", "max abs grad err", "runs", "time ratio"]
    text = [
        "### One 2-D point (float32)",
        "",
        "The first test point, float32 score. *No gradient*: ours under `torch.no_grad()` versus the scipy "
        "baseline (and, for information, the plain torchdiffeq code without gradient). *With gradient*: "
        "`log_prob` and d log_prob / dx by backpropagation through the solver, ours versus a straightforward "
        "differentiable implementation (`benchmarks/baseline_torchdiffeq.py`: `torchdiffeq.odeint` dopri5 with "
        "its default RMS norm, trace by a per-dimension autograd loop with `create_graph=True`). Times are "
        "medians of the runs; NFE counts forward field evaluations; errors are against the exact log density "
        "and its exact gradient (both include the few-1e-3 prior mismatch).",
        "",
        table(headers, rows),
    ]
    out.append("\n".join(text))
    print(out[-1] + "\n")


def bench_field_cost(problems, cfg: Settings, out: list):
    """Where log_prob's time goes: one evaluation of the augmented field, by divergence implementation.

    ``pyro_scoreflow.dynamics.exact_divergence`` (one forward pass, the ``D``
    vector-Jacobian products batched with ``is_grads_batched``) against
    ``divergence_loop`` (``D`` separate backward passes) and Hutchinson, on
    ``field_sizes`` points at t = 0.3.
    """
    rows = []
    for size, (dim, problem), dtype in itertools.product(cfg.field_sizes, problems.items(), cfg.dtypes):
        field = ScoreField(problem.scores[dtype], problem.sde, (dim,))
        x0 = problem.points[:size].to(dtype)
        t = torch.tensor(0.3, dtype=dtype)
        probes = make_probes("rademacher", 1, x0.shape[0], dim, dtype, x0.device)

        def forward(field=field, x0=x0, t=t):
            x = x0.detach().requires_grad_(True)
            with torch.enable_grad():
                return field.probability_flow(x, t), x

        def no_grad(field=field, x0=x0, t=t):
            with torch.no_grad():
                return field.probability_flow(x0, t)

        variants = {
            "score only (no grad)": no_grad,
            "exact_divergence (batched VJP)": lambda f=forward: exact_divergence(*f(), create_graph=False),
            "divergence_loop (D backward passes)": lambda f=forward: divergence_loop(*f(), create_graph=False),
            "hutchinson_divergence (1 probe)": lambda f=forward, p=probes: hutchinson_divergence(
                *f(), p, create_graph=False
            ),
        }
        times = {name: [] for name in variants}
        for fn in variants.values():
            fn()  # warm-up
        inner = 5
        for _ in range(max(3, cfg.repeats + 2)):  # interleaved rounds; median
            for name, fn in variants.items():
                t0 = time.perf_counter()
                for _ in range(inner):
                    fn()
                times[name].append((time.perf_counter() - t0) / inner)
        med = {name: statistics.median(v) for name, v in times.items()}
        ref = med["divergence_loop (D backward passes)"]
        for name, seconds in med.items():
            rows.append([size, dim, DTYPE_NAMES[dtype], name, f"{1e3 * seconds:.2f}", fmt_r(seconds / ref)])
    headers = ["points", "dim", "dtype", "field evaluation", "time (ms)", "ratio to divergence_loop"]
    text = [
        "### Where the time goes: one field evaluation",
        "",
        "One evaluation of the probability-flow field and its divergence at t = 0.3 with the package's own "
        "building blocks (`pyro_scoreflow.dynamics`): the score alone, the exact divergence as `log_prob` "
        "computes it (`exact_divergence`: the D vector-Jacobian products batched with `is_grads_batched`), the "
        "same trace by D separate backward passes (`divergence_loop`, the baseline's approach) and Hutchinson "
        "with one probe. Medians of interleaved rounds.",
        "",
        table(headers, rows),
    ]
    out.append("\n".join(text))
    print(out[-1] + "\n")


# -- 3. sampling ----------------------------------------------------------------------------------------------------
def bench_sampling(sde, cfg: Settings, out: list):
    """Section 3: samplers against exact samples of p_eps."""
    rows = []
    floors = []
    n = cfg.n_samples
    for dim in cfg.sample_dims:
        problem = Problem(sde, dim, n_points=1, x_T_tol=1e-6)
        score, p_eps = problem.scores[torch.float32], problem.p_eps
        torch.manual_seed(100 + dim)
        ed_floor = [energy_distance(p_eps.sample((n,)), p_eps.sample((n,))) for _ in range(cfg.floor_pairs)]
        mass_floor = [component_mass_error(p_eps, p_eps.sample((n,))) for _ in range(cfg.floor_pairs)]
        ed_mean, ed_sd = statistics.mean(ed_floor), statistics.pstdev(ed_floor)
        floors.append(
            f"{dim}-D: energy distance {fmt_e(ed_mean)} ± {fmt_e(ed_sd)}, "
            f"max mass error {statistics.mean(mass_floor):.4f} ± {statistics.pstdev(mass_floor):.4f}"
        )
        configs = [("sde", s) for s in cfg.sde_steps] + [("ode", None)] + [("dpm-solver", s) for s in cfg.dpm_steps]
        dim_rows, default_time = [], None
        for index, (sampler, steps) in enumerate(configs):
            kwargs = {"sampler": sampler} if steps is None else {"sampler": sampler, "num_steps": steps}
            prior = ScoreSDEPrior(score, sde, (dim,), **kwargs)

            def run(prior=prior):
                x = prior.sample((n,))
                return x, prior.last_nfe

            torch.manual_seed(1000 * dim + index)  # independent draws for every sampler
            run()  # warm-up (full size: the reverse SDE's Brownian tree depends on the batch)
            seconds, outputs, runs = measure(run, cfg.sample_repeats, cfg.cheap_s)
            eds = [energy_distance(x, p_eps.sample((n,))) for x, _ in outputs]
            mass = [component_mass_error(p_eps, x) for x, _ in outputs]
            ed = statistics.mean(eds)
            label = sampler if steps is None else f"{sampler} ({steps} steps)"
            if sampler == "ode":
                label = "ode (dopri5, rtol = atol = 1e-5)"
            if (sampler, steps) == ("sde", 500):
                default_time = seconds
            dim_rows.append([
                dim, label, outputs[0][1], fmt_t(seconds), runs, fmt_e(ed), fmt_r(ed / ed_mean),
                f"{statistics.mean(mass):.4f}", seconds,
            ])  # fmt: skip
            print(f"  sample dim={dim} {label}: {seconds:.3f}s nfe={outputs[0][1]}", file=sys.stderr)
        for row in dim_rows:
            row[-1] = fmt_r(row[-1] / default_time) if default_time else "-"
        rows += dim_rows
    headers = [
        "dim", "sampler", "NFE", "time (s)", "runs", "energy dist", "energy dist / floor", "max mass err",
        "time / sde-500",
    ]  # fmt: skip
    text = [
        f"## 3. Sampling ({n} samples, exact score, float32)",
        "",
        "`ScoreSDEPrior(..., sampler=...).sample((n,))`; NFE is `prior.last_nfe`. Time is the median of up to "
        f"{cfg.sample_repeats} runs after a warm-up (a run slower than {cfg.cheap_s:g} s is not repeated). "
        "*Energy distance* (V-statistic, `torch.cdist`, float64) is to a fresh set of n exact samples "
        "(`GaussianMixtureScore.marginal(eps).sample`), averaged over the runs; *floor* is the mean energy "
        f"distance between two independent exact sets of the same size ({cfg.floor_pairs} pairs), so a ratio "
        "near 1 means the sampler is indistinguishable from exact at this n. *Max mass err*: every sample is "
        "assigned to its most likely component under the exact p_eps; max over components of |fraction - "
        "weight| (weights 0.4/0.3/0.2/0.1). *time / sde-500* is relative to the default sampler "
        "(reverse SDE, 500 Euler-Maruyama steps) in the same run. The reverse SDE's NFE is num_steps + 1 because "
        "torchsde's `sdeint` evaluates the drift once at (T, x_T) to check shapes; one more (num_steps + 2) "
        "means a final sliver step: float32 round-off in torchsde's time accumulation leaves the last regular "
        "step just short of eps.",
        "",
        "Noise floors (mean ± sd over pairs of exact sets): " + "; ".join(floors) + ".",
        "",
        table(headers, rows),
    ]
    out.append("\n".join(text))
    print(out[-1] + "\n")


# -- driver ---------------------------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_commit() -> str:
    """The short commit of the checkout, with ``+modified`` when the package has uncommitted changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        status = subprocess.run(
            ["git", "status", "--porcelain", "--", "pyro_scoreflow"], cwd=ROOT, capture_output=True, text=True
        )
        commit = head.stdout.strip() or "unknown"
        return commit + (" (+ uncommitted changes in pyro_scoreflow/)" if status.stdout.strip() else "")
    except OSError:
        return "unknown"


def contention_probe(threads: int) -> dict:
    """Seconds for a fixed small workload (100 exact-score evaluations on 1000 2-D points) at 1 and ``threads``.

    Rounds alternate between the thread counts; medians of 3. On an idle
    machine the two are close; when other processes share the cores, torch's
    parallel regions wait for descheduled threads and the multi-thread time
    balloons. A multi-thread round is cut short once it is 4x slower than the
    single-thread one and extrapolated, so the probe stays cheap.
    """
    locs, scale_tril, logits = make_mixture(2)
    score = GaussianMixtureScore(VPSDE(), locs.float(), scale_tril.float(), logits.float())
    x, t = torch.randn(1000, 2), torch.full((1000,), 0.5)
    counts = sorted({1, threads})
    runs = {n: [] for n in counts}
    evaluations = 100
    for _ in range(3):
        for n in counts:
            torch.set_num_threads(n)
            score(x, t)
            limit = 4 * runs[1][-1] if n > 1 else math.inf
            done, elapsed, t0 = 0, 0.0, time.perf_counter()
            while done < evaluations and elapsed <= limit:
                score(x, t)
                done += 1
                elapsed = time.perf_counter() - t0
            runs[n].append(elapsed * evaluations / done)
    torch.set_num_threads(threads)
    return {n: statistics.median(v) for n, v in runs.items()}


def format_probe(probe: dict) -> str:
    text = ", ".join(f"{1e3 * v:.0f} ms at {k} thread{'s' if k > 1 else ''}" for k, v in sorted(probe.items()))
    many = max(probe)
    if many > 1 and probe[many] > 2 * probe[1]:
        text += f" (x{probe[many] / probe[1]:.2g}: the cores are shared, multi-thread timings are inflated)"
    return text


def header(mode, command, load, total_s, probes, note, thread_choice, default_threads) -> str:
    """The Markdown header: machine, versions, date, load."""
    import numpy
    import pyro
    import scipy
    import torchdiffeq
    import torchsde

    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return "\n".join([
        "# pyro_scoreflow core benchmarks",
        "",
        f"Generated by `PYTHONPATH=. python benchmarks/bench_core.py {command}`. Measurements, not "
        "assertions: numbers vary between machines and runs; ratios against baselines measured in the same run "
        "are the portable part.",
        "",
        f"- **Date**: {now}; mode: {mode}; total wall time {total_s:.0f} s",
        f"- **Machine**: {cpu_model()}, {os.cpu_count()} cores; torch threads: {thread_choice}; torch's default "
        f"here: {default_threads}",
        f"- **Software**: Python {platform.python_version()}, torch {torch.__version__}, pyro-ppl "
        f"{pyro.__version__}, torchdiffeq {torchdiffeq.__version__}, torchsde {torchsde.__version__}, scipy "
        f"{scipy.__version__}, numpy {numpy.__version__}; repository commit {git_commit()}",
        f"- **Load average** (1 min) at start / end: {load[0]:.2f} / {load[1]:.2f} on {os.cpu_count()} cores. "
        "When other processes share the cores, absolute times are noisy (and multi-thread torch ops wait for "
        "descheduled threads); medians, interleaved repeats and same-run ratios damp this.",
        "- **Contention probe** (100 exact-score evaluations on 1000 2-D points, 1 thread and the default "
        f"count alternating, medians of 3): start {format_probe(probes[0])}; end {format_probe(probes[1])}",
    ] + ([f"- **Note**: {note}"] if note else []))  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sizes for a CI smoke run (< 60 s)")
    parser.add_argument("--output", type=Path, default=None, help="also write the Markdown report to this file")
    parser.add_argument(
        "--threads",
        default="auto",
        help="torch threads: a number, or 'auto' (default): torch's default, unless the contention probe finds\n"
        "the machine's cores busy with other processes (multi-thread workload > 2x slower than 1 thread),\n"
        "then 1 thread; the report header says which",
    )
    parser.add_argument("--note", default=None, help="a remark to print in the report header")
    parser.add_argument(
        "--sections", default="1,2,3", help="comma-separated sections to run: 1 log_prob, 2 baselines, 3 sampling"
    )
    args = parser.parse_args(argv)
    if args.threads != "auto" and not (args.threads.isdigit() and int(args.threads) > 0):
        parser.error(f"--threads must be a positive integer or 'auto', got {args.threads!r}")
    cfg = QUICK if args.quick else FULL
    sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    start = time.perf_counter()
    load_start = os.getloadavg()[0]
    torch_default_threads = torch.get_num_threads()
    probe_start = contention_probe(max(torch_default_threads, 2))
    print(f"contention probe: {format_probe(probe_start)}", file=sys.stderr)
    if args.threads == "auto":
        threads = torch_default_threads
        many = max(probe_start)
        if threads > 1 and probe_start[many] > 2 * probe_start[1]:
            threads = 1
            print("auto threads: cores are busy with other processes, using 1 thread", file=sys.stderr)
    else:
        threads = int(args.threads)
    torch.set_num_threads(threads)
    thread_choice = (
        f"{threads} (chosen by --threads auto: the start probe found "
        + ("multi-thread runs slowed by other processes)" if threads != torch_default_threads else "no contention)")
        if args.threads == "auto"
        else f"{threads} (set by --threads)"
    )
    sde = VPSDE()
    out: list[str] = []
    problems = {}
    if sections & {"1", "2"}:
        problems = {dim: Problem(sde, dim, cfg.n_points, cfg.x_T_tol) for dim in cfg.dims}
    for name, run in (("1", bench_log_prob), ("2", bench_baselines)):
        if name in sections:
            t0 = time.perf_counter()
            run(problems, cfg, out)
            print(f"section {name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    if "3" in sections:
        t0 = time.perf_counter()
        bench_sampling(sde, cfg, out)
        print(f"section 3: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    total = time.perf_counter() - start
    probe_end = contention_probe(max(torch_default_threads, 2))
    torch.set_num_threads(threads)
    command = " ".join(sys.argv[1:] if argv is None else argv)
    load = (load_start, os.getloadavg()[0])
    mode = "quick" if args.quick else "full"
    head = header(mode, command, load, total, (probe_start, probe_end), args.note, thread_choice, torch_default_threads)
    print(f"total wall time: {total:.1f} s", file=sys.stderr)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(head + "\n\n" + "\n\n".join(out) + "\n")
        print(f"wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
