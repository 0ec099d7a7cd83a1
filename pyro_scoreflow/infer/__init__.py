"""Posterior inference with score-based priors: guided reverse diffusion (:class:`DiffusionPosterior`), the
model's likelihood (:class:`ModelLikelihood`) and guidance, and initialisation of HMC/NUTS."""

from .guidance import DPSGuidance, GuidedScoreField, PiGDMGuidance
from .initialization import init_to_score_prior
from .likelihood import ModelLikelihood
from .linear_gaussian import LinearGaussian, NotLinearGaussian, linear_gaussian
from .posterior import GUIDANCES, DiffusionPosterior

__all__ = [
    "DPSGuidance",
    "DiffusionPosterior",
    "GUIDANCES",
    "GuidedScoreField",
    "LinearGaussian",
    "ModelLikelihood",
    "NotLinearGaussian",
    "PiGDMGuidance",
    "init_to_score_prior",
    "linear_gaussian",
]
