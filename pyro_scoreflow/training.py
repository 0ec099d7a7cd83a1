r"""Training score models by denoising score matching (:func:`fit`).

For data :math:`x_0`, :math:`t \in [\epsilon, T]`, :math:`z \sim \mathcal N(0, I)`
and :math:`x_t = \alpha(t) x_0 + \sigma(t) z` (the SDE's marginal), the
denoising score-matching objective of Song et al. (2021) is

.. math::

    J(\theta) = E_{t \sim U[\epsilon, T]}\, E_{x_0, z}\,
        \lambda(t)\,\big\| s_\theta(x_t, t) + z/\sigma(t) \big\|^2 / D,

with :math:`D` the event size (the loss is reported per dimension). Two weightings:

* ``weighting="score"``: :math:`\lambda = \sigma^2`, i.e.
  :math:`\|\sigma s_\theta + z\|^2`, the DDPM noise-prediction loss
  (:math:`\|z - \epsilon_\theta\|^2` for a :class:`~pyro_scoreflow.networks.ScoreNet`).
  Best sample quality.
* ``weighting="likelihood"``: :math:`\lambda = g^2` (Song, Durkan, Murray &
  Ermon 2021), for which :math:`J` bounds the KL divergence from the data to
  the model, so it trains for log-likelihood. The integrand
  :math:`g^2\|s + z/\sigma\|^2 = (g^2/\sigma^2)\,\|\sigma s + z\|^2` is
  dominated by small :math:`t`, where :math:`g^2/\sigma^2 \sim 1/t`, so
  :math:`t` is importance sampled from :math:`q(t) \propto g(t)^2/\sigma(t)^2`
  and reweighted by :math:`\lambda / (\sigma^2 q (T - \epsilon)) = Z/(T - \epsilon)`,
  a constant, so that the estimate of :math:`J` stays unbiased. For every
  linear SDE (:math:`\alpha' = f\alpha`, :math:`(\sigma^2)' = 2f\sigma^2 + g^2`),
  :math:`g^2/\sigma^2 = -\tfrac{d}{dt}\lambda_{SNR}(t)` with the log-SNR
  :math:`\lambda_{SNR} = \log(\alpha^2/\sigma^2)`: :math:`q` is uniform in
  the log-SNR, :math:`Z = \lambda_{SNR}(\epsilon) - \lambda_{SNR}(T)`, and
  :math:`t = \lambda_{SNR}^{-1}(\lambda_{SNR}(\epsilon) - uZ)`,
  :math:`u \sim U[0, 1)`, is found by bisection on the SDE's own ``marginal``
  (exact inverse CDF, to float64 round-off).

Optimisation: Adam, gradient-norm clipping, and an exponential moving average
(EMA) of the weights, whose decay ramps up as
:math:`\min(d, (1 + k)/(10 + k))` after :math:`k` updates so that short runs
are not dominated by the initial weights. :func:`fit` returns the model with
the EMA weights loaded; the raw weights stay in ``model.fit_history``.

Randomness: each step draws, in this order, the data indices of the whole
batch (epochs of random permutations), then :math:`u` (the times) and then
:math:`z` for every point of that batch. Under ``torch.distributed`` (see
``docs/distributed.md``) every process draws that same global batch from the
shared seed and keeps its own slice of ``batch_size / world_size`` points, so
data-parallel training with ``DistributedDataParallel`` (gradients averaged
over processes) follows single-process training step by step, up to float
round-off. The EMA is kept identically on every process; the progress bar
shows on rank 0 only.

References:

[1] Y. Song, J. Sohl-Dickstein, D. P. Kingma, A. Kumar, S. Ermon, B. Poole,
    "Score-Based Generative Modeling through Stochastic Differential
    Equations", ICLR 2021.
[2] Y. Song, C. Durkan, I. Murray, S. Ermon, "Maximum Likelihood Training of
    Score-Based Diffusion Models", NeurIPS 2021.
[3] D. P. Kingma, T. Salimans, B. Poole, J. Ho, "Variational Diffusion Models", NeurIPS 2021.
"""

from __future__ import annotations

import contextlib
import functools
import math
import numbers
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, RandomSampler, SequentialSampler
from tqdm.auto import tqdm

from . import distributed as _distributed
from .checks import check_int, check_real
from .dynamics import model_dtype_device
from .sde import ForwardSDE, _broadcast_time

__all__ = [
    "fit",
    "dsm_loss",
    "validation_loss",
    "train_step",
    "EMA",
    "FitHistory",
    "TimeSampler",
    "TrainingDivergedError",
    "WEIGHTINGS",
]

WEIGHTINGS = ("score", "likelihood")
_BISECTION_STEPS = 64


# -- the objective ------------------------------------------------------------------------
class TimeSampler:
    r"""Draws diffusion times and their importance weights for a weighting.

    ``sampler(u)`` maps :math:`u \in [0, 1)` to :math:`(t, w)` such that
    :math:`E_u[w\,h(t)] = E_{t \sim U[\epsilon, T]}[\lambda(t)/\sigma(t)^2\, h(t)]`
    for any :math:`h`: :math:`t = \epsilon + u(T - \epsilon)`, :math:`w = 1` for
    ``"score"``; the inverse CDF of :math:`q \propto g^2/\sigma^2` and
    :math:`w = Z/(T - \epsilon)` for ``"likelihood"`` (see the module docstring).
    """

    def __init__(self, sde: ForwardSDE, weighting: str = "score"):
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {list(WEIGHTINGS)}, got {weighting!r}")
        self.sde = sde
        self.weighting = weighting
        if weighting == "likelihood":
            ends = self.log_snr(torch.tensor([sde.eps, sde.T], dtype=torch.float64))
            self._lambda_eps, self._lambda_T = float(ends[0]), float(ends[1])
            self.weight = (self._lambda_eps - self._lambda_T) / (sde.T - sde.eps)
        else:
            self.weight = 1.0

    def log_snr(self, t: torch.Tensor) -> torch.Tensor:
        r""":math:`\lambda_{SNR}(t) = \log(\alpha(t)^2/\sigma(t)^2)`, decreasing in :math:`t`."""
        alpha, std = self.sde.marginal(t)
        return 2 * (torch.log(alpha) - torch.log(std))

    def density(self, t: torch.Tensor) -> torch.Tensor:
        r"""The density of the sampled times on :math:`[\epsilon, T]`: :math:`q(t)`."""
        if self.weighting == "score":
            return torch.full_like(t, 1 / (self.sde.T - self.sde.eps))
        g2_over_var = self.sde.diffusion(t) ** 2 / self.sde.marginal(t)[1] ** 2
        return g2_over_var / (self._lambda_eps - self._lambda_T)

    def __call__(self, u: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Times ``t`` (shaped and typed like ``u``) and their common weight."""
        sde = self.sde
        if self.weighting == "score":
            return sde.eps + u * (sde.T - sde.eps), self.weight
        target = self._lambda_eps - u.double() * (self._lambda_eps - self._lambda_T)
        lo = torch.full_like(target, sde.eps)
        hi = torch.full_like(target, sde.T)
        for _ in range(_BISECTION_STEPS):  # log_snr decreases: move lo up while log_snr(mid) > target
            mid = 0.5 * (lo + hi)
            above = self.log_snr(mid) > target
            lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
        return (0.5 * (lo + hi)).to(u.dtype), self.weight


def dsm_loss(
    score_model: nn.Module, sde: ForwardSDE, x0: torch.Tensor, t: torch.Tensor, z: torch.Tensor, context=None
) -> torch.Tensor:
    r"""Per-point :math:`\|\sigma(t)\, s_\theta(x_t, t) + z\|^2 / D` with :math:`x_t = \alpha(t) x_0 + \sigma(t) z`.

    :param x0: data ``(N, *event_shape)``.
    :param t: times ``(N,)``.
    :param z: standard normal noise shaped like ``x0``.
    :param context: optional context ``(N, ...)``, passed as ``score_model(x_t, t, context)``.
    :returns: ``(N,)``.
    """
    alpha, std = sde.marginal(t)
    alpha, std = _broadcast_time(alpha, x0), _broadcast_time(std, x0)
    x_t = alpha * x0 + std * z
    score = score_model(x_t, t) if context is None else score_model(x_t, t, context)
    return (std * score + z).pow(2).flatten(1).mean(1)


def _weighted_loss(
    sde, sampler: TimeSampler, model, x0, context, u: torch.Tensor | None = None, z: torch.Tensor | None = None
) -> torch.Tensor:
    """The weighted DSM loss of a batch: times from ``u`` and noise ``z`` (fresh draws where ``None``)."""
    if u is None:
        u = torch.rand(x0.shape[0], dtype=x0.dtype, device=x0.device)
    if z is None:
        z = torch.randn_like(x0)
    t, weight = sampler(u)
    return weight * dsm_loss(model, sde, x0, t, z, context).mean()


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


# -- fit ----------------------------------------------------------------------------------
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
    r"""Train ``score_model`` by denoising score matching (module docstring) and return it with EMA weights.

    :param nn.Module score_model: ``score_model(x, t[, context])``, trained in place.
    :param ForwardSDE sde: the forward SDE.
    :param data: a tensor ``(N, *event_shape)`` (batches drawn by reshuffling
        each epoch), or a ``DataLoader`` yielding tensors or ``(x, context)``
        pairs (cycled for ``steps`` batches; its own ``batch_size`` rules and
        ``batch_size`` is ignored).
    :param int steps: optimisation steps.
    :param int batch_size: points per step for tensor data.
    :param float lr: Adam learning rate.
    :param str weighting: ``"score"`` (:math:`\lambda = \sigma^2`) or
        ``"likelihood"`` (:math:`\lambda = g^2`, importance-sampled).
    :param float ema_decay: EMA decay in :math:`[0, 1)`; ``None`` or 0 returns the raw weights.
    :param float grad_clip: maximum gradient norm; ``None`` disables clipping.
    :param int seed: makes training reproducible (same initial weights and seed
        give identical weights) without touching torch's global RNG; ``None``
        draws from the global RNG.
    :param context: conditioning ``(N, ...)`` aligned with tensor ``data``.
    :param validation_data: held-out tensor; its DSM loss (stratified times,
        one draw per point) under the returned weights goes into
        ``model.fit_history.validation_loss``.
    :param validation_context: context aligned with ``validation_data``.
    :param bool validation_log_prob: also compute the held-out log-likelihood
        (``ScoreSDEPrior(model, sde, event_shape, rtol=1e-3, atol=1e-3).log_prob``, exact trace, mean
        over ``validation_data``) into ``model.fit_history.validation_log_prob``: the honest model
        comparison, at the cost of one ODE solve (loose tolerances: errors ~1e-2 nats).
    :param bool progress: show a tqdm bar with the running loss (on rank 0 only when distributed).
    :param device: move the model there first (default: where its parameters are; under an NCCL
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
    :raises ValueError: for bad arguments, or data of the wrong shape or with NaN/inf, before training.
    """
    _check_model(score_model)
    if not isinstance(sde, ForwardSDE):
        raise TypeError(f"sde must be a VPSDE, SubVPSDE or VESDE (a ForwardSDE), got {type(sde).__name__}")
    steps = check_int("steps", steps)
    batch_size = check_int("batch_size", batch_size)
    lr = check_real("lr", lr, positive=True)
    sampler = TimeSampler(sde, weighting)
    ema_decay = _check_ema_decay(ema_decay)
    grad_clip = None if grad_clip is None else check_real("grad_clip", grad_clip, positive=True)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
        raise ValueError(f"seed must be an integer or None, got {seed!r}")
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
    if not (distributed is True or distributed is False or distributed == "auto"):
        raise ValueError(f"distributed must be 'auto', True or False, got {distributed!r}")

    group = _setup_distributed(distributed)
    if group is not None:
        if isinstance(data, DataLoader):
            _check_shardable(data, group.world_size)
        else:
            _local_batch_size("batch_size", batch_size, group.world_size)
        if device is None and group.nccl and not any(p.is_cuda for p in score_model.parameters()):
            device = torch.device("cuda", torch.cuda.current_device())
        if group.nccl and device is not None and torch.device(device).type != "cuda":
            raise ValueError(f"the NCCL backend trains on GPUs, got device={str(device)!r}: pass None or 'cuda'")
        seed = _shared_seed(seed, group)  # a collective: after every check above, so a bad argument fails everywhere
        if isinstance(data, DataLoader):
            data = _shard_loader(data, group, seed)
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
            _train(score_model, sde, sampler, first, batches, steps, lr, ema_decay, grad_clip, progress, history, group)
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
    from .distribution import ScoreSDEPrior  # a higher layer: imported at call time only

    event_shape = data.shape[1:]
    options = dict(rtol=1e-3, atol=1e-3)
    if context is None:
        prior = ScoreSDEPrior(model, sde, event_shape, **options)
    else:
        prior = ScoreSDEPrior(model, sde, event_shape, context=context, context_shape=context.shape[1:], **options)
    with torch.no_grad():
        return float(prior.log_prob(data).mean())


def _train(model, sde, sampler, first, batches, steps, lr, ema_decay, grad_clip, progress, history, group) -> None:
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
    loss_fn = functools.partial(_weighted_loss, sde, sampler)
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
        total += float(_weighted_loss(sde, sampler, score_model, data[sl], ctx, u[sl])) * data[sl].shape[0]
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
            raise ValueError(f"{name} must be a tensor (N, *event_shape), got {type(x).__name__}") from err
    if not (x.is_floating_point() or x.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)):
        raise ValueError(f"{name} must hold real numbers, got dtype {x.dtype}")
    if x.dim() < 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must have shape (N, *event_shape) with N >= 1, got {tuple(x.shape)}")
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
    context = torch.as_tensor(context)
    if context.dim() == 0 or context.shape[0] != n:
        raise ValueError(f"{name} must have {n} rows to match the data, got shape {tuple(context.shape)}")
    if context.is_floating_point() and not torch.isfinite(context).all():
        raise ValueError(f"{name} contains NaN or inf")
    return context


# -- distributed ----------------------------------------------------------------------------
@dataclass(frozen=True)
class _Group:
    """The default process group as :func:`fit` uses it."""

    rank: int
    world_size: int
    nccl: bool  # collectives need CUDA tensors


def _setup_distributed(distributed: bool | str) -> _Group | None:
    """The process group to train over (initialised from torchrun's environment if need be), or None for one process."""
    if distributed is False:
        return None
    if not _distributed.init_from_env():
        if distributed is True:
            raise RuntimeError(
                "fit(distributed=True) needs an initialised torch.distributed process group or torchrun's "
                "environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)"
            )
        return None
    if dist.get_world_size() == 1:
        return None
    backend = str(dist.get_backend())
    return _Group(dist.get_rank(), dist.get_world_size(), nccl="nccl" in backend and "gloo" not in backend)


def _local_batch_size(name: str, batch_size: int, world_size: int) -> int:
    if batch_size % world_size:
        raise ValueError(
            f"{name} ({batch_size}) must be divisible by the number of processes ({world_size}): "
            f"each process takes {name} // {world_size} points of every step's global batch"
        )
    return batch_size // world_size


def _shared_seed(seed: int | None, group: _Group) -> int:
    """``seed``, or (for ``None``) a seed drawn from rank 0's global RNG and broadcast to every process."""
    if seed is not None:
        return seed
    value = torch.randint(0, 2**62, (1,))
    if group.nccl:
        value = value.cuda()
    dist.broadcast(value, src=0)
    return int(value.item())


def _check_shardable(loader: DataLoader, world_size: int) -> None:
    if isinstance(loader.sampler, DistributedSampler) or isinstance(loader.dataset, IterableDataset):
        return  # used as is: the loader shards itself
    if loader.batch_size is None or not isinstance(loader.sampler, (RandomSampler, SequentialSampler)):
        raise ValueError(
            "a DataLoader with a custom sampler or batch_sampler cannot be sharded over processes: "
            "give one whose sampler is a torch.utils.data.DistributedSampler"
        )
    _local_batch_size("the DataLoader's batch_size", loader.batch_size, world_size)


def _shard_loader(loader: DataLoader, group: _Group, seed: int) -> DataLoader:
    """The loader rebuilt around a ``DistributedSampler``: its batch size is split over the processes.

    A loader whose sampler is already a ``DistributedSampler``, or whose dataset is an ``IterableDataset``,
    is returned as it is.
    """
    if isinstance(loader.sampler, DistributedSampler) or isinstance(loader.dataset, IterableDataset):
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


# -- argument checks and RNG -----------------------------------------------------------------
def _check_model(score_model) -> None:
    if not isinstance(score_model, nn.Module):
        raise TypeError(f"score_model must be a torch.nn.Module, got {type(score_model).__name__}")
    if not any(p.requires_grad for p in score_model.parameters()):
        raise ValueError("score_model has no trainable parameters")


def _check_ema_decay(value) -> float:
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < 1:
        raise ValueError(f"ema_decay must lie in [0, 1) or be None, got {value!r}")
    return float(value)


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
