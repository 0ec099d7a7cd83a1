"""
Latent space: encoding digits with the probability-flow ODE and interpolating
=============================================================================

The probability-flow ODE dx = f~(x, t) dt, f~ = f - g^2 s / 2, is deterministic and
invertible: integrating it from noise x_T at t = T down to t = eps gives a sample, and
integrating a data point up from eps to T gives the unique noise that generates it.
``prior.flow`` is that map as a bijective Pyro ``Transform`` (noise -> data), and
``prior.flow.inv`` encodes. The latent of the VP SDE is N(0, I): a diffusion model is also
a continuous normalizing flow, with log p(x) = log N(z; 0, I) - log|det dx/dz| and the
log-determinant integrated along the same trajectory (``flow.log_abs_det_jacobian`` costs
nothing after a call: it is remembered).

This tutorial encodes pairs of 8x8 test digits with the shipped ``digits`` prior (trained on
the training split only) and walks between their latents:

* **pixel space**, (1 - a) x0 + a x1: a cross-fade, two half-transparent digits on top of
  each other;
* **linear in the latent**, (1 - a) z0 + a z1: the midpoint has a smaller norm than either
  end (for 64 independent N(0, 1) coordinates, ||z|| concentrates near 8, and the midpoint
  of two near-orthogonal latents has norm about 8 / sqrt 2), so it decodes to an atypical,
  washed-out image;
* **spherical** (slerp) in the latent, z(a) = [sin((1-a) th) z0 + sin(a th) z1] / sin th,
  with th the angle between z0 and z1: it keeps the norm, so every intermediate latent is a
  typical draw of N(0, I), and the images keep the contrast of real digits.

It prints the encoding round-trip error and, along each path, the log density in bits per
dimension (lower is denser; on the data's own scale, pixels in [-1, 1); add log2(17/2) = 3.09
for bits per 17-level pixel) and the latent norm of every image (for the pixel path, from
encoding it), and saves ``latent_space.png``. The lesson of the numbers: *density is not
typicality*. The cross-fades and the washed-out linear-latent images are denser than the real
digits at their ends (smooth, low-contrast images are, for flows and diffusion models alike),
while their latents are atypical, with norms near 6, three standard deviations below the
typical 8 +- 0.7. (The encoded real digits are not all typical either: the model is not a
perfect fit, and one of the six, a 7, encodes to a norm of 5.6.)

Run ``python examples/latent_space.py`` (about 75 s on 2 CPU cores) or with ``--smoke``.
"""

# [start-imports]
from __future__ import annotations

import argparse
import math
import os
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from pyro_scoreflow import ScoreSDEPrior, datasets  # noqa: E402

# [end-imports]

# [start-helpers]
DIM = 64
TRAIN_SIZE = 1500  # split "train" is the first 1500 of scikit-learn's 1797 digits, "test" the rest


def test_labels() -> torch.Tensor:
    """Class labels of the digits test split (scikit-learn ships the data set: no download)."""
    from sklearn.datasets import load_digits

    return torch.as_tensor(load_digits().target[TRAIN_SIZE:])


def slerp(z0: torch.Tensor, z1: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between ``z0`` and ``z1`` (``(D,)``) at fractions ``a`` (``(K,)``): ``(K, D)``."""
    cos = torch.dot(z0, z1) / (z0.norm() * z1.norm())
    theta = torch.arccos(cos.clamp(-1.0, 1.0))
    a = a.unsqueeze(-1)
    return (torch.sin((1 - a) * theta) * z0 + torch.sin(a * theta) * z1) / torch.sin(theta)


def bits_per_dim(log_p: torch.Tensor) -> torch.Tensor:
    return -log_p / (DIM * math.log(2))


# [end-helpers]


# [start-flow]
def decode(prior: ScoreSDEPrior, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images, their log density log p(x) = log N(z) - log|det dx/dz| (from the same solve) and ``z``."""
    flow = prior.flow
    with torch.no_grad():
        x = flow(z)
        log_det = flow.log_abs_det_jacobian(z, x)
    return x, prior.sde.prior((DIM,)).log_prob(z) - log_det, z


def encode(prior: ScoreSDEPrior, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Like :func:`decode`, from images: one solve gives the latents and log p(x)."""
    flow = prior.flow
    with torch.no_grad():
        z = flow.inv(x)
        log_det = flow.log_abs_det_jacobian(z, x)
    return x, prior.sde.prior((DIM,)).log_prob(z) - log_det, z


# [end-flow]


# [start-prior]
def main(args: argparse.Namespace) -> None:
    if args.smoke:
        print("--smoke: tiny sizes that only check that the script runs; its numbers are not meaningful.")
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.num_threads)
    os.makedirs(args.output_dir, exist_ok=True)
    start = time.time()

    prior = ScoreSDEPrior.from_pretrained("digits", rtol=args.tol, atol=args.tol)
    images = datasets.load("digits", split="test", seed=args.seed)
    labels = test_labels()
    pairs = [(int((labels == a).nonzero()[0]), int((labels == b).nonzero()[0])) for a, b in args.pairs]
    a = torch.linspace(0, 1, args.num_points)
    # [end-prior]

    # [start-encode]
    # -- encode: one batched solve from eps up to T -------------------------------------------------
    ends = torch.stack([images[i] for pair in pairs for i in pair])
    t0 = time.time()
    _, _, latents = encode(prior, ends)
    encode_time = time.time() - t0
    recon, _, _ = decode(prior, latents)
    rmse = float((recon - ends).pow(2).mean().sqrt())
    print(f"encoded {len(ends)} test digits in {encode_time:.1f}s (NFE {prior.last_nfe}, rtol = atol = {args.tol:g})")
    print(f"round trip decode(encode(x)): RMSE {rmse:.1e} (pixels span [-1, 1))")
    norms = latents.norm(dim=-1)
    print(f"latent norms: {', '.join(f'{v:.2f}' for v in norms.tolist())} (N(0, I) in 64-D: 8.0 +- 0.7)")
    # [end-encode]

    # [start-paths]
    # -- paths: pixel space and linear latent for the first pair, slerp for all ----------------------
    rows, names = [], []
    x0, x1 = images[pairs[0][0]], images[pairs[0][1]]
    z0, z1 = latents[0], latents[1]
    rows.append(encode(prior, (1 - a[:, None]) * x0 + a[:, None] * x1))  # encoded to get its latents
    names.append(f"{args.pairs[0][0]}->{args.pairs[0][1]}, pixel space")
    rows.append(decode(prior, (1 - a[:, None]) * z0 + a[:, None] * z1))
    names.append(f"{args.pairs[0][0]}->{args.pairs[0][1]}, linear in z")
    for k, (da, db) in enumerate(args.pairs):
        rows.append(decode(prior, slerp(latents[2 * k], latents[2 * k + 1], a)))
        names.append(f"{da}->{db}, slerp in z")

    mid = args.num_points // 2
    print(
        f"\n{'path':<26}{'bits/dim at ends':>18}{'mean':>7}{'max':>7}{'min':>7}{'|z| at ends':>14}{'mid':>6}{'min':>6}"
    )
    for name, (_, lp, z) in zip(names, rows):
        b, n = bits_per_dim(lp), z.norm(dim=-1)
        b_ends, n_ends = f"{float(b[0]):+.2f} / {float(b[-1]):+.2f}", f"{float(n[0]):.2f} / {float(n[-1]):.2f}"
        stats = f"{float(b.mean()):>+7.2f}{float(b.max()):>+7.2f}{float(b.min()):>+7.2f}"
        print(f"{name:<26}{b_ends:>18}{stats}{n_ends:>14}{float(n[mid]):>6.2f}{float(n.min()):>6.2f}")
    # [end-paths]

    # [start-figure]
    # -- figure -------------------------------------------------------------------------------------
    fig, axes = plt.subplots(len(rows), args.num_points, figsize=(1.1 * args.num_points + 1.6, 1.25 * len(rows)))
    for r, (name, (x, lp, z)) in enumerate(zip(names, rows)):
        bpd, norm = bits_per_dim(lp), z.norm(dim=-1)
        for c in range(args.num_points):
            ax = axes[r, c]
            ax.imshow(x[c].reshape(8, 8).clamp(-1, 1).numpy(), cmap="gray_r", vmin=-1, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel(f"{float(bpd[c]):+.2f} | {float(norm[c]):.1f}", fontsize=7, labelpad=1)
        axes[r, 0].set_ylabel(name, fontsize=7, rotation=0, ha="right", va="center")
    fig.suptitle(
        "interpolations; under each image: bits/dim (lower = denser) | latent norm |z| (typical: 8 +- 0.7)", fontsize=9
    )
    fig.tight_layout()
    path = os.path.join(args.output_dir, "latent_space.png")
    fig.savefig(path, dpi=args.dpi)
    plt.close(fig)
    print(f"\n[figure] saved {path}\ndone in {time.time() - start:.1f}s")
    # [end-figure]


# [start-cli]
def pair(text: str) -> tuple[int, int]:
    a, b = text.split(",")
    return int(a), int(b)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Encode digits with the probability-flow ODE and interpolate")
    parser.add_argument("--pairs", default=[(0, 6), (1, 7), (3, 8)], type=pair, nargs="+", help="digit classes")
    parser.add_argument("--num-points", default=9, type=int, help="images per interpolation path")
    parser.add_argument("--tol", default=1e-5, type=float, help="rtol = atol of the probability-flow ODE")
    parser.add_argument("--seed", default=0, type=int)
    parser.add_argument("--num-threads", default=1, type=int)
    parser.add_argument("--dpi", default=100, type=int)
    parser.add_argument("--output-dir", default="outputs/latent_space")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for a quick check")
    args = parser.parse_args()
    if args.smoke:
        args.pairs, args.num_points, args.tol, args.dpi = [(0, 6)], 3, 1e-2, 50
    main(args)
# [end-cli]
