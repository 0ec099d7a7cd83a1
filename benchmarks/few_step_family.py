r"""Few-step sampling across a family of exact mixtures: ``sampler="dpm-solver"`` against diffusers' schedulers.

Usage (from the repository root; a few minutes on one core; needs ``diffusers``)::

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/few_step_family.py [--samples 10000] [--quick]

The family (issue 13, part 2): random Gaussian mixtures in 2-D and 8-D with 3-8 components, unequal weights
(logits ~ N(0, 0.8^2)), correlated components (random rotations, per-axis standard deviations log-uniform in
[0.1, 0.6] before standardisation), standardised to zero mean and unit variance per coordinate; one per seed.
Each is diffused by the default VP SDE and its exact score (:class:`~pyro_scoreflow.GaussianMixtureScore`)
drives every sampler from the same draws of the prior:

* ``dpm-solver``: this package's default few-step sampler (DPM-Solver++ multistep, order 3, stopping at
  :data:`~pyro_scoreflow.samplers.DPM_END_TIME`);
* diffusers' ``DPMSolverMultistepScheduler`` (DPM-Solver++(2M) and (3M)) and ``UniPCMultistepScheduler``
  (UniPC-bh2, order 2), configured with the *exact* discrete VP schedule of the SDE (``trained_betas`` whose
  cumulative products are :math:`\alpha(t)^2` on the 1000-point grid), noise prediction
  :math:`\hat\epsilon = -\sigma_t\, s(x, t)` at the continuous time of each of their noise levels
  :math:`\sigma/\alpha`, with their default settings (linspace timesteps, final step to :math:`\sigma = 0`,
  lower order at the end) and with Karras sigmas (``use_karras_sigmas=True``).

Every sampler uses exactly NFE score evaluations (checked). Quality: energy distance of ``--samples`` draws
to as many exact draws of :math:`p_\epsilon`, with the two-sample noise floor (two exact sets) of each mixture.
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

from pyro_scoreflow import VPSDE, GaussianMixtureScore  # noqa: E402
from pyro_scoreflow.dynamics import ScoreField  # noqa: E402
from pyro_scoreflow.metrics import energy_distance  # noqa: E402
from pyro_scoreflow.samplers import dpm_solver_sample  # noqa: E402

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


SAMPLERS = {
    "dpm-solver (this package)": lambda f, x, n: dpm_solver_sample(f, x, num_steps=n),
    "diffusers DPM++(2M)": lambda f, x, n: diffusers_sample("dpm++2m", False, f, x, n),
    "diffusers DPM++(3M)": lambda f, x, n: diffusers_sample("dpm++3m", False, f, x, n),
    "diffusers UniPC": lambda f, x, n: diffusers_sample("unipc", False, f, x, n),
    "diffusers DPM++(2M) Karras": lambda f, x, n: diffusers_sample("dpm++2m", True, f, x, n),
    "diffusers UniPC Karras": lambda f, x, n: diffusers_sample("unipc", True, f, x, n),
}

PROBLEMS_2D = [(3, 0), (5, 1), (8, 2), (3, 3), (4, 4), (6, 5), (3, 6), (5, 7)]
PROBLEMS_8D = [(4, 0), (6, 1)]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--quick", action="store_true", help="2000 samples, three 2-D mixtures")
    parser.add_argument("--dims", type=int, nargs="+", default=[2, 8], help="which members of the family")
    parser.add_argument("--samplers", nargs="+", default=None, help="substrings of the sampler names to run")
    args = parser.parse_args(argv)
    samplers = {k: v for k, v in SAMPLERS.items() if args.samplers is None or any(s in k for s in args.samplers)}
    torch.set_num_threads(1)
    n = 2000 if args.quick else args.samples
    problems = [(d, k, s) for d, family in ((2, PROBLEMS_2D), (8, PROBLEMS_8D)) if d in args.dims for k, s in family]
    if args.quick:
        problems = problems[:3]
    sde = VPSDE()
    results: dict[tuple[str, int], list[float]] = {}
    t0 = time.perf_counter()
    labels = []
    for dim, k, seed in problems:
        score = family_mixture(sde, dim, k, seed)
        exact = score.marginal(sde.eps)
        torch.manual_seed(seed)
        reference = exact.sample((n,))
        floor = float(energy_distance(exact.sample((n,)), reference))
        x_T = torch.randn(n, dim, dtype=torch.float64)
        labels.append(f"{dim}-D K={k} seed {seed}")
        results.setdefault(("floor", 0), []).append(floor)
        for nfe in (10, 20):
            for name, run in samplers.items():
                field = ScoreField(score, sde, (dim,))
                x = run(field, x_T, nfe)
                assert field.nfe == nfe, (name, field.nfe)
                results.setdefault((name, nfe), []).append(float(energy_distance(x, reference)))
        print(f"  {labels[-1]}: {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    print(f"Energy distance to {n} exact draws of p_eps (VP SDE); each column one mixture of the family.\n")
    print("| sampler | NFE | " + " | ".join(labels) + " | max over 2-D | max / floor over all |")
    print("|---|---|" + "---|" * (len(labels) + 2))
    floors = results[("floor", 0)]
    print("| noise floor | - | " + " | ".join(f"{v:.1e}" for v in floors) + " | - | - |")
    two_d = [i for i, (dim, _, _) in enumerate(problems) if dim == 2]
    for nfe in (10, 20):
        for name in samplers:
            vals = results[(name, nfe)]
            worst_2d = max(vals[i] for i in two_d) if two_d else float("nan")
            worst_ratio = max(v / f for v, f in zip(vals, floors))
            cells = " | ".join(f"{v:.1e}" for v in vals)
            print(f"| {name} | {nfe} | {cells} | {worst_2d:.1e} | {worst_ratio:.1f} |")


if __name__ == "__main__":
    main()
