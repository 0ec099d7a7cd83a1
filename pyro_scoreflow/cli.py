r"""The ``pyro-scoreflow`` command line (also ``python -m pyro_scoreflow``).

::

    pyro-scoreflow demo [--output-dir DIR]
    pyro-scoreflow train DATASET_OR_NPY --output-dir DIR [--sde vp|subvp|ve] [--steps N] [--batch-size B]
                         [--lr LR] [--seed S]
    pyro-scoreflow sample NAME_OR_DIR --num-samples N --output FILE.npy [--plot FILE.png] [--sampler sde|ode] [--seed S]
    pyro-scoreflow log-prob NAME_OR_DIR INPUT.npy [--output FILE.npy] [--divergence exact|hutchinson]

Every command exits 0 on success. A bad argument, an unreadable file or an invalid checkpoint exits
non-zero with one line on stderr (set ``PYRO_SCOREFLOW_DEBUG=1`` for the traceback). Counts are bounded
(``--num-steps`` <= 100000, ``--num-samples`` <= 1000000, ``--batch-size`` <= 100000,
``--hutchinson-samples`` <= 10000) so that a typo cannot start a computation that never ends.

This module parses and dispatches; the commands are in :mod:`pyro_scoreflow.commands` and
:mod:`pyro_scoreflow.demo`, the figures in :mod:`pyro_scoreflow.plotting` (optional matplotlib).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

# Module-level imports only: importing this module runs the package's __init__, which imports torch anyway,
# so deferring imports into functions would not make --help faster.
from ._version import __version__
from .checkpoint import CheckpointError
from .commands import PROG, SDES, cmd_log_prob, cmd_sample, cmd_train
from .demo import run_demo
from .options import DIVERGENCES, SAMPLERS
from .plotting import MissingMatplotlibError

__all__ = ["main", "build_parser"]

MAX_NUM_STEPS = 100_000
MAX_NUM_SAMPLES = 1_000_000
MAX_BATCH_SIZE = 100_000
MAX_HUTCHINSON_SAMPLES = 10_000


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


def _int_up_to(maximum: int) -> Callable[[str], int]:
    """An argparse type: an integer in ``[1, maximum]``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = 0
        if not 1 <= value <= maximum:
            raise argparse.ArgumentTypeError(f"expected a positive integer of at most {maximum}, got {text!r}")
        return value

    return parse


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
        "the exact posterior of the data distribution. Prints a summary and writes two PNGs (about a minute on 2 "
        "cores); the figures need matplotlib (pip install 'pyro_scoreflow[plots]') and are skipped without it.",
        formatter_class=fmt,
    )
    demo.add_argument("--output-dir", default="outputs/demo", metavar="DIR", help="directory for the PNG figures")
    demo.add_argument(
        "--num-samples", type=_int_up_to(MAX_NUM_SAMPLES), default=2000, metavar="N",
        help=f"prior samples (and importance samples), at most {MAX_NUM_SAMPLES}",
    )  # fmt: skip
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
    train.add_argument(
        "--batch-size", type=_int_up_to(MAX_BATCH_SIZE), metavar="B", default=256,
        help=f"points per step, at most {MAX_BATCH_SIZE}",
    )  # fmt: skip
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
    sample.add_argument(
        "--num-samples", type=_int_up_to(MAX_NUM_SAMPLES), required=True, metavar="N",
        help=f"number of samples, at most {MAX_NUM_SAMPLES}",
    )  # fmt: skip
    sample.add_argument("--output", required=True, metavar="FILE.npy", help="output .npy file")
    sample.add_argument(
        "--plot", default=None, metavar="FILE.png",
        help="also write a PNG: a scatter plot (2-D) or an image grid (needs matplotlib: pip install "
        "'pyro_scoreflow[plots]')",
    )  # fmt: skip
    sample.add_argument("--sampler", choices=list(SAMPLERS), default=None, help="sampler (default: the saved option)")
    sample.add_argument(
        "--num-steps", type=_int_up_to(MAX_NUM_STEPS), metavar="N", default=None,
        help=f"solver steps, at most {MAX_NUM_STEPS} (default: the saved option)",
    )  # fmt: skip
    sample.add_argument(
        "--batch-size", type=_int_up_to(MAX_BATCH_SIZE), metavar="B", default=2000,
        help=f"samples drawn per solve, at most {MAX_BATCH_SIZE}",
    )  # fmt: skip
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
        "--output", default=None, metavar="FILE.npy",
        help="write the per-point log p (N,) to this .npy file (not the input file)",
    )  # fmt: skip
    log_prob.add_argument(
        "--divergence", choices=list(DIVERGENCES), default=None, help="divergence (default: the saved option)"
    )
    log_prob.add_argument(
        "--hutchinson-samples", type=_int_up_to(MAX_HUTCHINSON_SAMPLES), metavar="K", default=None,
        help=f"probes per point, at most {MAX_HUTCHINSON_SAMPLES}",
    )  # fmt: skip
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
    log_prob.add_argument(
        "--batch-size", type=_int_up_to(MAX_BATCH_SIZE), metavar="B", default=1000,
        help=f"points per solve, at most {MAX_BATCH_SIZE}",
    )  # fmt: skip
    log_prob.add_argument("--seed", type=int, metavar="S", default=0, help="random seed (Hutchinson probes)")
    log_prob.add_argument("--device", default="cpu", metavar="DEVICE", help="torch device")
    return parser


def cmd_demo(args: argparse.Namespace) -> None:
    run_demo(Path(args.output_dir), num_samples=args.num_samples, seed=args.seed, smoke=args.smoke)


COMMANDS = {"train": cmd_train, "sample": cmd_sample, "log-prob": cmd_log_prob, "demo": cmd_demo}


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``pyro-scoreflow`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130
    except (CheckpointError, OSError, ValueError, TypeError, ImportError, RuntimeError, MemoryError) as err:
        if os.environ.get("PYRO_SCOREFLOW_DEBUG"):
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        if isinstance(err, MemoryError):
            kind = "out of memory: "
        elif isinstance(err, (CheckpointError, ValueError, OSError, MissingMatplotlibError)):
            kind = ""  # their messages say what went wrong
        else:
            kind = f"{type(err).__name__}: "
        print(f"{PROG} {args.command}: error: {kind}{message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
