r"""Few-step sampling across a family of exact mixtures and on the shipped priors: ``sampler="dpm-solver"``
against diffusers' schedulers and a 1000-step reference.

Usage (from the repository root; about 30 minutes on one core at 20,000 samples; the diffusers rows need
``diffusers``, skipped without it)::

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/few_step_family.py [--samples 20000] [--quick]
        [--sdes vp ve] [--shipped moons checkerboard digits]

The family (issue 13, part 2): random Gaussian mixtures in 2-D and 8-D with 3-8 components, unequal weights
(logits ~ N(0, 0.8^2)), correlated components (random rotations, per-axis standard deviations log-uniform in
[0.1, 0.6] before standardisation), standardised to zero mean and unit variance per coordinate; one per seed.
Each is diffused by the default VP SDE and its exact score (:class:`~pyro_scoreflow.GaussianMixtureScore`)
drives every sampler from the same draws of the prior:

* ``dpm-solver``: this package's default few-step sampler (DPM-Solver++ multistep, order 3, with the UniC
  corrector, warped log-SNR schedule, stopping where :math:`\sigma/\alpha` =
  :data:`~pyro_scoreflow.samplers.DPM_END_NOISE`), and its previous default (no corrector, uniform
  log-SNR, stopping at t = 3e-3);
* the reference: the reverse SDE with 1000 Euler-Maruyama steps (1000 evaluations);
* diffusers' ``DPMSolverMultistepScheduler`` (DPM-Solver++(2M) and (3M)) and ``UniPCMultistepScheduler``
  (UniPC-bh2, order 2), configured with the *exact* discrete VP schedule of the SDE (``trained_betas`` whose
  cumulative products are :math:`\alpha(t)^2` on the 1000-point grid), noise prediction
  :math:`\hat\epsilon = -\sigma_t\, s(x, t)` at the continuous time of each of their noise levels
  :math:`\sigma/\alpha`, with their default settings (linspace timesteps, final step to :math:`\sigma = 0`,
  lower order at the end) and with Karras sigmas (``use_karras_sigmas=True``).

The VE SDE (and sub-VP) rows run the package's samplers only (diffusers' schedulers take a discrete VP
schedule). Every sampler uses exactly NFE score evaluations (checked). Quality: energy distance of
``--samples`` draws to as many exact draws of :math:`p_\epsilon`, with the two-sample noise floor (two exact
sets) of each mixture.

Shipped priors (``--shipped``): no exact draws exist; every sampler's draws are compared with held-out data
of the training set (as docs/benchmarks.md section 3; floor: a second held-out set), next to two 1000-step
references, the reverse SDE (1000 Euler-Maruyama steps) and the probability-flow ODE (1000 Euler steps).
Measurements, never assertions.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

from pyro_scoreflow import VESDE, VPSDE, GaussianMixtureScore, ScoreSDEPrior, SubVPSDE, datasets  # noqa: E402
from pyro_scoreflow.dynamics import ScoreField  # noqa: E402
from pyro_scoreflow.metrics import energy_distance  # noqa: E402
from pyro_scoreflow.samplers import dpm_solver_sample, probability_flow_sample, reverse_sde_sample  # noqa: E402

TRAIN_STEPS = 1000


def family_mixture(sde, dim: int, k: int, seed: int) -> GaussianMixtureScore:
    """One member of the family (see the module docstring)."""
    dtype = torch.float64
    g = torch.Generator().manual_seed(seed)
    locs = torch.randn(k, dim, generator=g, dtype=dtype) * 1.5
    q, _ = torch.linalg.qr(torch.randn(k, dim, dim, generator=g, dtype=dtype))
    stds = torch.exp(torch.empty(k, dim, dtype=dtype).uniform_(math.log(0.1), math.log(0.6), generator=g))
    cov = q @ torch.diag_embed(stds**2) @ q.transpose(-1, -2)
    logits = torch.randn(k, generator=g, dtype=dtype) * 0.8
    w = torch.softmax(logits, 0)
    mean = (w[:, None] * locs).sum(0)
    second = (w[:, None, None] * (cov + locs[:, :, None] * locs[:, None, :])).sum(0)
    std = (second - mean[:, None] * mean[None, :]).diagonal().sqrt()
    locs = (locs - mean) / std
    cov = cov / std[:, None] / std[None, :]
    return GaussianMixtureScore(sde, locs, torch.linalg.cholesky(cov), logits)


def exact_vp_betas(sde: VPSDE) -> list[float]:
    """Discrete betas with cumulative products :math:`\\alpha(t_i)^2`, :math:`t_i = (i + 1) T / 1000`."""
    t = torch.arange(1, TRAIN_STEPS + 1, dtype=torch.float64) / TRAIN_STEPS * sde.T
    abar = sde.marginal(t)[0] ** 2
    prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    return (1 - abar / prev).tolist()


def diffusers_sample(kind: str, karras: bool, field: ScoreField, x_T: torch.Tensor, nfe: int) -> torch.Tensor:
    from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

    sde = field.sde
    common = {"num_train_timesteps": TRAIN_STEPS, "trained_betas": exact_vp_betas(sde), "use_karras_sigmas": karras}
    if kind == "unipc":
        scheduler = UniPCMultistepScheduler(**common)
    else:
        scheduler = DPMSolverMultistepScheduler(solver_order=2 if kind == "dpm++2m" else 3, **common)
    scheduler.set_timesteps(nfe)
    x = x_T.clone()
    for i, timestep in enumerate(scheduler.timesteps):
        ratio = float(scheduler.sigmas[i])  # sigma / alpha of this step
        t = sde.inverse_log_snr(torch.tensor(-math.log(ratio), dtype=torch.float64))
        sigma = sde.marginal(t)[1]
        noise = -sigma.to(x.dtype) * field(x, t.to(x.dtype))
        x = scheduler.step(noise, timestep, x).prev_sample
    return x


def previous_default(field: ScoreField, x_T: torch.Tensor, nfe: int) -> torch.Tensor:
    """The default before issue 13: order 3, no corrector, uniform log-SNR steps, stopping at t = 3e-3."""
    return dpm_solver_sample(field, x_T, num_steps=nfe, corrector=False, power=1.0, t_end=max(3e-3, field.sde.eps))


OURS = {
    "dpm-solver (this package)": lambda f, x, n: dpm_solver_sample(f, x, num_steps=n),
    "dpm-solver, previous default": previous_default,
}
SAMPLERS = {
    **OURS,
    "diffusers DPM++(2M)": lambda f, x, n: diffusers_sample("dpm++2m", False, f, x, n),
    "diffusers DPM++(3M)": lambda f, x, n: diffusers_sample("dpm++3m", False, f, x, n),
    "diffusers UniPC": lambda f, x, n: diffusers_sample("unipc", False, f, x, n),
    "diffusers DPM++(2M) Karras": lambda f, x, n: diffusers_sample("dpm++2m", True, f, x, n),
    "diffusers UniPC Karras": lambda f, x, n: diffusers_sample("unipc", True, f, x, n),
}

PROBLEMS_2D = [(3, 0), (5, 1), (8, 2), (3, 3), (4, 4), (6, 5), (3, 6), (5, 7)]
PROBLEMS_8D = [(4, 0), (6, 1)]
SDES = {"vp": VPSDE, "ve": VESDE, "subvp": SubVPSDE}
REFERENCE_STEPS = 1000


def reference_sample(field: ScoreField, x_T: torch.Tensor) -> torch.Tensor:
    """The 1000-step reference: Euler-Maruyama on the reverse SDE."""
    return reverse_sde_sample(field, x_T, num_steps=REFERENCE_STEPS, method="euler")


def pf_ode_reference(field: ScoreField, x_T: torch.Tensor) -> torch.Tensor:
    """The deterministic 1000-step reference: Euler on the probability-flow ODE (the map every ODE solver
    approximates; a learned score's flow can differ from its reverse SDE, so both are shown)."""
    return probability_flow_sample(
        field, x_T, method="euler", rtol=0.0, atol=0.0, num_steps=REFERENCE_STEPS, max_num_steps=10 * REFERENCE_STEPS
    )


def family_table(sde_name: str, problems, samplers, n: int, t0: float) -> None:
    """One table: every sampler at 10 and 20 NFE and the 1000-step reference on each mixture."""
    sde = SDES[sde_name]()
    results: dict[tuple[str, int], list[float]] = {}
    labels = []
    for dim, k, seed in problems:
        score = family_mixture(sde, dim, k, seed)
        exact = score.marginal(sde.eps)
        torch.manual_seed(seed)
        reference = exact.sample((n,))
        floor = float(energy_distance(exact.sample((n,)), reference))
        x_T = torch.randn(n, dim, dtype=torch.float64) * sde.prior_std()
        labels.append(f"{dim}-D K={k} seed {seed}")
        results.setdefault(("noise floor", 0), []).append(floor)
        field = ScoreField(score, sde, (dim,))
        x = reference_sample(field, x_T)
        results.setdefault((f"reverse SDE, {REFERENCE_STEPS} Euler-Maruyama steps", REFERENCE_STEPS), []).append(
            float(energy_distance(x, reference))
        )
        for nfe in (10, 20):
            for name, run in samplers.items():
                field = ScoreField(score, sde, (dim,))
                x = run(field, x_T, nfe)
                assert field.nfe == nfe, (name, field.nfe)
                results.setdefault((name, nfe), []).append(float(energy_distance(x, reference)))
        print(f"  {sde_name} {labels[-1]}: {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    print(f"\n### {sde_name.upper()} SDE: energy distance to {n} exact draws of p_eps; one column per mixture\n")
    print("| sampler | NFE | " + " | ".join(labels) + " | max over 2-D | max / floor | max / reference |")
    print("|---|---|" + "---|" * (len(labels) + 3))
    floors = results[("noise floor", 0)]
    refs = results[(f"reverse SDE, {REFERENCE_STEPS} Euler-Maruyama steps", REFERENCE_STEPS)]
    two_d = [i for i, (dim, _, _) in enumerate(problems) if dim == 2]
    for (name, nfe), vals in results.items():
        worst_2d = max(vals[i] for i in two_d) if two_d else float("nan")
        worst_floor = max(v / f for v, f in zip(vals, floors))
        worst_ref = max(v / r for v, r in zip(vals, refs))
        cells = " | ".join(f"{v:.1e}" for v in vals)
        print(f"| {name} | {nfe or '-'} | {cells} | {worst_2d:.1e} | {worst_floor:.1f} | {worst_ref:.2f} |")


def shipped_table(names, n: int, t0: float) -> None:
    """The shipped priors: each sampler's draws against held-out data, next to the two 1000-step references."""
    print(f"\n### Shipped priors: energy distance to held-out data, {REFERENCE_STEPS}-step references\n")
    print("| prior | n | sampler | NFE | energy distance | / data floor |")
    print("|---|---|---|---|---|---|")
    for name in names:
        prior = ScoreSDEPrior.from_pretrained(name)
        size = min(n, 2000) if name == "digits" else n
        data = datasets.load(name, num_samples=size, seed=123, split="test" if name == "digits" else "all")[:size]
        data2 = datasets.load(name, num_samples=size, seed=124, split="train" if name == "digits" else "all")[:size]
        floor = float(energy_distance(data2, data))
        print(f"| {name} | {size} | held-out data, second set (floor) | - | {floor:.2e} | 1.00 |")
        field = prior._score_field(torch.Size([size]), torch.float32, torch.device("cpu"))
        torch.manual_seed(0)
        x_T = torch.randn(size, *prior.event_shape).reshape(size, -1) * prior.sde.prior_std()
        runs = [
            ("reverse SDE, Euler-Maruyama (reference)", REFERENCE_STEPS, reference_sample),
            ("probability-flow ODE, Euler (reference)", REFERENCE_STEPS, pf_ode_reference),
        ] + [(label, nfe, run) for nfe in (10, 20) for label, run in OURS.items()]
        with torch.no_grad():
            for label, nfe, run in runs:
                field.nfe = 0
                x = run(field, x_T) if nfe == REFERENCE_STEPS else run(field, x_T, nfe)
                assert field.nfe == nfe, (label, field.nfe)
                ed = float(energy_distance(x.reshape(size, *prior.event_shape), data))
                print(f"| {name} | {size} | {label} | {nfe} | {ed:.2e} | {ed / floor:.2f} |")
        print(f"  {name}: {time.perf_counter() - t0:.0f}s", file=sys.stderr)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=20_000)
    parser.add_argument("--quick", action="store_true", help="2000 samples, three 2-D mixtures, VP, moons only")
    parser.add_argument("--dims", type=int, nargs="+", default=[2, 8], help="which members of the family")
    parser.add_argument("--sdes", nargs="*", default=["vp", "ve"], choices=sorted(SDES))
    parser.add_argument("--samplers", nargs="+", default=None, help="substrings of the sampler names to run")
    parser.add_argument("--shipped", nargs="*", default=["moons", "checkerboard", "digits"], help="shipped priors")
    args = parser.parse_args(argv)
    samplers = {k: v for k, v in SAMPLERS.items() if args.samplers is None or any(s in k for s in args.samplers)}
    try:
        import diffusers  # noqa: F401
    except ImportError:
        print("diffusers is not installed: its rows are skipped", file=sys.stderr)
        samplers = {k: v for k, v in samplers.items() if k in OURS}
    torch.set_num_threads(1)
    n = 2000 if args.quick else args.samples
    problems = [(d, k, s) for d, family in ((2, PROBLEMS_2D), (8, PROBLEMS_8D)) if d in args.dims for k, s in family]
    sdes, shipped = args.sdes, args.shipped
    if args.quick:
        problems, sdes, shipped = problems[:3], sdes[:1], shipped[:1]
    t0 = time.perf_counter()
    for sde_name in sdes:
        family_samplers = samplers if sde_name == "vp" else {k: v for k, v in samplers.items() if k in OURS}
        family_table(sde_name, problems, family_samplers, n, t0)
    if shipped:
        shipped_table(shipped, n, t0)


if __name__ == "__main__":
    main()
