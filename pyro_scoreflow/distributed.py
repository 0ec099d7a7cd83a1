"""Small helpers for training under ``torch.distributed`` (``torchrun``); see ``docs/distributed.md``.

Every helper works, and answers as for a single process, when ``torch.distributed``
is unavailable or no process group has been initialised, so code can call them
unconditionally: ``if is_main_process(): save(...)``.
"""

from __future__ import annotations

import atexit
import os

import torch
import torch.distributed as dist

__all__ = ["is_initialized", "rank", "world_size", "local_rank", "is_main_process", "init_from_env", "barrier"]

#: what ``torchrun`` (``python -m torch.distributed.run``) sets for every process it launches
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def is_initialized() -> bool:
    """Whether ``torch.distributed`` is available and a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def _launched_by_torchrun() -> bool:
    return all(name in os.environ for name in TORCHRUN_ENV)


def rank() -> int:
    """This process's rank: the process group's if one is initialised, else ``$RANK`` under torchrun, else 0."""
    if is_initialized():
        return dist.get_rank()
    return int(os.environ["RANK"]) if _launched_by_torchrun() else 0


def world_size() -> int:
    """The number of processes: the process group's, else ``$WORLD_SIZE`` under torchrun, else 1."""
    if is_initialized():
        return dist.get_world_size()
    return int(os.environ["WORLD_SIZE"]) if _launched_by_torchrun() else 1


def local_rank() -> int:
    """This process's rank on its machine (``$LOCAL_RANK``, 0 when not launched by torchrun)."""
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main_process() -> bool:
    """True on rank 0 (and in a plain single process): the one process that writes files and logs."""
    return rank() == 0


def init_from_env(backend: str | None = None) -> bool:
    """Initialise the default process group from torchrun's environment, if there is one.

    Does nothing and returns True when a process group is already initialised;
    returns False (initialising nothing) when ``torch.distributed`` is unavailable
    or the process was not launched by torchrun (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` not all set).

    :param backend: ``"nccl"`` or ``"gloo"``; by default NCCL when CUDA is
        available (each process then uses GPU ``$LOCAL_RANK``, made the current
        CUDA device), else gloo.
    :returns: whether a process group is initialised on return.
    """
    if is_initialized():
        return True
    if not dist.is_available() or not _launched_by_torchrun():
        return False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend=backend)
    atexit.register(_destroy)
    return True


def _destroy() -> None:
    if is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every process of the group; a no-op without one."""
    if is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
