r"""Checkpoints of score priors: ``config.json`` + ``model.safetensors``, never pickle.

A checkpoint is a directory holding

* ``config.json``: the format version, the package version, the forward SDE
  (``sde.config()``), the network (class ``"ScoreNet"``, the event shape it
  was built for and its ``config``), the prior's event shape, its solver
  options (``ScoreSDEPrior.options``), the weights' dtype, the SHA-256 of the
  weights file and free-form ``metadata`` (e.g. how it was trained);
* ``model.safetensors``: the network's ``state_dict``.

**Why safetensors.** ``torch.load`` unpickles, and unpickling can run
arbitrary code: a checkpoint downloaded from an untrusted source could take
over the machine. A safetensors file is a JSON header plus raw tensor bytes,
and only ``ScoreNet`` can be rebuilt from a config (no class is imported by
name), so loading a checkpoint never executes code from it. Pickle-based files
(``.pt``, ``.pth``, ``.bin``, ``.pkl``, ``.ckpt``) are refused with
:class:`UnsafeCheckpointError`.

**Atomic saves.** :func:`save_checkpoint` writes both files into a temporary
sibling directory, fsyncs them, then swaps it into place: the old directory is
renamed aside, the new one renamed in, the old one deleted. An exception
during the save leaves the previous checkpoint untouched; a crash (power loss)
can at worst leave the previous checkpoint under ``.NAME.old-*`` next to it,
never a half-written one under ``NAME``.

Shipped priors live in ``pyro_scoreflow/pretrained/<name>/``
(:func:`pretrained_names`); see ``docs/pretrained.md`` for their quality and
``scripts/train_pretrained.py`` for how they were made.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import stat
import uuid
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import nn

from ._version import __version__
from .networks import ScoreNet
from .options import SolverOptions
from .sde import ForwardSDE, sde_from_config

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "FORMAT_VERSION",
    "CheckpointError",
    "CheckpointNotFoundError",
    "UnsafeCheckpointError",
    "save_checkpoint",
    "check_save_target",
    "load_checkpoint",
    "read_config",
    "pretrained_names",
    "pretrained_path",
    "resolve_checkpoint",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_NAME = "pyro_scoreflow.checkpoint"
FORMAT_VERSION = 1
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")
PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained"

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
_PICKLE_WARNING = (
    "pickle-based files are refused because unpickling can run arbitrary code; "
    "only config.json + model.safetensors checkpoints are loaded"
)


class CheckpointError(ValueError):
    """A checkpoint is invalid: bad or unsupported config, corrupted weights, weights not matching the config."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No checkpoint directory and no shipped prior of that name (or a checkpoint file is missing)."""


class UnsafeCheckpointError(CheckpointError):
    """The checkpoint is a pickle-based file (``.pt``/``.pth``/``.bin``/``.pkl``), which is never loaded."""


# -- shipped priors --------------------------------------------------------------------------
def pretrained_names() -> list[str]:
    """Names of the priors shipped with the package (directories of ``pyro_scoreflow/pretrained``)."""
    if not PRETRAINED_DIR.is_dir():
        return []
    return sorted(p.name for p in PRETRAINED_DIR.iterdir() if (p / CONFIG_NAME).is_file())


def pretrained_path(name: str) -> Path:
    """The directory of the shipped prior ``name``; :class:`CheckpointNotFoundError` listing the names if none."""
    if name not in pretrained_names():
        raise CheckpointNotFoundError(f"no shipped prior named {name!r}; shipped priors: {_names_text()}")
    return PRETRAINED_DIR / name


def _names_text() -> str:
    return ", ".join(pretrained_names()) or "(none installed)"


def resolve_checkpoint(name_or_directory: str | os.PathLike) -> Path:
    """The checkpoint directory for a directory path or a shipped name.

    An existing directory wins over a shipped prior of the same name (so a prior trained into ``./moons``
    is found); use :func:`pretrained_path` to ask for the shipped one explicitly.

    :raises UnsafeCheckpointError: for a pickle-based file (``model.pt`` and the like).
    :raises CheckpointNotFoundError: for anything else that is neither a directory nor a shipped name.
    """
    if not isinstance(name_or_directory, (str, os.PathLike)):
        raise TypeError(f"name_or_directory must be a str or path, got {type(name_or_directory).__name__}")
    path = Path(name_or_directory)
    if path.is_dir():
        return path
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UnsafeCheckpointError(f"{path}: {_PICKLE_WARNING}")
    if isinstance(name_or_directory, str) and name_or_directory in pretrained_names():
        return PRETRAINED_DIR / name_or_directory
    if path.is_file():
        if path.name in (CONFIG_NAME, WEIGHTS_NAME):
            return path.parent
        raise CheckpointError(f"{path} is a file; expected a checkpoint directory (config.json + model.safetensors)")
    hint = _interrupted_save_hint(path)
    raise CheckpointNotFoundError(
        f"{str(name_or_directory)!r} is neither a checkpoint directory nor a shipped prior "
        f"(shipped priors: {_names_text()}){hint}"
    )


def _interrupted_save_hint(path: Path) -> str:
    parent = path.parent if str(path.parent) else Path(".")
    try:
        backups = sorted(parent.glob(f".{path.name}.old-*")) if path.name else []
    except OSError:
        backups = []
    if backups:
        return f"; an interrupted save left the previous checkpoint in {backups[-1]}"
    return ""


# -- saving ------------------------------------------------------------------------------------
def save_checkpoint(
    directory: str | os.PathLike,
    score_model: nn.Module,
    sde: ForwardSDE,
    event_shape: Sequence[int],
    options: Mapping[str, Any] | None = None,
    *,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``config.json`` and ``model.safetensors`` to ``directory``, atomically (module docstring).

    An existing checkpoint there is replaced; other files in it are carried over. A non-empty directory
    that holds no checkpoint is refused rather than replaced, so ``save_checkpoint(".")`` cannot wipe a
    working directory.

    :param score_model: a :class:`~pyro_scoreflow.networks.ScoreNet` (other models cannot be rebuilt
        without running code, so they are refused with ``TypeError``).
    :param sde: the forward SDE; must equal ``score_model.sde``.
    :param event_shape: the prior's event shape (``score_model.event_shape`` or its flattening).
    :param options: ``ScoreSDEPrior`` keyword options (solver settings), JSON-serialisable.
    :param metadata: free-form JSON-serialisable notes stored in the config (e.g. training settings).
    :returns: the checkpoint directory.
    """
    config = _make_config(score_model, sde, event_shape, options, metadata)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in score_model.state_dict().items()}
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:  # refuse before touching the target: a diverged model must not replace a good checkpoint
        raise ValueError(
            f"refusing to save non-finite weights (NaN or inf in {', '.join(bad[:3])}"
            f"{' and more' if len(bad) > 3 else ''}); {directory} is left as it was"
        )
    target = Path(directory)
    if target.is_symlink():
        target = Path(os.path.realpath(target))
    check_save_target(target)
    extras = _extra_entries(target)
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".{target.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()  # not tempfile.mkdtemp: its 0700 mode would end up on the checkpoint; this honours the umask
    try:
        weights = tmp / WEIGHTS_NAME
        safetensors.torch.save_file(tensors, str(weights), metadata={"format": "pt"})
        _fsync_file(weights)
        config["weights_sha256"] = _sha256(weights)
        with open(tmp / CONFIG_NAME, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, allow_nan=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        # safetensors creates its file with mode 0600; give it config.json's mode (the umask's default)
        os.chmod(weights, stat.S_IMODE(os.stat(tmp / CONFIG_NAME).st_mode))
        for entry in extras:
            if entry.is_dir():
                shutil.copytree(entry, tmp / entry.name, symlinks=True)
            else:
                shutil.copy2(entry, tmp / entry.name, follow_symlinks=False)
        _fsync_dir(tmp)
        _swap_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _make_config(score_model, sde, event_shape, options, metadata) -> dict:
    if type(score_model) is not ScoreNet:
        raise TypeError(
            f"only pyro_scoreflow.networks.ScoreNet models can be saved (their architecture is rebuilt from a "
            f"JSON config, so loading runs no code); got {type(score_model).__name__}"
        )
    if not isinstance(sde, ForwardSDE):
        raise TypeError(f"sde must be a VPSDE, SubVPSDE or VESDE (a ForwardSDE), got {type(sde).__name__}")
    if score_model.sde != sde:
        raise ValueError(
            f"the ScoreNet was built for {score_model.sde!r} but the prior uses {sde!r}; a checkpoint stores one SDE"
        )
    shape = [int(s) for s in torch.Size(event_shape)]
    if math.prod(shape) != math.prod(score_model.event_shape):
        raise ValueError(
            f"event_shape {tuple(shape)} does not match the ScoreNet's event shape {tuple(score_model.event_shape)}"
        )
    dtypes = {p.dtype for p in score_model.parameters()}
    if len(dtypes) != 1 or next(iter(dtypes)) not in _DTYPES.values():
        raise ValueError(f"the model's parameters must share one floating dtype, got {sorted(map(str, dtypes))}")
    dtype = next(iter(dtypes))
    config = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "package_version": __version__,
        "sde": sde.config(),
        "network": {
            "class": "ScoreNet",
            "event_shape": list(score_model.event_shape),
            "config": score_model.config,
        },
        "event_shape": shape,
        "options": dict(options or {}),
        "dtype": str(dtype).removeprefix("torch."),
        "metadata": dict(metadata or {}),
    }
    try:
        json.dumps(config, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ValueError(f"options and metadata must be JSON-serialisable (finite numbers): {err}") from err
    return config


def check_save_target(directory: str | os.PathLike) -> None:
    """Raise :class:`CheckpointError` now if :func:`save_checkpoint` would refuse ``directory``
    (an existing file, or a non-empty directory that holds no checkpoint): call it before a long training run."""
    target = Path(directory)
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"{target} exists and is not a directory")
    _extra_entries(target)


def _extra_entries(target: Path) -> list[Path]:
    """Entries of an existing checkpoint directory other than its two files; refuses a non-checkpoint directory."""
    if not target.is_dir():
        return []
    entries = [p for p in target.iterdir() if p.name not in (CONFIG_NAME, WEIGHTS_NAME)]
    if entries and not (target / CONFIG_NAME).is_file():
        names = ", ".join(sorted(p.name for p in entries)[:5])
        raise CheckpointError(
            f"{target} is a non-empty directory without a checkpoint (it holds {names}); saving replaces the whole "
            "directory, so choose a new or empty directory"
        )
    return entries


def _swap_into_place(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` to ``target``; an existing ``target`` is renamed aside first and deleted afterwards."""
    parent = target.parent
    if not target.exists():
        os.rename(tmp, target)
        _fsync_dir(parent)
        return
    old = parent / f".{target.name}.old-{uuid.uuid4().hex[:12]}"
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)
        raise
    _fsync_dir(parent)
    shutil.rmtree(old, ignore_errors=True)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# -- loading -----------------------------------------------------------------------------------
def read_config(name_or_directory: str | os.PathLike) -> dict:
    """The checked ``config.json`` of a checkpoint directory or shipped prior (no weights are read)."""
    return _read_config(resolve_checkpoint(name_or_directory))


def _read_config(directory: Path) -> dict:
    path = directory / CONFIG_NAME
    if not path.is_file():
        pickles = sorted(p.name for p in directory.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            raise UnsafeCheckpointError(f"{directory / pickles[0]}: {_PICKLE_WARNING}")
        raise CheckpointNotFoundError(f"{path} not found: {directory} is not a pyro_scoreflow checkpoint")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(config).__name__}")
    if config.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path} is not a pyro_scoreflow checkpoint config (format {config.get('format')!r})")
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format_version {version!r}, but this version of pyro_scoreflow reads format_version "
            f"{FORMAT_VERSION} (saved by pyro_scoreflow {config.get('package_version', '?')})"
        )
    for key, kind in (("sde", dict), ("network", dict), ("event_shape", list), ("dtype", str)):
        if not isinstance(config.get(key), kind):
            raise CheckpointError(f"{path}: {key!r} is missing or not a JSON {kind.__name__.replace('dict', 'object')}")
    for key in ("options", "metadata"):
        if not isinstance(config.setdefault(key, {}), dict):
            raise CheckpointError(f"{path}: {key!r} must be a JSON object")
    return config


def load_checkpoint(
    name_or_directory: str | os.PathLike, map_location: str | torch.device | None = None
) -> tuple[ScoreNet, ForwardSDE, torch.Size, dict]:
    """Load a checkpoint directory or a shipped prior (e.g. ``"moons"``) without unpickling anything.

    :param name_or_directory: a directory written by :func:`save_checkpoint` or a name of :func:`pretrained_names`.
    :param map_location: device for the weights (default CPU), e.g. ``"cuda"``.
    :returns: ``(score_model, sde, event_shape, options)``: the network in eval mode with
        ``requires_grad_(False)`` (``log_prob`` then builds no graph through the weights; call
        ``model.requires_grad_()`` to fine-tune), its SDE, the prior's event shape and its saved
        ``ScoreSDEPrior`` keyword options.
    :raises CheckpointNotFoundError: unknown name or directory (the message lists the shipped names), missing file.
    :raises UnsafeCheckpointError: a pickle-based file.
    :raises CheckpointError: invalid config, unknown format version, truncated or corrupted weights,
        weights that do not match the architecture.
    """
    try:
        device = torch.device("cpu") if map_location is None else torch.device(map_location)
    except (RuntimeError, TypeError) as err:
        raise ValueError(
            f"map_location must name a torch device such as 'cpu' or 'cuda', got {map_location!r}"
        ) from err
    directory = resolve_checkpoint(name_or_directory)
    config = _read_config(directory)
    config_path = directory / CONFIG_NAME
    sde, model, event_shape = _build(config, config_path)
    state = _read_weights(directory / WEIGHTS_NAME, config)
    _check_state_dict(state, model, directory / WEIGHTS_NAME)
    model.load_state_dict(state)
    model.to(device).eval().requires_grad_(False)
    options = dict(config["options"])
    _check_options(options, model, sde, event_shape, config_path)
    return model, sde, event_shape, options


def _build(config: dict, path: Path) -> tuple[ForwardSDE, ScoreNet, torch.Size]:
    try:
        sde = sde_from_config(config["sde"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: invalid SDE {config['sde']!r}: {err}") from err
    network = config["network"]
    if network.get("class") != "ScoreNet":
        raise CheckpointError(f"{path}: unsupported network class {network.get('class')!r}; only 'ScoreNet' loads")
    if config["dtype"] not in _DTYPES:
        raise CheckpointError(f"{path}: unsupported dtype {config['dtype']!r}; expected one of {sorted(_DTYPES)}")
    event_shape = _shape(config["event_shape"], "event_shape", path)
    net_shape = _shape(network.get("event_shape", config["event_shape"]), "network.event_shape", path)
    if math.prod(net_shape) != math.prod(event_shape):
        raise CheckpointError(f"{path}: event_shape {tuple(event_shape)} does not match network {tuple(net_shape)}")
    net_config = network.get("config", {})
    if not isinstance(net_config, dict):
        raise CheckpointError(f"{path}: network.config must be a JSON object")
    try:
        model = ScoreNet(sde, net_shape, **net_config)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: invalid ScoreNet config {net_config!r}: {err}") from err
    return sde, model.to(_DTYPES[config["dtype"]]), event_shape


def _shape(value, name: str, path: Path) -> torch.Size:
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in value)
    ):
        raise CheckpointError(f"{path}: {name} must be a non-empty list of positive integers, got {value!r}")
    return torch.Size(value)


def _read_weights(path: Path, config: dict) -> dict[str, torch.Tensor]:
    if not path.is_file():
        pickles = sorted(p.name for p in path.parent.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            raise UnsafeCheckpointError(
                f"{path} not found and {path.parent / pickles[0]} is refused: {_PICKLE_WARNING}"
            )
        raise CheckpointNotFoundError(f"{path} not found (a checkpoint needs config.json and model.safetensors)")
    expected = config.get("weights_sha256")
    if expected is not None and _sha256(path) != expected:
        raise CheckpointError(
            f"{path} is corrupted or was replaced: its SHA-256 does not match the one recorded in config.json"
        )
    try:
        return safetensors.torch.load_file(str(path), device="cpu")
    except Exception as err:  # SafetensorError derives from Exception only
        raise CheckpointError(f"{path} is not a valid safetensors file (truncated or corrupted?): {err}") from err


def _check_state_dict(state: dict[str, torch.Tensor], model: nn.Module, path: Path) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing keys {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_few(unexpected)}")
    shapes = [
        f"{k}: {tuple(state[k].shape)} in the file vs {tuple(v.shape)} in the model"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if shapes:
        problems.append(f"shape mismatch {_few(shapes)}")
    if problems:
        raise CheckpointError(f"{path} does not match the architecture in config.json: " + "; ".join(problems))
    for k, v in state.items():
        if v.dtype != expected[k].dtype:
            raise CheckpointError(f"{path}: tensor {k} has dtype {v.dtype}, config.json says {expected[k].dtype}")
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise CheckpointError(f"{path}: tensor {k} contains NaN or inf")


def _few(items: list[str], n: int = 4) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def _check_options(options: dict, model, sde, event_shape, path: Path) -> None:
    """Drop (with a warning) options this version does not know; raise for invalid values of known ones."""
    unknown = sorted(set(options) - set(SolverOptions.names()))
    if unknown:
        warnings.warn(
            f"{path}: ignoring solver options unknown to this version of pyro_scoreflow: {', '.join(unknown)}",
            stacklevel=3,
        )
        for key in unknown:
            del options[key]
    try:
        SolverOptions(**options).check_sde(sde)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: invalid solver options {options!r}: {err}") from err
