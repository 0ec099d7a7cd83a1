r"""Checkpoints of score priors: ``config.json`` plus a safetensors weights file, never pickle.

This module does file I/O only: it writes and reads a network, its SDE, the prior's event shape and
its solver options; :meth:`ScoreSDEPrior.from_pretrained <pyro_scoreflow.ScoreSDEPrior.from_pretrained>`
builds the prior from them.

**Layout** (format 2). A checkpoint is a directory holding

* ``config.json``: the format version, the package version, the forward SDE (``sde.config()``), the
  network (class ``"ScoreNet"``, the event shape it was built for and its ``config``), the prior's
  event shape, its solver options (:class:`~pyro_scoreflow.options.SolverOptions`, by name), the
  weights' dtype, the name and SHA-256 of the weights file, and free-form ``metadata``;
* ``model-<first 16 hex digits of its SHA-256>.safetensors``: the network's ``state_dict``, named by
  ``config.json``; ``model.safetensors`` is the same file (a hard link, else a copy) under the plain name
  that tools expect, updated after each save.

Format 1 (earlier versions: the weights in ``model.safetensors``, no ``weights_file`` in the config) is
still read, so are the shipped priors.

**Why safetensors.** ``torch.load`` unpickles, and unpickling can run arbitrary code. A safetensors
file is a JSON header plus raw tensor bytes, and only ``ScoreNet`` can be rebuilt from a config (no
class is imported by name), so loading a checkpoint never executes code from it. Pickle-based files
(``.pt``, ``.pth``, ``.bin``, ``.pkl``, ``.ckpt``) are refused with :class:`UnsafeCheckpointError`.

**Hostile files.** ``config.json`` is read only up to :data:`MAX_CONFIG_BYTES`; every number in it is
bounded (the network's by :class:`~pyro_scoreflow.networks.ScoreNet`, the event shape by
:data:`MAX_EVENT_SIZE`); and the tensor shapes the config implies (from a network whose parameters
live on PyTorch's ``meta`` device, which allocates nothing) are checked against the safetensors
header before any memory is allocated for the network, so the network built can never be larger
than the weights file on disk.

**Concurrent and interrupted saves.** The weights file of each save has a new name and is never
changed once written; ``config.json``, replaced atomically (``os.replace``) after the weights file is
complete and synced, is the pointer to it. So a reader reads ``config.json`` once and then opens the
weights file it names: it sees the old checkpoint or the new one, never a mixture (should a save
delete the file between the two reads, the reader reads the new ``config.json`` again). Writers take
an exclusive lock on the directory (``fcntl.flock``; waiting up to :data:`LOCK_TIMEOUT` seconds, then
:class:`CheckpointLockedError`), so concurrent saves run one after the other and the last one wins.
Temporary files are named ``.tmp-<pid>-<random>-<name>``; a killed save leaves at most such files
and an unreferenced weights file, which the next save removes, together with every weights file
other than the new one and the one it replaced (kept for readers that read the previous
``config.json`` a moment ago). An exception during a save leaves the previous checkpoint untouched.

Shipped priors live in ``pyro_scoreflow/pretrained/<name>/`` (:func:`pretrained_names`); see
``docs/pretrained.md`` for their quality and ``scripts/train_pretrained.py`` for how they were made.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import safetensors.torch
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ._version import __version__
from .checks import ArgumentTypeError, check_bool, check_device, check_optional
from .networks import ScoreNet
from .options import SolverOptions
from .sde import ForwardSDE, sde_from_config

try:  # POSIX: writers lock the checkpoint directory
    import fcntl
except ImportError:  # pragma: no cover - Windows: saves stay atomic for readers, concurrent writers are not serialised
    fcntl = None

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "FORMAT_VERSION",
    "CheckpointError",
    "CheckpointLockedError",
    "CheckpointNotFoundError",
    "UnsafeCheckpointError",
    "save_checkpoint",
    "check_save_target",
    "load_checkpoint",
    "read_config",
    "weights_file",
    "pretrained_names",
    "pretrained_path",
    "resolve_checkpoint",
]

CONFIG_NAME = "config.json"
#: the weights file of format 1 (format 2 names it ``model-<hash>.safetensors``, see the module docstring)
WEIGHTS_NAME = "model.safetensors"
FORMAT_NAME = "pyro_scoreflow.checkpoint"
FORMAT_VERSION = 2
READABLE_FORMAT_VERSIONS = (1, 2)
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")
PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained"

#: ``config.json`` files larger than this are refused unread (a real one is a few kB)
MAX_CONFIG_BYTES = 1 << 20
#: safetensors headers larger than this are refused (a ScoreNet's lists a few hundred tensors in a few kB)
MAX_HEADER_BYTES = 16 << 20
#: the largest event size (values per draw) a checkpoint may declare
MAX_EVENT_SIZE = 2**24
#: seconds a save waits for another process's save into the same directory before giving up
LOCK_TIMEOUT = 120.0
#: how often a reader rereads a checkpoint that other processes keep replacing under it
_READ_ATTEMPTS = 20
#: temporaries of the pre-format-2 saves (``.NAME.tmp-<hex>`` next to the checkpoint) older than this are removed
_LEGACY_TEMPORARY_AGE = 3600.0

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
_SAFETENSORS_DTYPES = {"F32": torch.float32, "F64": torch.float64, "F16": torch.float16, "BF16": torch.bfloat16}
_WEIGHTS_FILE = re.compile(r"model-[0-9a-f]{16}\.safetensors")
_TEMPORARY = re.compile(r"\.tmp-[0-9]+-[0-9a-f]{12}-.*")
_PICKLE_WARNING = (
    "pickle-based files are refused because unpickling can run arbitrary code; "
    "only config.json + safetensors checkpoints are loaded"
)


class CheckpointError(ValueError):
    """A checkpoint is invalid: bad or unsupported config, corrupted weights, weights not matching the config."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No checkpoint directory and no shipped prior of that name (or a checkpoint file is missing)."""


class UnsafeCheckpointError(CheckpointError):
    """The checkpoint is a pickle-based file (``.pt``/``.pth``/``.bin``/``.pkl``), which is never loaded."""


class CheckpointLockedError(CheckpointError, TimeoutError):
    """Another process kept saving into the same checkpoint directory for longer than :data:`LOCK_TIMEOUT`."""


# -- finding checkpoints ----------------------------------------------------------------------------
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
    """The checkpoint directory for a shipped name or a directory path.

    **Precedence.** A string equal to the name of a shipped prior (:func:`pretrained_names`, e.g.
    ``"moons"``) always means the shipped prior, even when the working directory holds a folder of that
    name (a ``UserWarning`` then says so). Any other string, and every ``os.PathLike`` (``pathlib.Path``),
    is a path: write a local directory that shares a shipped name as ``"./moons"`` or ``Path("moons")``.

    :raises UnsafeCheckpointError: for a pickle-based file (``model.pt`` and the like).
    :raises CheckpointNotFoundError: for anything else that is neither a directory nor a shipped name.
    """
    if isinstance(name_or_directory, str) and name_or_directory in pretrained_names():
        if os.path.lexists(name_or_directory):
            warnings.warn(
                f"{name_or_directory!r} names the shipped prior; the {name_or_directory!r} in the working directory "
                f"is not loaded (to load it, write it as a path: './{name_or_directory}' or "
                f"pathlib.Path({name_or_directory!r}))",
                UserWarning,
                stacklevel=3,
            )
        return PRETRAINED_DIR / name_or_directory
    if not isinstance(name_or_directory, (str, os.PathLike)):
        raise ArgumentTypeError(f"name_or_directory must be a str or path, got {type(name_or_directory).__name__}")
    path = Path(name_or_directory)
    if path.is_dir():
        return path
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UnsafeCheckpointError(f"{path}: {_PICKLE_WARNING}")
    if path.is_file():
        if path.name == CONFIG_NAME or path.name == WEIGHTS_NAME or _WEIGHTS_FILE.fullmatch(path.name):
            return path.parent
        raise CheckpointError(f"{path} is a file; expected a checkpoint directory (config.json + weights)")
    raise CheckpointNotFoundError(
        f"{str(name_or_directory)!r} is neither a checkpoint directory nor a shipped prior "
        f"(shipped priors: {_names_text()}){_interrupted_save_hint(path)}"
    )


def _interrupted_save_hint(path: Path) -> str:
    """Saves of earlier versions swapped directories; a crash could leave the previous one as ``.NAME.old-*``."""
    parent = path.parent if str(path.parent) else Path(".")
    try:
        backups = sorted(parent.glob(f".{path.name}.old-*")) if path.name else []
    except OSError:
        backups = []
    if backups:
        return f"; an interrupted save left the previous checkpoint in {backups[-1]}"
    return ""


# -- saving -------------------------------------------------------------------------------------------
def save_checkpoint(
    directory: str | os.PathLike,
    score_model: nn.Module,
    sde: ForwardSDE,
    event_shape: Sequence[int],
    options: Mapping[str, Any] | SolverOptions | None = None,
    *,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write a checkpoint (``config.json`` and the weights) to ``directory``, atomically (module docstring).

    An existing checkpoint there is replaced; other files in the directory are left alone. A non-empty
    directory that holds no checkpoint (or a ``config.json`` of something else) is refused, so
    ``save_checkpoint(".")`` cannot clobber a working directory. Safe against concurrent readers and
    writers and against a save killed midway (module docstring).

    :param score_model: a :class:`~pyro_scoreflow.networks.ScoreNet` (other models cannot be rebuilt
        without running code, so they are refused with ``TypeError``).
    :param sde: the forward SDE; must equal ``score_model.sde``.
    :param event_shape: the prior's event shape (``score_model.event_shape`` or its flattening).
    :param options: the prior's solver options: a :class:`~pyro_scoreflow.options.SolverOptions` or
        keyword options (validated by it).
    :param metadata: free-form JSON-serialisable notes stored in the config (e.g. training settings).
    :returns: the checkpoint directory.
    :raises CheckpointLockedError: when another process's save into ``directory`` takes over :data:`LOCK_TIMEOUT`.
    """
    config = _make_config(score_model, sde, event_shape, options, metadata)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in score_model.state_dict().items()}
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:  # refuse before touching the target: a diverged model must not replace a good checkpoint
        raise ValueError(
            f"refusing to save non-finite weights (NaN or inf in {', '.join(bad[:3])}"
            f"{' and more' if len(bad) > 3 else ''}); {directory} is left as it was"
        )
    data = safetensors.torch.save(tensors, metadata={"format": "pt"})
    digest = hashlib.sha256(data).hexdigest()
    config["weights_file"] = f"model-{digest[:16]}.safetensors"
    config["weights_sha256"] = digest
    text = json.dumps(config, indent=2, allow_nan=False) + "\n"

    target = Path(directory)
    if target.is_symlink():
        target = Path(os.path.realpath(target))
    check_save_target(target)
    target.mkdir(parents=True, exist_ok=True)  # honours the umask
    with _writer_lock(target) as locked:
        check_save_target(target)  # again: another writer may have changed the directory meanwhile
        previous = _current_weights_name(target)
        weights = target / config["weights_file"]
        placed = False
        try:
            _write_atomically(weights, data)
            placed = True
            _fsync_dir(target)  # the weights file is in place for good before config.json points to it
            _write_atomically(target / CONFIG_NAME, text.encode("utf-8"))  # the switch
        except BaseException:
            if placed and weights.name != previous:
                _remove(weights)
            raise
        _fsync_dir(target)
        _publish_plain_name(weights)
        _collect_garbage(target, {weights.name, previous, WEIGHTS_NAME}, locked)
    _remove_legacy_temporaries(target)
    return target


def _make_config(score_model, sde, event_shape, options, metadata) -> dict:
    if type(score_model) is not ScoreNet:
        raise ArgumentTypeError(
            f"only pyro_scoreflow.networks.ScoreNet models can be saved (their architecture is rebuilt from a "
            f"JSON config, so loading runs no code); got {type(score_model).__name__}"
        )
    if not isinstance(sde, ForwardSDE):
        raise ArgumentTypeError(f"sde must be a VPSDE, SubVPSDE or VESDE (a ForwardSDE), got {type(sde).__name__}")
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
    if isinstance(options, SolverOptions):
        options = options.as_dict()
    options = dict(options or {})
    SolverOptions().replace(**options).check_sde(sde)  # refuse now what loading would refuse
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
        "options": options,
        "dtype": str(next(iter(dtypes))).removeprefix("torch."),
        "metadata": dict(metadata or {}),
    }
    try:
        text = json.dumps(config, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ValueError(f"options and metadata must be JSON-serialisable (finite numbers): {err}") from err
    if len(text) > MAX_CONFIG_BYTES // 2:
        raise ValueError(
            f"metadata too large: the config would take {len(text)} bytes (at most {MAX_CONFIG_BYTES // 2})"
        )
    return config


def check_save_target(directory: str | os.PathLike) -> None:
    """Raise :class:`CheckpointError` now if :func:`save_checkpoint` would refuse ``directory``
    (an existing file, a ``config.json`` that is no pyro_scoreflow checkpoint's, or a non-empty directory
    without a checkpoint): call it before a long training run."""
    target = Path(directory)
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"{target} exists and is not a directory")
    if not target.is_dir():
        return
    if (target / CONFIG_NAME).exists():
        try:
            _parse_config(_read_config_bytes(target / CONFIG_NAME), target / CONFIG_NAME)
        except CheckpointError as err:
            raise CheckpointError(
                f"{target} holds a config.json that is not a readable pyro_scoreflow checkpoint ({err}); saving would "
                "replace it, so choose another directory (or delete it)"
            ) from None
        return
    others = sorted(p.name for p in target.iterdir() if not _is_ours(p.name))
    if others:
        raise CheckpointError(
            f"{target} is a non-empty directory without a checkpoint (it holds {_few(others)}); choose a new or "
            "empty directory"
        )


def _is_ours(name: str) -> bool:
    """A file a save writes: a temporary or a weights file."""
    return bool(_TEMPORARY.fullmatch(name) or _WEIGHTS_FILE.fullmatch(name))


@contextlib.contextmanager
def _writer_lock(directory: Path) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on ``directory`` (waiting up to :data:`LOCK_TIMEOUT`); yields whether it is held."""
    if fcntl is None:  # pragma: no cover - no flock on this platform
        yield False
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        deadline = time.monotonic() + LOCK_TIMEOUT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise CheckpointLockedError(
                        f"another process has been saving into {directory} for over {LOCK_TIMEOUT:g} s; nothing was "
                        "written: try again once it is done"
                    ) from None
                time.sleep(0.01)
            except OSError as err:  # e.g. ENOLCK on some network file systems
                warnings.warn(
                    f"cannot lock {directory} ({err}); saving without: concurrent saves there are not serialised",
                    stacklevel=4,
                )
                yield False
                return
        yield True
    finally:
        os.close(fd)  # releases the lock (so does the kernel if the process dies)


def _write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary sibling, fsync it, rename it to ``path`` (mode from the umask, as for ``open``)."""
    tmp = path.with_name(f".tmp-{os.getpid()}-{secrets.token_hex(6)}-{path.name}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        with open(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def _current_weights_name(directory: Path) -> str | None:
    """The weights file the directory's ``config.json`` names now (None if there is no readable one)."""
    try:
        return _weights_name(_parse_config(_read_config_bytes(directory / CONFIG_NAME), directory / CONFIG_NAME))
    except (CheckpointError, OSError):
        return None


def _publish_plain_name(weights: Path) -> None:
    """Make ``model.safetensors`` the new weights too (a hard link, else a copy; replaced atomically), for tools
    that expect that name. Loading follows ``config.json``; a save killed before this leaves the previous
    weights under that name, which the next save replaces."""
    tmp = weights.parent / f".tmp-{os.getpid()}-{secrets.token_hex(6)}-{WEIGHTS_NAME}"
    try:
        os.link(weights, tmp)
    except OSError:  # no hard links on this file system
        shutil.copyfile(weights, tmp)
    try:
        os.replace(tmp, weights.parent / WEIGHTS_NAME)
    except BaseException:
        _remove(tmp)
        raise


def _collect_garbage(directory: Path, keep: set, locked: bool) -> None:
    """Remove temporaries and weights files other than ``keep``. Without the lock (no ``flock``), only those over
    an hour old: another process may be writing them."""
    for entry in directory.iterdir():
        name = entry.name
        if name in keep or not _is_ours(name):
            continue
        if not locked and _age(entry) < _LEGACY_TEMPORARY_AGE:  # pragma: no cover - no flock
            continue
        _remove(entry)


def _remove_legacy_temporaries(target: Path) -> None:
    """Temporary directories ``.NAME.tmp-<hex>`` that saves of earlier versions left next to ``NAME`` when killed."""
    try:
        leftovers = list(target.parent.glob(f".{target.name}.tmp-*"))
    except OSError:
        return
    for path in leftovers:
        if re.fullmatch(r"[0-9a-f]{12}", path.name.rsplit(".tmp-", 1)[-1]) and _age(path) > _LEGACY_TEMPORARY_AGE:
            shutil.rmtree(path, ignore_errors=True)


def _age(path: Path) -> float:
    try:
        return time.time() - path.lstat().st_mtime
    except OSError:
        return 0.0


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


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


# -- reading --------------------------------------------------------------------------------------------
def read_config(name_or_directory: str | os.PathLike) -> dict:
    """The checked ``config.json`` of a checkpoint directory or shipped prior (no weights are read)."""
    directory = resolve_checkpoint(name_or_directory)
    return _parse_config(_read_config_bytes(directory / CONFIG_NAME), directory / CONFIG_NAME)


def weights_file(name_or_directory: str | os.PathLike) -> Path:
    """The weights file that the checkpoint's ``config.json`` names now (``model-<hash>.safetensors``, or
    ``model.safetensors`` for format 1)."""
    directory = resolve_checkpoint(name_or_directory)
    return directory / _weights_name(read_config(directory))


def _read_config_bytes(path: Path) -> bytes:
    """The bytes of ``config.json`` (one read: a concurrent save replaces the file, never edits it)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_CONFIG_BYTES:
                raise CheckpointError(f"{path} is {size} bytes; a config.json holds at most {MAX_CONFIG_BYTES}")
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        directory = path.parent
        pickles = sorted(p.name for p in directory.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            raise UnsafeCheckpointError(f"{directory / pickles[0]}: {_PICKLE_WARNING}") from None
        raise CheckpointNotFoundError(f"{path} not found: {directory} is not a pyro_scoreflow checkpoint") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path} is a directory, not a file") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise CheckpointError(f"{path} holds more than {MAX_CONFIG_BYTES} bytes")
    return raw


def _parse_config(raw: bytes, path: Path) -> dict:
    try:
        config = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:  # RecursionError: deeply nested JSON
        raise CheckpointError(f"{path} is not valid JSON: {type(err).__name__}: {str(err)[:200]}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(config).__name__}")
    if config.get("format") != FORMAT_NAME:
        raise CheckpointError(
            f"{path} is not a pyro_scoreflow checkpoint config (format {str(config.get('format'))[:100]!r})"
        )
    version = config.get("format_version")
    if isinstance(version, bool) or version not in READABLE_FORMAT_VERSIONS:
        raise CheckpointError(
            f"{path} has format_version {str(version)[:100]}, but this version of pyro_scoreflow reads format_version "
            f"{' or '.join(map(str, READABLE_FORMAT_VERSIONS))} (saved by pyro_scoreflow "
            f"{str(config.get('package_version', '?'))[:100]})"
        )
    for key, kind in (("sde", dict), ("network", dict), ("event_shape", list), ("dtype", str)):
        if not isinstance(config.get(key), kind):
            raise CheckpointError(f"{path}: {key!r} is missing or not a JSON {kind.__name__.replace('dict', 'object')}")
    for key in ("options", "metadata"):
        if not isinstance(config.setdefault(key, {}), dict):
            raise CheckpointError(f"{path}: {key!r} must be a JSON object")
    if version >= 2 and not (
        isinstance(config.get("weights_file"), str) and _WEIGHTS_FILE.fullmatch(config["weights_file"])
    ):
        raise CheckpointError(f"{path}: 'weights_file' must be a name model-<16 hex digits>.safetensors")
    if config.get("weights_sha256") is not None and not isinstance(config["weights_sha256"], str):
        raise CheckpointError(f"{path}: 'weights_sha256' must be a string")
    return config


def _weights_name(config: dict) -> str:
    return config["weights_file"] if config["format_version"] >= 2 else WEIGHTS_NAME


def _open_checkpoint(directory: Path) -> tuple[dict, Path, BinaryIO]:
    """``config.json`` and the open weights file it names, consistent even while other processes save there."""
    config_path = directory / CONFIG_NAME
    for _ in range(_READ_ATTEMPTS):
        raw = _read_config_bytes(config_path)
        config = _parse_config(raw, config_path)
        path = directory / _weights_name(config)
        try:
            return config, path, open(path, "rb")  # noqa: SIM115 - the caller closes it
        except IsADirectoryError:
            raise CheckpointError(f"{path} is a directory, not a weights file") from None
        except FileNotFoundError:
            try:
                replaced = _read_config_bytes(config_path) != raw
            except CheckpointNotFoundError:
                replaced = False
            if replaced:  # a save replaced config.json and deleted the old weights meanwhile: read the new pair
                continue
            pickles = sorted(p.name for p in directory.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
            if pickles:
                raise UnsafeCheckpointError(
                    f"{path} not found and {directory / pickles[0]} is refused: {_PICKLE_WARNING}"
                ) from None
            raise CheckpointNotFoundError(f"{path} not found (config.json names it as the weights file)") from None
    raise CheckpointError(f"{directory} was replaced {_READ_ATTEMPTS} times while being read; try again")


def load_checkpoint(
    name_or_directory: str | os.PathLike,
    map_location: str | torch.device | None = None,
    *,
    trainable: bool = False,
) -> tuple[ScoreNet, ForwardSDE, torch.Size, dict]:
    """Load a checkpoint directory or a shipped prior (e.g. ``"moons"``) without unpickling anything.

    :param name_or_directory: a directory written by :func:`save_checkpoint` or a name of
        :func:`pretrained_names` (a shipped name wins over a local folder of that name: see
        :func:`resolve_checkpoint`).
    :param map_location: device for the weights (default CPU), e.g. ``"cuda"``; ``ValueError`` if this
        machine has no such device.
    :param bool trainable: ``False`` (default): the network's weights are frozen
        (``requires_grad_(False)``), so ``log_prob`` builds no graph through them (faster) while
        gradients with respect to the value still flow. ``True``: they require gradients, for
        fine-tuning (``fit``, or SVI with ``pyro.module``). The network is in eval mode either way.
    :returns: ``(score_model, sde, event_shape, options)``: the network, its SDE, the prior's event shape and
        its saved solver options (validated keyword options of ``ScoreSDEPrior``; names this version does
        not know are dropped with a warning).
    :raises CheckpointNotFoundError: unknown name or directory (the message lists the shipped names), missing file.
    :raises UnsafeCheckpointError: a pickle-based file.
    :raises CheckpointError: invalid or oversized config, unknown format version, truncated or corrupted weights,
        weights that do not match the architecture.
    """
    device = check_optional(check_device, "map_location", map_location) or torch.device("cpu")
    trainable = check_bool("trainable", trainable)
    directory = resolve_checkpoint(name_or_directory)
    config, weights_path, f = _open_checkpoint(directory)
    config_path = directory / CONFIG_NAME
    with f:
        sde, net_shape, net_config, dtype, event_shape = _parse_network(config, config_path)
        options = _check_options(dict(config["options"]), sde, config_path)
        expected = _expected_tensors(sde, net_shape, net_config, dtype, config_path)
        state = _read_weights(f, weights_path, config, expected)
    model = ScoreNet(sde, net_shape, **net_config).to(dtype)  # no larger than the weights file (checked)
    model.load_state_dict(state)
    model.to(device).eval().requires_grad_(trainable)
    return model, sde, event_shape, options


def _parse_network(config: dict, path: Path) -> tuple[ForwardSDE, torch.Size, dict, torch.dtype, torch.Size]:
    try:
        sde = sde_from_config(config["sde"])
    except (KeyError, TypeError, ValueError, OverflowError) as err:
        raise CheckpointError(f"{path}: invalid SDE {str(config['sde'])[:200]}: {err}") from err
    network = config["network"]
    if network.get("class") != "ScoreNet":
        cls = str(network.get("class"))[:100]
        raise CheckpointError(f"{path}: unsupported network class {cls!r}; only 'ScoreNet' loads")
    if config["dtype"] not in _DTYPES:
        raise CheckpointError(f"{path}: unsupported dtype {config['dtype'][:100]!r}; expected one of {sorted(_DTYPES)}")
    event_shape = _shape(config["event_shape"], "event_shape", path)
    net_shape = _shape(network.get("event_shape", config["event_shape"]), "network.event_shape", path)
    if math.prod(net_shape) != math.prod(event_shape):
        raise CheckpointError(f"{path}: event_shape {tuple(event_shape)} does not match network {tuple(net_shape)}")
    net_config = network.get("config", {})
    if not isinstance(net_config, dict):
        raise CheckpointError(f"{path}: network.config must be a JSON object")
    return sde, net_shape, net_config, _DTYPES[config["dtype"]], event_shape


def _shape(value, name: str, path: Path) -> torch.Size:
    if (
        not isinstance(value, list)
        or not 0 < len(value) <= 8
        or not all(isinstance(s, int) and not isinstance(s, bool) and 0 < s <= MAX_EVENT_SIZE for s in value)
        or math.prod(value) > MAX_EVENT_SIZE
    ):
        raise CheckpointError(
            f"{path}: {name} must be a list of 1 to 8 positive integers with at most {MAX_EVENT_SIZE} values in all, "
            f"got {str(value)[:100]}"
        )
    return torch.Size(value)


def _check_options(options: dict, sde: ForwardSDE, path: Path) -> dict:
    """The saved options, validated by :class:`SolverOptions`; names unknown to this version dropped with a warning."""
    unknown = sorted(set(options) - set(SolverOptions.names()))
    if unknown:
        warnings.warn(
            f"{path}: ignoring solver options unknown to this version of pyro_scoreflow: {_few(unknown)}",
            stacklevel=3,
        )
        options = {k: v for k, v in options.items() if k not in unknown}
    try:
        checked = SolverOptions(**options).check_sde(sde)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: invalid solver options: {err}") from err
    return {name: getattr(checked, name) for name in options}


def _expected_tensors(sde, net_shape, net_config, dtype, path: Path) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """Name -> (shape, dtype) of the state dict the config implies, from a network whose parameters take no memory."""
    try:
        with _MetaParameters():
            model = ScoreNet(sde, net_shape, **net_config).to(dtype)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: invalid ScoreNet config {str(net_config)[:300]}: {err}") from err
    return {k: (v.shape, v.dtype) for k, v in model.state_dict().items()}


class _MetaParameters(TorchFunctionMode):
    """Makes ``torch.empty``, which ``nn`` layers allocate their parameters with, return tensors on the meta device
    (shapes and dtypes, no memory), and skips in-place initialisation (``uniform_``, ``normal_``, ...) of meta
    tensors. Other tensors (e.g. the buffers a module computes) stay real and small.

    Not the ``torch.device("meta")`` context: its kernels for ``linspace`` and ``normal_`` import sympy and
    torch._dynamo on first use, seconds of every process's first load.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.empty:
            return func(*args, **{**kwargs, "device": "meta"})
        name = getattr(func, "__name__", "")
        target = args[0] if args else kwargs.get("tensor")  # nn.init functions pass it by keyword
        if name.endswith("_") and not name.startswith("_") and isinstance(target, torch.Tensor) and target.is_meta:
            return target
        return func(*args, **kwargs)


def _read_weights(f: BinaryIO, path: Path, config: dict, expected: dict) -> dict[str, torch.Tensor]:
    """Check the safetensors header against ``expected`` (before reading the data), then the SHA-256, then load."""
    size = os.fstat(f.fileno()).st_size
    invalid = f"{path} is not a valid safetensors file (truncated or corrupted?)"
    head = f.read(8)
    header_len = int.from_bytes(head, "little") if len(head) == 8 else -1
    if not 2 <= header_len <= min(MAX_HEADER_BYTES, size - 8):
        raise CheckpointError(f"{invalid}: bad header length")
    try:
        header = json.loads(f.read(header_len).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise CheckpointError(f"{invalid}: {type(err).__name__} in the header") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{invalid}: the header is not a JSON object")
    header.pop("__metadata__", None)
    _check_header(header, expected, path)
    end = max((_offsets(entry, path)[1] for entry in header.values()), default=0)
    if 8 + header_len + end != size:
        raise CheckpointError(f"{invalid}: {size} bytes, the header describes {8 + header_len + end}")
    f.seek(0)
    data = f.read()
    expected_sha = config.get("weights_sha256")
    if expected_sha is not None and hashlib.sha256(data).hexdigest() != expected_sha:
        raise CheckpointError(
            f"{path} is corrupted or was replaced: its SHA-256 does not match the one recorded in config.json"
        )
    try:
        state = safetensors.torch.load(data)
    except Exception as err:  # SafetensorError derives from Exception only
        raise CheckpointError(f"{invalid}: {err}") from err
    for k, v in state.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise CheckpointError(f"{path}: tensor {k} contains NaN or inf")
    return state


def _offsets(entry, path: Path) -> tuple[int, int]:
    offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) and o >= 0 for o in offsets)):
        raise CheckpointError(f"{path} is not a valid safetensors file (truncated or corrupted?): bad data_offsets")
    return offsets[0], offsets[1]


def _check_header(header: dict, expected: dict, path: Path) -> None:
    """The tensors the header lists must be those of the architecture in config.json: names, shapes, dtypes."""
    missing = sorted(set(expected) - set(header))
    unexpected = sorted(set(header) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing keys {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_few([k[:100] for k in unexpected])}")
    shapes = []
    for k, (shape, _) in expected.items():
        entry = header.get(k)
        if k in header and (not isinstance(entry, dict) or entry.get("shape") != list(shape)):
            file_shape = entry.get("shape") if isinstance(entry, dict) else entry
            shapes.append(f"{k}: {str(file_shape)[:50]} in the file vs {tuple(shape)} in the model")
    if shapes:
        problems.append(f"shape mismatch {_few(shapes)}")
    if problems:
        raise CheckpointError(f"{path} does not match the architecture in config.json: " + "; ".join(problems))
    for k, (_, dtype) in expected.items():
        found = _SAFETENSORS_DTYPES.get(header[k].get("dtype"))
        if found != dtype:
            raise CheckpointError(
                f"{path}: tensor {k} has dtype {str(header[k].get('dtype'))[:20]}, config.json says {dtype}"
            )


def _few(items: list[str], n: int = 4) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")
