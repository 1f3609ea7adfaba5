"""kve-lightning: variance-exploding score-based diffusion with EDM's stochastic Karras VE sampler."""

from kve_lightning.denoiser import VEDenoiser
from kve_lightning.sampling import karras_ve_sigmas, sample_karras_ve

__all__ = ["VEDenoiser", "karras_ve_sigmas", "sample_karras_ve"]
