r"""Peak memory of one ``log_prob`` + backward configuration, measured in a fresh process.

Usage: ``python benchmarks/mem_probe.py --steps 100 [--adjoint] [--points 1000]``; prints one JSON line.

The 2-D benchmark mixture (exact score, float32), fixed-grid ``rk4`` with
``num_steps`` steps, gradient of ``log_prob(x).sum()`` with respect to ``x`` by
backpropagation through the solver or by the adjoint (``adjoint=True``).
After a small warm-up the process's peak resident set size (``VmHWM``) is
reset through ``/proc/self/clear_refs`` (Linux), so ``peak_mb`` is the peak
RSS reached during the measured call minus the RSS just before it.
``maxrss_mb`` is ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` over the whole
process (imports and warm-up included) for reference. Run by
:mod:`bench_targets`, one process per configuration.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
for _path in (str(HERE.parent), str(HERE)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from bench_core import make_mixture  # noqa: E402

from pyro_scoreflow import VPSDE, GaussianMixtureScore, ScoreSDEPrior  # noqa: E402


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--points", type=int, default=1000)
    parser.add_argument("--adjoint", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sde = VPSDE()
    locs, scale_tril, logits = make_mixture(2)
    score = GaussianMixtureScore(sde, locs.float(), scale_tril.float(), logits.float())
    prior = ScoreSDEPrior(score, sde, (2,), ode_method="rk4", num_steps=args.steps, adjoint=args.adjoint)
    torch.manual_seed(0)
    x0 = score.marginal(sde.eps).sample((args.points,)).float()

    def run(x):
        x = x.clone().requires_grad_(True)
        lp = prior.log_prob(x)
        (g,) = torch.autograd.grad(lp.sum(), x)
        return g

    small = prior.with_options(num_steps=5)
    xs = x0.clone().requires_grad_(True)
    torch.autograd.grad(small.log_prob(xs).sum(), xs)  # warm-up
    before = _status_kb("VmRSS")
    reset = True
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        reset = False
    t0 = time.perf_counter()
    run(x0)
    seconds = time.perf_counter() - t0
    peak = _status_kb("VmHWM")
    out = {
        "steps": args.steps,
        "adjoint": args.adjoint,
        "points": args.points,
        "nfe": prior.last_nfe,
        "seconds": seconds,
        "peak_mb": (peak - before) / 1024 if reset else float("nan"),
        "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "hwm_reset": reset,
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
