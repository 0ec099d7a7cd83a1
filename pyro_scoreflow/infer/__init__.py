"""Posterior inference with score-based priors.

* :class:`DiffusionPosterior`: guided reverse diffusion (DPS, ΠGDM), fast and approximate;
* :class:`DiffusionSMC`: twisted sequential Monte Carlo, asymptotically exact, with the evidence;
* :class:`ScoreFlowReparam`: HMC/NUTS/SVI in the latent space of the prior's flow;
* :func:`init_to_score_prior`: cheap initialization for NUTS and autoguides;
* :class:`ModelLikelihood`, guidance and :func:`linear_gaussian`: the pieces the samplers share;
* :func:`linear_gaussian_posterior`: the closed-form posterior of a Gaussian-mixture prior (for checks).
"""

from .exact import linear_gaussian_posterior
from .guidance import DPSGuidance, GuidedScoreField, PiGDMGuidance
from .initialization import init_to_score_prior
from .likelihood import ModelLikelihood
from .linear_gaussian import LinearGaussian, NotLinearGaussian, linear_gaussian
from .posterior import GUIDANCES, DiffusionPosterior
from .reparam import ScoreFlowReparam
from .smc import SMC_GUIDANCES, DiffusionSMC

__all__ = [
    "DPSGuidance",
    "DiffusionPosterior",
    "DiffusionSMC",
    "GUIDANCES",
    "GuidedScoreField",
    "LinearGaussian",
    "ModelLikelihood",
    "NotLinearGaussian",
    "PiGDMGuidance",
    "SMC_GUIDANCES",
    "ScoreFlowReparam",
    "init_to_score_prior",
    "linear_gaussian",
    "linear_gaussian_posterior",
]
