"""Posterior inference with score-based priors: :class:`DiffusionPosterior` (guided reverse diffusion)."""

from .guidance import DPSGuidance, PiGDMGuidance
from .posterior import GUIDANCES, DiffusionPosterior

__all__ = ["DiffusionPosterior", "DPSGuidance", "GUIDANCES", "PiGDMGuidance"]
