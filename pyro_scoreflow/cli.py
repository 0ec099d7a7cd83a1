r"""The ``pyro-scoreflow`` command line (also ``python -m pyro_scoreflow``).

::

    pyro-scoreflow demo [--output-dir DIR]
    pyro-scoreflow train DATASET_OR_NPY --output-dir DIR [--sde vp|subvp|ve] [--steps N] [--batch-size B]
                         [--lr LR] [--seed S]
    pyro-scoreflow sample NAME_OR_DIR --num-samples N --output FILE.npy [--plot FILE.png] [--sampler sde|ode] [--seed S]
    pyro-scoreflow log-prob NAME_OR_DIR INPUT.npy [--output FILE.npy] [--divergence exact|hutchinson]

Every command exits 0 on success. A bad argument, an unreadable file or an invalid checkpoint exits
non-zero with one line on stderr (set ``PYRO_SCOREFLOW_DEBUG=1`` for the traceback).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main", "build_parser"]

PROG = "pyro-scoreflow"
SDES = {"vp": "VPSDE", "subvp": "SubVPSDE", "ve": "VESDE"}


# -- argument parsing ---------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr (exit status 2)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except ``None``/``False`` ones and those the help text already states."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS:
            return action.help
        if "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``pyro-scoreflow`` and its subcommands."""
    from . import __version__

    parser = _Parser(
        prog=PROG,
        description="Score-based diffusion priors as Pyro distributions: demo, train, sample, evaluate log p.",
        epilog="Run 'pyro-scoreflow COMMAND --help' for a command's options. Start with 'pyro-scoreflow demo'.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    fmt = _HelpFormatter

    demo = sub.add_parser(
        "demo",
        help="load the shipped 'moons' prior, sample, plot its density, run a small Bayesian inference",
        description="Load the shipped 'moons' prior; draw samples and plot them next to its density (log_prob on "
        "a grid); infer x from a noisy measurement of its first coordinate by importance sampling with the prior "
        "as proposal (pyro.infer.importance.vectorized_importance_weights), and compare with the prior and with "
        "the exact posterior of the data distribution. Writes PNGs and prints a summary (about a minute on 2 cores).",
        formatter_class=fmt,
    )
    demo.add_argument("--output-dir", default="outputs/demo", metavar="DIR", help="directory for the PNG figures")
    demo.add_argument(
        "--num-samples", type=_positive_int, default=2000, metavar="N", help="prior samples (and importance samples)"
    )
    demo.add_argument("--seed", type=int, metavar="S", default=0, help="random seed")
    demo.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # a seconds-long run for tests

    train = sub.add_parser(
        "train",
        help="train a score prior on a named data set or a .npy array and save it as a checkpoint",
        description="Train a ScoreNet by denoising score matching on DATASET_OR_NPY (a name of "
        "pyro_scoreflow.datasets, e.g. 'moons' or 'digits', or a .npy file holding an array (N, *event_shape) "
        "of data of about unit scale) and save the prior to --output-dir (config.json + model.safetensors). "
        "Load it with ScoreSDEPrior.from_pretrained(DIR) or 'pyro-scoreflow sample DIR'.",
        formatter_class=fmt,
    )
    train.add_argument("data", metavar="DATASET_OR_NPY", help="data set name or path to a .npy file")
    train.add_argument(
        "--output-dir", required=True, metavar="DIR", help="checkpoint directory to write (replaced atomically)"
    )
    train.add_argument("--sde", choices=list(SDES), default="vp", help="forward SDE")
    train.add_argument("--steps", type=_positive_int, metavar="N", default=2000, help="optimisation steps")
    train.add_argument("--batch-size", type=_positive_int, metavar="B", default=256, help="points per step")
    train.add_argument("--lr", type=_positive_float, metavar="LR", default=2e-3, help="Adam learning rate")
    train.add_argument(
        "--seed", type=int, metavar="S", default=0, help="seed of the initial weights, data draws and training"
    )
    train.add_argument("--hidden", type=_positive_int, metavar="H", default=128, help="width of the residual MLP")
    train.add_argument("--num-layers", type=_positive_int, metavar="L", default=3, help="residual MLP blocks")
    train.add_argument(
        "--embed-dim", type=_positive_int, metavar="E", default=64, help="noise-level embedding width (even)"
    )
    train.add_argument("--weighting", choices=["score", "likelihood"], default="score", help="loss weighting")
    train.add_argument(
        "--num-data",
        type=_positive_int,
        metavar="N",
        default=None,
        help="points to draw from a named data set (default: its size)",
    )
    train.add_argument("--split", choices=["train", "test", "all"], default="all", help="split of 'digits'")
    train.add_argument(
        "--validation-fraction", type=float, metavar="F", default=0.1, help="fraction held out for validation"
    )
    train.add_argument(
        "--device", default=None, metavar="DEVICE",
        help="torch device to train on (default: cpu; under torchrun with CUDA: cuda:$LOCAL_RANK)",
    )  # fmt: skip
    train.add_argument("--quiet", action="store_true", help="no progress bar")

    sample = sub.add_parser(
        "sample",
        help="draw samples from a shipped prior or a checkpoint directory into a .npy file",
        description="Draw samples from NAME_OR_DIR (a shipped prior such as 'moons', 'checkerboard', 'digits', "
        "or a checkpoint directory) and save them as an array (N, *event_shape) to --output.",
        formatter_class=fmt,
    )
    sample.add_argument("checkpoint", metavar="NAME_OR_DIR", help="shipped prior name or checkpoint directory")
    sample.add_argument("--num-samples", type=_positive_int, required=True, metavar="N", help="number of samples")
    sample.add_argument("--output", required=True, metavar="FILE.npy", help="output .npy file")
    sample.add_argument(
        "--plot", default=None, metavar="FILE.png", help="also write a PNG: a scatter plot (2-D) or an image grid"
    )
    sample.add_argument(
        "--sampler", choices=["sde", "ode", "dpm-solver"], default=None, help="sampler (default: the saved option)"
    )
    sample.add_argument(
        "--num-steps", type=_positive_int, metavar="N", default=None, help="solver steps (default: saved option)"
    )
    sample.add_argument("--batch-size", type=_positive_int, metavar="B", default=2000, help="samples drawn per solve")
    sample.add_argument("--seed", type=int, metavar="S", default=0, help="random seed")
    sample.add_argument("--device", default="cpu", metavar="DEVICE", help="torch device")

    log_prob = sub.add_parser(
        "log-prob",
        help="evaluate log p of the points in a .npy file under a prior",
        description="Evaluate log p(x) (probability-flow ODE) of every point of INPUT.npy, an array "
        "(N, *event_shape), under NAME_OR_DIR. Prints the mean log p in nats and the mean bits/dim, "
        "defined as -log p / (D ln 2) with D the event size, on the data's own scale.",
        formatter_class=fmt,
    )
    log_prob.add_argument("checkpoint", metavar="NAME_OR_DIR", help="shipped prior name or checkpoint directory")
    log_prob.add_argument("input", metavar="INPUT.npy", help="points to evaluate, shape (N, *event_shape)")
    log_prob.add_argument(
        "--output", default=None, metavar="FILE.npy", help="write the per-point log p (N,) to this .npy file"
    )
    log_prob.add_argument(
        "--divergence", choices=["exact", "hutchinson"], default=None, help="divergence (default: the saved option)"
    )
    log_prob.add_argument(
        "--hutchinson-samples", type=_positive_int, metavar="K", default=None, help="probes per point"
    )
    log_prob.add_argument(
        "--hutchinson-redraw",
        action="store_true",
        default=None,
        help="fresh Hutchinson probes at every evaluation (unbiased, lower variance; see docs/math.md)",
    )
    log_prob.add_argument(
        "--rtol", type=_positive_float, metavar="RTOL", default=None, help="ODE rtol (default: the saved option)"
    )
    log_prob.add_argument(
        "--atol", type=_positive_float, metavar="ATOL", default=None, help="ODE atol (default: the saved option)"
    )
    log_prob.add_argument("--batch-size", type=_positive_int, metavar="B", default=1000, help="points per solve")
    log_prob.add_argument("--seed", type=int, metavar="S", default=0, help="random seed (Hutchinson probes)")
    log_prob.add_argument("--device", default="cpu", metavar="DEVICE", help="torch device")
    return parser


# -- helpers ------------------------------------------------------------------------------------
def _npy_path(text: str, what: str) -> Path:
    path = Path(text)
    if path.suffix != ".npy":
        raise ValueError(f"{what} must be a .npy file, got {text!r}")
    return path


def _load_npy(path: Path):
    """An array from a .npy file, refusing pickled object arrays."""
    import numpy as np
    import torch

    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        array = np.load(path, allow_pickle=False)
    except ValueError as err:
        raise ValueError(f"{path}: not a numeric .npy array ({err})") from err
    if not isinstance(array, np.ndarray) or not np.issubdtype(array.dtype, np.number):
        raise ValueError(f"{path}: expected a numeric array, got dtype {getattr(array, 'dtype', type(array))}")
    if np.issubdtype(array.dtype, np.complexfloating):
        raise ValueError(f"{path}: complex values are not supported")
    return torch.as_tensor(array.astype(np.float32 if array.dtype != np.float64 else np.float64))


def _save_npy(path: Path, tensor) -> None:
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, tensor.detach().cpu().numpy())


def _device(text: str):
    """A checked torch device: a clear error for a bad name or an accelerator that is not there."""
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise ValueError(f"--device {text!r} is not a torch device (e.g. 'cpu', 'cuda', 'cuda:1')") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {text!r}: CUDA is not available on this machine")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {text!r}: MPS is not available on this machine")
    return device


def _seed(seed: int) -> None:
    import pyro

    pyro.set_rng_seed(seed)


def _matplotlib():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_samples(samples, path: Path, title: str = "") -> None:
    """A scatter plot for 2-D samples, an image grid for square images, else the first two coordinates."""
    plt = _matplotlib()
    x = samples.detach().cpu().reshape(samples.shape[0], -1).numpy()
    D = x.shape[1]
    side = math.isqrt(D)
    if D != 2 and side * side == D:
        n = min(64, x.shape[0])
        cols = math.ceil(math.sqrt(n))
        rows = math.ceil(n / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.9, rows * 0.9 + 0.4), squeeze=False)
        for i, ax in enumerate(axes.flat):
            ax.axis("off")
            if i < n:
                ax.imshow(x[i].reshape(side, side), cmap="gray_r", vmin=-1, vmax=1)
    else:
        fig, ax = plt.subplots(figsize=(5, 5))
        ax.scatter(x[:, 0], x[:, 1] if D > 1 else [0] * len(x), s=2, alpha=0.5)
        ax.set_aspect("equal")
        ax.set_xlabel("x[0]")
        ax.set_ylabel("x[1]" if D > 1 else "")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- commands -----------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> None:
    import torch

    from . import datasets
    from . import sde as sde_module
    from .checkpoint import check_save_target, save_checkpoint
    from .distributed import is_main_process, world_size
    from .distribution import ScoreSDEPrior
    from .networks import ScoreNet
    from .training import fit

    main = is_main_process()  # under torchrun: rank 0 alone prints and writes the checkpoint
    say = print if main else (lambda *args, **kwargs: None)
    if not 0 <= args.validation_fraction < 1:
        raise ValueError(f"--validation-fraction must lie in [0, 1), got {args.validation_fraction}")
    check_save_target(args.output_dir)  # fail before training, not after
    device = None if args.device is None else _device(args.device)
    if args.data in datasets.names():
        data = datasets.load(args.data, args.num_data, seed=args.seed, split=args.split)
        source = {"dataset": args.data, "split": args.split, "seed": args.seed}
    elif args.data.endswith(".npy") or Path(args.data).exists():
        data = _load_npy(_npy_path(args.data, "DATASET_OR_NPY"))
        source = {"npy": os.path.basename(args.data)}
    else:
        raise ValueError(f"{args.data!r} is neither a data set ({', '.join(datasets.names())}) nor a .npy file")
    if data.dim() < 2 or data.shape[0] < 2:
        raise ValueError(f"training data must have shape (N, *event_shape) with N >= 2, got {tuple(data.shape)}")
    if not torch.isfinite(data).all():
        raise ValueError("training data contain NaN or inf")
    event_shape = tuple(data.shape[1:])
    perm = torch.randperm(data.shape[0], generator=torch.Generator().manual_seed(args.seed))
    n_val = int(round(args.validation_fraction * data.shape[0]))
    validation, train = data[perm[:n_val]], data[perm[n_val:]]
    rms = float(data.double().pow(2).mean().sqrt())
    if not 0.05 < rms < 20:
        say(f"warning: the data's RMS is {rms:.3g}; diffusion priors assume about unit scale: standardize first")

    sde = getattr(sde_module, SDES[args.sde])()
    torch.manual_seed(args.seed)
    net = ScoreNet(sde, event_shape, hidden=args.hidden, num_layers=args.num_layers, embed_dim=args.embed_dim)
    say(
        f"training a {SDES[args.sde]} prior on {args.data} ({train.shape[0]} points, event shape {event_shape}), "
        f"{sum(p.numel() for p in net.parameters())} parameters, {args.steps} steps"
    )
    start = time.perf_counter()
    fit(
        net, sde, train, steps=args.steps, batch_size=args.batch_size, lr=args.lr, weighting=args.weighting,
        seed=args.seed, validation_data=validation if n_val else None, progress=not args.quiet, device=device,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    if not main:
        return
    history = net.fit_history
    last = history.loss[-max(1, len(history.loss) // 10) :]
    if not all(math.isfinite(v) for v in last) or not all(torch.isfinite(p).all() for p in net.parameters()):
        raise ValueError("training diverged (non-finite loss or weights); try a smaller --lr")
    options = ScoreSDEPrior(net, sde, event_shape).options
    metadata = {
        "training": {
            **source, "train_size": train.shape[0], "steps": args.steps, "batch_size": args.batch_size,
            "lr": args.lr, "weighting": args.weighting, "seed": args.seed, "seconds": round(seconds, 1),
            "final_loss": sum(last) / len(last), "validation_loss": history.validation_loss,
            "command": "pyro-scoreflow train", "world_size": world_size(),
        }
    }  # fmt: skip
    out = save_checkpoint(args.output_dir, net.cpu(), sde, event_shape, options, metadata=metadata)
    val = "" if history.validation_loss is None else f", validation loss {history.validation_loss:.4f}"
    print(f"trained in {seconds:.1f} s: final training loss {sum(last) / len(last):.4f}{val}")
    print(f"saved {out}/config.json and {out}/model.safetensors")
    print(f"next: {PROG} sample {out} --num-samples 1000 --output samples.npy --plot samples.png")


def _load_prior(name_or_dir: str, device: str, **options):
    from .distribution import ScoreSDEPrior

    options = {k: v for k, v in options.items() if v is not None}
    return ScoreSDEPrior.from_pretrained(name_or_dir, map_location=_device(device), validate_args=True, **options)


def cmd_sample(args: argparse.Namespace) -> None:
    import torch
    from tqdm.auto import tqdm

    output = _npy_path(args.output, "--output")
    plot = None if args.plot is None else Path(args.plot)
    if plot is not None and plot.suffix.lower() != ".png":
        raise ValueError(f"--plot must be a .png file, got {args.plot!r}")
    prior = _load_prior(args.checkpoint, args.device, sampler=args.sampler, num_steps=args.num_steps)
    _seed(args.seed)
    start = time.perf_counter()
    chunks = []
    with tqdm(total=args.num_samples, desc="sample", unit="pt", dynamic_ncols=True, disable=None) as bar:
        for n in _chunks(args.num_samples, args.batch_size):
            chunks.append(prior.sample((n,)).cpu())
            bar.update(n)
    samples = torch.cat(chunks)
    _save_npy(output, samples)
    print(
        f"drew {args.num_samples} samples of shape {tuple(prior.event_shape)} from {args.checkpoint} "
        f"({_sampler_text(prior)}) in {time.perf_counter() - start:.1f} s; wrote {output}"
    )
    if plot is not None:
        plot_samples(samples, plot, title=f"{Path(args.checkpoint).name}: {args.num_samples} samples ({prior.sampler})")
        print(f"wrote {plot}")


def _sampler_text(prior) -> str:
    if prior.sampler == "ode":
        return f"probability-flow ODE, {prior.ode_method}, rtol={prior.rtol:g}, atol={prior.atol:g}"
    if prior.sampler == "sde":
        return f"reverse-time SDE, {prior.num_steps} {prior.sde_method} steps"
    return f"DPM-Solver++(2M), {prior.num_steps} steps"


def _chunks(total: int, size: int):
    for start in range(0, total, size):
        yield min(size, total - start)


def cmd_log_prob(args: argparse.Namespace) -> None:
    import torch
    from tqdm.auto import tqdm

    output = None if args.output is None else _npy_path(args.output, "--output")
    values = _load_npy(_npy_path(args.input, "INPUT.npy"))
    prior = _load_prior(
        args.checkpoint, args.device, divergence=args.divergence, hutchinson_samples=args.hutchinson_samples,
        hutchinson_redraw=args.hutchinson_redraw, rtol=args.rtol, atol=args.atol,
    )  # fmt: skip
    event_shape = tuple(prior.event_shape)
    if tuple(values.shape) == event_shape:
        values = values.unsqueeze(0)
    if tuple(values.shape[1:]) != event_shape or values.dim() != len(event_shape) + 1:
        raise ValueError(
            f"{args.input}: expected an array (N, {', '.join(map(str, event_shape))}) for this prior, "
            f"got shape {tuple(values.shape)}"
        )
    if values.shape[0] == 0:
        raise ValueError(f"{args.input}: no points")
    _seed(args.seed)
    start = time.perf_counter()
    out = []
    bar = tqdm(total=values.shape[0], desc="log_prob", unit="pt", dynamic_ncols=True, disable=None)  # terminals only
    with torch.no_grad(), bar:
        for chunk in values.split(args.batch_size):
            out.append(prior.log_prob(chunk).cpu())
            bar.update(chunk.shape[0])
    log_p = torch.cat(out).double()
    D = math.prod(event_shape)
    mean = log_p.mean().item()
    stderr = log_p.std().item() / math.sqrt(len(log_p)) if len(log_p) > 1 else float("nan")
    print(
        f"{len(log_p)} points of dimension D={D} under {args.checkpoint} ({prior.divergence} divergence, "
        f"rtol={prior.rtol:g}, atol={prior.atol:g}; {time.perf_counter() - start:.1f} s)"
    )
    print(f"mean log p: {mean:.4f} nats (standard error {stderr:.4f})")
    print(f"mean bits/dim: {-mean / (D * math.log(2)):.4f} (= -log p / (D ln 2), on the data's scale)")
    if output is not None:
        _save_npy(output, log_p)
        print(f"wrote per-point log p to {output}")


def cmd_demo(args: argparse.Namespace) -> None:
    run_demo(Path(args.output_dir), num_samples=args.num_samples, seed=args.seed, smoke=args.smoke)


def run_demo(output_dir: Path, *, num_samples: int = 2000, seed: int = 0, smoke: bool = False) -> dict:
    r"""The ``demo`` command: the shipped moons prior, its samples and density, and a small Bayesian inference.

    Inference: :math:`y = x_0 + \mathcal N(0, \sigma^2)` is observed; the posterior of :math:`x` under the
    prior is drawn by importance sampling with the prior as proposal
    (``pyro.infer.importance.vectorized_importance_weights``: the prior terms of model and guide cancel, the
    weights are the likelihood) and resampling, then compared with the exact posterior of the data
    distribution itself (200000 fresh data points reweighted by the same likelihood). Returns the summary
    numbers.
    """
    import pyro
    import pyro.distributions as dist
    import torch
    from pyro.infer.importance import vectorized_importance_weights

    from . import datasets
    from .distribution import ScoreSDEPrior

    total_start = time.perf_counter()
    grid_size, num_reference, num_held_out = (16, 20_000, 100) if smoke else (60, 200_000, 500)
    if smoke:
        num_samples = min(num_samples, 200)
    steps = {"num_steps": 50} if smoke else {}
    y_obs, noise = -0.5, 0.1
    output_dir.mkdir(parents=True, exist_ok=True)
    _seed(seed)

    prior = ScoreSDEPrior.from_pretrained("moons", **steps)
    fast = prior.with_options(rtol=1e-3, atol=1e-3)  # loose ODE tolerance for the plots: errors ~1e-3 nats
    size = sum(p.numel() for p in prior.score_model.parameters())
    print(f"{PROG} demo: the shipped 'moons' prior ({prior.sde!r}, ScoreNet with {size} parameters)")

    start = time.perf_counter()
    samples = prior.sample((num_samples,))
    print(
        f"  samples: {num_samples} draws (reverse-time SDE, {prior.num_steps} Euler-Maruyama steps) "
        f"in {time.perf_counter() - start:.1f} s"
    )

    start = time.perf_counter()
    xs, ys = torch.linspace(-2.6, 2.6, grid_size), torch.linspace(-1.9, 1.9, grid_size)
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).reshape(-1, 2)
    with torch.no_grad():
        log_density = fast.log_prob(grid).reshape(grid_size, grid_size)
    mass = log_density.exp().sum().item() * (xs[1] - xs[0]).item() * (ys[1] - ys[0]).item()
    print(
        f"  density: log p on a {grid_size}x{grid_size} grid (probability-flow ODE, rtol=atol=1e-3) in "
        f"{time.perf_counter() - start:.1f} s; it integrates to {mass:.3f} over the plotted box"
    )

    held_out = datasets.load("moons", num_held_out, seed=123)
    fit_data = datasets.load("moons", 10_000, seed=124)
    gaussian = dist.MultivariateNormal(fit_data.mean(0), torch.cov(fit_data.T))
    with torch.no_grad():
        held_out_lp = fast.log_prob(held_out).mean().item()
    gaussian_lp = gaussian.log_prob(held_out).mean().item()
    print(
        f"  held-out log-likelihood: {held_out_lp:.3f} nats/point vs {gaussian_lp:.3f} for a fitted Gaussian "
        f"({num_held_out} fresh points; {-held_out_lp / (2 * math.log(2)):.3f} vs "
        f"{-gaussian_lp / (2 * math.log(2)):.3f} bits/dim)"
    )

    # Bayesian inference: y = x[0] + N(0, noise^2), y observed; the prior is the importance proposal, so the
    # prior's log density (the same deterministic ODE solve in model and guide) cancels exactly in the weights.
    def model(y):
        x = pyro.sample("x", fast)
        pyro.sample("y", dist.Normal(x[..., 0], noise), obs=y)

    def guide(y):
        pyro.sample("x", fast)

    start = time.perf_counter()
    with torch.no_grad():
        log_w, _, guide_trace = vectorized_importance_weights(
            model, guide, torch.tensor(y_obs), num_samples=num_samples, max_plate_nesting=0
        )
    particles = guide_trace.nodes["x"]["value"]
    log_w = log_w.detach()
    ess = math.exp(2 * torch.logsumexp(log_w, 0).item() - torch.logsumexp(2 * log_w, 0).item())
    posterior = particles[dist.Categorical(logits=log_w).sample((num_samples,))]
    weights = torch.softmax(log_w, 0)
    is_upper = (weights * (particles[:, 1] > 0)).sum().item()
    is_mean = (weights * particles[:, 1]).sum().item()
    seconds = time.perf_counter() - start

    reference = datasets.load("moons", num_reference, seed=125)
    ref_w = torch.softmax(dist.Normal(reference[:, 0], noise).log_prob(torch.tensor(y_obs)), 0)
    ref_upper = (ref_w * (reference[:, 1] > 0)).sum().item()
    ref_mean = (ref_w * reference[:, 1]).sum().item()
    prior_upper = (samples[:, 1] > 0).double().mean().item()
    print(f"  inference: observe y = x[0] + N(0, {noise}^2) = {y_obs}; importance sampling with the prior as proposal")
    print(f"    {num_samples} weighted particles in {seconds:.1f} s, effective sample size {ess:.0f}")
    print(
        f"    P(x[1] > 0 | y) = {is_upper:.3f}, E[x[1] | y] = {is_mean:.3f}   "
        f"(exact posterior of the data distribution: {ref_upper:.3f}, {ref_mean:.3f}; prior: P(x[1] > 0) = "
        f"{prior_upper:.3f})"
    )

    plt = _matplotlib()
    extent = (xs[0].item(), xs[-1].item(), ys[0].item(), ys[-1].item())
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), layout="constrained")
    axes[0].scatter(samples[:, 0], samples[:, 1], s=2, alpha=0.5)
    axes[0].set_title(f"{num_samples} samples (reverse SDE)")
    image = axes[1].imshow(log_density.clamp(min=-10).numpy(), origin="lower", extent=extent, cmap="viridis")
    axes[1].set_title("log p(x) (probability-flow ODE)")
    fig.colorbar(image, ax=axes[1], label="log p")
    for ax in axes:
        ax.set_xlim(extent[:2])
        ax.set_ylim(extent[2:])
        ax.set_aspect("equal")
        ax.set_xlabel("x[0]")
    axes[0].set_ylabel("x[1]")
    fig.suptitle("pyro_scoreflow: the shipped 'moons' prior")
    prior_png = output_dir / "prior.png"
    fig.savefig(prior_png, dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), layout="constrained")
    axes[0].scatter(samples[:, 0], samples[:, 1], s=2, alpha=0.25, color="0.6", label="prior samples")
    axes[0].scatter(posterior[:, 0], posterior[:, 1], s=4, alpha=0.5, color="C3", label="posterior (resampled)")
    axes[0].axvspan(y_obs - noise, y_obs + noise, color="C1", alpha=0.15, label=f"y = {y_obs} +/- {noise}")
    axes[0].set_aspect("equal")
    axes[0].set_xlabel("x[0]")
    axes[0].set_ylabel("x[1]")
    axes[0].legend(loc="upper right", fontsize=8)
    axes[0].set_title("observe y = x[0] + noise")
    bins = torch.linspace(-2, 2, 41).numpy()
    axes[1].hist(samples[:, 1].numpy(), bins=bins, density=True, alpha=0.4, color="0.5", label="prior")
    axes[1].hist(
        particles[:, 1].numpy(), bins=bins, weights=weights.numpy(), density=True, alpha=0.5, color="C3",
        label="posterior: score prior + importance sampling",
    )  # fmt: skip
    axes[1].hist(
        reference[:, 1].numpy(), bins=bins, weights=ref_w.numpy(), density=True, histtype="step", color="k",
        linewidth=1.5, label="exact posterior (data distribution)",
    )  # fmt: skip
    axes[1].set_xlabel("x[1]")
    axes[1].legend(loc="upper left", fontsize=8)
    axes[1].set_title(f"p(x[1] | y = {y_obs}), ESS {ess:.0f} of {num_samples}")
    posterior_png = output_dir / "posterior.png"
    fig.savefig(posterior_png, dpi=110)
    plt.close(fig)
    total = time.perf_counter() - total_start
    print(f"  wrote {prior_png} and {posterior_png} (total {total:.1f} s)")
    return {
        "held_out_log_lik": held_out_lp, "gaussian_log_lik": gaussian_lp, "ess": ess,
        "posterior_upper": is_upper, "reference_upper": ref_upper, "posterior_mean": is_mean,
        "reference_mean": ref_mean, "seconds": total,
    }  # fmt: skip


COMMANDS = {"train": cmd_train, "sample": cmd_sample, "log-prob": cmd_log_prob, "demo": cmd_demo}


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``pyro-scoreflow`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from .checkpoint import CheckpointError

    try:
        COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130
    except (CheckpointError, OSError, ValueError, TypeError, ImportError, RuntimeError) as err:
        if os.environ.get("PYRO_SCOREFLOW_DEBUG"):
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        kind = "" if isinstance(err, (CheckpointError, ValueError, OSError)) else f"{type(err).__name__}: "
        print(f"{PROG} {args.command}: error: {kind}{message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
