"""The ``train``, ``sample`` and ``log-prob`` commands of ``pyro-scoreflow``, and their ``.npy`` file I/O.

Each command takes the :class:`argparse.Namespace` built by :func:`pyro_scoreflow.cli.build_parser` and
raises ``ValueError``/``OSError``/:class:`~pyro_scoreflow.checkpoint.CheckpointError` with a one-line
message for bad input; :func:`pyro_scoreflow.cli.main` prints it. Everything that can be checked before
the long computation (paths, writability, the plotting dependency) is checked first, so a mistake never
costs a training or sampling run, and every output file is written atomically.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyro
import torch
from tqdm.auto import tqdm

from . import datasets, plotting
from . import sde as sde_module
from ._files import check_writable, write_atomically
from .checkpoint import check_save_target, save_checkpoint
from .checks import check_device
from .distributed import is_main_process, world_size
from .distribution import ScoreSDEPrior
from .networks import ScoreNet
from .options import SolverOptions
from .training import fit

__all__ = ["SDES", "cmd_log_prob", "cmd_sample", "cmd_train", "load_npy", "load_prior", "sampler_text", "save_npy"]

PROG = "pyro-scoreflow"
SDES = {"vp": "VPSDE", "subvp": "SubVPSDE", "ve": "VESDE"}


# -- .npy files ---------------------------------------------------------------------------------
def npy_path(text: str, what: str) -> Path:
    """``text`` as a path, which must end in ``.npy`` (``what`` names the argument in the error)."""
    path = Path(text)
    if path.suffix != ".npy":
        raise ValueError(f"{what} must be a .npy file, got {text!r}")
    return path


def load_npy(path: str | os.PathLike) -> torch.Tensor:
    """A float tensor from a numeric ``.npy`` file (float64 stays float64, other types become float32).

    The header is read and checked first: pickled object arrays, non-numeric or complex types, and a
    shape whose data the file does not hold (a truncated or crafted file claiming a huge shape) are
    refused with ``ValueError`` before any array is allocated.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"unsupported .npy format version {version[0]}.{version[1]}")
        except ValueError as err:
            raise ValueError(f"{path}: not a numeric .npy array ({err})") from None
        if dtype.hasobject or not np.issubdtype(dtype, np.number):
            raise ValueError(f"{path}: not a numeric .npy array (dtype {dtype})")
        if np.issubdtype(dtype, np.complexfloating):
            raise ValueError(f"{path}: complex values are not supported")
        claimed = math.prod(shape) * dtype.itemsize
        held = os.fstat(f.fileno()).st_size - f.tell()
        if claimed > held:
            raise ValueError(
                f"{path}: the header claims an array of shape {tuple(shape)} ({claimed} bytes of {dtype}) but the "
                f"file holds {held} bytes of data (truncated or corrupt)"
            )
        f.seek(0)
        array = np.lib.format.read_array(f, allow_pickle=False)
    return torch.as_tensor(array.astype(np.float64 if dtype == np.float64 else np.float32))


def save_npy(path: str | os.PathLike, tensor: torch.Tensor) -> Path:
    """Write ``tensor`` to a ``.npy`` file atomically (a temporary file in the same directory, then
    ``os.replace``), so a failure never leaves a half-written file or clobbers the previous one."""
    array = tensor.detach().cpu().numpy()
    return write_atomically(path, lambda f: np.save(f, array, allow_pickle=False))


def _check_not_input(output: Path, source: Path, what: str) -> None:
    same = output.resolve() == source.resolve()
    if not same and output.exists() and source.exists():
        same = os.path.samefile(output, source)  # a hard link
    if same:
        raise ValueError(f"{what} {output} is the input file; choose another path (it would be overwritten)")


# -- shared helpers -----------------------------------------------------------------------------
def device(text: str) -> torch.device:
    """A checked ``--device``: a clear error for a bad name or an accelerator that is not there."""
    return check_device("--device", text)


def load_prior(name_or_dir: str, device_name: str, **options) -> ScoreSDEPrior:
    """A shipped prior or checkpoint with the given options; ``None`` options keep the saved value."""
    options = {k: v for k, v in options.items() if v is not None}
    return ScoreSDEPrior.from_pretrained(name_or_dir, map_location=device(device_name), validate_args=True, **options)


def sampler_text(prior: ScoreSDEPrior) -> str:
    """A short description of how ``prior.sample`` draws, from the prior's own options."""
    if prior.sampler == "ode":
        return f"probability-flow ODE, {prior.ode_method}, rtol={prior.rtol:g}, atol={prior.atol:g}"
    if prior.sampler == "sde":
        return f"reverse-time SDE, {prior.num_steps} {prior.sde_method} steps"
    if prior.sampler == "dpm-solver":
        return f"DPM-Solver++ multistep of order {prior.dpm_order} with UniC corrector, {prior.num_steps} steps"
    corrector = f"{prior.corrector_steps} Langevin step{'s' if prior.corrector_steps != 1 else ''}"
    if prior.sampler == "pc":
        return f"predictor-corrector, {prior.num_steps} {prior.predictor} steps and {corrector} after each"
    if prior.sampler == "langevin":
        return f"annealed Langevin dynamics, {prior.num_steps} noise levels and {corrector} at each"
    return f"sampler {prior.sampler!r}, {prior.num_steps} steps"


def _divergence_text(prior: ScoreSDEPrior) -> str:
    if prior.divergence != "hutchinson":
        return f"{prior.divergence} divergence"
    k = prior.hutchinson_samples
    when = "redrawn at every evaluation" if prior.hutchinson_redraw else "fixed along the trajectory"
    return f"hutchinson divergence, {k} {prior.hutchinson_probe} probe{'s' if k > 1 else ''} per point {when}"


def _chunks(total: int, size: int) -> Iterator[int]:
    for start in range(0, total, size):
        yield min(size, total - start)


# -- commands -----------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> None:
    """``pyro-scoreflow train``: fit a :class:`~pyro_scoreflow.networks.ScoreNet` by denoising score
    matching and save the prior as a checkpoint (under ``torchrun``, rank 0 alone prints and saves)."""
    main = is_main_process()
    say = print if main else (lambda *args, **kwargs: None)
    if not 0 <= args.validation_fraction < 1:
        raise ValueError(f"--validation-fraction must lie in [0, 1), got {args.validation_fraction}")
    check_save_target(args.output_dir)  # fail before training, not after
    check_writable(args.output_dir, "--output-dir", directory=True)
    train_device = None if args.device is None else device(args.device)
    if args.data in datasets.names():
        data = datasets.load(args.data, args.num_data, seed=args.seed, split=args.split)
        source = {"dataset": args.data, "split": args.split, "seed": args.seed}
    elif args.data.endswith(".npy") or Path(args.data).exists():
        data = load_npy(npy_path(args.data, "DATASET_OR_NPY"))
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
        seed=args.seed, validation_data=validation if n_val else None, progress=not args.quiet, device=train_device,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    if not main:
        return
    history = net.fit_history
    last = history.loss[-max(1, len(history.loss) // 10) :]
    if not all(math.isfinite(v) for v in last) or not all(torch.isfinite(p).all() for p in net.parameters()):
        raise ValueError("training diverged (non-finite loss or weights); try a smaller --lr")
    options = SolverOptions().as_dict()  # the defaults, saved so that loading needs no guess
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


def cmd_sample(args: argparse.Namespace) -> None:
    """``pyro-scoreflow sample``: draw ``--num-samples`` samples in batches into a ``.npy`` file, and
    optionally plot them."""
    output = npy_path(args.output, "--output")
    plot = None if args.plot is None else Path(args.plot)
    if plot is not None:
        if plot.suffix.lower() != ".png":
            raise ValueError(f"--plot must be a .png file, got {args.plot!r}")
        if not plotting.available():
            raise plotting.MissingMatplotlibError(f"--plot: {plotting.MISSING_MATPLOTLIB}")
        check_writable(plot, "--plot")
    check_writable(output, "--output")
    prior = load_prior(args.checkpoint, args.device, sampler=args.sampler, num_steps=args.num_steps)
    pyro.set_rng_seed(args.seed)
    start = time.perf_counter()
    chunks = []
    with tqdm(total=args.num_samples, desc="sample", unit="pt", dynamic_ncols=True, disable=None) as bar:
        for n in _chunks(args.num_samples, args.batch_size):
            chunks.append(prior.sample((n,)).cpu())
            bar.update(n)
    samples = torch.cat(chunks)
    save_npy(output, samples)
    print(
        f"drew {args.num_samples} samples of shape {tuple(prior.event_shape)} from {args.checkpoint} "
        f"({sampler_text(prior)}) in {time.perf_counter() - start:.1f} s; wrote {output}"
    )
    if plot is not None:
        title = f"{Path(args.checkpoint).name}: {args.num_samples} samples ({prior.sampler})"
        plotting.plot_samples(samples, plot, title=title)
        print(f"wrote {plot}")


def cmd_log_prob(args: argparse.Namespace) -> None:
    """``pyro-scoreflow log-prob``: ``log p`` of every point of a ``.npy`` file (probability-flow ODE), its
    mean in nats and bits/dim, and optionally the per-point values in a ``.npy`` file."""
    input_path = npy_path(args.input, "INPUT.npy")
    output = None if args.output is None else npy_path(args.output, "--output")
    if output is not None:
        _check_not_input(output, input_path, "--output")
        check_writable(output, "--output")
    values = load_npy(input_path)
    prior = load_prior(
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
    pyro.set_rng_seed(args.seed)
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
        f"{len(log_p)} points of dimension D={D} under {args.checkpoint} ({_divergence_text(prior)}; "
        f"rtol={prior.rtol:g}, atol={prior.atol:g}; {time.perf_counter() - start:.1f} s)"
    )
    print(f"mean log p: {mean:.4f} nats (standard error {stderr:.4f})")
    print(f"mean bits/dim: {-mean / (D * math.log(2)):.4f} (= -log p / (D ln 2), on the data's scale)")
    if output is not None:
        save_npy(output, log_p)
        print(f"wrote per-point log p to {output}")
