#!/usr/bin/env python
r"""Train the priors shipped in ``pyro_scoreflow/pretrained/`` and record their quality in ``docs/pretrained.md``.

Usage (from the repository root)::

    OMP_NUM_THREADS=1 PYTHONPATH=. python scripts/train_pretrained.py            # all of them
    OMP_NUM_THREADS=1 PYTHONPATH=. python scripts/train_pretrained.py --only moons --steps 500

Every prior uses the VP SDE and a :class:`~pyro_scoreflow.networks.ScoreNet` (residual MLP), trained by
denoising score matching (``weighting="score"``, Adam, EMA). Evaluation, stored in each checkpoint's
``config.json`` under ``metadata.evaluation`` and rendered into ``docs/pretrained.md``:

* held-out log-likelihood :math:`\log p_\epsilon(x)` (probability-flow ODE, exact divergence, the stated
  ``rtol = atol``), in nats per point and bits/dim :math:`= -\log p / (D \ln 2)`, next to a Gaussian
  fitted to the training data (mean and covariance);
* the squared energy distance (:func:`pyro_scoreflow.metrics.energy_distance`) between samples (the
  shipped default sampler: 500 Euler-Maruyama steps of the reverse SDE; mean over 3 sample sets as large
  as the held-out set) and held-out data, with its noise floor: the mean energy distance between the
  held-out set and 5 independent data sets of the same size.

2-D sets: training on fresh draws (``seed=1``), held-out draws with other seeds. ``digits``: trained
on split ``"train"`` (its 1500 images, re-dequantized ``--repeats`` times), evaluated on split ``"test"``
(297 images); its noise floor compares the test set with 297 random training images (another draw of
the test split would repeat the same images).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyro
import torch
from torch.distributions import MultivariateNormal

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from pyro_scoreflow import VPSDE, ScoreSDEPrior, datasets  # noqa: E402
from pyro_scoreflow.checkpoint import load_checkpoint, read_config, save_checkpoint, weights_file  # noqa: E402
from pyro_scoreflow.metrics import energy_distance  # noqa: E402
from pyro_scoreflow.networks import ScoreNet  # noqa: E402
from pyro_scoreflow.training import fit  # noqa: E402


@dataclass
class Spec:
    """How one shipped prior is trained and evaluated."""

    net: dict
    steps: int
    batch_size: int
    lr: float
    train_size: int = 50_000  # 2-D sets: fresh points; digits: images x dequantization repeats
    eval_rtol: float = 1e-5  # probability-flow tolerance (rtol = atol) of the held-out log-likelihood
    eval_size: int = 2000  # 2-D sets: held-out points (digits: the whole test split)
    floor_pairs: int = 5  # independent data sets whose mean energy distance to the held-out set is the floor
    sample_sets: int = 3  # independent sample sets whose mean energy distance to the held-out set is reported
    notes: list[str] = field(default_factory=list)


SPECS = {
    "moons": Spec(net=dict(hidden=128, num_layers=3, embed_dim=64), steps=5000, batch_size=512, lr=2e-3),
    "checkerboard": Spec(net=dict(hidden=128, num_layers=3, embed_dim=64), steps=5000, batch_size=512, lr=2e-3),
    "digits": Spec(
        net=dict(hidden=256, num_layers=3, embed_dim=128),
        steps=8000,
        batch_size=128,
        lr=1e-3,
        train_size=1500 * 20,
        eval_rtol=1e-3,
    ),
}


def gaussian_fit(train: torch.Tensor) -> MultivariateNormal:
    flat = train.double().flatten(1)
    cov = torch.cov(flat.T) + 1e-6 * torch.eye(flat.shape[1], dtype=flat.dtype)
    return MultivariateNormal(flat.mean(0), cov)


def data_sets(name: str, spec: Spec, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Training data, held-out data, and independent reference sets (same size as held-out) for the floor."""
    if name == "digits":
        train = datasets.load("digits", spec.train_size, seed=seed, split="train")
        held_out = datasets.load("digits", seed=seed + 1000, split="test")
        g = torch.Generator().manual_seed(seed)
        refs = []
        for i in range(spec.floor_pairs):
            images = datasets.load("digits", seed=seed + 2000 + i, split="train")
            refs.append(images[torch.randperm(images.shape[0], generator=g)[: held_out.shape[0]]])
        return train, held_out, refs
    train = datasets.load(name, spec.train_size, seed=seed)
    held_out = datasets.load(name, spec.eval_size, seed=seed + 1000)
    refs = [datasets.load(name, spec.eval_size, seed=seed + 2000 + i) for i in range(spec.floor_pairs)]
    return train, held_out, refs


def train_one(name: str, spec: Spec, args: argparse.Namespace) -> dict:
    """Train prior ``name`` (or, with ``--eval-only``, reload it), evaluate it and save it with its metadata."""
    event_shape = datasets.event_shape(name)
    out = Path(args.output_root) / name
    if args.eval_only:
        net, sde, _, _ = load_checkpoint(out)
        metadata = read_config(out)["metadata"]
        seed = metadata["training"]["seed"]
        train, held_out, refs = data_sets(name, spec, seed)
        train_seconds = metadata.get("evaluation", {}).get("train_seconds")
        print(f"[{name}] re-evaluating {out}", flush=True)
    else:
        sde, seed = VPSDE(), args.seed
        train, held_out, refs = data_sets(name, spec, seed)
        torch.manual_seed(seed)
        net = ScoreNet(sde, event_shape, **spec.net)
        steps, batch_size, lr = args.steps or spec.steps, args.batch_size or spec.batch_size, args.lr or spec.lr
        print(f"[{name}] training {sum(p.numel() for p in net.parameters())} parameters, {steps} steps", flush=True)
        start = time.perf_counter()
        fit(net, sde, train, steps=steps, batch_size=batch_size, lr=lr, seed=seed, progress=not args.quiet)
        train_seconds = round(time.perf_counter() - start, 1)
        net.eval().requires_grad_(False)
        metadata = {
            "description": f"VP-SDE score prior of pyro_scoreflow.datasets.load({name!r}), event shape "
            f"{list(event_shape)}",
            "training": {
                "dataset": name, "split": "train" if name == "digits" else None, "train_size": train.shape[0],
                "steps": steps, "batch_size": batch_size, "lr": lr, "weighting": "score", "ema_decay": 0.999,
                "seed": seed, "script": "scripts/train_pretrained.py",
            },
        }  # fmt: skip
    start = time.perf_counter()
    evaluation = evaluate(net, sde, event_shape, train, held_out, refs, spec, seed)
    evaluation["eval_seconds"] = round(time.perf_counter() - start, 1)
    evaluation["train_seconds"] = train_seconds
    metadata["evaluation"] = evaluation
    # no stored solver options: a shipped prior uses the installed ScoreSDEPrior's defaults
    save_checkpoint(out, net, sde, event_shape, {}, metadata=metadata)
    for stale in out.glob("*.safetensors"):  # a shipped prior carries one weights file (a save keeps the previous)
        if stale != weights_file(out):
            stale.unlink()
    print(f"[{name}] saved to {out}: {json.dumps(evaluation)}", flush=True)
    return metadata


def _mean_sd(values: list[float]) -> tuple[float, float]:
    t = torch.tensor(values, dtype=torch.float64)
    return round(t.mean().item(), 5), round(t.std().item() if len(values) > 1 else 0.0, 5)


@torch.no_grad()
def evaluate(net, sde, event_shape, train, held_out, refs, spec: Spec, seed: int) -> dict:
    D = math.prod(event_shape)
    prior = ScoreSDEPrior(net, sde, event_shape, rtol=spec.eval_rtol, atol=spec.eval_rtol)
    log_p = torch.cat([prior.log_prob(chunk) for chunk in held_out.split(500)])
    gaussian = gaussian_fit(train)
    gauss_log_p = gaussian.log_prob(held_out.double().flatten(1))
    pyro.set_rng_seed(seed)
    sampler = ScoreSDEPrior(net, sde, event_shape)
    n = held_out.shape[0]
    energy = _mean_sd([energy_distance(sampler.sample((n,)), held_out).item() for _ in range(spec.sample_sets)])
    floor = _mean_sd([energy_distance(ref, held_out).item() for ref in refs])
    gauss_energy = _mean_sd(
        [energy_distance(gaussian.sample((n,)).float(), held_out).item() for _ in range(spec.sample_sets)]
    )
    nats, gnats = log_p.mean().item(), gauss_log_p.mean().item()
    return {
        "held_out_size": n,
        "log_lik_nats": round(nats, 4),
        "log_lik_stderr": round(log_p.std().item() / math.sqrt(len(log_p)), 4),
        "bits_per_dim": round(-nats / (D * math.log(2)), 4),
        "gaussian_log_lik_nats": round(gnats, 4),
        "gaussian_bits_per_dim": round(-gnats / (D * math.log(2)), 4),
        "eval_rtol_atol": spec.eval_rtol,
        "energy_distance": energy[0],
        "energy_distance_sd": energy[1],
        "energy_noise_floor": floor[0],
        "energy_noise_floor_sd": floor[1],
        "gaussian_energy_distance": gauss_energy[0],
        "gaussian_energy_distance_sd": gauss_energy[1],
        "sampler": "sde, 500 Euler-Maruyama steps",
    }


def _pm(ev: dict, key: str) -> str:
    digits = 4 if ev[key] < 0.05 else 3
    return f"{ev[key]:.{digits}f} ± {ev.get(key + '_sd', 0.0):.{digits}f}"


def render_docs(output_root: Path) -> str:
    rows, details, digits_gap = [], [], "?"
    for name in SPECS:
        try:
            config = read_config(output_root / name)
        except (OSError, ValueError):
            continue
        meta = config["metadata"]
        ev, tr = meta.get("evaluation", {}), meta.get("training", {})
        if not ev:
            continue
        D = math.prod(config["event_shape"])
        if name == "digits":
            digits_gap = f"{ev['log_lik_nats'] - ev['gaussian_log_lik_nats']:.1f}"
        rows.append(
            f"| `{name}` | {D} | {ev['held_out_size']} | {ev['log_lik_nats']:.3f} ± {ev['log_lik_stderr']:.3f} "
            f"| {ev['bits_per_dim']:.3f} | {ev['gaussian_log_lik_nats']:.3f} | {ev['gaussian_bits_per_dim']:.3f} "
            f"| {ev['eval_rtol_atol']:g} | {_pm(ev, 'energy_distance')} | {_pm(ev, 'energy_noise_floor')} "
            f"| {_pm(ev, 'gaussian_energy_distance')} |"
        )
        net = config["network"]["config"]
        size = weights_file(output_root / name).stat().st_size / 1e6
        details.append(
            f"| `{name}` | {net['hidden']} x {net['num_layers']} blocks, embed {net['embed_dim']} | {size:.2f} MB "
            f"| {tr.get('train_size')} | {tr.get('steps')} x {tr.get('batch_size')}, lr {tr.get('lr')} "
            f"| {ev.get('train_seconds')} s | {ev.get('eval_seconds')} s |"
        )
    return DOC_TEMPLATE.format(
        header=TABLE_HEADER, rows="\n".join(rows), details="\n".join(details), digits_gap=digits_gap
    )


COLUMNS = [
    "prior", "D", "held-out n", "log p (nats, ± s.e.)", "bits/dim", "Gaussian log p", "Gaussian bits/dim",
    "ODE rtol=atol", "energy dist. (± sd)", "noise floor (± sd)", "Gaussian energy dist. (± sd)",
]  # fmt: skip
TABLE_HEADER = "| " + " | ".join(COLUMNS) + " |\n" + "|---" * len(COLUMNS) + "|"


DOC_TEMPLATE = """# Shipped pretrained priors

`ScoreSDEPrior.from_pretrained(name)` (or `pyro-scoreflow sample NAME ...`) loads these with no network access.
Each models `pyro_scoreflow.datasets.load(name)` on the same scale, with the VP SDE
(`beta_min=0.1, beta_max=20, eps=1e-5`) and a residual-MLP `ScoreNet`; the saved solver options are
`ScoreSDEPrior`'s defaults (the configs store no solver options; today: reverse-SDE sampling with 500
Euler-Maruyama steps, probability-flow `dopri5` with `rtol = atol = 1e-5` for `log_prob`), so
`from_pretrained(name, rtol=1e-3, atol=1e-3)` etc. is how to trade accuracy for speed. `digits` is
trained on split `"train"` only and evaluated on split `"test"`.

A shipped prior loads with its network frozen (`log_prob` builds no graph through the weights);
`from_pretrained(name, trainable=True)` loads it for fine-tuning (`fit`, or SVI with `pyro.module`).
A plain name such as `"moons"` always means the shipped prior, even if the working directory holds a
folder of that name (a warning then says so): load such a folder as `"./moons"` or `Path("moons")`.

This file is generated by `scripts/train_pretrained.py` (rerun it to reproduce; `--only NAME` retrains one).
Its numbers are also stored in each checkpoint's `config.json` under `metadata.evaluation`.

## Quality

{header}
{rows}

* **log p**: mean held-out log-density of the prior, `log p_eps(x)` from the probability-flow ODE with the
  exact divergence and the stated tolerance (higher is better). **bits/dim** `= -log p / (D ln 2)`, on
  the data's own scale (for `digits`, dequantized pixels on `[-1, 1)`; the discrete 17-level pixels then
  satisfy `-log2 P(v)/D <= bits/dim + log2(8.5)` in expectation over the dequantization noise).
  **Gaussian**: a multivariate normal with the training data's mean and covariance, the baseline to beat.
* **energy dist.**: squared energy distance between as many prior samples (reverse SDE, 500 steps) as
  held-out points and the held-out set (mean over 3 sample sets); **noise floor**: the same statistic
  between the held-out set and independent data sets of the same size (mean of 5; for `digits`, random
  subsets of the training images, freshly dequantized). A prior at the floor is indistinguishable from
  the data by this test. "± sd" is the spread over the sets: differences smaller than it are noise.
  For `digits` (297 test images in 64 dimensions) the statistic is dominated by means and covariances,
  which the Gaussian matches by construction: prior and Gaussian both land at the floor within its spread
  (the Gaussian even a little below it: the floor compares test images with training images, which differ
  slightly), so there the energy distance does not rank them. The log-likelihood does ({digits_gap} nats per
  image above the Gaussian), and the samples look like digits:
  `pyro-scoreflow sample digits --num-samples 64 --output d.npy --plot d.png`.

## Training

| prior | network | weights | training points | steps x batch, lr | training time | evaluation time |
|---|---|---|---|---|---|---|
{details}

Times are wall-clock on a shared, busy 2-core CPU machine (load average 4-6) with one torch thread.
Adam with gradient clipping at 1, EMA decay 0.999, `weighting="score"` (the noise-prediction loss).
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--only", choices=sorted(SPECS), action="append", help="train only this prior (repeatable)")
    parser.add_argument("--steps", type=int, help="training steps (default: per prior, see SPECS)")
    parser.add_argument("--batch-size", type=int, help="batch size (default: per prior)")
    parser.add_argument("--lr", type=float, help="Adam learning rate (default: per prior)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, initial weights and training")
    parser.add_argument(
        "--output-root", default=str(ROOT / "pyro_scoreflow" / "pretrained"), help="where the priors are written"
    )
    parser.add_argument("--docs", default=str(ROOT / "docs" / "pretrained.md"), help="the quality report to write")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 is fastest on a busy box)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument(
        "--docs-only", action="store_true", help="only rewrite the docs from the checkpoints' stored evaluation"
    )
    parser.add_argument(
        "--eval-only", action="store_true", help="re-evaluate the existing checkpoints (no training) and rewrite docs"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not args.docs_only:
        for name in args.only or list(SPECS):
            train_one(name, SPECS[name], args)
    docs = Path(args.docs)
    docs.parent.mkdir(parents=True, exist_ok=True)
    docs.write_text(render_docs(Path(args.output_root)))
    print(f"wrote {docs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
