"""Posterior inference with score-based priors: :class:`DiffusionPosterior` (guided reverse diffusion)."""

from .guidance import DPSGuidance, PiGDMGuidance
from .initialization import init_to_score_prior
from .posterior import GUIDANCES, DiffusionPosterior

__all__ = ["DiffusionPosterior", "DPSGuidance", "GUIDANCES", "PiGDMGuidance", "init_to_score_prior"]
