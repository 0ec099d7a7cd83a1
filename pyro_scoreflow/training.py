r"""Training score models by denoising score matching: :func:`fit`.

The objective, the time sampling of the two weightings (``"score"`` and ``"likelihood"``) and the
loss of a batch live in :mod:`pyro_scoreflow.losses`; this module runs the optimisation, and
:mod:`pyro_scoreflow.distributed` shards it over processes.

Optimisation: Adam, gradient-norm clipping, and an exponential moving average
(EMA) of the weights, whose decay ramps up as
:math:`\min(d, (1 + k)/(10 + k))` after :math:`k` updates so that short runs
are not dominated by the initial weights. :func:`fit` returns the model with
the EMA weights loaded; the raw weights stay in ``model.fit_history``. A
non-finite training loss stops training with :class:`TrainingDivergedError`
and restores the weights the model had before ``fit``.

Randomness: each step draws, in this order, the data indices of the whole
batch (epochs of random permutations), then :math:`u` (the times) and then
:math:`z` for every point of that batch. Under ``torch.distributed`` (see
``docs/distributed.md``) every process draws that same global batch from the
shared seed and keeps its own slice of ``batch_size / world_size`` points, so
data-parallel training with ``DistributedDataParallel`` (gradients averaged
over processes) follows single-process training step by step, up to float
round-off. The EMA is kept identically on every process; the progress bar
shows on rank 0 only.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm

from . import distributed as D
from .checks import (
    MAX_STEPS,
    ArgumentTypeError,
    check_bool,
    check_device,
    check_int,
    check_optional,
    check_real,
    check_seed,
)
from .distribution import ScoreSDEPrior
from .dynamics import model_dtype_device
from .losses import WEIGHTINGS as WEIGHTINGS  # re-exported, as are TimeSampler and dsm_loss
from .losses import TimeSampler, weighted_dsm_loss
from .losses import dsm_loss as dsm_loss
from .sde import ForwardSDE

__all__ = ["fit", "validation_loss", "train_step", "EMA", "FitHistory", "TrainingDivergedError"]


def train_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn, batch: tuple, grad_clip: float | None
) -> torch.Tensor:
    """One optimisation step: zero grads, ``loss_fn(model, *batch).backward()``, clip, step; the detached loss.

    ``model`` may be a ``DistributedDataParallel`` wrapper: its backward pass averages the gradients over
    the processes, so the clipping sees (and every process applies) the averaged gradients.
    """
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(model, *batch)
    loss.backward()
    if grad_clip is not None:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return loss.detach()


class EMA:
    r"""Exponential moving average of a module's parameters,
    :math:`\bar\theta \leftarrow d_k \bar\theta + (1 - d_k)\theta` with
    :math:`d_k = \min(d, (1 + k)/(10 + k))` at update :math:`k`.
    """

    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.num_updates = 0
        self.params = [p.detach().clone() for p in module.parameters()]

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        k = self.num_updates
        decay = min(self.decay, (1 + k) / (10 + k))
        for avg, p in zip(self.params, module.parameters(), strict=True):
            avg.lerp_(p.detach(), 1 - decay)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        for avg, p in zip(self.params, module.parameters(), strict=True):
            p.copy_(avg)


@dataclass
class FitHistory:
    r"""What :func:`fit` records, stored as ``model.fit_history``.

    :ivar loss: the training loss at every step (per dimension, raw weights, noisy).
    :ivar raw_state_dict: the raw (non-EMA) weights at the end of training.
    :ivar validation_loss: the DSM loss of the returned (EMA) model on ``validation_data``.
    :ivar validation_log_prob: mean probability-flow :math:`\log p_\epsilon` (nats per point) of
        ``validation_data`` under the returned model, when ``validation_log_prob=True``.
    :ivar steps_per_second: training throughput.
    """

    weighting: str
    loss: list[float] = field(default_factory=list)
    raw_state_dict: dict | None = None
    validation_loss: float | None = None
    validation_log_prob: float | None = None
    steps_per_second: float = math.nan


def fit(
    score_model: nn.Module,
    sde: ForwardSDE,
    data: torch.Tensor | DataLoader,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    weighting: str = "score",
    ema_decay: float | None = 0.999,
    grad_clip: float | None = 1.0,
    seed: int | None = None,
    context: torch.Tensor | None = None,
    validation_data: torch.Tensor | None = None,
    validation_context: torch.Tensor | None = None,
    validation_log_prob: bool = False,
    progress: bool = True,
    device: torch.device | str | None = None,
    distributed: bool | str = "auto",
) -> nn.Module:
    r"""Train ``score_model`` by denoising score matching (:mod:`pyro_scoreflow.losses`); return it with EMA weights.

    :param nn.Module score_model: ``score_model(x, t[, context])``, trained in place.
    :param ForwardSDE sde: the forward SDE.
    :param data: a tensor ``(N, *event_shape)`` (batches drawn by reshuffling
        each epoch), or a ``DataLoader`` yielding tensors or ``(x, context)``
        pairs (cycled for ``steps`` batches; its own ``batch_size`` rules and
        ``batch_size`` is ignored).
    :param int steps: optimisation steps.
    :param int batch_size: points per step for tensor data.
    :param float lr: Adam learning rate.
    :param str weighting: ``"score"`` (weight :math:`\sigma^2`) or ``"likelihood"`` (weight :math:`g^2`,
        importance-sampled), see :mod:`pyro_scoreflow.losses`.
    :param float ema_decay: EMA decay in :math:`[0, 1)`; ``None`` or 0 returns the raw weights.
    :param float grad_clip: maximum gradient norm; ``None`` disables clipping.
    :param int seed: a non-negative integer that makes training reproducible (same initial weights and
        seed give identical weights) without touching torch's global RNG; ``None`` draws from the global RNG.
    :param context: conditioning ``(N, ...)`` aligned with tensor ``data``.
    :param validation_data: held-out tensor; its DSM loss (stratified times,
        one draw per point) under the returned weights goes into
        ``model.fit_history.validation_loss``.
    :param validation_context: context aligned with ``validation_data`` (only with ``validation_data``).
    :param bool validation_log_prob: with ``validation_data``, also compute the held-out log-likelihood
        (``ScoreSDEPrior(model, sde, event_shape, rtol=1e-3, atol=1e-3).log_prob``, exact trace, mean
        over ``validation_data``) into ``model.fit_history.validation_log_prob``: the honest model
        comparison, at the cost of one ODE solve (loose tolerances: errors ~1e-2 nats).
    :param bool progress: show a tqdm bar with the running loss (on rank 0 only when distributed).
    :param device: move the model there first (a device this machine has, else ``ValueError``; default:
        where its parameters are; under an NCCL
        process group, a model not on a GPU goes to the current CUDA device, GPU ``$LOCAL_RANK``).
    :param distributed: data-parallel training over a ``torch.distributed`` process group (see
        ``docs/distributed.md``). ``"auto"`` (default): use the initialised default process group,
        or initialise one from torchrun's environment (NCCL with CUDA, else gloo), or train in this
        process alone when there is neither. ``True``: as ``"auto"``, but raise ``RuntimeError`` when
        there is neither. ``False``: train in this process alone, ignoring any process group. With
        more than one process, every process must call ``fit`` with the same arguments; the model is
        wrapped in ``DistributedDataParallel`` (rank 0's initial weights are broadcast, gradients are
        averaged), each step's global batch of ``batch_size`` points is drawn identically on every
        process (``seed``, or one seed drawn on rank 0 and broadcast) and split into ``world_size``
        slices of ``batch_size // world_size`` points, one per process (``batch_size``, or a
        ``DataLoader``'s batch size, must be divisible by the world size). A ``DataLoader`` is rebuilt
        around a ``DistributedSampler`` (unless its sampler already is one, or its dataset is an
        ``IterableDataset``, which must then shard itself). Every process returns the same model.
    :returns: ``score_model``, EMA weights loaded, with ``score_model.fit_history`` a :class:`FitHistory`.
    :raises ValueError: for bad arguments (a wrong type raises :class:`~pyro_scoreflow.checks.ArgumentTypeError`,
        both a ``TypeError`` and a ``ValueError``), or empty data, data of the wrong shape or with NaN/inf,
        before training.
    :raises TrainingDivergedError: when the training loss becomes non-finite; the weights are then restored.
    """
    _check_model(score_model)
    if not isinstance(sde, ForwardSDE):
        raise ArgumentTypeError(f"sde must be a VPSDE, SubVPSDE or VESDE (a ForwardSDE), got {type(sde).__name__}")
    steps = check_int("steps", steps, maximum=MAX_STEPS)
    batch_size = check_int("batch_size", batch_size, maximum=MAX_STEPS)
    lr = check_real("lr", lr, positive=True)
    sampler = TimeSampler(sde, weighting)
    ema_decay = _check_ema_decay(ema_decay)
    grad_clip = check_optional(check_real, "grad_clip", grad_clip, positive=True)
    seed = check_optional(check_seed, "seed", seed)
    validation_log_prob = check_bool("validation_log_prob", validation_log_prob)
    progress = check_bool("progress", progress)
    device = check_optional(check_device, "device", device)
    if not (distributed is True or distributed is False or distributed == "auto"):
        raise ValueError(f"distributed must be 'auto', True or False, got {distributed!r}")
    event_shape = getattr(score_model, "event_shape", None)
    if isinstance(data, DataLoader):
        if context is not None:
            raise ValueError("context must be None when data is a DataLoader: yield (x, context) batches instead")
    else:
        data = _check_tensor("data", data, event_shape)
        event_shape = data.shape[1:]
        context = _check_context("context", context, data.shape[0])
    if validation_data is not None:
        validation_data = _check_tensor("validation_data", validation_data, event_shape)
        validation_context = _check_context("validation_context", validation_context, validation_data.shape[0])
    elif validation_context is not None or validation_log_prob:
        given = "validation_context" if validation_context is not None else "validation_log_prob=True"
        raise ValueError(f"{given} needs validation_data")

    group = D.setup_group(distributed)
    if group is not None:
        if isinstance(data, DataLoader):
            D.check_shardable(data, group.world_size)
        else:
            D.local_batch_size("batch_size", batch_size, group.world_size)
        if device is None and group.nccl and not any(p.is_cuda for p in score_model.parameters()):
            device = torch.device("cuda", torch.cuda.current_device())
        if group.nccl and device is not None and device.type != "cuda":
            raise ValueError(f"the NCCL backend trains on GPUs, got device={str(device)!r}: pass None or 'cuda'")
        seed = D.shared_seed(seed, group)  # a collective: after every check above, so a bad argument fails everywhere
        if isinstance(data, DataLoader):
            data = D.shard_loader(data, group, seed)
    if device is not None:
        score_model.to(device)
    dtype, device = model_dtype_device(score_model)
    history = FitHistory(weighting=weighting)
    was_training = score_model.training
    with _seeded(seed, device):
        batches = _batch_iterator(data, context, batch_size, event_shape, dtype, device, group)
        first = next(batches)  # checks a DataLoader's first batch before training
        score_model.train()
        initial = {k: v.detach().clone() for k, v in score_model.state_dict().items()}
        try:
            _train(score_model, sampler, first, batches, steps, lr, ema_decay, grad_clip, progress, history, group)
        except TrainingDivergedError as err:
            score_model.load_state_dict(initial)  # never hand back (or let anyone save) NaN weights
            score_model.train(was_training)
            scale = "" if isinstance(data, DataLoader) else f"; the data's largest |value| is {_max_abs(data):.3g}"
            raise TrainingDivergedError(
                f"{err}{scale}. Diffusion priors assume data of about unit scale (standardise it) and a moderate "
                f"lr (now {lr:g}); the model's weights were restored to their values before fit"
            ) from None
        score_model.eval()
        if validation_data is not None:
            history.validation_loss = validation_loss(
                score_model, sde, validation_data.to(device, dtype), weighting=weighting,
                context=_to_device(validation_context, device, dtype), batch_size=batch_size,
            )  # fmt: skip
            if validation_log_prob:
                history.validation_log_prob = _validation_log_prob(
                    score_model, sde, validation_data.to(device, dtype), _to_device(validation_context, device, dtype)
                )
    score_model.train(was_training)
    score_model.fit_history = history
    return score_model


class TrainingDivergedError(ValueError):
    """The training loss or the weights became non-finite (NaN or inf)."""


def _max_abs(data: torch.Tensor) -> float:
    return float(data.detach().abs().max()) if data.numel() else 0.0


def _validation_log_prob(model, sde, data: torch.Tensor, context) -> float:
    """Mean held-out log-likelihood under the probability-flow ODE (exact trace, rtol = atol = 1e-3)."""
    event_shape = data.shape[1:]
    options = dict(rtol=1e-3, atol=1e-3)
    if context is None:
        prior = ScoreSDEPrior(model, sde, event_shape, **options)
    else:
        prior = ScoreSDEPrior(model, sde, event_shape, context=context, context_shape=context.shape[1:], **options)
    with torch.no_grad():
        return float(prior.log_prob(data).mean())


def _train(model, sampler, first, batches, steps, lr, ema_decay, grad_clip, progress, history, group) -> None:
    """The optimisation loop: Adam steps on the batches, EMA updates, progress; loads the EMA weights at the end.

    With a process group, the steps run through a ``DistributedDataParallel`` wrapper (built first: it
    broadcasts rank 0's weights, from which every process's EMA then starts), and the recorded losses
    are averaged over the processes, so that every process ends with the same model and history.
    """
    net = model
    if group is not None:
        device = model_dtype_device(model)[1]
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    ema = EMA(model, ema_decay) if ema_decay else None
    windows, pending = [], []
    main = group is None or group.rank == 0
    bar = tqdm(total=steps, desc="fit", disable=not progress or not main, dynamic_ncols=True)
    refresh = max(1, steps // 100)
    start = time.perf_counter()
    loss_fn = functools.partial(weighted_dsm_loss, sampler)
    batch = first
    for step in range(steps):
        pending.append(train_step(net, optimizer, loss_fn, batch, grad_clip))
        if ema is not None:
            ema.update(model)
        if (step + 1) % refresh == 0 or step + 1 == steps:  # the same steps on every process
            window = torch.stack(pending)
            pending = []
            if group is not None:
                dist.all_reduce(window)  # a sum: ReduceOp.AVG is NCCL-only
                window /= group.world_size
            windows.append(window)
            if not torch.isfinite(window).all():  # the same decision on every process (the window is all-reduced)
                bar.close()
                bad = int((~torch.isfinite(window)).nonzero()[0, 0])
                at = step + 2 - window.numel() + bad  # 1-based
                raise TrainingDivergedError(f"fit diverged: the training loss was {window[bad].item()} at step {at}")
            bar.set_postfix(loss=f"{window.mean().item():.4g}", refresh=False)
            bar.update(step + 1 - bar.n)
        if step + 1 < steps:
            batch = next(batches)
    bar.close()
    del net  # the wrapper is not kept: fit returns (and may train again) the plain module
    history.steps_per_second = steps / (time.perf_counter() - start)
    history.loss = torch.cat(windows).tolist()
    history.raw_state_dict = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if ema is not None:
        ema.copy_to(model)
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise TrainingDivergedError(f"fit diverged: the weights {bad[:3]} became non-finite")


@torch.no_grad()
def validation_loss(
    score_model: nn.Module,
    sde: ForwardSDE,
    data: torch.Tensor,
    *,
    weighting: str = "score",
    context: torch.Tensor | None = None,
    batch_size: int = 1024,
) -> float:
    r"""The weighted DSM loss :math:`J` on ``data``: one :math:`(t, z)` per point, with stratified
    :math:`u_i = (\pi_i + v_i)/N` (:math:`\pi` a random permutation, :math:`v_i \sim U[0, 1)`), which
    lowers the variance over :math:`t` without biasing the estimate.
    """
    sampler = TimeSampler(sde, weighting)
    n = data.shape[0]
    u = (torch.randperm(n, device=data.device).to(data.dtype) + torch.rand(n, dtype=data.dtype, device=data.device)) / n
    total = 0.0
    for start in range(0, n, batch_size):
        sl = slice(start, start + batch_size)
        ctx = None if context is None else context[sl]
        total += float(weighted_dsm_loss(sampler, score_model, data[sl], ctx, u[sl])) * data[sl].shape[0]
    return total / n


# -- data ---------------------------------------------------------------------------------
def _batch_iterator(data, context, batch_size, event_shape, dtype, device, group=None) -> Iterator[tuple]:
    """Endless ``(x0, context, u, z)`` batches on ``device``: epochs of random permutations, or a cycled DataLoader.

    Each step draws the global batch's indices, then its ``u`` and ``z`` (:func:`_batch_noise`); with a
    process group, every process draws them all and keeps the slice of its rank.
    """
    rank, world = (0, 1) if group is None else (group.rank, group.world_size)
    if isinstance(data, DataLoader):
        for x, ctx in _loader_batches(data, event_shape, dtype, device):
            yield x, ctx, *_batch_noise(x.shape[0], x.shape[1:], dtype, device, rank, world)
        return
    n = data.shape[0]
    local = batch_size // world
    order = torch.empty(0, dtype=torch.long)
    while True:
        while order.numel() < batch_size:
            order = torch.cat([order, torch.randperm(n)])
        idx, order = order[rank * local : (rank + 1) * local], order[batch_size:]
        x0 = data[idx].to(device, dtype)
        ctx = _to_device(None if context is None else context[idx], device, dtype)
        yield x0, ctx, *_batch_noise(local, event_shape, dtype, device, rank, world)


def _batch_noise(local: int, event_shape, dtype, device, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``u ~ U[0, 1)`` and ``z ~ N(0, I)`` for the ``local * world`` points of a global batch; this rank's slice."""
    u = torch.rand(local * world, dtype=dtype, device=device)
    z = torch.randn((local * world, *event_shape), dtype=dtype, device=device)
    if world == 1:
        return u, z
    return u[rank * local : (rank + 1) * local], z[rank * local : (rank + 1) * local]


def _loader_batches(loader: DataLoader, event_shape, dtype, device) -> Iterator[tuple]:
    epoch = 0
    while True:
        if isinstance(loader.sampler, DistributedSampler):
            loader.sampler.set_epoch(epoch)  # a fresh shuffle every pass, the same on every process
        empty = True
        for batch in loader:
            empty = False
            x, ctx = _unpack(batch)
            x = _check_tensor("a data batch", x, event_shape)
            event_shape = x.shape[1:]  # every batch must match the first
            yield x.to(device, dtype), _to_device(_check_context("a batch's context", ctx, x.shape[0]), device, dtype)
        if empty:
            raise ValueError("data is an empty DataLoader")
        epoch += 1


def _unpack(batch) -> tuple:
    """A DataLoader batch as ``(x, context)``: a tensor, ``(x,)`` (as from a ``TensorDataset``) or ``(x, ctx)``."""
    if isinstance(batch, (tuple, list)) and len(batch) in (1, 2):
        return batch[0], (batch[1] if len(batch) == 2 else None)
    if isinstance(batch, torch.Tensor):
        return batch, None
    raise ValueError(f"DataLoader batches must be tensors, (x,) or (x, context) pairs, got {type(batch).__name__}")


def _to_device(context, device, dtype):
    """Move a context tensor; floating contexts take the model's dtype, integer labels stay integers."""
    if context is None:
        return None
    return context.to(device, dtype) if context.is_floating_point() else context.to(device)


def _check_tensor(name: str, x, event_shape) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        try:
            x = torch.as_tensor(x)
        except (TypeError, ValueError, RuntimeError) as err:
            raise ArgumentTypeError(f"{name} must be a tensor (N, *event_shape), got {type(x).__name__}") from err
    if not (x.is_floating_point() or x.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)):
        raise ArgumentTypeError(f"{name} must hold real numbers, got dtype {x.dtype}")
    if x.dim() < 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must have shape (N, *event_shape) with N >= 1, got {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{name} has an empty event shape {tuple(x.shape[1:])}")
    if event_shape is not None and x.shape[1:] != torch.Size(event_shape):
        raise ValueError(
            f"{name} has shape {tuple(x.shape)}, but its trailing dimensions must be the model's event shape "
            f"{tuple(event_shape)}"
        )
    if x.is_floating_point() and not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf")
    return x


def _check_context(name: str, context, n: int):
    if context is None:
        return None
    try:
        context = torch.as_tensor(context)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ArgumentTypeError(f"{name} must be a tensor with {n} rows, got {type(context).__name__}") from err
    if context.is_complex():
        raise ArgumentTypeError(f"{name} must hold real numbers or integer labels, got dtype {context.dtype}")
    if context.dim() == 0 or context.shape[0] != n:
        raise ValueError(f"{name} must have {n} rows to match the data, got shape {tuple(context.shape)}")
    if context.is_floating_point() and not torch.isfinite(context).all():
        raise ValueError(f"{name} contains NaN or inf")
    return context


# -- argument checks and RNG -----------------------------------------------------------------
def _check_model(score_model) -> None:
    if not isinstance(score_model, nn.Module):
        raise ArgumentTypeError(f"score_model must be a torch.nn.Module, got {type(score_model).__name__}")
    if not any(p.requires_grad for p in score_model.parameters()):
        raise ValueError("score_model has no trainable parameters")


def _check_ema_decay(value) -> float:
    """``None`` (no EMA, as 0) or a decay in ``[0, 1)``."""
    decay = check_optional(check_real, "ema_decay", value, nonnegative=True) or 0.0
    if decay >= 1:
        raise ValueError(f"ema_decay must lie in [0, 1) or be None, got {value!r}")
    return decay


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device):
    """Run under ``torch.manual_seed(seed)``, restoring the global RNG state afterwards; no-op for ``None``."""
    if seed is None:
        yield
        return
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
