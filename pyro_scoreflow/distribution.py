r""":class:`ScoreSDEPrior`: a score model and a forward SDE as a Pyro distribution."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from pyro.distributions import Delta
from pyro.distributions.torch_distribution import TorchDistribution
from pyro.ops.integrator import register_exception_handler
from torch import nn
from torch.distributions import constraints, register_kl

from .checkpoint import load_checkpoint, save_checkpoint
from .checks import ArgumentTypeError, check_batch_shape, check_event_shape, check_int
from .dynamics import ScoreField, SolverError, model_dtype_device
from .losses import dsm_bound
from .memo import LogProbMemo
from .options import SAMPLERS, SolverOptions
from .samplers import final_time, sample_with_options
from .sde import ForwardSDE
from .transforms import ProbabilityFlowTransform, broadcast_context

__all__ = ["SAMPLERS", "ScoreSDEPrior"]

# Inside HMC/NUTS a solver failure (step-size underflow or overflow on a wild proposal) becomes a divergent,
# rejected proposal, like Pyro's handling of singular matrices, instead of ending the chain.
register_exception_handler("pyro_scoreflow_solver", lambda e: isinstance(e, SolverError), warn_on_overwrite=False)


def _check_context(context, context_shape, batch_shape) -> tuple[torch.Tensor | None, torch.Size, torch.Size]:
    """Validate a conditioning context; its leading dimensions (beyond ``context_shape``) join the batch shape."""
    if context is None:
        if context_shape is not None and len(context_shape) > 0:
            raise ValueError("context_shape was given without a context")
        return None, torch.Size(), batch_shape
    if not isinstance(context, torch.Tensor):
        raise ArgumentTypeError(f"context must be a torch.Tensor, got {type(context).__name__}")
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
    :math:`T` down to :math:`\epsilon` (:mod:`pyro_scoreflow.samplers`):

    * ``sampler="sde"`` (default): the reverse-time SDE
      :math:`dx = [f - g^2 s_\theta]\,dt + g\,d\bar w` with ``torchsde.sdeint``
      (``sde_method``, ``num_steps`` equal steps);
    * ``sampler="ode"``: the probability-flow ODE
      :math:`dx = \tilde f\,dt`, :math:`\tilde f = f - \tfrac12 g^2 s_\theta`, with
      ``torchdiffeq.odeint`` (``ode_method``; ``rtol``/``atol`` for adaptive
      methods, ``num_steps`` for fixed-grid ones);
    * ``sampler="dpm-solver"``: DPM-Solver++ multistep (order ``dpm_order``, default 3) with the UniC
      corrector on the probability-flow ODE, ``num_steps`` score evaluations in all (use 10-20), stopping
      at ``dpm_end_time`` (default: where :math:`\sigma/\alpha = 0.025`;
      :func:`~pyro_scoreflow.samplers.dpm_solver_sample`);
    * ``sampler="pc"``: predictor-corrector sampling, a reverse-diffusion (``predictor``) step and
      ``corrector_steps`` Langevin steps with signal-to-noise ratio ``snr`` per time step;
    * ``sampler="langevin"``: annealed Langevin dynamics over ``num_steps`` noise levels.

    It returns :math:`x_\epsilon` (``"dpm-solver"``: :math:`x_{t_{end}}`); ``denoise=True`` adds Tweedie's final
    denoising step :math:`\hat x_0 = (x_t + \sigma_t^2 s_\theta(x_t, t))/\alpha_t` at that last time
    (then samples are no longer draws of :math:`p_\epsilon`).

    **log_prob** integrates the probability-flow ODE augmented with its
    divergence from :math:`\epsilon` to :math:`T` (instantaneous change of variables, :attr:`flow`):

    .. math::

        \log p_\epsilon(x) = \log p_T(x_T) + \int_\epsilon^T \nabla\cdot\tilde f(x_t, t)\,dt,

    with the divergence exact (``divergence="exact"``: the trace of the
    Jacobian from one forward pass and ``D`` batched vector-Jacobian products)
    or Hutchinson's unbiased estimate :math:`\epsilon^\top J \epsilon`
    (``hutchinson_samples`` probes per point, fixed along the trajectory).
    The error of adaptive solvers is controlled *per point*: the tolerance is
    met by every point of a batch, not by the batch's RMS error.

    ``log_prob`` is differentiable with respect to ``value``, the network's trainable parameters and a
    context (backpropagation through the solver, or ``adjoint=True`` for memory that does not grow with
    the number of steps), so SVI and NUTS work; it also works under ``torch.no_grad()``. Computations
    run in the score model's dtype and device (its parameters'; the value's floating dtype for a
    parameter-free callable). A score model must be differentiable in ``x`` for ``log_prob``.

    The options (every keyword argument below but ``batch_shape``, ``context``, ``context_shape`` and
    ``validate_args``) form one validated :class:`~pyro_scoreflow.options.SolverOptions`
    (:attr:`solver_options`), which documents each default and why; each is also an attribute
    (``prior.rtol``; setting one validates it).

    :param callable score_model: ``score_model(x, t)`` estimating :math:`\nabla_x\log p_t(x)`.
    :param ForwardSDE sde: the forward SDE.
    :param event_shape: shape of one draw, e.g. ``(2,)`` or ``(1, 8, 8)``.
    :param options: solver and sampler options (``sampler``, ``num_steps``, ``sde_method``, ``ode_method``,
        ``rtol``, ``atol``, ``divergence``, ``hutchinson_samples``, ``hutchinson_probe``, ``hutchinson_seed``,
        ``hutchinson_redraw``, ``dpm_order``, ``dpm_end_time``, ``corrector_steps``, ``snr``, ``predictor``,
        ``langevin_step_size``, ``adjoint``, ``compile``, ``denoise``, ``max_num_steps``, ``grad_chunk_size``): see
        :class:`~pyro_scoreflow.options.SolverOptions`.
    :param batch_shape: the batch shape (usually set by :meth:`expand`).
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
        batch_shape: Sequence[int] = (),
        context: torch.Tensor | None = None,
        context_shape: Sequence[int] | None = None,
        validate_args=None,
        **options,
    ):
        if not callable(score_model):
            raise ArgumentTypeError(
                f"score_model must be callable as score_model(x, t), got {type(score_model).__name__}"
            )
        if not isinstance(sde, ForwardSDE):
            raise ArgumentTypeError(f"sde must be a VPSDE, SubVPSDE or VESDE (a ForwardSDE), got {type(sde).__name__}")
        self.score_model = score_model
        self.sde = sde
        self._options = SolverOptions().replace(**options).check_sde(sde)
        self._nfe = [0]  # score evaluations of the last solve, shared with expanded copies
        # one-entry memo of log_prob, shared with expanded copies (pyro.plate expands the prior at
        # every call, so model and guide get different instances); see pyro_scoreflow.memo
        self._cache = LogProbMemo()
        self._compiled: dict = {}  # divergence -> CompiledFlow, shared with expanded copies
        event_shape = check_event_shape(event_shape)
        batch_shape = check_batch_shape(batch_shape)
        self.context, self.context_shape, batch_shape = _check_context(context, context_shape, batch_shape)
        super().__init__(batch_shape, event_shape, validate_args=validate_args)

    # -- options --------------------------------------------------------------------------------------
    @property
    def solver_options(self) -> SolverOptions:
        """The validated solver and sampler options."""
        return self._options

    @property
    def options(self) -> dict:
        """The solver options, as keyword arguments of the constructor."""
        return self._options.as_dict()

    def with_options(self, **options) -> ScoreSDEPrior:
        """A copy with some solver options replaced (e.g. ``prior.with_options(sampler="ode")``)."""
        return type(self)(
            self.score_model, self.sde, self.event_shape, batch_shape=self.batch_shape, context=self.context,
            context_shape=self.context_shape, validate_args=self._validate_args,
            **self._options.replace(**options).as_dict(),
        )  # fmt: skip

    @property
    def last_nfe(self) -> int:
        """Score evaluations of the most recent ``sample``/``log_prob`` solve by this prior or any copy
        made by :meth:`expand` (``pyro.plate`` expands the prior at every call)."""
        return self._nfe[0]

    def _record_nfe(self, nfe: int) -> None:
        self._nfe[0] = nfe

    # -- Pyro / torch.distributions plumbing -----------------------------------------------------------
    @constraints.dependent_property(is_discrete=False, event_dim=0)
    def support(self):
        return constraints.independent(constraints.real, len(self.event_shape))

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(ScoreSDEPrior, _instance)
        batch_shape = check_batch_shape(batch_shape)
        new.score_model = self.score_model
        new.sde = self.sde
        new._options = self._options
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
        k = len(self.event_shape)
        if value.dim() < k or value.shape[value.dim() - k :] != self.event_shape:
            raise ValueError(
                f"value has shape {tuple(value.shape)}, but its trailing dimensions must be the "
                f"event shape {tuple(self.event_shape)}"
            )
        if value.is_floating_point():
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

    @property
    def event_dim_size(self) -> int:
        """The number of scalars in one draw, :math:`D = \\prod` ``event_shape``."""
        return math.prod(self.event_shape)

    @property
    def mean(self):
        raise NotImplementedError(
            "ScoreSDEPrior has no closed-form mean: estimate it from samples, e.g. prior.sample((n,)).mean(0)"
        )

    @property
    def variance(self):
        raise NotImplementedError(
            "ScoreSDEPrior has no closed-form variance: estimate it from samples, e.g. prior.sample((n,)).var(0)"
        )

    def rsample(self, sample_shape=torch.Size()):
        raise NotImplementedError(
            "ScoreSDEPrior has no reparameterized sampler (has_rsample=False); for gradients through draws use "
            "pyro_scoreflow.infer.ScoreFlowReparam, which writes x = decode(x_base) with x_base from the SDE's prior"
        )

    def _score_field(self, lead: torch.Size, dtype, device) -> ScoreField:
        """The score field for points laid out as ``lead`` (flattened), with the context broadcast to them."""
        context = broadcast_context(self.context, self.context_shape, lead, dtype, device)
        return ScoreField(self.score_model, self.sde, self.event_shape, context=context)

    @property
    def flow(self) -> ProbabilityFlowTransform:
        """The probability-flow bijection noise at T -> data at eps (:class:`ProbabilityFlowTransform`)."""
        return ProbabilityFlowTransform(
            self.score_model, self.sde, self.event_shape, self._options, context=self.context,
            context_shape=self.context_shape, compiled=self._compiled, record_nfe=self._record_nfe,
        )  # fmt: skip

    # -- sampling --------------------------------------------------------------------------------------
    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        r"""Draw ``(*sample_shape, *batch_shape, *event_shape)`` samples: :math:`x_T` from the SDE's prior,
        then the sampler named by ``sampler`` from :math:`T` down to :math:`\epsilon` (class docstring),
        then Tweedie's denoising step if ``denoise=True``. Not differentiable (``has_rsample = False``)."""
        shape = self._extended_shape(sample_shape)
        lead = shape[: len(shape) - len(self.event_shape)]
        dtype, device = model_dtype_device(self.score_model)
        with torch.no_grad():
            x_T = self.sde.prior((self.event_dim_size,), dtype=dtype, device=device).sample((math.prod(lead),))
            field = self._score_field(lead, dtype, device)
            try:
                x = x_T if x_T.shape[0] == 0 else sample_with_options(field, x_T, self._options)
                if self._options.denoise and x.shape[0] > 0:
                    t_end = final_time(self.sde, self._options)
                    x = field.denoised(x, torch.tensor(t_end, dtype=x.dtype, device=x.device))
            finally:
                self._record_nfe(field.nfe)
        return x.reshape(shape)

    def sample_and_log_prob(self, sample_shape=torch.Size()) -> tuple[torch.Tensor, torch.Tensor]:
        r"""Draw ``x`` and :math:`\log p_\epsilon(x)` in one probability-flow solve.

        Integrates the augmented ODE :math:`(x, \int\nabla\cdot\tilde f)` from
        :math:`T` to :math:`\epsilon` (whatever ``sampler`` is), then
        :math:`\log p_\epsilon(x_\epsilon) = \log p_T(x_T) - \int_T^\epsilon \nabla\cdot\tilde f\,dt`.
        The pair is remembered: ``log_prob`` of the returned tensor returns the same values at no cost.
        """
        shape = self._extended_shape(sample_shape)
        lead = shape[: len(shape) - len(self.event_shape)]
        dtype, device = model_dtype_device(self.score_model)
        with torch.no_grad():
            x_T = self.sde.prior(self.event_shape, dtype=dtype, device=device).sample(lead)
            x, integral = self.flow.solve(x_T, self.sde.T, self.sde.eps)
            lp = self.sde.prior_log_prob(x_T, len(self.event_shape)) - integral
        self._cache.put(x, self.score_model, self.context, self._memo_key(), lp)
        return x, lp

    # -- checkpoints -----------------------------------------------------------------------------------
    def save_pretrained(self, directory) -> None:
        """Write ``config.json`` (SDE, network, event shape, solver options, version) and the weights
        (``model-<hash>.safetensors``) to ``directory``, atomically. See :mod:`pyro_scoreflow.checkpoint`."""
        save_checkpoint(directory, self.score_model, self.sde, self.event_shape, self.options)

    @classmethod
    def from_pretrained(
        cls, name_or_directory, *, map_location=None, trainable: bool = False, **options
    ) -> ScoreSDEPrior:
        """Load a prior saved by :meth:`save_pretrained`, or a shipped one by name (e.g. ``"moons"``).

        Never unpickles. ``options`` override the saved solver options; ``map_location`` moves
        the weights (e.g. ``"cuda"``). A string equal to a shipped name always means the shipped prior,
        even when the working directory holds a folder of that name (a warning then says so); any other
        string, and a ``pathlib.Path``, is a directory: write a local folder named like a shipped prior as
        ``"./moons"`` or ``Path("moons")``.

        :param bool trainable: ``False`` (default): the network is frozen (``requires_grad=False``; ``log_prob``
            builds no graph through the weights). ``True``: its weights require gradients, to fine-tune with
            :func:`~pyro_scoreflow.fit` or SVI (``pyro.module("prior", prior.score_model)``). Eval mode either way.
        """
        model, sde, event_shape, saved = load_checkpoint(
            name_or_directory, map_location=map_location, trainable=trainable
        )
        return cls(model, sde, event_shape, **{**saved, **options})

    # -- density ---------------------------------------------------------------------------------------
    def _prepare_value(self, value: torch.Tensor) -> tuple[torch.Tensor, torch.Size]:
        """Check ``value``, convert it to the model's dtype/device; returns it and the result shape."""
        if not isinstance(value, torch.Tensor):
            raise ArgumentTypeError(f"value must be a torch.Tensor, got {type(value).__name__}")
        if value.is_complex() or value.dtype == torch.bool:
            raise ValueError(f"value must hold real numbers, got dtype {value.dtype}")
        if self._validate_args:
            self._validate_sample(value)
        dtype, device = model_dtype_device(self.score_model, value)
        x = value.to(dtype=dtype, device=device)
        lead = x.shape[: x.dim() - len(self.event_shape)]
        return x, torch.broadcast_shapes(lead, self.batch_shape)

    def _builds_graph(self, value: torch.Tensor) -> bool:
        """Whether ``log_prob(value)`` carries an autograd graph (then it is never served from the memo)."""
        if not torch.is_grad_enabled():
            return False
        if value.requires_grad or (isinstance(self.context, torch.Tensor) and self.context.requires_grad):
            return True
        model = self.score_model
        return isinstance(model, nn.Module) and any(p.requires_grad for p in model.parameters())

    def _memo_key(self) -> tuple:
        """Everything besides the value, the model's weights and the context that ``log_prob`` depends on."""
        sde = self.sde.config()
        return (self._options, sde["type"], tuple(sde["params"].items()))

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        r""":math:`\log p_\epsilon(value)` from the probability-flow ODE, shape ``value.shape[:-event_dim]``
        broadcast with ``batch_shape``: :math:`\log p_T(x_T) + \int_\epsilon^T \nabla\cdot\tilde f\,dt` with
        :math:`x_T` = ``flow.inv(value)`` (:meth:`ProbabilityFlowTransform.solve`).

        The last result is remembered (when it carries no autograd graph and the score model is an
        ``nn.Module``): the log density of a tensor just returned by :meth:`sample_and_log_prob`, or
        evaluated twice (a model and a guide sharing this prior under ``Importance``), is the same
        number, so prior terms cancel exactly even with Hutchinson's estimator. A hit needs the same
        tensor with the same numbers, the same model weights, context, SDE and options
        (:mod:`pyro_scoreflow.memo`), so an edit of any of them recomputes.
        """
        x, out_shape = self._prepare_value(value)
        if not self._builds_graph(value):
            cached = self._cache.get(value, self.score_model, self.context, self._memo_key())
            if cached is not None and cached.shape == out_shape:
                return cached
        chunk = self._options.grad_chunk_size
        if chunk is not None and self._value_gradient_only(value) and x.numel() > chunk * self.event_dim_size:
            lp = self._log_prob_in_chunks(x, chunk)
        else:
            lp = self._log_prob(x)
        if lp.shape != out_shape:
            lp = lp.expand(out_shape)
        self._cache.put(value, self.score_model, self.context, self._memo_key(), lp)
        return lp

    def _log_prob(self, x: torch.Tensor) -> torch.Tensor:
        x_T, integral = self.flow.solve(x, self.sde.eps, self.sde.T)
        return self.sde.prior_log_prob(x_T, len(self.event_shape)) + integral

    def _value_gradient_only(self, value: torch.Tensor) -> bool:
        """Gradients are wanted for the value and for nothing else (the case chunking can serve)."""
        if not (torch.is_grad_enabled() and value.requires_grad) or self.context is not None:
            return False
        model = self.score_model
        return not (isinstance(model, nn.Module) and any(p.requires_grad for p in model.parameters()))

    def _log_prob_in_chunks(self, x: torch.Tensor, chunk: int) -> torch.Tensor:
        """``log_prob`` of many points with a value gradient, in memory bounded by one chunk's graph: each
        chunk's gradient is taken right after its solve, and backward multiplies by it (``grad_chunk_size``)."""
        k = len(self.event_shape)
        flat = x.detach().reshape((-1,) + self.event_shape)
        values, grads = [], []
        for part in flat.split(chunk):
            part = part.requires_grad_(True)
            with torch.enable_grad():
                lp = self._log_prob(part)
                (grad,) = torch.autograd.grad(lp.sum(), part)
            values.append(lp.detach())
            grads.append(grad)
        lead = x.shape[: x.dim() - k]
        return _PrecomputedGradient.apply(x, torch.cat(values).reshape(lead), torch.cat(grads).reshape(x.shape))

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
        density :math:`\propto g^2/\sigma^2` (uniform in the log-SNR, stratified) and antithetic noise
        pairs :math:`\pm z`. It bounds the density of the SDE model, which equals
        :math:`p_\epsilon` for an exact score (``value`` is treated as data at time 0; the
        :math:`[0, \epsilon]` slice is dropped, an :math:`O(\epsilon)` term). Unbiased for the bound
        (not for :math:`\log p`), cheap (``num_samples`` score evaluations per point, no divergence)
        and differentiable: the surrogate of Feng & Bouman (2023) for large models.

        :returns: shape ``value.shape[:-event_dim]`` broadcast with ``batch_shape``.
        """
        num_samples = check_int("num_samples", num_samples, maximum=2**20)
        x, out_shape = self._prepare_value(value)
        if x.numel() == 0:
            raise ValueError(f"value must hold at least one point, got shape {tuple(value.shape)}")
        x = x.expand(out_shape + self.event_shape).reshape(-1, self.event_dim_size)
        field = self._score_field(out_shape, x.dtype, x.device)
        if field.context is not None:  # one context row per point, repeated for its times (dsm_bound's row order)
            field.context = field.context.repeat_interleave((num_samples + 1) // 2, 0)
        return dsm_bound(field, self.sde, x, num_samples).reshape(out_shape)


class _PrecomputedGradient(torch.autograd.Function):
    """``values`` as a function of ``x`` whose per-point gradient ``grad`` (shaped like ``x``) is already known."""

    @staticmethod
    def forward(ctx, x, values, grad):
        ctx.save_for_backward(grad)
        return values.clone()

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return grad_output.reshape(grad_output.shape + (1,) * (grad.dim() - grad_output.dim())) * grad, None, None


def _option_property(name: str) -> property:
    def get(self):
        return getattr(self._options, name)

    def set(self, value):  # validated; the memo key includes the options, so results are recomputed
        self._options = self._options.replace(**{name: value}).check_sde(self.sde)

    return property(get, set, doc=f"Option ``{name}``: see :class:`~pyro_scoreflow.options.SolverOptions`.")


for _name in SolverOptions.names():
    setattr(ScoreSDEPrior, _name, _option_property(_name))
del _name


@register_kl(Delta, ScoreSDEPrior)
def _kl_delta_score_prior(p, q):
    """No closed form: ``TraceMeanField_ELBO`` then uses the log density its model trace already holds
    (one probability-flow solve per step) instead of Pyro's generic ``-q.log_prob(p.v)`` (a second one)."""
    raise NotImplementedError("KL(Delta || ScoreSDEPrior) has no closed form beyond -log_prob(value)")
