"""kve-lightning: variance-exploding score-based diffusion with EDM's stochastic Karras VE sampler."""

from kve_lightning.data import ImageDataModule
from kve_lightning.denoiser import VEDenoiser
from kve_lightning.module import KarrasVeModule
from kve_lightning.sampling import SamplerSettings, inpaint_karras_ve, karras_ve_sigmas, sample_karras_ve

__all__ = ["ImageDataModule", "KarrasVeModule", "SamplerSettings", "VEDenoiser", "inpaint_karras_ve", "karras_ve_sigmas",
           "sample_karras_ve"]
