r"""The ``pyro_scoreflow`` benchmark suite (issue 5): one command, Markdown tables and plots.

Usage (from the repository root)::

    PYTHONPATH=. python benchmarks/run_all.py --quick                          # CI smoke, < 90 s
    PYTHONPATH=. python benchmarks/run_all.py --output docs/benchmarks.md      # full run, writes the doc + plots

Sections:

1. ``log_prob`` accuracy and cost: the exact-score mixtures of
   :mod:`bench_core` (2-D and 16-D, exact and Hutchinson, float32 and float64)
   and the shipped ``moons`` and ``digits`` priors.
2. Targets: each a ratio measured in this run against its baseline, PASS/FAIL
   (:mod:`bench_targets`): accuracy per cost, one-point latency with gradient,
   the 64-D exact trace and Hutchinson variance, gradient cost and adjoint
   memory, few-step sampling.
3. Sampling quality against NFE for the learned ``moons`` prior.
4. Training throughput of :func:`pyro_scoreflow.fit`.

Measurements, not assertions: the script exits 0 whatever the numbers are
(non-zero only if a benchmark crashes). With ``--output``, PNG plots go to
``<output dir>/_static/benchmarks/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _path in (str(ROOT), str(HERE)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import bench_core  # noqa: E402
import bench_learned  # noqa: E402
import bench_targets  # noqa: E402
from bench_core import FULL, QUICK, Problem, contention_probe, cpu_model, format_probe, git_commit, table  # noqa: E402

from pyro_scoreflow import VPSDE, ScoreSDEPrior  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Suite:
    core: bench_core.Settings  # section 1 mixtures
    pretrained: tuple  # (name, points, tol, dtypes, probes)
    acc_tols: tuple
    acc_repeats: int
    lat_repeats: int
    fd_steps: int
    hd_points: int
    hd_probes: tuple
    hd_repeats: int
    hd_tol: float
    grad_points: int
    grad_repeats: int
    mem_steps: tuple
    mem_points: int
    ed_samples: int
    dpm_steps: tuple
    sde_steps: tuple
    dopri_tols: tuple
    moons_samples: int
    moons_dpm_steps: tuple
    moons_sde_steps: tuple
    moons_dopri_tols: tuple
    train_steps: int


F32, F64 = torch.float32, torch.float64
FULL_SUITE = Suite(
    core=dataclasses.replace(FULL, repeats=1, probes=(1, 4)),
    pretrained=(("moons", 500, 1e-5, (F32, F64), (1, 4)), ("digits", 200, 1e-3, (F32, F64), (1, 4, 16))),
    acc_tols=(1e-5, 3e-5, 1e-4, 3e-4), acc_repeats=3, lat_repeats=5, fd_steps=400,
    hd_points=200, hd_probes=(1, 2, 4, 8, 16), hd_repeats=2, hd_tol=1e-3,
    grad_points=100, grad_repeats=3, mem_steps=(25, 50, 100, 200), mem_points=1000,
    ed_samples=20000, dpm_steps=(5, 8, 10, 15, 20), sde_steps=(100, 1000), dopri_tols=(1e-3, 1e-5),
    moons_samples=4000, moons_dpm_steps=(5, 10, 20), moons_sde_steps=(100, 500), moons_dopri_tols=(1e-3, 1e-5),
    train_steps=40,
)  # fmt: skip
QUICK_SUITE = Suite(
    core=dataclasses.replace(QUICK, dims=(2,), probes=(1,)),
    pretrained=(("moons", 100, 1e-5, (F32,), (1,)), ("digits", 20, 1e-3, (F32,), (1, 4))),
    acc_tols=(1e-5, 3e-5, 1e-4), acc_repeats=1, lat_repeats=1, fd_steps=400,
    hd_points=30, hd_probes=(1, 2, 4), hd_repeats=1, hd_tol=1e-3,
    grad_points=50, grad_repeats=1, mem_steps=(25, 100), mem_points=500,
    ed_samples=4000, dpm_steps=(5, 10, 20), sde_steps=(1000,), dopri_tols=(1e-3,),
    moons_samples=500, moons_dpm_steps=(10,), moons_sde_steps=(100,), moons_dopri_tols=(),
    train_steps=5,
)  # fmt: skip


# -- plots ----------------------------------------------------------------------------------------------------------
def make_plots(plots: dict, directory: Path) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    written = []

    def sampling(key, title, target):
        if key not in plots:
            return
        results, floor = plots[key]
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        families = {}
        for fam, _opts, nfe, _, ed in results:
            families.setdefault(fam, []).append((nfe, ed))
        markers = dict(zip(sorted(families), "osD^v<>"))
        for fam, pts in families.items():
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=markers[fam], label=fam)
        ax.axhline(floor, color="gray", ls="--", label="noise floor (exact vs exact)")
        if target:
            ax.axhline(target, color="red", ls=":", label=f"target {target:g}")
            ax.axvline(10, color="red", ls=":", lw=0.8)
        ax.set(xscale="log", yscale="log", xlabel="NFE (score evaluations)", ylabel="energy distance", title=title)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = directory / f"{key}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    sampling("sampling_mixture", "Sampling quality vs NFE: 2-D mixture, exact score", 5e-4)
    sampling("sampling_moons", "Sampling quality vs NFE: learned moons prior vs held-out data", None)
    if plots.get("memory", {}).get("backprop"):
        fig, ax = plt.subplots(figsize=(5.6, 4))
        for key, marker in (("backprop", "o"), ("adjoint", "s")):
            pts = plots["memory"][key]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=key)
        ax.set(xlabel="rk4 steps", ylabel="peak RSS increase (MB)", title="log_prob + gradient: memory vs steps")
        ax.legend()
        fig.tight_layout()
        path = directory / "memory.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    if "hutchinson" in plots:
        fig, ax = plt.subplots(figsize=(5.6, 4))
        for kind, pts in plots["hutchinson"].items():
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=kind)
        ax.axhline(0.5, color="red", ls=":", label="target 0.5 nats")
        ax.set(xscale="log", yscale="log", xlabel="probes per point", ylabel="per-point error std (nats)",
               title="Hutchinson log_prob error, 64-D MLP")  # fmt: skip
        ax.legend()
        fig.tight_layout()
        path = directory / "hutchinson.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


# -- page layout ---------------------------------------------------------------------------------------------------
# The page reads: recommendations, the measurements by topic (with their plots), then the internal target table
# and the run's details in appendices. ``assemble_report`` builds it from the parts each benchmark returns, so the
# layout lives in one place.
FIGURES = {  # plot file -> (the detail section it belongs to, its caption)
    "hutchinson.png": ("### c.", "Hutchinson's per-point log_prob error against the number of probes (64-D MLP score)"),
    "memory.png": (
        "### d.",
        "Peak memory of log_prob + gradient against the number of rk4 steps: backprop and adjoint",
    ),
}


def intro(command: str) -> str:
    return "\n".join([
        "# Benchmarks",
        "",
        f"Generated by `PYTHONPATH=. python benchmarks/run_all.py {command}` (see `benchmarks/run_all.py`; `--quick` "
        "is the CI smoke run). Measurements, not assertions: absolute numbers vary between machines and runs; the "
        "ratios against baselines measured in the same run are the portable part. The recommendations come first, "
        "then the measurements behind them; the run's machine and load are in Appendix B.",
    ])  # fmt: skip


def run_details(mode, load, total_s, probes, note, thread_choice) -> list[str]:
    """The run's facts (date, machine, software, load), for Appendix B."""
    import numpy
    import pyro
    import scipy
    import torchdiffeq
    import torchsde

    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return [
        f"- **Date**: {now}; mode: {mode}; total wall time {total_s:.0f} s",
        f"- **Machine**: {cpu_model()}, {os.cpu_count()} cores; torch threads: {thread_choice}",
        "- **GPU**: none available this session: GPU numbers were not measured (all timings are CPU).",
        f"- **Software**: Python {platform.python_version()}, torch {torch.__version__}, pyro-ppl "
        f"{pyro.__version__}, torchdiffeq {torchdiffeq.__version__}, torchsde {torchsde.__version__}, scipy "
        f"{scipy.__version__}, numpy {numpy.__version__}; repository commit {git_commit()}",
        f"- **Load average** (1 / 5 / 15 min) at start: {load[0][0]:.2f} / {load[0][1]:.2f} / {load[0][2]:.2f}; "
        f"at end: {load[1][0]:.2f} / {load[1][1]:.2f} / {load[1][2]:.2f} (on {os.cpu_count()} cores). Other "
        "processes sharing the cores make absolute times noisy; interleaved repeats and same-run ratios damp it.",
        "- **Contention probe** (100 exact-score evaluations on 1000 2-D points, 1 thread and 2 threads "
        f"alternating, medians of 3): start {format_probe(probes[0])}; end {format_probe(probes[1])}",
    ] + ([f"- **Note**: {note}"] if note else [])  # fmt: skip


def _sampling_facts(results, floor) -> dict:
    """Energy distance / noise floor of the reference settings, from ``(family, options, nfe, s, ed)`` rows."""
    facts = {}
    for fam, opts, nfe, _, ed in results:
        if fam == "dpm-solver order 3" and opts.get("num_steps") in (5, 10):
            facts[f"dpm{opts['num_steps']}"] = ed / floor
        elif fam.startswith("sde") and "num_steps" in opts:
            if opts["num_steps"] >= facts.get("sde", (0, 0))[0]:
                facts["sde"] = (opts["num_steps"], ed / floor)
        elif fam == "ode dopri5" and opts.get("rtol") == 1e-3:
            facts["ode"] = (nfe, ed / floor)
    return facts


def _x(v: float) -> str:
    return f"{v:.2g}x" if v < 10 else f"{v:.0f}x"


def _floor(ratio: float) -> str:
    """An energy distance relative to the two-sample noise floor, in words."""
    return f"at the noise floor ({_x(ratio)})" if ratio < 1.5 else f"{_x(ratio)} the noise floor"


def recommendations(plots: dict, summary: list) -> str:
    """What to use when, with the costs measured in this run (a phrase is left out when its number is missing)."""
    sampling = _sampling_facts(*plots["sampling_mixture"]) if "sampling_mixture" in plots else {}
    by_target = {row[0]: row[2] for row in summary}

    def target(prefix: str) -> str | None:
        return next((v for k, v in by_target.items() if k.startswith(prefix)), None)

    rows = []
    cost = "500–1000 score evaluations (§2e)"
    if "sde" in sampling:
        cost = (f"{sampling['sde'][0]} Euler–Maruyama steps: energy distance {_floor(sampling['sde'][1])} "
                f"(2-D mixture, §2e); {sampling['sde'][0]} score evaluations")  # fmt: skip
    rows.append(["many samples, best quality", '`sampler="sde"` (default; 500 steps, 1000 for the last bit)', cost])
    cost = "10 score evaluations (§2e, §3)"
    if "dpm10" in sampling:
        cost = (f"10 steps: {_floor(sampling['dpm10'])} for 10 score evaluations, 100 times fewer than "
                "the SDE's 1000"
                + (f"; below 8 steps it breaks down (5 steps: {_floor(sampling['dpm5'])})" if "dpm5" in sampling
                   else "") + " (§2e, §3)")  # fmt: skip
    rows.append(["fast samples", '`sampler="dpm-solver"`, `num_steps=10`–`20` (order 3, the default)', cost])
    cost = "adaptive (§2e)"
    if "ode" in sampling:
        cost = (f"dopri5 at rtol = atol = 1e-3: {_floor(sampling['ode'][1])}, {sampling['ode'][0]} score "
                "evaluations (§2e)")  # fmt: skip
    rows.append(["deterministic samples, encoding, interpolation", '`sampler="ode"`, `prior.flow`, `prior.flow.inv`',
                 cost])  # fmt: skip
    hutch = plots.get("hutchinson", {})
    cost = "$D$ vector-Jacobian products per step, batched (§1, §2c)"
    c_full = target("c. exact trace 64-D, whole")
    if c_full:
        cost += f"; batched against a loop of $D$ backward passes in 64-D: {c_full}"
    rows.append(["a reported log-likelihood", '`divergence="exact"`', cost])
    cost = "unbiased, but a large per-point error (§2c, figure)"
    if hutch.get("rademacher") and hutch.get("rademacher, redrawn"):
        fixed, redrawn = dict(hutch["rademacher"]), dict(hutch["rademacher, redrawn"])
        most = max(redrawn)
        cost = (f"unbiased, but the per-point error in 64-D is {fixed[min(fixed)]:.0f} nats with one fixed probe, "
                f"{redrawn[min(redrawn)]:.0f} redrawn, {redrawn[most]:.1f} with {most} redrawn probes; it falls as "
                r"$1/\sqrt{\text{probes}}$ (§2c, figure). Fine for means over many points and for stochastic "
                "gradients, not for one point's value")  # fmt: skip
    rows.append(["gradients for SVI or training, test-set averages in high dimension",
                 '`divergence="hutchinson"`, `hutchinson_redraw=True`, 4–16 probes', cost])  # fmt: skip
    a = target("a.")
    tolerance = (
        "solver error far below the $p_T \\approx \\mathcal N(0, I)$ mismatch of a few $10^{-3}$ nats per point (§1); "
        "tighter tolerances buy nothing"
    )
    if a:
        tolerance += f". Cheapest setting with solver error $\\le 10^{{-3}}$: {a}"
    rows.append(["reported numbers", "`rtol = atol = 1e-5` (default)", tolerance])
    b = target("b. latency")
    rows.append(["inside NUTS, SVI or optimisation loops", "`rtol = atol = 1e-3`, `compile=True`",
                 "looser tolerances make each gradient about twice as cheap at about $10^{-2}$ nats of error "
                 "(Inference page); `compile=True` after a one-off compilation"
                 + (f": one point, log_prob + gradient: {b}" if b else "") + " (§2b)"])  # fmt: skip
    d, mem = target("d. gradient cost"), plots.get("memory", {})
    cost = f"log_prob + backward against log_prob alone: {d}" if d else "see §2d"
    if mem.get("backprop") and mem.get("adjoint"):
        bp, ad = mem["backprop"], mem["adjoint"]
        cost += (f"; backprop memory grows with the steps ({bp[0][1]:.0f} to {bp[-1][1]:.0f} MB from {bp[0][0]} to "
                 f"{bp[-1][0]} rk4 steps, 1000 points), the adjoint's stays flat ({max(m for _, m in ad):.1f} MB) at "
                 "1.2–1.5x the time (§2d, figure)")  # fmt: skip
    rows.append(["gradients of log_prob", "backpropagation (default); `adjoint=True` for long solves or big batches",
                 cost])  # fmt: skip
    rows.append(["the posterior of a model with a diffusion prior",
                 "see [Pyro in practice](pyro_practice.md): importance sampling, `DiffusionPosterior`, SVI, NUTS",
                 "not measured by this suite; from the test suite (2-D, CPU): vectorized importance sampling "
                 "10,000 particles in about 1.5 s, `DiffusionPosterior` (ΠGDM + corrector) 2000 draws in about 1.5 s, "
                 "SVI 150 steps about 11 s, NUTS 160 iterations (tree depth 2) about 27 s"])  # fmt: skip
    return "\n".join([
        "## Recommendations",
        "",
        "What to use when, with what it cost in this run (§ numbers point to the measurements below).",
        "",
        table(["when", "use", "cost and accuracy measured here"], rows),
    ])  # fmt: skip


def with_figures(target_out: list[str], figures: list[str]) -> list[str]:
    """Embed each generated plot (``FIGURES``) at the end of the detail section it belongs to."""
    out = list(target_out)
    for name, (heading, caption) in FIGURES.items():
        if name not in figures:
            continue
        for i, part in enumerate(out):
            if part.startswith(heading):
                out[i] = part + f"\n\n![{caption}](_static/benchmarks/{name})"
    return out


def assemble_report(*, command: str, details: list[str], timings: dict, section1: list[str], summary: list,
                    target_out: list[str], rest: list[str], plots: dict, figures: list[str]) -> str:  # fmt: skip
    """The Markdown page: intro, recommendations, sections 1-4, Appendix A (targets), Appendix B (this run)."""
    parts = [intro(command), recommendations(plots, summary)] + section1
    if target_out:
        parts.append("\n".join([
            "## 2. Solver measurements",
            "",
            "Cost and accuracy of `log_prob`, its gradient and the few-step sampler, each measured against a "
            "baseline in the same run (these are the details behind the internal targets of Appendix A).",
            "",
            "\n\n".join(with_figures(target_out, figures)),
        ]))  # fmt: skip
    parts += rest
    if summary:
        passed = sum("PASS" in row[3] for row in summary)
        parts.append("\n".join([
            "## Appendix A: internal targets",
            "",
            f"The project's performance targets, each a ratio or a level measured in this run against its baseline "
            f"({passed} of {len(summary)} pass); section 2 has the details and every setting tried.",
            "",
            table(["target", "requirement", "measured", "verdict"], [list(r) for r in summary]),
        ]))  # fmt: skip
    timing_line = "Section wall times: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + "."
    parts.append("\n".join(["## Appendix B: this run", ""] + details + ["", timing_line]))
    return "\n\n".join(parts) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes for a CI smoke run (< 90 s)")
    parser.add_argument("--output", type=Path, default=None, help="write the Markdown report here (plots beside it)")
    parser.add_argument("--threads", default="auto", help="torch threads: a number, or 'auto' (1 if cores are busy)")
    parser.add_argument("--note", default=None, help="a remark for the report header")
    parser.add_argument("--sections", default="1,2,3,4", help="comma-separated sections to run")
    parser.add_argument(
        "--keep-compile-cache",
        action="store_true",
        help="reuse torch.compile's on-disk cache (default: a fresh one, so compile times are real)",
    )
    args = parser.parse_args(argv)
    if not args.keep_compile_cache and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        # compile=True rows report their one-off compilation time: measure it from scratch, as on a fresh machine
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="pyro_scoreflow_bench_inductor_")
    if args.threads != "auto" and not (args.threads.isdigit() and int(args.threads) > 0):
        parser.error(f"--threads must be a positive integer or 'auto', got {args.threads!r}")
    suite = QUICK_SUITE if args.quick else FULL_SUITE
    sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    start = time.perf_counter()
    load_start = os.getloadavg()
    default_threads = torch.get_num_threads()
    probe_start = contention_probe(max(default_threads, 2))
    if args.threads == "auto":
        threads = default_threads
        if threads > 1 and probe_start[max(probe_start)] > 2 * probe_start[1]:
            threads = 1
        thread_choice = f"{threads} (auto; torch's default here: {default_threads})"
    else:
        threads = int(args.threads)
        thread_choice = f"{threads} (set by --threads; torch's default here: {default_threads})"
    torch.set_num_threads(threads)
    print(f"contention probe: {format_probe(probe_start)}; threads {threads}", file=sys.stderr)

    sde = VPSDE()
    out: list[str] = []
    summary: list = []
    plots: dict = {}
    timings = {}
    cfg = suite.core
    problems = {dim: Problem(sde, dim, cfg.n_points, cfg.x_T_tol) for dim in sorted(set(cfg.dims) | {2})}
    moons = ScoreSDEPrior.from_pretrained("moons")

    def section(name, fn):
        t0 = time.perf_counter()
        fn()
        timings[name] = time.perf_counter() - t0
        print(f"== {name}: {timings[name]:.1f} s", file=sys.stderr)

    if "1" in sections:
        out.append("## 1. log_prob accuracy and cost")

        def s1():
            bench_core.bench_log_prob({d: problems[d] for d in cfg.dims}, cfg, out)
            out[-1] = out[-1].replace("## 1. log_prob accuracy and cost", "### Exact-score mixtures", 1)
            bench_learned.bench_pretrained_log_prob(suite.pretrained, out)

        section("1 log_prob", s1)
    target_out: list[str] = []
    if "2" in sections:
        p2 = problems[2]
        section(
            "2a",
            lambda: summary.extend(bench_targets.target_accuracy(p2, suite.acc_tols, suite.acc_repeats, target_out)),
        )
        section(
            "2b",
            lambda: summary.extend(bench_targets.target_latency(p2, suite.lat_repeats, suite.fd_steps, target_out)),
        )
        section(
            "2c",
            lambda: summary.extend(
                bench_targets.target_high_dim(
                    sde, suite.hd_points, suite.hd_probes, suite.hd_repeats, suite.hd_tol, target_out, plots
                )
            ),
        )
        section(
            "2d",
            lambda: summary.extend(
                bench_targets.target_gradient(
                    p2,
                    moons,
                    suite.grad_points,
                    suite.grad_repeats,
                    suite.mem_steps,
                    suite.mem_points,
                    threads,
                    target_out,
                    plots,
                )
            ),
        )
        section("2e", lambda: summary.extend(bench_targets.target_sampling(
            sde, lambda: Problem(sde, 2, 1, 1e-6), suite.ed_samples, suite.dpm_steps, suite.sde_steps,
            suite.dopri_tols, target_out, plots)))  # fmt: skip
    if "3" in sections:
        section("3 moons sampling", lambda: bench_learned.bench_moons_sampling(
            suite.moons_samples, suite.moons_dpm_steps, suite.moons_sde_steps, suite.moons_dopri_tols, out,
            plots))  # fmt: skip
    if "4" in sections:
        section("4 training", lambda: bench_learned.bench_training(suite.train_steps, out))
    total = time.perf_counter() - start
    probe_end = contention_probe(max(default_threads, 2))
    torch.set_num_threads(threads)
    load_end = os.getloadavg()

    # order: section 1, solver measurements (targets' details), 3, 4, then the appendices
    first = [o for o in out if o.startswith("## 1") or o.startswith("### ")]
    rest = [o for o in out if o not in first]
    command = " ".join(sys.argv[1:] if argv is None else argv)
    details = run_details("quick" if args.quick else "full", (load_start, load_end), total,
                          (probe_start, probe_end), args.note, thread_choice)  # fmt: skip
    figures = []
    if args.output is not None:
        for path in make_plots(plots, args.output.parent / "_static" / "benchmarks"):
            figures.append(path.name)
            print(f"wrote {path}", file=sys.stderr)
    report = assemble_report(command=command, details=details, timings=timings, section1=first, summary=summary,
                             target_out=target_out, rest=rest, plots=plots, figures=figures)  # fmt: skip
    if summary:
        print("\n" + table(["target", "requirement", "measured", "verdict"], [list(r) for r in summary]) + "\n")
    print(f"total wall time: {total:.1f} s; " + report.rsplit("\n\n", 1)[-1].strip(), file=sys.stderr)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.output.with_suffix(args.output.suffix + ".tmp")
        tmp.write_text(report)
        os.replace(tmp, args.output)  # atomic: a crash never leaves half a page
        print(f"wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
