r"""When does a Langevin corrector pay off? ``sampler="pc"`` against ``"sde"`` and ``"langevin"`` at equal cost.

Usage (from the repository root; about a minute on one core)::

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/langevin_corrector.py [--quick]

For the exact 3-component 2-D mixture of the tests (:class:`~pyro_scoreflow.GaussianMixtureScore`, exact score)
under the VP and the VE SDE, every sampler gets the same number of score evaluations (NFE):

* ``sde``: the reverse SDE, NFE Euler–Maruyama steps (the package's default sampler);
* ``pc, 0 corrector``: the reverse-diffusion predictor alone, NFE steps;
* ``pc, 1 corrector``: NFE/2 predictor steps, each followed by one Langevin step (snr 0.16, Song et al.);
* ``langevin``: annealed Langevin dynamics, NFE noise levels with one step each (snr 0.5).

Quality: energy distance of ``--samples`` samples (default 2000) to as many exact draws of :math:`p_\epsilon`,
divided by the two-sample noise floor (mean over 4 pairs of independent exact sets), and the largest error of a
mode's mass (most likely component). The mean over ``--seeds`` runs (default 2) is printed. Measurements, never
assertions.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

from pyro_scoreflow import VESDE, VPSDE, GaussianMixtureScore, ScoreSDEPrior  # noqa: E402
from pyro_scoreflow.metrics import energy_distance  # noqa: E402


def mixture(sde, dim: int = 2) -> GaussianMixtureScore:
    """The tests' 3-component 2-D mixture (``dim=2``), else a random 4-component one (tests/helpers.py's
    ``random_mixture(sde, 4, dim, seed=0)``: unit-scale means, correlated components, unequal weights)."""
    if dim != 2:
        g = torch.Generator().manual_seed(0)
        locs = torch.randn(4, dim, generator=g, dtype=torch.float64)
        a = torch.randn(4, dim, dim, generator=g, dtype=torch.float64) * 0.3
        scale_tril = torch.linalg.cholesky(a @ a.transpose(-1, -2) / dim + 0.05 * torch.eye(dim, dtype=torch.float64))
        return GaussianMixtureScore(sde, locs, scale_tril, torch.randn(4, generator=g, dtype=torch.float64))
    locs = torch.tensor([[-1.0, 0.5], [1.0, -0.5], [0.3, 1.2]], dtype=torch.float64)
    scale_tril = torch.tensor(
        [[[0.3, 0.0], [0.1, 0.2]], [[0.25, 0.0], [0.0, 0.25]], [[0.2, 0.0], [-0.1, 0.3]]], dtype=torch.float64
    )
    return GaussianMixtureScore(sde, locs, scale_tril, torch.tensor([0.0, 0.5, -0.3], dtype=torch.float64))


def configs(nfe: int) -> list[tuple[str, dict]]:
    return [
        ("sde", {"sampler": "sde", "num_steps": nfe}),
        ("pc, 0 corrector", {"sampler": "pc", "num_steps": nfe, "corrector_steps": 0}),
        ("pc, 1 corrector", {"sampler": "pc", "num_steps": nfe // 2, "corrector_steps": 1}),
        ("langevin", {"sampler": "langevin", "num_steps": nfe, "corrector_steps": 1}),
    ]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1000 samples, budgets 50 and 200, one seed")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--dim", type=int, default=2, help="2: the tests' mixture; else a random 4-component one")
    parser.add_argument("--budgets", type=int, nargs="+", default=[100, 500], help="NFE budgets")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    n, budgets, seeds = (1000, (50, 200), 1) if args.quick else (args.samples, args.budgets, args.seeds)
    print(f"{args.dim}-D mixture\n\n| SDE | NFE | sampler | ED / floor | max mode-mass error |")
    print("|---|---|---|---|---|")
    for sde in (VPSDE(), VESDE()):
        score = mixture(sde, args.dim)
        exact = score.marginal(sde.eps)
        weights = torch.softmax(score.logits, 0)
        comp = exact.component_distribution
        torch.manual_seed(0)
        floor = sum(float(energy_distance(exact.sample((n,)), exact.sample((n,)))) for _ in range(4)) / 4
        for nfe in budgets:
            for name, options in configs(nfe):
                prior = ScoreSDEPrior(score, sde, (args.dim,), **options)
                ratios, masses = [], []
                for seed in range(seeds):
                    torch.manual_seed(100 + seed)
                    x = prior.sample((n,))
                    assert prior.last_nfe == nfe, (name, prior.last_nfe)
                    ratios.append(float(energy_distance(x, exact.sample((n,)))) / floor)
                    labels = comp.log_prob(x.unsqueeze(-2)).argmax(-1)
                    share = torch.bincount(labels, minlength=score.num_components).double() / n
                    masses.append(float((share - weights).abs().max()))
                ed, mass = sum(ratios) / len(ratios), sum(masses) / len(masses)
                print(f"| {type(sde).__name__} | {nfe} | {name} | {ed:.2f} | {mass:.3f} |", flush=True)
    print(f"\nn = {n} samples per run, mean over {seeds} seeds; noise floor measured per SDE from exact sets.")


if __name__ == "__main__":
    main()
