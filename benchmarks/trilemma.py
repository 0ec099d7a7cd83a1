r"""The generative-model "trilemma" row of this package's priors: fast sampling, exact likelihood, latents, coverage.

Usage (from the repository root; about two minutes on one core)::

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/trilemma.py [--quick]

For the shipped priors (``ScoreSDEPrior.from_pretrained("moons" / "checkerboard" / "digits")``) and an exact
Gaussian-mixture prior (:class:`~pyro_scoreflow.GaussianMixtureScore`, the 3-component 2-D mixture of the tests,
VP SDE) it measures, per prior:

* **sampling**: score evaluations (NFE) and seconds per 1000 samples of ``sampler="dpm-solver"`` with 20 steps
  and of the default reverse SDE (500 Euler–Maruyama steps), each with its quality: the energy distance
  (:func:`~pyro_scoreflow.metrics.energy_distance`) to as many held-out points (exact draws of
  :math:`p_\epsilon` for the mixture) divided by the two-sample noise floor (the same statistic between two
  independent data sets of that size; for ``digits`` a random subset of the training images);
* **log_prob**: NFE and milliseconds per point of ``log_prob`` (exact divergence; default tolerances
  ``rtol = atol = 1e-5``, ``1e-3`` for ``digits`` as in its shipped evaluation), and its accuracy: the largest
  per-point error against a solve 100x tighter (the exact log-density for the mixture);
* **latent round trip**: encode held-out points to :math:`x_T` with ``flow.inv`` and decode with ``flow``
  (one plain probability-flow solve each way, default tolerances): the median and largest error over the
  points, relative to the data's RMS;
* **mode coverage**: each mode's share of 4000 samples (1000 for ``digits``) against its share of the data,
  the largest difference (the per-mode shares are printed below the table); modes: mixture components (most
  likely component), the two moons (nearest arc), the 8 checkerboard squares (nearest square), the 10 digit
  classes (a logistic-regression classifier trained on the training images, its predicted class shares on the
  samples against those on all 1797 images).

These are measurements, never assertions: the script exits 0 whatever the numbers are.
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

from pyro_scoreflow import VPSDE, GaussianMixtureScore, ScoreSDEPrior, datasets  # noqa: E402
from pyro_scoreflow.metrics import energy_distance  # noqa: E402


def mixture_prior() -> tuple[ScoreSDEPrior, GaussianMixtureScore]:
    """The tests' 3-component 2-D mixture (tests/helpers.py: ``mixture_2d``) under the default VP SDE."""
    sde = VPSDE()
    locs = torch.tensor([[-1.0, 0.5], [1.0, -0.5], [0.3, 1.2]], dtype=torch.float64)
    scale_tril = torch.tensor(
        [[[0.3, 0.0], [0.1, 0.2]], [[0.25, 0.0], [0.0, 0.25]], [[0.2, 0.0], [-0.1, 0.3]]], dtype=torch.float64
    )
    score = GaussianMixtureScore(sde, locs, scale_tril, torch.tensor([0.0, 0.5, -0.3], dtype=torch.float64))
    return ScoreSDEPrior(score, sde, (2,)), score


# -- modes ----------------------------------------------------------------------------------------------------------
def moons_modes(x: torch.Tensor) -> torch.Tensor:
    """0 for the upper moon, 1 for the lower one: the nearer of the two (standardised) arcs."""
    angle = torch.linspace(0, math.pi, 2000, dtype=torch.float64)
    upper = torch.stack([torch.cos(angle), torch.sin(angle)], -1)
    lower = torch.stack([1 - torch.cos(angle), 0.5 - torch.sin(angle)], -1)
    mean, scale = torch.tensor([0.5, 0.25], dtype=torch.float64), 0.7121  # datasets' fixed standardisation
    arcs = [(a - mean) / scale for a in (upper, lower)]
    d = torch.stack([torch.cdist(x.double(), a).min(-1).values for a in arcs], -1)
    return d.argmin(-1)


def checkerboard_modes(x: torch.Tensor) -> torch.Tensor:
    """The nearest of the 8 black squares of the (standardised) 4x4 board on [-2, 2]^2, numbered 0..7."""
    raw = x.double() * 1.1545
    centers = torch.tensor(
        [[i + 0.5, j + 0.5] for i in range(-2, 2) for j in range(-2, 2) if (i + j) % 2 == 0], dtype=torch.float64
    )
    return torch.cdist(raw, centers).argmin(-1)


def digits_classifier():
    """A logistic regression on the training images (dequantized as the prior sees them): ``predict(x)``."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    labels = torch.as_tensor(load_digits().target)
    x = datasets.load("digits", split="all", seed=0)
    train = datasets.DIGITS_TRAIN_SIZE
    clf = LogisticRegression(max_iter=2000).fit(x[:train].numpy(), labels[:train].numpy())
    accuracy = float((torch.as_tensor(clf.predict(x[train:].numpy())) == labels[train:]).double().mean())
    return (lambda v: torch.as_tensor(clf.predict(v.double().numpy()))), accuracy


def shares(labels: torch.Tensor, k: int) -> torch.Tensor:
    return torch.bincount(labels, minlength=k).double() / labels.numel()


# -- measurements ---------------------------------------------------------------------------------------------------
def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def sampling(prior: ScoreSDEPrior, options: dict, n: int, reference: torch.Tensor, floor: float):
    """``(NFE, seconds per 1000 samples, energy distance / floor, samples)``."""
    p = prior.with_options(**options)
    torch.manual_seed(1)
    with torch.no_grad():
        seconds, x = timed(lambda: p.sample((n,)))
    return p.last_nfe, 1000 * seconds / n, float(energy_distance(x, reference)) / floor, x


def log_prob_cost(prior: ScoreSDEPrior, x: torch.Tensor, tol: float, exact: torch.Tensor | None):
    """``(NFE, ms per point, max |error|)`` at ``rtol = atol = tol``, against ``exact`` or a 100x tighter solve."""
    p = prior.with_options(rtol=tol, atol=tol)
    with torch.no_grad():
        seconds, lp = timed(lambda: p.log_prob(x.clone()))
        nfe = p.last_nfe
        if exact is None:
            exact = prior.with_options(rtol=tol / 100, atol=tol / 100).log_prob(x.clone())
    return nfe, 1000 * seconds / x.shape[0], float((lp.double() - exact.double()).abs().max())


def round_trip(prior: ScoreSDEPrior, x: torch.Tensor, tol: float) -> tuple[float, float]:
    """Median and largest ``|decode(encode(x)) - x|`` over the points, relative to the RMS of ``x``."""
    flow = prior.with_options(rtol=tol, atol=tol).flow
    sde = prior.sde
    with torch.no_grad():
        z = flow.solve(x, sde.eps, sde.T, divergence=False)[0]
        back = flow.solve(z, sde.T, sde.eps, divergence=False)[0]
    err = (back - x).norm(dim=-1) / x.pow(2).sum(-1).mean().sqrt()
    return float(err.median()), float(err.max())


def measure(name: str, quick: bool) -> dict:
    n2 = 500 if quick else 4000
    if name == "mixture":
        prior, score = mixture_prior()
        exact = score.marginal(prior.sde.eps)
        torch.manual_seed(0)
        reference, other = exact.sample((n2,)), exact.sample((n2,))
        held_out = exact.sample((50 if quick else 200,))
        lp_exact = score.log_density(held_out, torch.full((held_out.shape[0],), prior.sde.eps, dtype=torch.float64))
        comp = exact.component_distribution
        modes = lambda v: comp.log_prob(v.double().unsqueeze(-2)).argmax(-1)  # noqa: E731
        data_shares = torch.softmax(score.logits, 0)
        k, tol, n_lp = score.num_components, 1e-5, held_out.shape[0]
        note = "exact"
    else:
        prior = ScoreSDEPrior.from_pretrained(name)
        lp_exact = None
        if name == "digits":
            n2 = 200 if quick else 1000
            reference = datasets.load("digits", split="test", seed=123)
            g = torch.Generator().manual_seed(0)
            other = datasets.load("digits", split="train", seed=124)[torch.randperm(1500, generator=g)[:297]]
            modes, accuracy = digits_classifier()
            data_shares, k, tol = shares(modes(datasets.load("digits", split="all", seed=5)), 10), 10, 1e-3
            held_out = reference[: 10 if quick else 30]
            note = f"classifier test accuracy {accuracy:.3f}"
        else:
            reference = datasets.load(name, num_samples=n2, seed=123)
            other = datasets.load(name, num_samples=n2, seed=124)
            modes = moons_modes if name == "moons" else checkerboard_modes
            k = 2 if name == "moons" else 8
            data_shares, tol = shares(modes(datasets.load(name, num_samples=100_000, seed=7)), k), 1e-5
            held_out = reference[: 50 if quick else 200]
            note = "held-out data"
        n_lp = held_out.shape[0]
    n_quality = reference.shape[0]
    floor = float(energy_distance(reference, other))
    row = {"prior": name, "note": note, "floor": floor, "n_quality": n_quality}
    dpm = sampling(prior, {"sampler": "dpm-solver", "num_steps": 20}, n_quality, reference, floor)
    sde = sampling(prior, {"sampler": "sde", "num_steps": 100 if quick else 500}, n_quality, reference, floor)
    row["dpm"], row["sde"] = dpm[:3], sde[:3]
    x = dpm[3]
    if x.shape[0] < n2:
        with torch.no_grad():
            torch.manual_seed(2)
            x = prior.with_options(sampler="dpm-solver", num_steps=20).sample((n2,))
    row["shares"] = shares(modes(x), k)
    row["data_shares"] = data_shares
    row["coverage"] = float((row["shares"] - data_shares).abs().max())
    row["coverage_n"] = x.shape[0]
    row["log_prob"] = (*log_prob_cost(prior, held_out.to(torch.get_default_dtype()) if lp_exact is None else held_out,
                                      tol, lp_exact), tol, n_lp)  # fmt: skip
    row["round_trip"] = round_trip(prior, held_out, tol)
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for name in ("mixture", "moons", "checkerboard", "digits"):
        t0 = time.perf_counter()
        r = measure(name, args.quick)
        print(f"  {name}: {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        rows.append(r)
    headers = [
        "prior", "sampling: dpm-solver 20 steps (NFE, s/1000, ED/floor)",
        "sampling: reverse SDE (NFE, s/1000, ED/floor)",
        "log_prob (rtol=atol, NFE, ms/point, max error nats)", "latent round trip (median, max rel. error)",
        "mode coverage (max share error)",
    ]  # fmt: skip
    print("| " + " | ".join(headers) + " |")
    print("|" + "---|" * len(headers))
    for r in rows:
        d, s = r["dpm"], r["sde"]
        nfe, ms, err, tol, n_lp = r["log_prob"]
        print(
            f"| {r['prior']} | {d[0]}, {d[1]:.3f} s, {d[2]:.2f} | {s[0]}, {s[1]:.3f} s, {s[2]:.2f} | "
            f"{tol:g}, {nfe}, {ms:.1f} ms, {err:.1e} | {r['round_trip'][0]:.1e}, {r['round_trip'][1]:.1e} | "
            f"{r['coverage']:.3f} |"
        )
    print()
    for r in rows:
        print(
            f"* {r['prior']}: quality against {r['n_quality']} points ({r['note']}), noise floor "
            f"{r['floor']:.2e}; log_prob on {r['log_prob'][4]} points; coverage from {r['coverage_n']} samples; "
            f"mode shares {[round(float(v), 3) for v in r['shares']]} against "
            f"{[round(float(v), 3) for v in r['data_shares']]}"
        )


if __name__ == "__main__":
    main()
