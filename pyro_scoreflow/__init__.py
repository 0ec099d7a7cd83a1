"""pyro_scoreflow: score-based diffusion models as Pyro distributions."""

from .distribution import ScoreSDEPrior
from .dynamics import SolverError
from .scores import GaussianMixtureScore, ScoreModel
from .sde import VESDE, VPSDE, ForwardSDE, SubVPSDE

__version__ = "0.1.0"

__all__ = [
    "ForwardSDE",
    "GaussianMixtureScore",
    "ScoreModel",
    "ScoreSDEPrior",
    "SolverError",
    "SubVPSDE",
    "VESDE",
    "VPSDE",
    "__version__",
]
