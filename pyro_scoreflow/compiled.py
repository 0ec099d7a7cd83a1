r"""The augmented probability-flow field as one ``torch.compile``-d graph.

For small problems (a few points, low dimension: what NUTS and SVI evaluate at
every step) an evaluation of the augmented field
:math:`(\tilde f(x, t), \nabla\cdot\tilde f(x, t))` is a few dozen tiny tensor
operations, so Python and dispatcher overhead, not arithmetic, sets its cost.
:class:`CompiledFlow` evaluates the *same* field as the eager path
(:func:`~pyro_scoreflow.dynamics.score_drift` and
:func:`~pyro_scoreflow.dynamics.divergence_from_vjp`), with the vector-Jacobian products taken by
:mod:`torch.func` (``vjp``, then ``vmap`` of the pullback over the unit covectors or the
Hutchinson probes) so that the whole evaluation is traceable; ``torch.compile`` turns it into a
few fused kernels, its backward (for gradients of ``log_prob``) included.

The score model's output is checked (shape, values, autograd graph) by one eager evaluation
before the first compiled one, and its finiteness at every call through a traced flag: the
eager checks are data-dependent Python that cannot be traced.

The first call with a new input layout (batch size, dtype, grad mode) compiles
(seconds to tens of seconds on a CPU); later calls reuse the compiled code.
If compilation fails (no C++ compiler, an operation the compiler does not
support), :class:`CompiledFlow` warns once and the caller evaluates eagerly.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
from torch.distributions import Distribution
from torch.func import vjp, vmap

from .dynamics import ScoreField, SolverError, divergence_from_vjp, evaluate_score, score_drift

__all__ = ["CompiledFlow"]


@contextlib.contextmanager
def _keep_distribution_validation():
    """Restore ``torch.distributions.Distribution``'s default ``validate_args`` afterwards.

    ``torch.compile`` switches argument validation of all distributions off, process-wide, the
    first time it is called (dynamo's ``TorchPatcher``, once per process, when the compiled
    function is created, not when it runs); without this, ``compile=True`` would silently turn
    off the value checks of every Pyro distribution, this package's included.
    """
    saved = Distribution._validate_args
    try:
        yield
    finally:
        Distribution.set_default_validate_args(saved)


def _augmented_field(score_model, sde, event_shape, t, state, probes, context):
    """``([f̃(x, t), ∇·f̃(x, t)], all finite?)`` for ``state = [x, logdet]``: the function that is compiled."""
    x = state[:, :-1]
    t = t.clamp(sde.eps, sde.T)

    def flow(z: torch.Tensor) -> torch.Tensor:
        s = evaluate_score(score_model, z, t, event_shape, context).reshape(z.shape)
        return score_drift(sde, z, t, s, 0.5)

    v, pullback = vjp(flow, x)
    div = divergence_from_vjp(lambda c: vmap(pullback)(c)[0], x, probes)
    return torch.cat([v, div.unsqueeze(-1)], dim=-1), torch.isfinite(v).all()


class CompiledFlow:
    r"""The augmented probability-flow field of a score model, compiled; shared by a prior and its copies.

    The divergence is exact, or Hutchinson's estimate with the probes passed at each call.
    Not picklable state (the compiled function) is rebuilt after unpickling.
    """

    def __init__(self):
        self.failed: str | None = None
        self.validated = False  # set once an eager evaluation has checked the model's output
        self._build()

    def _build(self) -> None:
        with _keep_distribution_validation():
            self._compiled = torch.compile(_augmented_field, dynamic=None)

    def __getstate__(self) -> dict:
        return {"failed": self.failed, "validated": self.validated}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._build()

    def __call__(self, field: ScoreField, t, state, probes, create_graph: bool) -> torch.Tensor | None:
        """The augmented field at ``(t, state)``, or ``None`` if compiling failed (then evaluate eagerly)."""
        if self.failed is not None:
            return None
        if not self.validated:  # one eager call checks the model's output: shape, values, autograd graph
            with torch.enable_grad():
                field.probability_flow(state[:, :-1].detach().requires_grad_(True), t, need_graph=True)
            self.validated = True
        try:
            with torch.set_grad_enabled(create_graph):
                augmented, finite = self._compiled(
                    field.score_model, field.sde, field.event_shape, t,
                    state if create_graph else state.detach(), probes, field.context,
                )  # fmt: skip
        except Exception as err:  # noqa: BLE001 - any compiler failure: fall back, the eager path reports real errors
            self.failed = f"{type(err).__name__}: {err}".splitlines()[0][:300]
            warnings.warn(
                f"compile=True: torch.compile of the probability-flow field failed ({self.failed}); "
                "evaluating eagerly instead",
                RuntimeWarning,
                stacklevel=3,
            )
            return None
        field.nfe += 1
        if not finite:
            raise SolverError(f"score model returned non-finite values (NaN or inf) at t={float(t):.6g}")
        return augmented
