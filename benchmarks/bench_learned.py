r"""Benchmarks of the shipped (learned) priors and of training; run through :mod:`run_all`.

* :func:`bench_pretrained_log_prob` — ``log_prob`` of the shipped ``moons``
  (2-D) and ``digits`` (64-D) priors: NFE, time, points/s, and Hutchinson
  against the exact trace (the exact density of a learned prior is unknown).
* :func:`bench_moons_sampling` — sampling quality against NFE for ``moons``
  against held-out data.
* :func:`bench_training` — steps/s of :func:`pyro_scoreflow.fit`.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
for _path in (str(HERE.parent), str(HERE)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from bench_core import fmt_e, fmt_r, fmt_t, table  # noqa: E402
from bench_targets import no_grad_log_prob, run_samplers, sampler_configs, sampling_rows, timed  # noqa: E402

from pyro_scoreflow import VPSDE, ScoreNet, ScoreSDEPrior, datasets, fit  # noqa: E402
from pyro_scoreflow.metrics import energy_distance  # noqa: E402

DTYPE_NAMES = {torch.float32: "float32", torch.float64: "float64"}


def bench_pretrained_log_prob(specs, out: list) -> None:
    """``specs``: ``(name, points, tol, dtypes, probes)`` per shipped prior."""
    rows = []
    for name, n, tol, dtypes, probes in specs:
        if name == "digits":
            x = datasets.load("digits", num_samples=n, seed=0, split="test")
        else:
            x = datasets.load(name, num_samples=n, seed=123)
        for dtype in dtypes:
            base = ScoreSDEPrior.from_pretrained(name, rtol=tol, atol=tol)
            base.score_model.to(dtype)
            xd = x.to(dtype)
            base.log_prob(xd[:4].clone())  # warm-up
            seconds, (lp_exact, nfe) = timed(no_grad_log_prob(base, xd))
            rows.append([name, n, DTYPE_NAMES[dtype], f"{tol:g}", "exact", nfe, fmt_t(seconds), f"{n / seconds:.0f}",
                         f"{float(lp_exact.mean()):.3f}", "-", "-", "-"])  # fmt: skip
            print(f"  {name} {DTYPE_NAMES[dtype]} exact: {seconds:.2f}s nfe={nfe}", file=sys.stderr)
            for s in probes:
                prior = base.with_options(divergence="hutchinson", hutchinson_samples=s)
                torch.manual_seed(s)
                t_h, (lp, nfe_h) = timed(no_grad_log_prob(prior, xd))
                err = lp - lp_exact
                rows.append([
                    name, n, DTYPE_NAMES[dtype], f"{tol:g}", f"hutchinson ({s} probe{'s' if s > 1 else ''})", nfe_h,
                    fmt_t(t_h), f"{n / t_h:.0f}", f"{float(lp.mean()):.3f}", f"{float(err.std()):.3f}",
                    f"{float(err.mean()):+.3f}", fmt_r(t_h / seconds),
                ])  # fmt: skip
                print(f"  {name} {DTYPE_NAMES[dtype]} hutchinson {s}: {t_h:.2f}s", file=sys.stderr)
    headers = [
        "prior", "points", "dtype", "rtol = atol", "divergence", "NFE", "time (s)", "points/s", "mean log p",
        "per-point std of (hutchinson - exact)", "mean of (hutchinson - exact)", "time / exact",
    ]  # fmt: skip
    out.append("\n".join([
        "### Shipped priors: `moons` (2-D) and `digits` (64-D)",
        "",
        "`ScoreSDEPrior.from_pretrained(name, rtol=..., atol=...)`, one batched `log_prob` under "
        "`torch.no_grad()` (one run after a warm-up); float64 rows convert the network to float64. The exact "
        "density of a learned prior is unknown, so accuracy is not reported; the Hutchinson rows give the "
        "per-point spread of the estimate around the exact-trace value (same points, same solver settings). "
        "Points: `moons` from `datasets.load('moons', seed=123)`, `digits` from the held-out `test` split. "
        "`digits` runs at rtol = atol = 1e-3 (the tolerance of its shipped evaluation): its exact trace costs "
        "64 vector-Jacobian products per evaluation.",
        "",
        table(headers, rows),
    ]))  # fmt: skip
    print(out[-1] + "\n")


def bench_moons_sampling(n: int, dpm_steps, sde_steps, dopri_tols, out: list, plots: dict) -> None:
    prior = ScoreSDEPrior.from_pretrained("moons")
    held = datasets.load("moons", num_samples=n, seed=123)
    floor = float(energy_distance(datasets.load("moons", num_samples=n, seed=124), held))
    configs = sampler_configs(dpm_steps, sde_steps, dopri_tols)
    results = run_samplers(prior.score_model, prior.sde, (2,), configs, n, held, seed=900)
    plots["sampling_moons"] = (results, floor)
    out.append("\n".join([
        f"## 3. Sampling quality against NFE: the learned `moons` prior ({n:,} samples)",
        "",
        f"Energy distance of n samples of the shipped `moons` prior to n held-out points "
        f"(`datasets.load('moons', num_samples={n}, seed=123)`); floor: a second held-out set (seed 124) against "
        f"the same points, {fmt_e(floor)}. Differences at the floor are within two-sample noise; what remains "
        "above it mixes the sampler's error and the network's (the reverse SDE with many steps shows the "
        "network's own level).",
        "",
        "![energy distance vs NFE, moons](_static/benchmarks/sampling_moons.png)",
        "",
        table(["sampler", "setting", "NFE", "time (s)", "energy distance", "/ floor"], sampling_rows(results, floor)),
    ]))  # fmt: skip
    print(out[-1] + "\n")


def bench_training(steps: int, out: list) -> None:
    sde = VPSDE()
    cases = [
        ("moons", "ScoreNet MLP (default: 4 blocks, width 256)", (2,), 256, datasets.load("moons", 5000, seed=0)),
        ("digits", "ScoreNet MLP (default: 4 blocks, width 256)", (64,), 128, datasets.load("digits", split="train")),
        ("digits", "ScoreNet U-Net (1, 8, 8), channels (32, 64)", (1, 8, 8), 128,
         datasets.load("digits", split="train").reshape(-1, 1, 8, 8)),
    ]  # fmt: skip
    rows = []
    for data_name, label, shape, batch, data in cases:
        torch.manual_seed(0)
        net = ScoreNet(sde, shape)
        fit(net, sde, data, steps=2, batch_size=batch, lr=1e-3, progress=False, seed=0)  # warm-up
        seconds, net = timed(lambda net=net, data=data, batch=batch: fit(
            net, sde, data, steps=steps, batch_size=batch, lr=1e-3, progress=False, seed=1))  # fmt: skip
        sps = net.fit_history.steps_per_second
        params = sum(p.numel() for p in net.parameters())
        rows.append([data_name, label, f"{params:,}", batch, steps, fmt_t(seconds), f"{sps:.1f}", f"{sps * batch:.0f}"])
        print(f"  fit {data_name} {shape}: {sps:.1f} steps/s", file=sys.stderr)
    out.append("\n".join([
        "## 4. Training throughput",
        "",
        f"`fit(net, VPSDE(), data, steps={steps}, batch_size=B, lr=1e-3, progress=False)` after a 2-step warm-up; "
        "*steps/s* is `net.fit_history.steps_per_second` (the training loop alone), *time* the whole call "
        "(EMA copy and set-up included). CPU, float32.",
        "",
        table(["data", "network", "parameters", "batch", "steps", "time (s)", "steps/s", "examples/s"], rows),
    ]))  # fmt: skip
    print(out[-1] + "\n")


def time_now() -> float:
    return time.perf_counter()
