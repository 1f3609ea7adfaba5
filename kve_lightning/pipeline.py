"""A diffusers pipeline around our paper-exact sampler: diffusers' ``KarrasVePipeline`` call, EDM Algorithm 2 inside.

``KarrasVeLightningPipeline(unet, scheduler)`` takes the call of diffusers' ``KarrasVePipeline`` and runs
``sample_karras_ve`` over ``VEDenoiser(unet)``; ``KarrasVeLightningScheduler`` only holds the sampler's settings, so
``save_pretrained`` / ``from_pretrained`` carry them in ``scheduler/scheduler_config.json``.

diffusers records a component class from outside its own libraries under its module path
(``["kve_lightning.pipeline", "KarrasVeLightningScheduler"]`` in ``model_index.json``), resolves that path from
``sys.modules`` only (importing this module is what makes it loadable) and looks the loadable base class
``SchedulerMixin`` up by name in this module: keep it imported here under that name.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Sequence

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, SchedulerMixin, UNet2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config

from kve_lightning.denoiser import VEDenoiser
from kve_lightning.module import to_unit
from kve_lightning.sampling import check_churn_and_solver, karras_ve_sigmas, sample_karras_ve

OUTPUT_TYPES = ("pil", "np", "pt")


class KarrasVeLightningScheduler(SchedulerMixin, ConfigMixin):
    """The settings of EDM Algorithm 2 (``sample_karras_ve``): noise range, schedule (Table 1's VE or Eq. 5's rho
    schedule), churn (Table 5) and solver. ``num_steps`` is the trained model's default step count; a pipeline
    call's ``num_inference_steps`` takes precedence. No ``step()``: the pipeline runs the whole sampler."""

    @register_to_config
    def __init__(
        self,
        sigma_min: float = 0.02,
        sigma_max: float = 100.0,
        num_steps: int = 50,
        schedule: str = "ve",
        s_churn: float = 80.0,
        s_min: float = 0.05,
        s_max: float = 1.0,
        s_noise: float = 1.007,
        solver: str = "heun",
        rho: float = 7.0,
        clamp_denoised: bool = False,
    ):
        karras_ve_sigmas(num_steps, sigma_min, sigma_max, schedule, rho)  # a bad setting fails on load, not on use
        check_churn_and_solver(s_churn, s_min, s_max, s_noise, solver)

    def sampler_kwargs(self, num_inference_steps: int, **overrides: Any) -> dict[str, Any]:
        """``sample_karras_ve`` keyword arguments: the config's settings with the non-None ``overrides`` applied,
        and the ``num_inference_steps``-step schedule as ``sigmas`` (float64, as ``sample_karras_ve`` builds it)."""
        c = dict(self.config) | {k: v for k, v in overrides.items() if v is not None}
        sigmas = karras_ve_sigmas(num_inference_steps, c["sigma_min"], c["sigma_max"], c["schedule"], c["rho"],
                                  dtype=torch.float64)
        return dict(sigmas=sigmas) | {k: c[k] for k in ("s_churn", "s_min", "s_max", "s_noise", "solver",
                                                        "clamp_denoised")}


class KarrasVeLightningPipeline(DiffusionPipeline):
    """Unconditional generation with EDM's stochastic sampler (Algorithm 2, VE column of Table 1).

    Args:
        unet: a ``UNet2DModel`` with ``time_embedding_type="fourier"`` (any ``in_channels``).
        scheduler: a ``KarrasVeLightningScheduler`` holding the sampler's settings.
    """

    unet: UNet2DModel
    scheduler: KarrasVeLightningScheduler

    def __init__(self, unet: UNet2DModel, scheduler: KarrasVeLightningScheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs: Any) -> KarrasVeLightningPipeline:
        """``DiffusionPipeline.from_pretrained``, with a clear error for a local folder that is not an export, and the
        UNet's weights copied out of the memory-mapped safetensors file (see ``_own_storage``)."""
        path = Path(pretrained_model_name_or_path)
        if path.is_dir():
            needed = ["model_index.json"] + [c for c in ("unet", "scheduler") if c not in kwargs]
            missing = [p for p in needed if not (path / p).exists()]
            if missing:
                raise ValueError(f"{str(path)!r} is not an exported kve-lightning model folder: it has no "
                                 f"{', '.join(missing)}")
        pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        _own_storage(pipe.unet)
        return pipe

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        num_inference_steps: int = 50,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        *,
        seeds: Sequence[int] | None = None,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        schedule: str | None = None,
        rho: float | None = None,
        s_churn: float | None = None,
        s_min: float | None = None,
        s_max: float | None = None,
        s_noise: float | None = None,
        solver: str | None = None,
        clamp_denoised: bool | None = None,
    ) -> ImagePipelineOutput | tuple:
        """``batch_size`` images in [0, 1] (``output_type`` "pil", "np" [B, H, W, C] float32, or "pt" [B, C, H, W]).

        ``seeds``: one image per seed, each from ``torch.Generator().manual_seed(seed)``, the same images as
        ``KarrasVeModule.sample(seeds)``; it replaces ``generator`` and sets the batch size. The other keywords
        override the scheduler's settings for this call; ``num_inference_steps`` is N (NFE = 2N - 1 with Heun).
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"unknown output_type={output_type!r}; expected one of {OUTPUT_TYPES}")
        batch_size, generator = _batch_and_generator(batch_size, generator, seeds)
        kwargs = self.scheduler.sampler_kwargs(num_inference_steps, sigma_min=sigma_min, sigma_max=sigma_max,
                                               schedule=schedule, rho=rho, s_churn=s_churn, s_min=s_min, s_max=s_max,
                                               s_noise=s_noise, solver=solver, clamp_denoised=clamp_denoised)
        size = self.unet.config.sample_size
        height, width = (size, size) if isinstance(size, int) else size
        shape = (batch_size, self.unet.config.in_channels, height, width)
        with self.progress_bar(total=num_inference_steps) as bar:
            x = sample_karras_ve(VEDenoiser(self.unet), shape, generator=generator, device=self.device,
                                 dtype=self.unet.dtype, callback=lambda *_: bar.update(), **kwargs)
        images = _to_output(to_unit(x), output_type)
        return ImagePipelineOutput(images=images) if return_dict else (images,)


def _own_storage(model: torch.nn.Module) -> None:
    """Give every parameter and buffer freshly allocated storage. Tensors memory-mapped from a safetensors file can
    sit at unaligned addresses, where CPU kernels round differently (~1e-6): copied, the weights give exactly the
    images of the same weights loaded from a checkpoint."""
    with torch.no_grad():
        for tensor in itertools.chain(model.parameters(), model.buffers()):
            tensor.data = tensor.data.clone()


def _batch_and_generator(batch_size: int, generator: Any, seeds: Sequence[int] | None) -> tuple[int, Any]:
    """The batch size and generator(s) of a call: one CPU generator per seed when ``seeds`` is given."""
    if seeds is None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got batch_size={batch_size}")
        return batch_size, generator
    seeds = [int(s) for s in seeds]
    if generator is not None:
        raise ValueError("pass either seeds or generator, not both")
    if not seeds or batch_size not in (1, len(seeds)):
        raise ValueError(f"seeds sets the batch size: got {len(seeds)} seeds and batch_size={batch_size}")
    return len(seeds), [torch.Generator().manual_seed(s) for s in seeds]


def _to_output(images: torch.Tensor, output_type: str) -> Any:
    """[B, C, H, W] in [0, 1] -> diffusers' output types: "pt" as is, "np" [B, H, W, C] float32, "pil" images."""
    if output_type == "pt":
        return images
    array = images.float().cpu().permute(0, 2, 3, 1).numpy()
    return array if output_type == "np" else DiffusionPipeline.numpy_to_pil(array)
