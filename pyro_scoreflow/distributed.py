"""Training under ``torch.distributed`` (``torchrun``); see ``docs/distributed.md``.

The public helpers work, and answer as for a single process, when ``torch.distributed``
is unavailable or no process group has been initialised, so code can call them
unconditionally: ``if is_main_process(): save(...)``.

The rest is how :func:`~pyro_scoreflow.training.fit` shards its work: :func:`setup_group` finds (or
initialises) the process group, :func:`shared_seed` agrees on one seed, and every process keeps
``batch_size // world_size`` points of each global batch (:func:`local_batch_size`), or reads a
``DataLoader`` rebuilt around a ``DistributedSampler`` (:func:`shard_loader`).
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, RandomSampler, SequentialSampler

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


# -- sharding fit's work ------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainingGroup:
    """The default process group as :func:`~pyro_scoreflow.training.fit` uses it."""

    rank: int
    world_size: int
    nccl: bool  # collectives need CUDA tensors


def setup_group(distributed: bool | str) -> TrainingGroup | None:
    """The process group to train over (initialised from torchrun's environment if need be), or None for one process.

    ``distributed`` is ``fit``'s argument: ``False`` ignores any process group, ``"auto"`` uses one if there is one,
    ``True`` raises ``RuntimeError`` if there is none.
    """
    if distributed is False:
        return None
    if not init_from_env():
        if distributed is True:
            raise RuntimeError(
                "fit(distributed=True) needs an initialised torch.distributed process group or torchrun's "
                "environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)"
            )
        return None
    if dist.get_world_size() == 1:
        return None
    backend = str(dist.get_backend())
    return TrainingGroup(dist.get_rank(), dist.get_world_size(), nccl="nccl" in backend and "gloo" not in backend)


def local_batch_size(name: str, batch_size: int, world_size: int) -> int:
    """Each process's share of a global batch; ``ValueError`` naming ``name`` unless ``world_size`` divides it."""
    if batch_size % world_size:
        raise ValueError(
            f"{name} ({batch_size}) must be divisible by the number of processes ({world_size}): "
            f"each process takes {name} // {world_size} points of every step's global batch"
        )
    return batch_size // world_size


def shared_seed(seed: int | None, group: TrainingGroup) -> int:
    """``seed``, or (for ``None``) a seed drawn from rank 0's global RNG and broadcast to every process."""
    if seed is not None:
        return seed
    value = torch.randint(0, 2**62, (1,))
    if group.nccl:
        value = value.cuda()
    dist.broadcast(value, src=0)
    return int(value.item())


def _shards_itself(loader: DataLoader) -> bool:
    return isinstance(loader.sampler, DistributedSampler) or isinstance(loader.dataset, IterableDataset)


def check_shardable(loader: DataLoader, world_size: int) -> None:
    """Raise ``ValueError`` unless :func:`shard_loader` can split ``loader`` over ``world_size`` processes."""
    if _shards_itself(loader):
        return  # used as is
    if loader.batch_size is None or not isinstance(loader.sampler, (RandomSampler, SequentialSampler)):
        raise ValueError(
            "a DataLoader with a custom sampler or batch_sampler cannot be sharded over processes: "
            "give one whose sampler is a torch.utils.data.DistributedSampler"
        )
    local_batch_size("the DataLoader's batch_size", loader.batch_size, world_size)


def shard_loader(loader: DataLoader, group: TrainingGroup, seed: int) -> DataLoader:
    """The loader rebuilt around a ``DistributedSampler``: its batch size is split over the processes.

    A loader whose sampler is already a ``DistributedSampler``, or whose dataset is an ``IterableDataset``,
    is returned as it is (it shards itself).
    """
    if _shards_itself(loader):
        return loader
    sampler = DistributedSampler(
        loader.dataset, num_replicas=group.world_size, rank=group.rank,
        shuffle=isinstance(loader.sampler, RandomSampler), seed=seed,
    )  # fmt: skip
    workers = {}
    if loader.num_workers > 0:
        workers = {"prefetch_factor": loader.prefetch_factor, "persistent_workers": loader.persistent_workers,
                   "multiprocessing_context": loader.multiprocessing_context}  # fmt: skip
    return DataLoader(
        loader.dataset, batch_size=loader.batch_size // group.world_size, sampler=sampler,
        num_workers=loader.num_workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
        drop_last=loader.drop_last, timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
        generator=loader.generator, **workers,
    )  # fmt: skip
