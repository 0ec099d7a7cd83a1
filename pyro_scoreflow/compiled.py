r"""The probability-flow field and its divergence as one ``torch.compile``-d graph.

For small problems (a few points, low dimension: what NUTS and SVI evaluate at
every step) an evaluation of the augmented field
:math:`(\tilde f(x, t), \nabla\cdot\tilde f(x, t))` is a few dozen tiny tensor
operations, so Python and dispatcher overhead, not arithmetic, sets its cost.
Written with :mod:`torch.func` (``vjp``, then ``vmap`` of the pullback over the
``D`` unit covectors for the exact trace, or over the Hutchinson probes),
the whole evaluation is traceable, and ``torch.compile`` turns it into a few
fused kernels; its backward (for gradients of ``log_prob``) is compiled too.

The first call with a new input layout (batch size, dtype, grad mode) compiles
(seconds to tens of seconds on a CPU); later calls reuse the compiled code.
If compilation fails (no C++ compiler, an operation the compiler does not
support), :class:`CompiledFlow` warns once and the caller evaluates eagerly.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable

import torch
from torch.distributions import Distribution
from torch.func import vjp, vmap

from .sde import ForwardSDE

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


class CompiledFlow:
    r"""``(t, state, probes) -> ([f̃(x, t), ∇·f̃(x, t)], all finite?)`` compiled, ``state = [x, logdet]``.

    The divergence is exact or Hutchinson's estimate with the given probes ``(S, N, D)``.

    :param score_model: ``score_model(x, t[, context])``.
    :param sde: the forward SDE.
    :param event_shape: the event shape the model expects.
    :param divergence: ``"exact"`` or ``"hutchinson"``.
    """

    def __init__(self, score_model: Callable, sde: ForwardSDE, event_shape: torch.Size, divergence: str):
        self.score_model = score_model
        self.sde = sde
        self.event_shape = torch.Size(event_shape)
        self.divergence = divergence
        self.failed: str | None = None
        self.validated = False  # set once an eager evaluation has checked the model's output
        with _keep_distribution_validation():
            self._compiled = torch.compile(self._evaluate, dynamic=None)

    def _evaluate(self, t: torch.Tensor, state: torch.Tensor, probes: torch.Tensor | None, context):
        x = state[:, :-1]
        n, d = x.shape
        t = t.clamp(self.sde.eps, self.sde.T)
        t_vec = t.expand(n)
        g2 = self.sde.diffusion(t) ** 2

        def flow(z: torch.Tensor) -> torch.Tensor:
            zz = z.reshape((n,) + self.event_shape)
            s = self.score_model(zz, t_vec) if context is None else self.score_model(zz, t_vec, context)
            return self.sde.drift(z, t) - 0.5 * g2 * s.reshape(n, d)

        v, pullback = vjp(flow, x)
        if self.divergence == "exact":
            eye = torch.eye(d, dtype=x.dtype, device=x.device).unsqueeze(1).expand(d, n, d)
            (rows,) = vmap(pullback)(eye)
            div = rows.diagonal(dim1=0, dim2=2).sum(-1)
        else:
            (rows,) = vmap(pullback)(probes)
            div = (rows * probes).sum(-1).mean(0)
        return torch.cat([v, div.unsqueeze(-1)], dim=-1), torch.isfinite(v).all()

    def __call__(self, t: torch.Tensor, state: torch.Tensor, probes: torch.Tensor | None, context):
        """The compiled evaluation, or ``None`` if compiling failed (then evaluate eagerly)."""
        if self.failed is not None:
            return None
        try:
            return self._compiled(t, state, probes, context)
        except Exception as err:  # noqa: BLE001 - any compiler failure: fall back, the eager path reports real errors
            self.failed = f"{type(err).__name__}: {err}".splitlines()[0][:300]
            warnings.warn(
                f"compile=True: torch.compile of the probability-flow field failed ({self.failed}); "
                "evaluating eagerly instead",
                RuntimeWarning,
                stacklevel=3,
            )
            return None
