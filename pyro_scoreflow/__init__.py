"""pyro_scoreflow: score-based diffusion models as Pyro distributions."""

from . import datasets, infer
from ._version import __version__
from .conditional import ConditionalScoreSDEPrior
from .distribution import ScoreSDEPrior
from .dynamics import SolverError
from .networks import ScoreNet
from .scores import GaussianMixtureScore, ScoreModel
from .sde import VESDE, VPSDE, ForwardSDE, SubVPSDE
from .training import fit
from .transforms import ProbabilityFlowTransform

__all__ = [
    "ConditionalScoreSDEPrior",
    "ForwardSDE",
    "GaussianMixtureScore",
    "ScoreModel",
    "ScoreNet",
    "ProbabilityFlowTransform",
    "ScoreSDEPrior",
    "SolverError",
    "SubVPSDE",
    "VESDE",
    "VPSDE",
    "datasets",
    "infer",
    "fit",
    "__version__",
]
