r""":class:`ConditionalScoreSDEPrior`: a score prior :math:`p(x \mid c)` over a context :math:`c`."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from pyro.distributions.conditional import ConditionalDistribution

from .checks import ArgumentTypeError, check_batch_shape, check_event_shape
from .distribution import ScoreSDEPrior
from .options import SolverOptions
from .sde import ForwardSDE

__all__ = ["ConditionalScoreSDEPrior"]


class ConditionalScoreSDEPrior(ConditionalDistribution):
    r"""A conditional score model :math:`s_\theta(x, t, c) \approx \nabla_x \log p_t(x \mid c)` as
    a Pyro ``ConditionalDistribution``: ``.condition(context)`` returns a :class:`ScoreSDEPrior`.

    The score model is called as ``score_model(x, t, context)`` with the context expanded to
    ``(N, *context_shape)``, one row per point. A context with leading dimensions beyond
    ``context_shape`` gives the conditioned prior that batch shape, e.g. one class label per
    element of a plate::

        prior = ConditionalScoreSDEPrior(net, sde, (2,), context_shape=())
        with pyro.plate("data", 3):
            x = pyro.sample("x", prior.condition(torch.tensor([0, 1, 2])))

    :param callable score_model: ``score_model(x, t, context)``.
    :param ForwardSDE sde: the forward SDE.
    :param event_shape: shape of one draw.
    :param context_shape: the shape of one context: ``()`` for a class label, ``(C,)`` for a
        vector. ``None`` treats the whole context passed to :meth:`condition` as one context.
    :param options: :class:`ScoreSDEPrior` options (``sampler``, ``rtol``, ...).
    """

    def __init__(
        self,
        score_model: Callable,
        sde: ForwardSDE,
        event_shape: Sequence[int],
        *,
        context_shape: Sequence[int] | None = None,
        **options,
    ):
        if not callable(score_model):
            raise ArgumentTypeError(f"score_model must be callable, got {type(score_model).__name__}")
        if not isinstance(sde, ForwardSDE):
            raise ArgumentTypeError(f"sde must be a VPSDE, SubVPSDE or VESDE (a ForwardSDE), got {type(sde).__name__}")
        self.score_model = score_model
        self.sde = sde
        self.event_shape = check_event_shape(event_shape)
        self.context_shape = None if context_shape is None else check_batch_shape(context_shape, "context_shape")
        self.options = SolverOptions().replace(**options).check_sde(sde).as_dict()  # validated eagerly

    def condition(self, context) -> ScoreSDEPrior:
        """The prior :math:`p(x \\mid c)` for ``context`` (a tensor, or anything ``torch.as_tensor`` takes)."""
        if not isinstance(context, torch.Tensor):
            context = torch.as_tensor(context)
        return ScoreSDEPrior(
            self.score_model, self.sde, self.event_shape, context=context, context_shape=self.context_shape,
            **self.options,
        )  # fmt: skip
