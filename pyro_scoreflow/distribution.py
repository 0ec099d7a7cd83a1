r""":class:`ScoreSDEPrior`: a score model and a forward SDE as a Pyro distribution."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence

import torch
from pyro.distributions.torch_distribution import TorchDistribution
from pyro.ops.integrator import register_exception_handler
from torch.distributions import constraints

from .checks import check_event_shape
from .compiled import CompiledFlow
from .dynamics import (
    ADAPTIVE_ODE_METHODS,
    FIXED_ODE_METHODS,
    ProbabilityFlowODE,
    ScoreField,
    SolverError,
    log_normal_std,
    make_probes,
    model_dtype_device,
    solve_ode,
)
from .memo import LogProbMemo
from .samplers import SDE_METHODS, dpm_solver_sample, probability_flow_sample, reverse_sde_sample
from .sde import ForwardSDE

__all__ = ["ScoreSDEPrior"]

SAMPLERS = ("sde", "ode", "dpm-solver")

# Inside HMC/NUTS a solver failure (step-size underflow on a wild proposal) becomes a divergent,
# rejected proposal, like Pyro's handling of singular matrices, instead of ending the chain.
register_exception_handler("pyro_scoreflow_solver", lambda e: isinstance(e, SolverError), warn_on_overwrite=False)
DIVERGENCES = ("exact", "hutchinson")
PROBES = ("rademacher", "gaussian")


def _check_choice(name: str, value, choices) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def _check_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_tol(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be positive and finite, got {value}")
    return float(value)


def _check_context(context, context_shape, batch_shape) -> tuple[torch.Tensor | None, torch.Size, torch.Size]:
    """Validate a conditioning context; its leading dimensions (beyond ``context_shape``) join the batch shape."""
    batch_shape = torch.Size(batch_shape)
    if context is None:
        if context_shape is not None and len(context_shape) > 0:
            raise ValueError("context_shape was given without a context")
        return None, torch.Size(), batch_shape
    if not isinstance(context, torch.Tensor):
        raise TypeError(f"context must be a torch.Tensor, got {type(context).__name__}")
    if context.is_floating_point() and not torch.isfinite(context).all():
        raise ValueError("context contains NaN or inf")
    context_shape = torch.Size(context.shape if context_shape is None else context_shape)
    k = len(context_shape)
    if context.shape[context.dim() - k :] != context_shape:
        raise ValueError(
            f"context has shape {tuple(context.shape)}, but its trailing dimensions must be context_shape "
            f"{tuple(context_shape)}"
        )
    try:
        batch_shape = torch.broadcast_shapes(batch_shape, context.shape[: context.dim() - k])
    except RuntimeError as err:
        raise ValueError(
            f"context batch shape {tuple(context.shape[: context.dim() - k])} does not broadcast with "
            f"batch_shape {tuple(batch_shape)}"
        ) from err
    return context, context_shape, batch_shape


class ScoreSDEPrior(TorchDistribution):
    r"""The distribution :math:`p_\epsilon` defined by a score model and a forward SDE.

    **Sampling** draws :math:`x_T` from ``sde.prior`` and integrates, from
    :math:`T` down to :math:`\epsilon`,

    * ``sampler="sde"``: the reverse-time SDE
      :math:`dx = [f - g^2 s_\theta]\,dt + g\,d\bar w` with ``torchsde.sdeint``
      (``sde_method``, ``num_steps`` equal steps);
    * ``sampler="ode"``: the probability-flow ODE
      :math:`dx = \tilde f\,dt`, :math:`\tilde f = f - \tfrac12 g^2 s_\theta`, with
      ``torchdiffeq.odeint`` (``ode_method``; ``rtol``/``atol`` for adaptive
      methods, ``num_steps`` for fixed-grid ones);
    * ``sampler="dpm-solver"``: DPM-Solver++ multistep (order ``dpm_order``, default 3) on the
      probability-flow ODE, ``num_steps`` score evaluations in all (use 10-20). It stops at
      ``dpm_end_time`` (default 3e-3, see :func:`~pyro_scoreflow.samplers.dpm_solver_sample`
      for the trade-off) and returns :math:`x_{t_{end}}`.

    It returns :math:`x_\epsilon` (``"dpm-solver"``: :math:`x_{t_{end}}`); ``denoise=True`` adds Tweedie's final
    denoising step :math:`\hat x_0 = (x_\epsilon + \sigma_\epsilon^2 s_\theta(x_\epsilon, \epsilon))/\alpha_\epsilon`
    (then samples are no longer draws of :math:`p_\epsilon`).

    **log_prob** integrates the probability-flow ODE augmented with its
    divergence from :math:`\epsilon` to :math:`T` (instantaneous change of variables):

    .. math::

        \log p_\epsilon(x) = \log p_T(x_T) + \int_\epsilon^T \nabla\cdot\tilde f(x_t, t)\,dt,

    with the divergence exact (``divergence="exact"``: the trace of the
    Jacobian from one forward pass and ``D`` batched vector-Jacobian products)
    or Hutchinson's unbiased estimate :math:`\epsilon^\top J \epsilon`
    (``hutchinson_samples`` probes per point, fixed along the trajectory).
    The error of adaptive solvers is controlled *per point*: the tolerance is
    met by every point of a batch, not by the batch's RMS error.

    ``log_prob`` is differentiable with respect to ``value`` (backpropagation
    through the solver, or ``adjoint=True`` for memory that does not grow with
    the number of steps), so SVI and NUTS work; it also works under
    ``torch.no_grad()``. Computations run in the score model's dtype and device
    (its parameters'; the value's floating dtype for a parameter-free callable).

    Defaults: ``dopri5`` with ``rtol = atol = 1e-5`` keeps log-density errors
    around 1e-4 nats per point in 2-D (float32 round-off is about 1e-6
    relative, well below); 500 Euler–Maruyama steps for the SDE sampler make
    its discretisation bias small next to the two-sample noise of 10^4 samples.

    :param callable score_model: ``score_model(x, t)`` estimating :math:`\nabla_x\log p_t(x)`.
    :param ForwardSDE sde: the forward SDE.
    :param event_shape: shape of one draw, e.g. ``(2,)`` or ``(1, 8, 8)``.
    :param str sampler: ``"sde"``, ``"ode"`` or ``"dpm-solver"``.
    :param int num_steps: steps for fixed-step sampling (and fixed-grid ``ode_method``).
    :param str sde_method: a torchsde method valid for diagonal noise.
    :param str ode_method: a torchdiffeq method.
    :param float rtol: relative tolerance of the probability-flow ODE.
    :param float atol: absolute tolerance of the probability-flow ODE.
    :param str divergence: ``"exact"`` or ``"hutchinson"``.
    :param int hutchinson_samples: probes per point, averaged.
    :param str hutchinson_probe: ``"rademacher"`` or ``"gaussian"``.
    :param int dpm_order: order of the multistep DPM-Solver++ (1, 2 or 3).
    :param float dpm_end_time: where ``"dpm-solver"`` stops (default 3e-3, or eps if larger).
    :param bool adjoint: use ``odeint_adjoint`` for gradients of ``log_prob`` (memory that does
        not grow with the number of steps; both solves run 10x tighter, ~1.6x the cost).
    :param bool compile: evaluate ``log_prob``'s augmented field (score, drift and divergence) as one
        ``torch.compile``-d graph (:mod:`pyro_scoreflow.compiled`): for latency-bound calls (one or a
        few points, as in NUTS) it removes most of the per-evaluation Python overhead (2-D mixture,
        one point, ``log_prob`` + gradient: see docs/benchmarks.md). The first call per input layout
        compiles (seconds to tens of seconds); on failure it warns and runs eagerly. Default ``False``.
    :param bool denoise: apply Tweedie's denoising step after sampling.
    :param int hutchinson_seed: if given, Hutchinson probes are drawn from this seed, so two
        priors (or two calls) with the same seed give identical estimates for the same batch
        (e.g. so that prior terms cancel exactly in importance weights); ``None`` draws fresh
        probes from torch's RNG at every call.
    :param bool hutchinson_redraw: draw fresh probes at every evaluation of the field instead of keeping
        them fixed along the trajectory. Still unbiased (the trajectory does not depend on the probes), with
        a variance that sums over evaluations instead of squaring a sum: 64-D, 200 points, the error std fell
        from 30 to 12 nats with one probe and from 7.7 to 2.9 with 16 (docs/benchmarks.md, 2c); the log-det
        column is then left out of the step-size control. The estimate is no longer a smooth function of
        ``value`` (which probe meets which step changes with the steps), so keep the default ``False`` for
        HMC/NUTS; use it to report likelihoods. Not with ``adjoint=True``.
    :param int max_num_steps: step budget of adaptive solvers before raising.
    :param torch.Tensor context: for a conditional score model ``score_model(x, t, context)``:
        the context, shaped ``(*batch, *context_shape)``; usually set by
        :meth:`ConditionalScoreSDEPrior.condition`.
    :param context_shape: the event shape of one context (default: the whole ``context``).
    """

    arg_constraints: dict = {}
    has_rsample = False

    def __init__(
        self,
        score_model: Callable,
        sde: ForwardSDE,
        event_shape: Sequence[int],
        *,
        sampler: str = "sde",
        num_steps: int = 500,
        sde_method: str = "euler",
        ode_method: str = "dopri5",
        rtol: float = 1e-5,
        atol: float = 1e-5,
        divergence: str = "exact",
        hutchinson_samples: int = 1,
        hutchinson_probe: str = "rademacher",
        hutchinson_seed: int | None = None,
        hutchinson_redraw: bool = False,
        dpm_order: int = 3,
        dpm_end_time: float | None = None,
        adjoint: bool = False,
        compile: bool = False,  # noqa: A002 - the name torch uses
        denoise: bool = False,
        max_num_steps: int = 100_000,
        batch_shape: Sequence[int] = (),
        context: torch.Tensor | None = None,
        context_shape: Sequence[int] | None = None,
        validate_args=None,
    ):
        if not callable(score_model):
            raise TypeError(f"score_model must be callable as score_model(x, t), got {type(score_model).__name__}")
        if not isinstance(sde, ForwardSDE):
            raise TypeError(f"sde must be a VPSDE, SubVPSDE or VESDE (a ForwardSDE), got {type(sde).__name__}")
        self.score_model = score_model
        self.sde = sde
        self.sampler = _check_choice("sampler", sampler, SAMPLERS)
        self.num_steps = _check_int("num_steps", num_steps)
        self.sde_method = _check_choice("sde_method", sde_method, tuple(SDE_METHODS))
        self.ode_method = _check_choice("ode_method", ode_method, ADAPTIVE_ODE_METHODS + FIXED_ODE_METHODS)
        self.rtol = _check_tol("rtol", rtol)
        self.atol = _check_tol("atol", atol)
        self.divergence = _check_choice("divergence", divergence, DIVERGENCES)
        self.hutchinson_samples = _check_int("hutchinson_samples", hutchinson_samples)
        self.hutchinson_probe = _check_choice("hutchinson_probe", hutchinson_probe, PROBES)
        if hutchinson_seed is not None:
            hutchinson_seed = _check_int("hutchinson_seed", hutchinson_seed, minimum=0)
        self.hutchinson_seed = hutchinson_seed
        self.hutchinson_redraw = bool(hutchinson_redraw)
        self.dpm_order = _check_int("dpm_order", dpm_order)
        if self.dpm_order > 3:
            raise ValueError(f"dpm_order must be 1, 2 or 3, got {dpm_order}")
        if dpm_end_time is not None:
            dpm_end_time = _check_tol("dpm_end_time", dpm_end_time)
            if not sde.eps <= dpm_end_time < sde.T:
                raise ValueError(f"dpm_end_time must lie in [eps, T) = [{sde.eps}, {sde.T}), got {dpm_end_time}")
        self.dpm_end_time = dpm_end_time
        self.adjoint = bool(adjoint)
        if self.adjoint and self.hutchinson_redraw:
            raise ValueError(
                "hutchinson_redraw=True cannot be combined with adjoint=True: the adjoint's backward solve "
                "re-evaluates the field, and would see other probes than the forward solve"
            )
        self.compile = bool(compile)
        self.denoise = bool(denoise)
        self.max_num_steps = _check_int("max_num_steps", max_num_steps)
        self._nfe = [0]  # score evaluations of the last solve, shared with expanded copies
        # one-entry memo of log_prob, shared with expanded copies (pyro.plate expands the prior at
        # every call, so model and guide get different instances); see pyro_scoreflow.memo
        self._cache = LogProbMemo()
        self._compiled: dict = {}  # divergence -> CompiledFlow, shared with expanded copies
        event_shape = check_event_shape(event_shape)
        self.context, self.context_shape, batch_shape = _check_context(context, context_shape, batch_shape)
        super().__init__(torch.Size(batch_shape), event_shape, validate_args=validate_args)

    # -- Pyro / torch.distributions plumbing --------------------------------
    _OPTIONS = (
        "sampler", "num_steps", "sde_method", "ode_method", "rtol", "atol", "divergence",
        "hutchinson_samples", "hutchinson_probe", "hutchinson_seed", "hutchinson_redraw", "dpm_order",
        "dpm_end_time", "adjoint", "compile", "denoise", "max_num_steps",
    )  # fmt: skip

    @property
    def last_nfe(self) -> int:
        """Score evaluations of the most recent ``sample``/``log_prob`` solve by this prior or any copy
        made by :meth:`expand` (``pyro.plate`` expands the prior at every call)."""
        return self._nfe[0]

    @property
    def options(self) -> dict:
        """The solver options, as keyword arguments of the constructor."""
        return {name: getattr(self, name) for name in self._OPTIONS}

    def with_options(self, **options) -> ScoreSDEPrior:
        """A copy with some solver options replaced (e.g. ``prior.with_options(sampler="ode")``)."""
        kwargs = {**self.options, **options}
        return type(self)(
            self.score_model, self.sde, self.event_shape, batch_shape=self.batch_shape, context=self.context,
            context_shape=self.context_shape, validate_args=self._validate_args, **kwargs,
        )  # fmt: skip

    @constraints.dependent_property(is_discrete=False, event_dim=0)
    def support(self):
        return constraints.independent(constraints.real, len(self.event_shape))

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(ScoreSDEPrior, _instance)
        batch_shape = torch.Size(batch_shape)
        new.score_model = self.score_model
        new.sde = self.sde
        for name in self._OPTIONS:
            setattr(new, name, getattr(self, name))
        new.context_shape = self.context_shape
        new.context = None
        if self.context is not None:
            new.context = self.context.expand(batch_shape + self.context_shape)
        new._nfe = self._nfe
        new._cache = self._cache
        new._compiled = self._compiled
        super(ScoreSDEPrior, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(sde={self.sde!r}, event_shape={tuple(self.event_shape)}, "
            f"batch_shape={tuple(self.batch_shape)}, sampler={self.sampler!r})"
        )

    def _validate_sample(self, value: torch.Tensor) -> None:
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"value must be a torch.Tensor, got {type(value).__name__}")
        k = len(self.event_shape)
        if value.dim() < k or value.shape[value.dim() - k :] != self.event_shape:
            raise ValueError(
                f"value has shape {tuple(value.shape)}, but its trailing dimensions must be the "
                f"event shape {tuple(self.event_shape)}"
            )
        if value.is_floating_point() or value.is_complex():
            if torch.isnan(value).any():
                raise ValueError("value contains NaN")
            if torch.isinf(value).any():
                raise ValueError("value contains inf (log p is only defined for finite values)")
        try:
            torch.broadcast_shapes(value.shape[: value.dim() - k], self.batch_shape)
        except RuntimeError as err:
            raise ValueError(
                f"value batch shape {tuple(value.shape[: value.dim() - k])} does not broadcast with "
                f"batch_shape {tuple(self.batch_shape)}"
            ) from err

    # -- helpers --------------------------------------------------------------
    @property
    def event_dim_size(self) -> int:
        return math.prod(self.event_shape)

    def _field(self, batch: torch.Size | None = None, dtype=None, device=None) -> ScoreField:
        """The score field for points laid out as ``batch`` (flattened); the context is broadcast to it."""
        context = None
        if self.context is not None:
            batch = self.batch_shape if batch is None else batch
            context = self.context.expand(batch + self.context_shape).reshape((-1,) + self.context_shape)
            if context.is_floating_point() and dtype is not None:
                context = context.to(dtype)
            if device is not None:
                context = context.to(device)
        return ScoreField(self.score_model, self.sde, self.event_shape, context=context)

    def _prior_log_prob(self, x_T: torch.Tensor) -> torch.Tensor:
        r""":math:`\log p_T(x_T)` for flat ``x_T`` ``(N, D)``."""
        return log_normal_std(x_T, self.sde.prior_std())

    def _draw_prior(self, n: int) -> torch.Tensor:
        dtype, device = model_dtype_device(self.score_model)
        return torch.randn(n, self.event_dim_size, dtype=dtype, device=device) * self.sde.prior_std()

    def _ode_kwargs(self) -> dict:
        return dict(method=self.ode_method, rtol=self.rtol, atol=self.atol, num_steps=self.num_steps)

    def _divergence_ode(self, field: ScoreField, n: int, dtype, device) -> ProbabilityFlowODE:
        probes = draw_probes = None
        if self.divergence == "hutchinson":
            generator = None
            if self.hutchinson_seed is not None:
                generator = torch.Generator(device=device).manual_seed(self.hutchinson_seed)

            def draw_probes():
                return make_probes(
                    self.hutchinson_probe, self.hutchinson_samples, n, self.event_dim_size, dtype, device, generator
                )

            if not self.hutchinson_redraw:  # one draw, fixed along the trajectory
                probes, draw_probes = draw_probes(), None
        compiled = None
        if self.compile:
            compiled = self._compiled.get(self.divergence)
            if compiled is None:
                compiled = CompiledFlow(self.score_model, self.sde, self.event_shape, self.divergence)
                self._compiled[self.divergence] = compiled
        return ProbabilityFlowODE(field, self.divergence, probes, compiled, draw_probes)

    def _flow_solve(self, x: torch.Tensor, t0: float, t1: float, lead: torch.Size | None = None):
        r"""Integrate flat states ``x`` ``(N, D)`` from ``t0`` to ``t1`` with the divergence.

        ``lead`` is the (unflattened) layout of the N points, used to broadcast a context.
        Returns the end states and :math:`\int_{t_0}^{t_1} \nabla\cdot\tilde f\,dt` ``(N,)``.
        """
        if torch.is_inference_mode_enabled():  # the divergence needs autograd, which inference mode forbids
            with torch.inference_mode(False), torch.no_grad():
                return self._flow_solve(x.clone(), t0, t1, lead)
        n = x.shape[0]
        if n == 0:
            return x, x.new_zeros(0)
        field = self._field(torch.Size([n]) if lead is None else lead, x.dtype, x.device)
        func = self._divergence_ode(field, n, x.dtype, x.device)
        y0 = torch.cat([x, x.new_zeros(n, 1)], dim=-1)
        y1 = solve_ode(func, y0, t0, t1, adjoint=self.adjoint, max_num_steps=self.max_num_steps, **self._ode_kwargs())
        self._nfe[0] = field.nfe
        return y1[:, :-1], y1[:, -1]

    @property
    def flow(self):
        """The probability-flow bijection noise at T -> data at eps (:class:`ProbabilityFlowTransform`)."""
        from .transforms import ProbabilityFlowTransform

        return ProbabilityFlowTransform(self)

    # -- sampling ---------------------------------------------------------------
    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        shape = self._extended_shape(sample_shape)
        batch = shape[: len(shape) - len(self.event_shape)]
        n = math.prod(batch)
        with torch.no_grad():
            x_T = self._draw_prior(n)
            field = self._field(batch, x_T.dtype, x_T.device)
            if n == 0:
                x = x_T
            elif self.sampler == "sde":
                x = reverse_sde_sample(field, x_T, num_steps=self.num_steps, method=self.sde_method)
            elif self.sampler == "ode":
                x = probability_flow_sample(field, x_T, max_num_steps=self.max_num_steps, **self._ode_kwargs())
            else:
                x = dpm_solver_sample(
                    field, x_T, num_steps=self.num_steps, order=self.dpm_order, t_end=self.dpm_end_time
                )
            if self.denoise and n > 0:
                x = self._tweedie(field, x)
        self._nfe[0] = field.nfe
        return x.reshape(shape)

    def _tweedie(self, field: ScoreField, x: torch.Tensor) -> torch.Tensor:
        t = torch.tensor(self.sde.eps, dtype=x.dtype, device=x.device)
        alpha, sigma = self.sde.marginal(t)
        return (x + sigma**2 * field(x, t)) / alpha

    def sample_and_log_prob(self, sample_shape=torch.Size()) -> tuple[torch.Tensor, torch.Tensor]:
        r"""Draw ``x`` and :math:`\log p_\epsilon(x)` in one probability-flow solve.

        Integrates the augmented ODE :math:`(x, \int\nabla\cdot\tilde f)` from
        :math:`T` to :math:`\epsilon` (whatever ``sampler`` is), then
        :math:`\log p_\epsilon(x_\epsilon) = \log p_T(x_T) - \int_T^\epsilon \nabla\cdot\tilde f\,dt`.
        The pair is cached: ``log_prob`` of the returned tensor returns the same values at no cost.
        """
        shape = self._extended_shape(sample_shape)
        batch = shape[: len(shape) - len(self.event_shape)]
        with torch.no_grad():
            x_T = self._draw_prior(math.prod(batch))
            x, integral = self._flow_solve(x_T, self.sde.T, self.sde.eps, batch)
            lp = self._prior_log_prob(x_T) - integral
        x, lp = x.reshape(shape), lp.reshape(batch)
        self._cache.put(x, self.score_model, self.context, self._memo_key(), lp)
        return x, lp

    def _builds_graph(self, value: torch.Tensor) -> bool:
        """Whether ``log_prob(value)`` carries an autograd graph (then it is never served from the memo)."""
        if not torch.is_grad_enabled():
            return False
        if value.requires_grad or (isinstance(self.context, torch.Tensor) and self.context.requires_grad):
            return True
        model = self.score_model
        return isinstance(model, torch.nn.Module) and any(p.requires_grad for p in model.parameters())

    def _memo_key(self) -> tuple:
        """Everything besides the value, the model's weights and the context that ``log_prob`` depends on."""
        sde = self.sde.config()
        return (tuple(self.options.items()), sde["type"], tuple(sde["params"].items()))

    # -- checkpoints --------------------------------------------------------------
    def save_pretrained(self, directory) -> None:
        """Write ``config.json`` (SDE, network, event shape, solver options, version) and
        ``model.safetensors`` to ``directory``, atomically. See :mod:`pyro_scoreflow.checkpoint`."""
        from .checkpoint import save_checkpoint

        save_checkpoint(directory, self.score_model, self.sde, self.event_shape, self.options)

    @classmethod
    def from_pretrained(cls, name_or_directory, *, map_location=None, **options) -> ScoreSDEPrior:
        """Load a prior saved by :meth:`save_pretrained`, or a shipped one by name (e.g. ``"moons"``).

        Never unpickles. ``options`` override the saved solver options; ``map_location`` moves
        the weights (e.g. ``"cuda"``)."""
        from .checkpoint import load_checkpoint

        model, sde, event_shape, saved = load_checkpoint(name_or_directory, map_location=map_location)
        return cls(model, sde, event_shape, **{**saved, **options})

    # -- density ----------------------------------------------------------------
    def _prepare_value(self, value: torch.Tensor) -> tuple[torch.Tensor, torch.Size, torch.Size]:
        """Validate ``value``, convert it to the model's dtype/device; its leading shape and the result shape."""
        if self._validate_args:
            self._validate_sample(value)
        dtype, device = model_dtype_device(self.score_model, value)
        x = value.to(dtype=dtype, device=device)
        lead = x.shape[: x.dim() - len(self.event_shape)]
        return x, lead, torch.broadcast_shapes(lead, self.batch_shape)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        r""":math:`\log p_\epsilon(value)` from the probability-flow ODE, shape ``value.shape[:-event_dim]``
        broadcast with ``batch_shape``.

        The last result is remembered (when it carries no autograd graph and the score model is an
        ``nn.Module``): the log density of a tensor just returned by :meth:`sample_and_log_prob`, or
        evaluated twice (a model and a guide sharing this prior under ``Importance``), is the same
        number, so prior terms cancel exactly even with Hutchinson's estimator. A hit needs the same
        tensor with the same numbers, the same model weights, context, SDE and options
        (:mod:`pyro_scoreflow.memo`), so an edit of any of them recomputes.
        """
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"value must be a torch.Tensor, got {type(value).__name__}")
        x, lead, out_shape = self._prepare_value(value)
        if not self._builds_graph(value):
            cached = self._cache.get(value, self.score_model, self.context, self._memo_key())
            if cached is not None and cached.shape == out_shape:
                return cached
        if self.context is not None and out_shape != lead:  # each point meets its own context
            x, lead = x.expand(out_shape + self.event_shape), out_shape
        x_T, integral = self._flow_solve(x.reshape(-1, self.event_dim_size), self.sde.eps, self.sde.T, lead)
        lp = (self._prior_log_prob(x_T) + integral).reshape(lead)
        if out_shape != lead:
            lp = lp.expand(out_shape)
        self._cache.put(value, self.score_model, self.context, self._memo_key(), lp)
        return lp

    def log_prob_lower_bound(self, value: torch.Tensor, num_samples: int = 64) -> torch.Tensor:
        r"""A Monte Carlo denoising score-matching lower bound on :math:`\log p(value)`, no ODE.

        Song, Durkan, Murray & Ermon (2021), Thm. 1, with :math:`x_t = \alpha_t x + \sigma_t z`:

        .. math::

            \log p(x) \ge E[\log \pi(x_T)]
              - \tfrac12 \int_\epsilon^T \frac{g^2}{\sigma_t^2}
                E_z\big[\|\sigma_t s_\theta(x_t, t) + z\|^2 - \|z\|^2\big]\,dt
              + \int_\epsilon^T \nabla\cdot f\,dt .

        :math:`E[\log\pi(x_T)]` and :math:`\int\nabla\cdot f = D\log(\alpha_T/\alpha_\epsilon)` are
        closed-form; the time integral is estimated with ``num_samples`` times per point drawn with
        density :math:`\propto g^2/\sigma^2` (the likelihood-weighting importance sampler, stratified)
        and antithetic noise pairs :math:`\pm z`. It bounds the density of the SDE model, which equals
        :math:`p_\epsilon` for an exact score (``value`` is treated as data at time 0; the
        :math:`[0, \epsilon]` slice is dropped, an :math:`O(\epsilon)` term). Unbiased for the bound
        (not for :math:`\log p`), cheap (``num_samples`` score evaluations per point, no divergence)
        and differentiable: the surrogate of Feng & Bouman (2023) for large models.

        :returns: shape ``value.shape[:-event_dim]`` broadcast with ``batch_shape``.
        """
        from .training import TimeSampler

        num_samples = _check_int("num_samples", num_samples)
        x, _, out_shape = self._prepare_value(value)
        dtype, device = x.dtype, x.device
        x = x.expand(out_shape + self.event_shape).reshape(-1, self.event_dim_size)
        n, d = x.shape
        sde = self.sde
        # E[log pi(x_T)] with x_T ~ N(alpha_T x, sigma_T^2 I) and pi = N(0, s^2 I)
        t_end = torch.tensor([sde.eps, sde.T], dtype=dtype, device=device)
        alphas, sigmas = sde.marginal(t_end)
        s2 = sde.prior_std() ** 2
        prior_term = -0.5 * (alphas[1] ** 2 * (x**2).sum(-1) + d * sigmas[1] ** 2) / s2 - 0.5 * d * math.log(
            2 * math.pi * s2
        )
        drift_term = d * torch.log(alphas[1] / alphas[0])
        # the time integral: stratified u -> t ~ q ∝ g^2 / sigma^2, antithetic z
        half = (num_samples + 1) // 2
        sampler = TimeSampler(sde, "likelihood")
        u = (torch.arange(half, dtype=dtype, device=device) + torch.rand(n, half, dtype=dtype, device=device)) / half
        t, weight = sampler(u.reshape(-1))
        z = torch.randn(n * half, d, dtype=dtype, device=device)
        alpha, sigma = sde.marginal(t)
        alpha, sigma = alpha.unsqueeze(-1), sigma.unsqueeze(-1)
        xs = x.repeat_interleave(half, 0)
        field = self._field(torch.Size([n * half]) if self.context is None else out_shape, dtype, device)
        if self.context is not None:  # one context row per point, repeated for its times
            field.context = field.context.repeat_interleave(half, 0)
        terms = []
        for sign in (1.0, -1.0):
            x_t = alpha * xs + sign * sigma * z
            score = field(x_t, t)
            terms.append((sigma * score + sign * z).pow(2).sum(-1) - z.pow(2).sum(-1))
        integrand = 0.5 * (terms[0] + terms[1])  # antithetic average, (n * half,)
        integral = weight * (sde.T - sde.eps) * integrand.reshape(n, half).mean(-1)
        bound = prior_term - 0.5 * integral + drift_term
        return bound.reshape(out_shape)
