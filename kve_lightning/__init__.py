"""kve-lightning: variance-exploding score-based diffusion with EDM's stochastic Karras VE sampler.

The layers, each a folder or file of its own:

- framework-free math (torch only): ``sampling``, ``denoiser``, ``likelihood``, ``exact``, ``metrics``, ``phema``,
  ``masks``, ``search``;
- Lightning: ``lit`` (the module, the data, the EMA and evaluation callbacks, the predict writer);
- interop: ``interop`` (checkpoints, the diffusers pipeline, exports);
- I/O helpers: ``storage`` (atomic writes, sample folders and their manifests);
- the command line: ``cli``, one file per ``kve`` subcommand.

``from kve_lightning import sample_karras_ve`` imports the sampler only; the Lightning and diffusers classes
named below load on first use.
"""

from importlib import import_module

from kve_lightning.sampling import SamplerSettings, inpaint_karras_ve, karras_ve_sigmas, sample_karras_ve

_LAZY = {"ImageDataModule": "kve_lightning.lit.data", "KarrasVeModule": "kve_lightning.lit.module",
         "VEDenoiser": "kve_lightning.denoiser"}

__all__ = ["ImageDataModule", "KarrasVeModule", "SamplerSettings", "VEDenoiser", "inpaint_karras_ve",
           "karras_ve_sigmas", "sample_karras_ve"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kve_lightning' has no attribute {name!r}")
