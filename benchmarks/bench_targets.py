r"""The targets of issue 5: each a ratio against a baseline measured in the same run, with PASS/FAIL.

Run through :mod:`run_all`. Every ``target_*`` function appends a Markdown
section to ``out`` and returns one or more rows of the summary table:
``(target, requirement, measured, verdict)``.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _path in (str(ROOT), str(HERE)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from baseline_scipy import scipy_log_prob  # noqa: E402
from baseline_torchdiffeq import divergence_loop, loop_vjp, torchdiffeq_log_prob  # noqa: E402
from bench_core import Problem, fmt_e, fmt_r, fmt_t, table  # noqa: E402

import pyro_scoreflow.dynamics as dynamics  # noqa: E402
from pyro_scoreflow import ScoreNet, ScoreSDEPrior, datasets  # noqa: E402
from pyro_scoreflow.compiled import CompiledFlow  # noqa: E402
from pyro_scoreflow.dynamics import ScoreField, exact_divergence  # noqa: E402
from pyro_scoreflow.metrics import energy_distance  # noqa: E402

F32, F64 = torch.float32, torch.float64


def verdict(ok: bool) -> str:
    return "**PASS**" if ok else "**FAIL**"


def timed(fn):
    t0 = time.perf_counter()
    value = fn()
    return time.perf_counter() - t0, value


def interleaved(fns: dict, repeats: int) -> tuple[dict, dict]:
    """Run every function once per round (after one warm-up each); median seconds and first outputs."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    outs = {}
    for _ in range(repeats):
        for k, fn in fns.items():
            t, v = timed(fn)
            times[k].append(t)
            outs.setdefault(k, v)
    return {k: statistics.median(v) for k, v in times.items()}, outs


def no_grad_log_prob(prior, x):
    def run():
        with torch.no_grad():
            lp = prior.log_prob(x.clone())  # fresh tensor: log_prob caches by identity
        return lp.double(), prior.last_nfe

    return run


# -- a. accuracy per cost -------------------------------------------------------------------------------------------
def target_accuracy(problem: Problem, tols, repeats: int, out: list) -> list:
    sde, score = problem.sde, problem.scores[F32]
    x = problem.points.to(F32)
    n = x.shape[0]

    def scipy_run():
        lp, nfe, _ = scipy_log_prob(score, sde, x)
        return lp, nfe

    fns = {"scipy": scipy_run}
    compile_seconds = {}
    for tol in tols:
        for compiled in (False, True):
            prior = ScoreSDEPrior(score, sde, (2,), rtol=tol, atol=tol, compile=compiled)
            fns[(tol, compiled)] = no_grad_log_prob(prior, x)
            if compiled:  # the one-off compilation, outside the timed runs
                compile_seconds[tol] = timed(fns[(tol, compiled)])[0]
    med, outs = interleaved(fns, repeats)
    rows, best, best_eager = [], None, None
    for key in fns:
        lp, nfe = outs[key]
        err = lp - problem.exact
        solver = (err - problem.mismatch).abs().max().item()
        if key == "scipy":
            label = "scipy baseline (RK45, rtol = atol = 1e-5)"
        else:
            label = f"ours, rtol = atol = {key[0]:g}" + (", `compile=True`" if key[1] else "")
        ok = solver <= 1e-3
        rows.append([
            label, fmt_t(med[key]), nfe, fmt_e(solver), fmt_e(err.abs().max().item()), fmt_e(err.abs().mean().item()),
            fmt_r(med[key] / med["scipy"]), "yes" if ok else "no",
        ])  # fmt: skip
        if key != "scipy" and ok:
            best_of = (key, solver, nfe)
            if best is None or med[key] < med[best[0]]:
                best = best_of
            if not key[1] and (best_eager is None or med[key] < med[best_eager[0]]):
                best_eager = best_of
    headers = [
        "implementation", "time (s)", "NFE", "max abs solver err", "max abs err vs exact p_eps", "mean abs err",
        "time / scipy", "max solver err <= 1e-3",
    ]  # fmt: skip
    out.append("\n".join([
        f"### a. Accuracy per cost (2-D mixture, {n} points, exact score and trace, float32)",
        "",
        "The score_sde-style scipy baseline (`benchmarks/baseline_scipy.py`) against `ScoreSDEPrior.log_prob` "
        "(dopri5, per-point error norm) at several tolerances, same points, interleaved runs, median of "
        f"{repeats}. *Solver error* = log_prob - log p_eps(x) - [log N(x_T; 0, I) - log p_T(x_T)] (section 1): the "
        "error of the ODE solve alone; *err vs exact p_eps* also contains the p_T ≈ N(0, I) mismatch, which no "
        "solver setting removes. The target asks for max solver error <= 1e-3 over all points at <= 1.5x the "
        "baseline's time; the cheapest setting that meets the accuracy is scored. `compile=True` rows evaluate "
        "the augmented field as one `torch.compile`-d graph (`pyro_scoreflow.compiled`); their one-off "
        "compilation, done before the timed runs, took "
        + ", ".join(f"{v:.1f} s (rtol {k:g})" for k, v in compile_seconds.items())
        + " (less when torch's on-disk compile cache already holds the graph).",
        "",
        table(headers, rows),
    ]))  # fmt: skip
    print(out[-1] + "\n")
    if best is None:
        return [("a. accuracy per cost", "max solver err <= 1e-3 at <= 1.5x scipy time", "no setting reached 1e-3",
                 verdict(False))]  # fmt: skip
    ratio = med[best[0]] / med["scipy"]
    scipy_solver = (outs["scipy"][0] - problem.exact - problem.mismatch).abs().max().item()

    def setting(key):
        return f"rtol = atol = {key[0]:g}" + (", compile=True" if key[1] else "")

    measured = (
        f"{setting(best[0])}: max solver err {fmt_e(best[1])}, {best[2]} NFE, time {fmt_r(ratio)}x scipy "
        f"(scipy's own max solver err: {fmt_e(scipy_solver)})"
    )
    if best_eager is not None and best_eager[0] != best[0]:
        measured += f"; without compile: {setting(best_eager[0])}, {fmt_r(med[best_eager[0]] / med['scipy'])}x"
    return [("a. accuracy per cost (2-D, exact trace)", "max solver err <= 1e-3 at <= 1.5x scipy time", measured,
             verdict(ratio <= 1.5))]  # fmt: skip


# -- b. latency of one point with gradient ----------------------------------------------------------------------------
def target_latency(problem: Problem, repeats: int, fd_steps: int, out: list) -> list:
    sde = problem.sde
    x64 = problem.points[:1]
    x = x64.to(F32)
    xr = x64.clone().requires_grad_(True)
    (grad_exact,) = torch.autograd.grad(problem.p_eps.log_prob(xr).sum(), xr)
    score = problem.scores[F32]

    def make_ours(prior):
        def ours():
            xr = x.clone().requires_grad_(True)
            lp = prior.log_prob(xr)
            (g,) = torch.autograd.grad(lp.sum(), xr)
            return float(lp.detach()[0]), prior.last_nfe, g.double()

        return ours

    ours = make_ours(ScoreSDEPrior(score, sde, (2,)))
    ours_compiled = make_ours(ScoreSDEPrior(score, sde, (2,), compile=True))
    compile_seconds = timed(ours_compiled)[0]  # the one-off compilation, outside the timed runs

    def naive():
        xr = x.clone().requires_grad_(True)
        lp, nfe = torchdiffeq_log_prob(score, sde, xr)
        (g,) = torch.autograd.grad(lp.sum(), xr)
        return float(lp.detach()[0]), nfe, g.double()

    med, outs = interleaved({"ours": ours, "compiled": ours_compiled, "naive": naive}, repeats)
    exact = float(problem.exact[0])
    mism = float(problem.mismatch[0])
    rows = []
    for key, label in (
        ("ours", "ours (`log_prob` + `autograd.grad`)"),
        ("compiled", "ours, `compile=True`"),
        ("naive", "plain torchdiffeq baseline"),
    ):
        lp, nfe, g = outs[key]
        rows.append([
            label, f"{1e3 * med[key]:.1f}", nfe, fmt_e(abs(lp - exact)), fmt_e(abs(lp - exact - mism)),
            fmt_e(float((g - grad_exact).abs().max())), fmt_r(med["naive"] / med[key]),
        ])  # fmt: skip
    best = min(("ours", "compiled"), key=lambda k: med[k])
    speedup = med["naive"] / med[best]
    speedup_eager = med["naive"] / med["ours"]
    g_ours, g_naive = outs[best][2], outs["naive"][2]
    err_o = float((g_ours - grad_exact).abs().max())
    err_n = float((g_naive - grad_exact).abs().max())
    same = abs(outs[best][0] - exact) <= 2 * abs(outs["naive"][0] - exact) + 1e-4 and err_o <= 2 * err_n + 1e-4

    # consistency: autograd of a fixed-grid solve vs central finite differences of the same solve (float64)
    fixed = ScoreSDEPrior(problem.scores[F64], sde, (2,), ode_method="rk4", num_steps=fd_steps)
    xr = x64.clone().requires_grad_(True)
    lp = fixed.log_prob(xr)
    (g_ad,) = torch.autograd.grad(lp.sum(), xr)
    h = 1e-5
    g_fd = torch.zeros(2, dtype=F64)
    m_fd = torch.zeros(2, dtype=F64)
    for i in range(2):
        e = torch.zeros_like(x64)
        e[0, i] = h
        with torch.no_grad():
            g_fd[i] = (fixed.log_prob(x64 + e) - fixed.log_prob(x64 - e))[0] / (2 * h)
        m_fd[i] = (problem.terminal_mismatch(x64 + e, 1e-11)[1] - problem.terminal_mismatch(x64 - e, 1e-11)[1])[0] / (
            2 * h
        )
    g_ad = g_ad[0]
    ge = grad_exact[0]
    fd_rows = [
        ["autograd vs finite differences (same fixed grid)", fmt_e(float((g_ad - g_fd).abs().max()))],
        ["autograd vs exact score (∇ log p_eps)", fmt_e(float((g_ad - ge).abs().max()))],
        ["∇ of the p_T mismatch term [log N(x_T; 0, I) - log p_T(x_T)] (finite differences)",
         fmt_e(float(m_fd.abs().max()))],
        ["autograd - exact score - ∇ mismatch", fmt_e(float((g_ad - ge - m_fd).abs().max()))],
    ]  # fmt: skip
    out.append("\n".join([
        "### b. Latency: log_prob + gradient of one 2-D point (float32)",
        "",
        "The first test point of the mixture, `log_prob` and d log_prob/dx by backpropagation through the "
        "solver, ours against the straightforward differentiable implementation "
        "(`benchmarks/baseline_torchdiffeq.py`: dopri5 with torchdiffeq's RMS norm, trace by a per-dimension "
        f"autograd loop with `create_graph=True`), both at rtol = atol = 1e-5; interleaved, median of {repeats}. "
        "Errors are against the exact log density and its exact gradient; *solver err* removes the p_T "
        "mismatch as in section 1. `compile=True` evaluates the augmented field and its backward as "
        f"`torch.compile`-d graphs; their one-off compilation took {compile_seconds:.1f} s before the timed runs "
        "(less from torch's on-disk cache), which a sampler amortises over its iterations. Both of our rows "
        "use the per-point error norm (stricter than the baseline's RMS over the whole state for one point, "
        "hence more NFE).",
        "",
        table(["implementation", "time (ms)", "NFE", "abs err", "abs solver err", "max abs grad err",
               "speed-up (baseline / this)"], rows),  # fmt: skip
        "",
        f"*Gradient consistency* (float64 exact score, fixed-grid rk4 with {fd_steps} steps so the discrete map "
        f"is smooth; central differences with h = {h:g}; PASS when autograd - FD < 1e-5 and the remainder is "
        "below a tenth of the mismatch gradient): the gradient equals the derivative of the computed "
        "log_prob; it differs from the exact score by the gradient of the p_T ≈ N(0, I) mismatch (computed "
        "separately from a tight float64 solve for x_T), not by zero: log_prob never substitutes the score at "
        "eps for the derivative.",
        "",
        table(["check", "max abs difference"], fd_rows),
    ]))  # fmt: skip
    print(out[-1] + "\n")
    return [
        ("b. latency, 1 point log_prob + grad (2-D)", ">= 3x faster than plain torchdiffeq, same accuracy",
         f"{fmt_r(speedup)}x{' with compile=True' if best == 'compiled' else ''} ({1e3 * med[best]:.0f} vs "
         f"{1e3 * med['naive']:.0f} ms; grad err {fmt_e(err_o)} vs {fmt_e(err_n)}); eager {fmt_r(speedup_eager)}x; "
         f"one-off compile {compile_seconds:.0f} s", verdict(speedup >= 3 and same)),
        ("b'. gradient = d(log_prob)/dx", "autograd = finite differences; differs from exact score by mismatch",
         f"AD-FD {fd_rows[0][1]}; AD-exact {fd_rows[1][1]}; ∇mismatch {fd_rows[2][1]}; remainder {fd_rows[3][1]}",
         verdict(float((g_ad - g_fd).abs().max()) < 1e-5
                 and float((g_ad - ge - m_fd).abs().max()) < 0.1 * float(m_fd.abs().max()))),
    ]  # fmt: skip


# -- c. high dimension ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def loop_divergence():
    """Make ``log_prob`` take its vector-Jacobian products one backward pass at a time (``D`` passes for the
    exact trace, as ``divergence_loop``) instead of one batched pass."""
    saved = dynamics.batched_vjp
    dynamics.batched_vjp = loop_vjp
    try:
        yield
    finally:
        dynamics.batched_vjp = saved


def matmul_share(fn) -> float:
    """Fraction of ``fn``'s operator time (torch.profiler, self CPU time) spent in matrix products."""
    from torch.profiler import profile

    fn()
    with profile() as prof:
        fn()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    mm = sum(e.self_cpu_time_total for e in events if e.key in ("aten::mm", "aten::addmm", "aten::bmm"))
    return mm / total


def target_high_dim(sde, n: int, probes: tuple, repeats: int, tol: float, out: list, plots: dict) -> list:
    torch.manual_seed(0)
    net = ScoreNet(sde, (64,), hidden=128).eval()
    net.backbone.out.reset_parameters()  # ScoreNet zero-initialises its output layer: score 0, a diagonal Jacobian
    x = datasets.load("digits", num_samples=n, seed=5, split="test")
    field = ScoreField(net, sde, (64,))
    t = torch.tensor(0.3)

    def forward():
        xx = x.detach().requires_grad_(True)
        with torch.enable_grad():
            return field.probability_flow(xx, t), xx

    def score_only():
        with torch.no_grad():
            return field.probability_flow(x, t)

    compiled = CompiledFlow()
    state = torch.cat([x, x.new_zeros(n, 1)], dim=-1)

    def compiled_divergence():
        with torch.no_grad():
            out = compiled(field, t, state, None, create_graph=False)
        if out is None:  # torch.compile failed (it warned): the eager path, reported as such below
            return exact_divergence(*forward(), create_graph=False)
        return out[:, -1]

    compile_seconds = timed(compiled_divergence)[0]
    fns = {
        "score": score_only,
        "batched": lambda: exact_divergence(*forward(), create_graph=False),
        "loop": lambda: divergence_loop(*forward(), create_graph=False),
        "compiled": compiled_divergence,
    }
    prior = ScoreSDEPrior(net, sde, (64,), rtol=tol, atol=tol)
    run = no_grad_log_prob(prior, x)
    run_compiled = no_grad_log_prob(prior.with_options(compile=True), x)
    compile_seconds += timed(run_compiled)[0]

    def run_loop():
        with loop_divergence():
            return run()

    # torch's default here is one thread per core; the loop's small products do not parallelise, the batched
    # ones do, so the comparison is made at each thread count (same threads for both) and across them
    saved_threads = torch.get_num_threads()
    thread_counts = sorted({1, min(2, os.cpu_count() or 1)})
    field_med, lp_med = {}, {}
    try:
        for k in thread_counts:
            torch.set_num_threads(k)
            field_med[k], outs_f = interleaved(fns, max(3, repeats))
            lp_med[k], outs_l = interleaved({"batched": run, "compiled": run_compiled, "loop": run_loop}, repeats)
            print(f"  64-D exact trace, {k} thread(s): field {field_med[k]}, log_prob {lp_med[k]}", file=sys.stderr)
    finally:
        torch.set_num_threads(saved_threads)
    div_diff = float((outs_f["batched"] - outs_f["loop"]).abs().max())
    compiled_diff = float((outs_f["compiled"] - outs_f["loop"]).abs().max())
    mm_share = matmul_share(fns["loop"])
    lp_exact = outs_l["batched"][0]
    lp_diff = max(float((outs_l[k][0] - outs_l["loop"][0]).abs().max()) for k in ("batched", "compiled"))
    nfe = f"NFE {outs_l['batched'][1]} / {outs_l['compiled'][1]} / {outs_l['loop'][1]}"
    rows = []
    for k in thread_counts:
        for label, med, diff in (
            (f"one field evaluation, t = 0.3, {k} thread(s)", field_med[k], max(div_diff, compiled_diff)),
            (f"whole log_prob, {k} thread(s) (rtol = atol = {tol:g}; {nfe})", lp_med[k], lp_diff),
        ):
            rows.append(
                [
                    label,
                    f"{1e3 * med['score']:.1f}" if "score" in med else "-",
                    f"{1e3 * med['batched']:.1f}",
                    f"{1e3 * med['compiled']:.1f}",
                    f"{1e3 * med['loop']:.1f}",
                    fmt_r(med["loop"] / med["batched"]),
                    fmt_r(med["loop"] / med["compiled"]),
                    fmt_e(diff),
                ]
            )

    def ours(med):
        return min(med["batched"], med["compiled"])

    # best of ours against the loop at the same thread count, and each at its fastest thread count
    speed_field = max(m["loop"] / ours(m) for m in field_med.values())
    speed_lp = max(m["loop"] / ours(m) for m in lp_med.values())
    field_across = min(m["loop"] for m in field_med.values()) / min(ours(m) for m in field_med.values())
    lp_across = min(m["loop"] for m in lp_med.values()) / min(ours(m) for m in lp_med.values())
    exact_med = lp_med.get(saved_threads, lp_med[thread_counts[0]])["batched"]  # Hutchinson runs at saved_threads
    # Hutchinson variance
    hrows, results = [], {}
    base_time = None
    variants = {"rademacher": ("rademacher", False), "gaussian": ("gaussian", False),
                "rademacher, redrawn": ("rademacher", True)}  # fmt: skip
    for label, (kind, redraw) in variants.items():
        for s in probes:
            p = prior.with_options(
                divergence="hutchinson", hutchinson_samples=s, hutchinson_probe=kind, hutchinson_redraw=redraw
            )
            torch.manual_seed(10 + s)
            seconds, (lp, nfe) = timed(no_grad_log_prob(p, x))
            if label == "rademacher" and s == probes[0]:
                base_time = seconds
            err = lp - lp_exact
            results[(label, s)] = (float(err.std()), seconds / base_time)
            hrows.append([label, s, nfe, fmt_t(seconds), fmt_r(seconds / base_time), f"{float(err.std()):.3f}",
                          f"{float(err.mean()):+.3f}", f"{float(err.abs().max()):.2f}"])  # fmt: skip
    exact_cost = exact_med / base_time
    std_one = results[("rademacher", probes[0])][0] * probes[0] ** 0.5
    needed = (std_one / 0.5) ** 2
    std_one_redraw = results[("rademacher, redrawn", probes[0])][0] * probes[0] ** 0.5
    redraw_gain = std_one / std_one_redraw
    needed_redraw = (std_one_redraw / 0.5) ** 2
    hrows.append(["exact trace (batched)", "-", outs_l["batched"][1], fmt_t(exact_med), fmt_r(exact_cost),
                  "0", "0", "0"])  # fmt: skip
    plots["hutchinson"] = {label: [(s, results[(label, s)][0]) for s in probes] for label in variants}
    ok_configs = [(c, k) for k, (sd, c) in results.items() if sd <= 0.5 and c <= 4]
    best_std = min(results.items(), key=lambda kv: kv[1][0])
    within = [(sd, k) for k, (sd, c) in results.items() if c <= 4]
    best_within = min(within) if within else None
    out.append("\n".join([
        f"### c. High dimension: 64-D, MLP score of width 128, {n} points (float32)",
        "",
        "A randomly initialised `ScoreNet(VPSDE(), (64,), hidden=128)` (4 residual blocks; its zero-initialised "
        "output layer re-drawn with PyTorch's default init, else the score is 0 and the Jacobian diagonal; random "
        "weights are fine for cost and for the spread of the trace estimator), evaluated at held-out `digits` images. "
        "`exact_divergence` (what `log_prob` uses eagerly: one forward pass, the 64 vector-Jacobian products "
        "batched with `is_grads_batched`) and the same 64 products as one `torch.compile`-d graph "
        "(`pyro_scoreflow.compiled.CompiledFlow`, what `compile=True` runs; compiled before timing, "
        f"{compile_seconds:.1f} s for the field and the log_prob graphs) against `divergence_loop` (64 separate "
        "backward passes, the baselines' approach), for one field evaluation and for a whole `log_prob` (same "
        "solver; the loop is swapped in for this measurement only); interleaved, median of "
        f"{max(3, repeats)} / {repeats}, at {' and '.join(str(k) for k in thread_counts)} torch thread(s) (without "
        f"OMP_NUM_THREADS torch uses one per core: {os.cpu_count()} here). Speed-ups compare the same thread "
        f"count; across thread counts (each at its fastest) ours is {fmt_r(field_across)}x (field) and "
        f"{fmt_r(lp_across)}x (log_prob) faster than the loop."
        + (f" **torch.compile failed here ({compiled.failed}): the compiled columns ran eagerly.**"
           if compiled.failed else ""),
        "",
        table(["measurement", "score only (ms)", "batched (ms)", "compiled (ms)", "loop (ms)",
               "loop / batched", "loop / compiled", "max abs difference"], rows),  # fmt: skip
        "",
        f"*One thread.* The loop's matrix products (`aten::mm`/`addmm`, torch.profiler self time) are "
        f"{100 * mm_share:.0f}% of its time, and they already run at the core's float32 matmul throughput "
        "(on this CPU a 200 x 128 x 128 product is at least as fast per flop as one 12,800 x 128 x 128 "
        "product). On one core batching removes only the remaining per-call overhead, so its ceiling there is "
        f"{fmt_r(1 / mm_share)}x; the eager `is_grads_batched` backward also falls back to per-slice loops for "
        "`silu_backward` and `native_layer_norm_backward` (no vmap batching rules), which limits it (loop / batched "
        f"at one thread: {fmt_r(field_med[thread_counts[0]]['loop'] / field_med[thread_counts[0]]['batched'])}x for "
        "one evaluation). With two threads the large batched products use both cores while the loop's small ones "
        "do not (the loop gets slower), which is where batching pays on a CPU; on a GPU it wins (one launch "
        "instead of 64). Two-thread timings need both cores free: see the load average in the header.",
        "",
        "*Hutchinson.* Per-point error of `log_prob(divergence='hutchinson')` against the exact-trace "
        "`log_prob` of the same points (std over points; mean shows the bias, which should be ~0); cost is time "
        "relative to one Rademacher probe, one run each. *Redrawn* rows use `hutchinson_redraw=True`: fresh probes "
        "at every evaluation of the field (still unbiased: the trajectory does not depend on the probes), so the "
        "errors of different evaluations are independent and their variances add, instead of one probe's error "
        "being integrated coherently along the whole path; the log-det column is then left out of the step-size "
        "control.",
        "",
        table(["probe", "probes", "NFE", "time (s)", "cost / 1 probe", "error std (nats)", "error mean",
               "max abs error"], hrows),  # fmt: skip
        "",
        f"*Why not 0.5 nats at 4x.* With the probes fixed along the trajectory, the error of S Rademacher probes "
        "is (1/S) sum_s (v_s^T M v_s - tr M), M the Jacobian integrated along the path: variance "
        "2 sum_(i != j) M_ij^2 / S, so the std falls as 1/sqrt(S) (the table follows it) and 0.5 nats needs "
        f"S = (std_1 / 0.5)^2 = ({std_one:.1f} / 0.5)^2 ~ {needed:,.0f} fixed probes, more than the {x.shape[1]} "
        f"vector-Jacobian products of the exact trace, which gives 0 nats for {fmt_r(exact_cost)}x one probe. "
        f"Redrawing the probes lowers the std by {fmt_r(redraw_gain)}x at one probe (the variance is spread over "
        "the evaluations, but concentrated near eps where the Jacobian grows like 1/sigma^2 and only a few "
        f"evaluations share it), so 0.5 nats would still need ~{needed_redraw:,.0f} redrawn probes. Rademacher "
        "probes already remove the diagonal's share of the variance (Gaussian probes: about twice the std); a "
        "control variate would need a cheap matrix with known trace close to M, which a generic network does "
        "not provide. Best achievable here: the std in the table within 4x, else the exact trace.",
    ]))  # fmt: skip
    print(out[-1] + "\n")
    hutch_measured = (
        f"best within 4x cost: std {best_within[0]:.2f} nats ({best_within[1][0]}, {best_within[1][1]} probes); "
        f"lowest std overall {best_std[1][0]:.2f} nats ({best_std[0][0]} x{best_std[0][1]}, cost "
        f"{fmt_r(best_std[1][1])}x); 0.5 nats would need ~{needed:,.0f} fixed / ~{needed_redraw:,.0f} redrawn "
        f"probes (1/sqrt(S) from {std_one:.1f} / {std_one_redraw:.1f} nats at 1), while the exact trace "
        f"({x.shape[1]} VJPs) costs {fmt_r(exact_cost)}x one probe"
        if best_within
        else "no configuration within 4x"
    )
    return [
        ("c. exact trace 64-D, one field evaluation", ">= 2x faster than divergence_loop",
         f"{fmt_r(speed_field)}x at equal threads (best of batched/compiled; {fmt_r(field_across)}x against the "
         f"loop's fastest thread count); at 1 thread the loop's matmuls are {100 * mm_share:.0f}% of its time, "
         f"capping batching at {fmt_r(1 / mm_share)}x there", verdict(speed_field >= 2)),
        ("c. exact trace 64-D, whole log_prob", ">= 2x faster than divergence_loop",
         f"{fmt_r(speed_lp)}x at equal threads ({fmt_r(lp_across)}x across thread counts)", verdict(speed_lp >= 2)),
        ("c. Hutchinson variance 64-D", "error std <= 0.5 nats at <= 4x one probe", hutch_measured,
         verdict(bool(ok_configs))),
    ]  # fmt: skip


# -- d. gradient cost and memory ------------------------------------------------------------------------------------
def target_gradient(problem: Problem, moons_prior, n: int, repeats: int, mem_steps: tuple, mem_points: int,
                    threads: int, out: list, plots: dict) -> list:  # fmt: skip
    rows, ratios = [], {}
    x_mix = problem.points[:n].to(F32)
    x_moons = datasets.load("moons", num_samples=n, seed=7)
    mix_prior = ScoreSDEPrior(problem.scores[F32], problem.sde, (2,))
    for label, prior, x in (("2-D mixture, exact score", mix_prior, x_mix), ("moons ScoreNet", moons_prior, x_moons)):

        def grad_run(prior=prior, x=x):
            xr = x.clone().requires_grad_(True)
            lp = prior.log_prob(xr)
            lp.sum().backward()
            return prior.last_nfe

        def plain(prior=prior, x=x):
            return no_grad_log_prob(prior, x)()[1]

        med, outs = interleaved({"plain": plain, "grad": grad_run}, repeats)
        ratios[label] = med["grad"] / med["plain"]
        rows.append([label, n, fmt_t(med["plain"]), outs["plain"], fmt_t(med["grad"]), outs["grad"],
                     fmt_r(ratios[label])])  # fmt: skip
    mem = []
    for steps in mem_steps:
        for adjoint in (False, True):
            cmd = [sys.executable, str(HERE / "mem_probe.py"), "--steps", str(steps), "--points", str(mem_points),
                   "--threads", str(threads)] + (["--adjoint"] if adjoint else [])  # fmt: skip
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if proc.returncode != 0:
                print(proc.stderr, file=sys.stderr)
                continue
            mem.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"  memory steps={steps} adjoint={adjoint}: {mem[-1]}", file=sys.stderr)
    by = {(m["steps"], m["adjoint"]): m for m in mem}
    mrows = []
    for steps in mem_steps:
        b, a = by.get((steps, False)), by.get((steps, True))
        if b and a:
            mrows.append([steps, b["nfe"], f"{b['peak_mb']:.1f}", fmt_t(b["seconds"]), f"{a['peak_mb']:.1f}",
                          fmt_t(a["seconds"]), fmt_r(a["seconds"] / b["seconds"])])  # fmt: skip
    plots["memory"] = {
        "backprop": [(s, by[(s, False)]["peak_mb"]) for s in mem_steps if (s, False) in by],
        "adjoint": [(s, by[(s, True)]["peak_mb"]) for s in mem_steps if (s, True) in by],
    }
    out.append("\n".join([
        "### d. Gradient: cost and memory",
        "",
        f"`log_prob` of {n} points (default dopri5, rtol = atol = 1e-5, float32) under `torch.no_grad()` "
        f"against `log_prob(x).sum().backward()` with `x.requires_grad_()`; interleaved, median of {repeats}.",
        "",
        table(["problem", "points", "log_prob (s)", "NFE", "log_prob + backward (s)", "NFE", "ratio"], rows),
        "",
        f"*Memory*: peak resident memory of one `log_prob` + gradient of {mem_points} points of the 2-D mixture "
        "(fixed-grid rk4, so the number of steps is set; NFE = 4 x steps), one fresh process per configuration "
        "(`benchmarks/mem_probe.py`): the peak RSS during the call (`VmHWM`, reset through "
        "`/proc/self/clear_refs` after a warm-up) minus the RSS before it. CPU only: no "
        "`torch.cuda.max_memory_allocated` here. Backpropagation stores the graph of every step; the adjoint "
        "(`adjoint=True`) re-integrates backwards and stores none. Memory freed by the warm-up and kept by the "
        "allocator is not counted again, so small numbers mean 'no growth', not an exact footprint.",
        "",
        table(["steps", "NFE", "backprop peak (MB)", "backprop time (s)", "adjoint peak (MB)", "adjoint time (s)",
               "adjoint / backprop time"], mrows),  # fmt: skip
    ]))  # fmt: skip
    print(out[-1] + "\n")
    worst = max(ratios.values())
    summary = [
        ("d. gradient cost", "log_prob + backward <= 3x log_prob",
         "; ".join(f"{k}: {fmt_r(v)}x" for k, v in ratios.items()), verdict(worst <= 3)),
    ]  # fmt: skip
    if len(mrows) >= 2:
        bp = plots["memory"]["backprop"]
        ad = plots["memory"]["adjoint"]
        flat = ad[-1][1] <= max(5.0, 1.5 * ad[0][1]) and ad[-1][1] < 0.25 * bp[-1][1]
        grows = bp[-1][1] > 2 * bp[0][1]
        summary.append(
            (
                "d. adjoint memory",
                "flat in the number of steps while backprop grows",
                f"backprop {bp[0][1]:.0f} -> {bp[-1][1]:.0f} MB, adjoint {ad[0][1]:.1f} -> {ad[-1][1]:.1f} MB "
                f"({bp[0][0]} -> {bp[-1][0]} steps)",
                verdict(flat and grows),
            )
        )
    return summary


# -- e. few-step sampling -------------------------------------------------------------------------------------------
def sampler_configs(dpm_steps, sde_steps, dopri_tols):
    configs = []
    for order in (3, 2):
        configs += [(f"dpm-solver order {order}", dict(sampler="dpm-solver", num_steps=k, dpm_order=order))
                    for k in dpm_steps]  # fmt: skip
    configs += [("ode euler", dict(sampler="ode", ode_method="euler", num_steps=k)) for k in dpm_steps]
    configs += [("ode dopri5", dict(sampler="ode", rtol=tol, atol=tol)) for tol in dopri_tols]
    configs += [("sde euler-maruyama", dict(sampler="sde", num_steps=k)) for k in sde_steps]
    return configs


def run_samplers(score, sde, event_shape, configs, n: int, reference, seed: int) -> list:
    """Each configuration: ``(family, options, nfe, seconds, energy distance to reference)``."""
    results = []
    for index, (family, opts) in enumerate(configs):
        prior = ScoreSDEPrior(score, sde, event_shape, **opts)
        torch.manual_seed(seed + index)
        seconds, xs = timed(lambda prior=prior: prior.sample((n,)))
        ed = float(energy_distance(xs, reference))
        results.append((family, opts, prior.last_nfe, seconds, ed))
        print(f"  sample {family} {opts}: nfe={prior.last_nfe} {seconds:.2f}s ed={ed:.2e}", file=sys.stderr)
    return results


def describe(opts: dict) -> str:
    if "rtol" in opts:
        return f"rtol = atol = {opts['rtol']:g}"
    return f"{opts['num_steps']} steps"


def sampling_rows(results, floor):
    return [[fam, describe(o), nfe, fmt_t(s), fmt_e(ed), fmt_r(ed / floor)] for fam, o, nfe, s, ed in results]


def target_sampling(problem_sde, make_problem, n: int, dpm_steps, sde_steps, dopri_tols, out: list,
                    plots: dict) -> list:  # fmt: skip
    problem = make_problem()
    score, p_eps = problem.scores[F32], problem.p_eps
    torch.manual_seed(2024)
    reference = p_eps.sample((n,)).float()
    floor = float(energy_distance(p_eps.sample((n,)), reference))
    configs = sampler_configs(dpm_steps, sde_steps, dopri_tols)
    results = run_samplers(score, problem_sde, (2,), configs, n, reference, seed=500)
    plots["sampling_mixture"] = (results, floor)
    few = [(ed, fam, o, nfe) for fam, o, nfe, s, ed in results if fam.startswith("dpm") and nfe <= 10]
    best = min(few) if few else None
    out.append("\n".join([
        f"### e. Few-step sampling (2-D mixture, exact score, {n:,} vs {n:,} samples, float32)",
        "",
        "Energy distance (`pyro_scoreflow.metrics.energy_distance`, V-statistic) of each sampler's n draws to "
        "one fixed set of n exact draws of p_eps; *floor* is the same statistic for a second independent exact "
        f"set: {fmt_e(floor)} (a sampler at the floor is indistinguishable from exact at this n). NFE = score "
        "evaluations (`prior.last_nfe`). DPM-Solver++ (order 3 or 2 with the UniC corrector, log-SNR steps "
        "warped with power 0.6) stops where sigma/alpha = 0.025 (its defaults); Euler on the "
        "probability-flow ODE uses the same number of evaluations; the reverse SDE is Euler-Maruyama. "
        "Plot: `_static/benchmarks/sampling_mixture.png`.",
        "",
        "![energy distance vs NFE, 2-D mixture](_static/benchmarks/sampling_mixture.png)",
        "",
        table(["sampler", "setting", "NFE", "time (s)", "energy distance", "/ floor"], sampling_rows(results, floor)),
    ]))  # fmt: skip
    print(out[-1] + "\n")
    if best is None:
        return [("e. few-step sampling", "energy distance <= 5e-4 at <= 10 NFE", "no run", verdict(False))]
    euler = {nfe: ed for fam, o, nfe, s, ed in results if fam == "ode euler"}
    sde_ed = [ed for fam, o, nfe, s, ed in results if fam.startswith("sde")]
    measured = (
        f"{fmt_e(best[0])} ({best[1]}, {best[3]} NFE); Euler PF-ODE at {best[3]} NFE: "
        f"{fmt_e(euler.get(best[3], float('nan')))}; SDE {sde_steps[-1]} steps: {fmt_e(sde_ed[-1])}; "
        f"floor {fmt_e(floor)}"
    )
    return [(f"e. few-step sampling (n = {n:,})", "energy distance <= 5e-4 at <= 10 NFE", measured,
             verdict(best[0] <= 5e-4))]  # fmt: skip
