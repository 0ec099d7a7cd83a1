r"""The solver and sampler options of a score prior, as one validated, immutable object.

:class:`SolverOptions` is what :class:`~pyro_scoreflow.ScoreSDEPrior` keeps, what ``with_options``
and ``expand`` copy and what checkpoints store (:meth:`SolverOptions.as_dict` is JSON-ready). The
prior's keyword arguments are the convenience: ``ScoreSDEPrior(model, sde, shape, rtol=1e-3)``
builds ``SolverOptions(rtol=1e-3)``. Every default is chosen and explained here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .checks import (
    MAX_STEPS,
    ArgumentTypeError,
    check_bool,
    check_choice,
    check_int,
    check_optional,
    check_real,
    check_seed,
)

__all__ = [
    "ADAPTIVE_ODE_METHODS",
    "DIVERGENCES",
    "FIXED_ODE_METHODS",
    "PROBES",
    "SAMPLERS",
    "SDE_METHODS",
    "SolverOptions",
]

#: ``sample``'s algorithms: reverse-time SDE, probability-flow ODE, few-step DPM-Solver++,
#: predictor-corrector, annealed Langevin dynamics (:mod:`pyro_scoreflow.samplers`)
SAMPLERS = ("sde", "ode", "dpm-solver", "pc", "langevin")
DIVERGENCES = ("exact", "hutchinson")
PROBES = ("rademacher", "gaussian")
ADAPTIVE_ODE_METHODS = ("dopri8", "dopri5", "bosh3", "fehlberg2", "adaptive_heun")
FIXED_ODE_METHODS = ("euler", "midpoint", "heun2", "heun3", "rk4", "explicit_adams", "implicit_adams", "fixed_adams")
#: torchsde methods valid for diagonal noise, with the SDE type and Levy-area approximation each needs.
#: The noise is additive, so Ito == Stratonovich. "reversible_heun" is accepted but only weakly stable on
#: the stiff reverse drift near eps (200 steps still biased on a 2-D mixture): prefer "euler", "heun", "srk".
SDE_METHODS = {
    "euler": ("ito", "none"),
    "milstein": ("ito", "none"),
    "srk": ("ito", "space-time"),
    "euler_heun": ("stratonovich", "none"),
    "heun": ("stratonovich", "none"),
    "midpoint": ("stratonovich", "none"),
    "reversible_heun": ("stratonovich", "none"),
    "log_ode": ("stratonovich", "foster"),
}
PC_PREDICTORS = ("euler-maruyama", "reverse-diffusion")


@dataclass(frozen=True)
class SolverOptions:
    r"""How a :class:`~pyro_scoreflow.ScoreSDEPrior` samples and evaluates its density.

    **Sampling** (``sample``):

    :ivar str sampler: ``"sde"`` (reverse-time SDE, torchsde; the default: consistent for any score,
        500 steps keep its bias below the two-sample noise of :math:`10^4` samples), ``"ode"``
        (probability-flow ODE, torchdiffeq), ``"dpm-solver"`` (few-step DPM-Solver++), ``"pc"``
        (predictor plus Langevin corrector) or ``"langevin"`` (annealed Langevin dynamics).
    :ivar int num_steps: fixed steps of ``"sde"``, ``"pc"``, ``"langevin"`` and fixed-grid ODE methods;
        score evaluations of ``"dpm-solver"`` (use 10-20 there).
    :ivar str sde_method: a torchsde method valid for diagonal noise (:data:`SDE_METHODS`).
    :ivar int dpm_order: order of the multistep DPM-Solver++ predictor (1, 2 or 3; 3 measured best at 10
        steps); its UniC corrector adds one.
    :ivar float dpm_end_time: where ``"dpm-solver"`` stops; ``None`` picks the time where
        :math:`\sigma/\alpha =` :data:`~pyro_scoreflow.samplers.DPM_END_NOISE` (see there).
    :ivar int corrector_steps: Langevin steps per noise level for ``"pc"`` and ``"langevin"``.
    :ivar float snr: the Langevin signal-to-noise ratio :math:`r` (step :math:`2a_t(r\|z\|/\|s\|)^2`);
        ``None`` picks the SDE's default (:func:`~pyro_scoreflow.samplers.default_snr`).
    :ivar str predictor: the ``"pc"`` predictor: ``"reverse-diffusion"`` (exact transition kernel of
        the forward SDE, Song et al.'s choice) or ``"euler-maruyama"``.
    :ivar float langevin_step_size: ``"langevin"`` only: Song & Ermon's step size :math:`\varepsilon` (the step
        at noise level :math:`i` is :math:`\tfrac{\varepsilon}{2}\sigma_i^2/\sigma_L^2`); ``None`` (default)
        sets each step from ``snr`` instead, which needs no tuning.
    :ivar bool denoise: apply Tweedie's denoising step :math:`\hat x_0 = (x + \sigma^2 s)/\alpha` at the end.

    **Density** (``log_prob``, ``sample_and_log_prob``, ``flow``) and ``sampler="ode"``:

    :ivar str ode_method: a torchdiffeq method (``"dopri5"``: adaptive 5th order, the usual choice).
    :ivar float rtol, atol: tolerances of adaptive methods, held by every point of a batch
        (1e-5: log-density errors around 1e-4 nats per point in 2-D, far above float32 round-off).
    :ivar int max_num_steps: step budget of adaptive solvers before :class:`~pyro_scoreflow.SolverError`.
    :ivar str divergence: ``"exact"`` (autograd trace, ``D`` vector-Jacobian products) or ``"hutchinson"``.
    :ivar int hutchinson_samples: probes per point, averaged.
    :ivar str hutchinson_probe: ``"rademacher"`` (lower variance) or ``"gaussian"``.
    :ivar int hutchinson_seed: draw probes from this seed (repeatable estimates); ``None``: torch's RNG.
    :ivar bool hutchinson_redraw: fresh probes at every evaluation (lower variance, not smooth in the value).
    :ivar bool adjoint: gradients by the adjoint method: memory flat in the number of steps, but about 10x the
        time of backpropagation (both solves 10x tighter, and the backward solve differentiates the divergence);
        for parameter or context gradients over batches too large for memory (docs/math.md).
    :ivar bool compile: ``torch.compile`` the augmented probability-flow field.
    :ivar int grad_chunk_size: bounds the memory of ``log_prob`` with gradients for the value only (HMC, NUTS,
        SVI with a frozen prior): backpropagation through a solve keeps every step's graph, about 5 MB per
        2-D point with the shipped moons network (2,000 points: 10 GB). Batches larger than this are solved in
        chunks whose gradients are taken at once and kept (``D`` numbers per point), so memory is that of
        one chunk. Second derivatives are then unavailable; ``None`` turns chunking off. Gradients for the
        network's parameters or a context are never chunked: use ``adjoint=True`` for large batches there.
    """

    sampler: str = "sde"
    num_steps: int = 500
    sde_method: str = "euler"
    ode_method: str = "dopri5"
    rtol: float = 1e-5
    atol: float = 1e-5
    divergence: str = "exact"
    hutchinson_samples: int = 1
    hutchinson_probe: str = "rademacher"
    hutchinson_seed: int | None = None
    hutchinson_redraw: bool = False
    dpm_order: int = 3
    dpm_end_time: float | None = None
    corrector_steps: int = 1
    snr: float | None = None
    predictor: str = "reverse-diffusion"
    langevin_step_size: float | None = None
    adjoint: bool = False
    compile: bool = False
    denoise: bool = False
    max_num_steps: int = 100_000
    grad_chunk_size: int | None = 256

    def __post_init__(self):
        checked = {
            "sampler": check_choice("sampler", self.sampler, SAMPLERS),
            "num_steps": check_int("num_steps", self.num_steps, maximum=MAX_STEPS),
            "sde_method": check_choice("sde_method", self.sde_method, tuple(SDE_METHODS)),
            "ode_method": check_choice("ode_method", self.ode_method, ADAPTIVE_ODE_METHODS + FIXED_ODE_METHODS),
            "rtol": check_real("rtol", self.rtol, positive=True),
            "atol": check_real("atol", self.atol, positive=True),
            "divergence": check_choice("divergence", self.divergence, DIVERGENCES),
            "hutchinson_samples": check_int("hutchinson_samples", self.hutchinson_samples, maximum=2**20),
            "hutchinson_probe": check_choice("hutchinson_probe", self.hutchinson_probe, PROBES),
            "hutchinson_seed": check_optional(check_seed, "hutchinson_seed", self.hutchinson_seed),
            "hutchinson_redraw": check_bool("hutchinson_redraw", self.hutchinson_redraw),
            "dpm_order": check_int("dpm_order", self.dpm_order, maximum=3),
            "dpm_end_time": check_optional(check_real, "dpm_end_time", self.dpm_end_time, positive=True),
            "corrector_steps": check_int("corrector_steps", self.corrector_steps, minimum=0, maximum=MAX_STEPS),
            "snr": check_optional(check_real, "snr", self.snr, positive=True),
            "predictor": check_choice("predictor", self.predictor, PC_PREDICTORS),
            "langevin_step_size": check_optional(
                check_real, "langevin_step_size", self.langevin_step_size, positive=True
            ),
            "adjoint": check_bool("adjoint", self.adjoint),
            "compile": check_bool("compile", self.compile),
            "denoise": check_bool("denoise", self.denoise),
            "max_num_steps": check_int("max_num_steps", self.max_num_steps, maximum=MAX_STEPS),
            "grad_chunk_size": check_optional(check_int, "grad_chunk_size", self.grad_chunk_size),
        }
        if checked["adjoint"] and checked["hutchinson_redraw"]:
            raise ValueError(
                "hutchinson_redraw=True cannot be combined with adjoint=True: the adjoint's backward solve "
                "re-evaluates the field, and would see other probes than the forward solve"
            )
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The option names, in order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    def replace(self, **changes) -> SolverOptions:
        """A copy with some options changed (validated)."""
        unknown = sorted(set(changes) - set(self.names()))
        if unknown:
            raise ArgumentTypeError(f"unknown option(s) {unknown}; the options are {list(self.names())}")
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict:
        """The options as keyword arguments (JSON-serialisable)."""
        return {name: getattr(self, name) for name in self.names()}

    def check_sde(self, sde) -> SolverOptions:
        """Check the options that depend on the SDE's time interval; returns ``self``."""
        if self.dpm_end_time is not None and not sde.eps <= self.dpm_end_time < sde.T:
            raise ValueError(f"dpm_end_time must lie in [eps, T) = [{sde.eps}, {sde.T}), got {self.dpm_end_time}")
        return self
