"""A diffusers pipeline around our paper-exact sampler: diffusers' ``KarrasVePipeline`` call, EDM Algorithm 2 inside.

``KarrasVeLightningPipeline(unet, scheduler)`` takes the call of diffusers' ``KarrasVePipeline`` and runs
``sample_karras_ve`` over the scheduler's ``VEDenoiser`` of ``unet``; ``KarrasVeLightningScheduler`` only holds the
sampler's settings and the UNet's preconditioning, so ``save_pretrained`` / ``from_pretrained`` carry them in
``scheduler/scheduler_config.json``.

diffusers records a component class from outside its own libraries under its module path
(``["kve_lightning.interop.pipeline", "KarrasVeLightningScheduler"]`` in ``model_index.json``), resolves that path from
``sys.modules`` only (importing this module is what makes it loadable) and looks the loadable base class
``SchedulerMixin`` up by name in this module: keep it imported here under that name.
"""

from __future__ import annotations

import inspect
import itertools
import json
import logging
import numbers
from dataclasses import fields
from pathlib import Path
from typing import Any, Sequence

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, SchedulerMixin, UNet2DModel
from diffusers.configuration_utils import ConfigMixin
from safetensors import safe_open

from kve_lightning.interop.checkpoint import check_finite
from kve_lightning.denoiser import PRECONDS, SIGMA_DATA, VEDenoiser
from kve_lightning.guidance import guided
from kve_lightning.storage import to_unit
from kve_lightning.sampling import SamplerSettings, sample_karras_ve

OUTPUT_TYPES = ("pil", "np", "pt")
# an EDM export's unet/config.json holds this key: diffusers' UNet2DModel ignores it, with a warning that shows its
# value, so loading the UNet for diffusers' own KarrasVePipeline (which assumes VE preconditioning) explains itself
NOT_FOR_KARRAS_VE = "kve_preconditioning"


def not_for_karras_ve(sigma_data: float) -> str:
    """The one-line explanation an EDM-preconditioned export carries for diffusers' ``KarrasVePipeline``."""
    return (f"EDM preconditioning (sigma_data {sigma_data:g}): diffusers' KarrasVePipeline assumes VE preconditioning "
            f"(D = x + sigma F) and samples this UNet wrongly; load the folder with kve_lightning's "
            f"KarrasVeLightningPipeline or `kve sample --pipeline`")


class _DropNotForKarrasVe(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return NOT_FOR_KARRAS_VE not in record.getMessage()


class KarrasVeLightningScheduler(SchedulerMixin, ConfigMixin):
    """The ``SamplerSettings`` of EDM Algorithm 2 as a diffusers config (``scheduler_config.json``), one key per
    setting, and the noise range the UNet was trained on (``train_sigma_min``, ``train_sigma_max``; an export of
    before they were stored was trained on its sampler's); a bad setting fails on load, not on use. ``num_steps`` is
    the default of a pipeline call's ``num_inference_steps``. ``class_names``: a conditional UNet's classes, label k
    naming class k. No ``step()``: the pipeline runs the whole sampler."""

    def __init__(self, train_sigma_min: float | None = None, train_sigma_max: float | None = None,
                 precond: str = "ve", sigma_data: float = SIGMA_DATA, class_names: Sequence[str] = (),
                 **settings: Any):
        self.settings = SamplerSettings(**settings)
        self.trained = (self.settings.sigma_min if train_sigma_min is None else float(train_sigma_min),
                        self.settings.sigma_max if train_sigma_max is None else float(train_sigma_max))
        if precond not in PRECONDS or not 0 < sigma_data < float("inf"):
            raise ValueError(f"need precond in {PRECONDS} and sigma_data > 0, got precond={precond!r}, "
                             f"sigma_data={sigma_data!r}")
        self.precond, self.sigma_data = precond, float(sigma_data)
        self.class_names = [str(name) for name in class_names]
        self.register_to_config(**self.settings.to_dict(), train_sigma_min=self.trained[0],
                                train_sigma_max=self.trained[1], precond=precond, sigma_data=self.sigma_data,
                                class_names=self.class_names)

    def denoiser(self, unet: UNet2DModel) -> VEDenoiser:
        """D(x; sigma) of ``unet`` with the preconditioning it was trained with."""
        return VEDenoiser(unet, self.precond, self.sigma_data)


# diffusers reads a config's keys off the __init__ signature: give it the training range and the settings' fields
KarrasVeLightningScheduler.__init__.__signature__ = inspect.Signature(
    [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    + [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None)
       for name in ("train_sigma_min", "train_sigma_max")]
    + [inspect.Parameter("precond", inspect.Parameter.KEYWORD_ONLY, default="ve"),
       inspect.Parameter("sigma_data", inspect.Parameter.KEYWORD_ONLY, default=SIGMA_DATA),
       inspect.Parameter("class_names", inspect.Parameter.KEYWORD_ONLY, default=())]
    + [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default) for f in fields(SamplerSettings)])


class KarrasVeLightningPipeline(DiffusionPipeline):
    """Generation with EDM's stochastic sampler (Algorithm 2, VE column of Table 1), unconditional or
    class-conditional (``class_labels=``), guided (``guidance_scale=``: classifier-free, or autoguidance with
    ``guide=``).

    Args:
        unet: a ``UNet2DModel`` with ``time_embedding_type="fourier"`` (any ``in_channels``; ``num_class_embeds`` K +
            1 for K classes, the last the null class).
        scheduler: a ``KarrasVeLightningScheduler`` holding the sampler's settings.
    """

    unet: UNet2DModel
    scheduler: KarrasVeLightningScheduler

    def __init__(self, unet: UNet2DModel, scheduler: KarrasVeLightningScheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs: Any) -> KarrasVeLightningPipeline:
        """``DiffusionPipeline.from_pretrained``, with a clear error for a local folder that is not an export or whose
        UNet weights are incomplete or non-finite, and the UNet's weights copied out of the memory-mapped safetensors
        file (see ``_own_storage``)."""
        path = Path(pretrained_model_name_or_path)
        if path.is_dir():
            needed = ["model_index.json"] + [c for c in ("unet", "scheduler") if c not in kwargs]
            missing = [p for p in needed if not (path / p).exists()]
            if missing:
                raise ValueError(f"{str(path)!r} is not an exported kve-lightning model folder: it has no "
                                 f"{', '.join(missing)}")
        quiet = _DropNotForKarrasVe()  # the warning is for diffusers' KarrasVePipeline, not for this pipeline
        logger = logging.getLogger("diffusers.configuration_utils")
        logger.addFilter(quiet)
        try:
            pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        finally:
            logger.removeFilter(quiet)
        if not isinstance(pipe.scheduler, KarrasVeLightningScheduler):
            raise ValueError(f"{str(path)!r} names the scheduler {type(pipe.scheduler).__name__}, not "
                             f"KarrasVeLightningScheduler: not a kve-lightning export")
        weights = path / "unet" / "diffusion_pytorch_model.safetensors"
        if weights.is_file() and "unet" not in kwargs:
            with safe_open(weights, framework="pt") as f:
                stored = set(f.keys())
            missing = sorted(set(pipe.unet.state_dict()) - stored)
            if missing:
                raise ValueError(f"{str(weights)!r} lacks {len(missing)} UNet tensor(s), e.g. {missing[0]}: refusing "
                                 f"to sample with randomly initialised weights")
        check_finite(pipe.unet.state_dict(), str(path))
        _own_storage(pipe.unet)
        return pipe

    def save_pretrained(self, save_directory: str | Path, **kwargs: Any) -> None:
        """``DiffusionPipeline.save_pretrained``; an EDM-preconditioned UNet's config also gets ``NOT_FOR_KARRAS_VE``."""
        super().save_pretrained(save_directory, **kwargs)
        if self.scheduler.precond != "ve":
            config = Path(save_directory) / "unet" / "config.json"
            text = json.loads(config.read_text()) | {NOT_FOR_KARRAS_VE: not_for_karras_ve(self.scheduler.sigma_data)}
            config.write_text(json.dumps(text, indent=2, sort_keys=True) + "\n")

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        num_inference_steps: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        *,
        seeds: Sequence[int] | None = None,
        class_labels: Sequence[int] | torch.Tensor | None = None,
        guide: VEDenoiser | None = None,
        **overrides: Any,
    ) -> ImagePipelineOutput | tuple:
        """``batch_size`` images in [0, 1] (``output_type`` "pil", "np" [B, H, W, C] float32, or "pt" [B, C, H, W]).

        ``seeds``: one image per seed, each from ``torch.Generator().manual_seed(seed)``, the same images as
        ``KarrasVeModule.sample(seeds)``; it replaces ``generator`` and sets the batch size. ``num_inference_steps``
        is N (NFE = 2N - 1 with Heun; ``None``: the scheduler's ``num_steps``); the other keywords are
        ``SamplerSettings`` fields that override the scheduler's settings for this call, ``guidance_scale`` and the
        guidance interval among them. ``class_labels``: one class per image for a conditional UNet (``None``: the
        null class); ``guide``: the weaker denoiser of autoguidance (``kve_lightning.guidance``).
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"unknown output_type={output_type!r}; expected one of {OUTPUT_TYPES}")
        batch_size, generator = _batch_and_generator(batch_size, generator, seeds)
        settings = self.scheduler.settings.replace(**{"num_steps": num_inference_steps} | overrides)
        settings.check_trained_range(*self.scheduler.trained)
        size = self.unet.config.sample_size
        height, width = (size, size) if isinstance(size, int) else size
        shape = (batch_size, self.unet.config.in_channels, height, width)
        if class_labels is not None and len(class_labels) != batch_size:
            raise ValueError(f"{len(class_labels)} class_labels for a batch of {batch_size}: give one per image")
        denoiser, settings = guided(self.scheduler.denoiser(self.unet), settings, class_labels, guide)
        with self.progress_bar(total=settings.num_steps) as bar:
            x = sample_karras_ve(denoiser, shape, settings=settings, generator=generator,
                                 device=self.device, dtype=self.unet.dtype, callback=lambda *_: bar.update())
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
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got batch_size={batch_size!r}")
    if seeds is None:
        return batch_size, generator
    if isinstance(seeds, (str, bytes)) or not all(isinstance(s, numbers.Integral) and not isinstance(s, bool)
                                                   for s in seeds):
        raise ValueError(f"seeds must be integers, got seeds={seeds!r}")
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
