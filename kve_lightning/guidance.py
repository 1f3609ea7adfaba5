"""Guidance: a denoiser built from two, D_w(x; sigma) = D_guide(x; sigma) + w (D_main(x; sigma) - D_guide(x; sigma)).

w = 1 is no guidance. Classifier-free guidance (Ho & Salimans 2022): D_main = D(x; sigma, c) and D_guide = D(x;
sigma, null) of one conditional network trained with its label dropped to the null class (``label_dropout``).
Autoguidance (Karras et al. 2024, "Guiding a diffusion model with a bad version of itself", Eq. 3 with EDM2's
``gnet.lerp(net, w)``): D_guide is a weaker model of the same data (an earlier checkpoint, a smaller UNet), called
with the same labels; it works for unconditional models too. Either applies for sigma in the guidance interval
(guidance_sigma_min, guidance_sigma_max] only (Kynkaenniemi et al. 2024); outside it D_w = D_main.

**Cost.** Inside the interval every evaluation costs two network evaluations per image: classifier-free guidance
runs both branches in one network call of 2B rows (the conditional rows, then the same rows with the null label),
autoguidance makes two calls of B rows (two networks). ``guided_nfe`` counts them.

The settings (``guidance_scale``, ``guidance_sigma_min``, ``guidance_sigma_max``) are ``SamplerSettings`` fields;
``guided`` turns a denoiser, the labels of the rows and a guide into the denoiser Algorithm 2 (and inpainting) call.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch

from kve_lightning.sampling import Denoiser, SamplerSettings, in_micro_batches, sample_karras_ve

if TYPE_CHECKING:
    from kve_lightning.denoiser import VEDenoiser


def guides_at(settings: SamplerSettings, sigma: torch.Tensor) -> torch.Tensor:
    """Whether guidance applies at each ``sigma``: w != 1 and sigma in (guidance_sigma_min, guidance_sigma_max]."""
    inside = (sigma > settings.guidance_sigma_min) & (sigma <= settings.guidance_sigma_max)
    return inside & (settings.guidance_scale != 1)


def guided_nfe(settings: SamplerSettings) -> int:
    """Network evaluations per image with guidance (``SamplerSettings.nfe`` without): one per denoiser evaluation,
    two where guidance applies (``guides_at`` the ``evaluated_sigmas``)."""
    if settings.guidance_scale == 1:
        return settings.nfe
    evaluated = evaluated_sigmas(settings)
    return len(evaluated) + int(guides_at(settings, evaluated).sum())


def evaluated_sigmas(settings: SamplerSettings) -> torch.Tensor:
    """The noise levels at which the solver of ``settings`` evaluates the denoiser, in order (float64): the solver
    itself, run once on a one-pixel stand-in denoiser (S_churn's sigma_hat included)."""
    evaluated: list[float] = []

    def record(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        evaluated.append(float(sigma[0]))
        return torch.zeros_like(x)

    sample_karras_ve(record, (1, 1, 1, 1), settings=settings.replace(guidance_scale=1.0, micro_batch=0),
                     generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return torch.tensor(evaluated, dtype=torch.float64)


def check_guide(main: VEDenoiser, guide: VEDenoiser, source: str) -> None:
    """A ``ValueError`` naming ``source`` unless ``guide`` can guide ``main``: the same image size, channel count and
    classes (it is called with the same labels)."""
    def shape(d: VEDenoiser) -> tuple[int, int, int]:
        return int(d.unet.config.sample_size), int(d.unet.config.in_channels), d.num_classes

    if shape(guide) != shape(main):
        (gs, gc, gk), (ms, mc, mk) = shape(guide), shape(main)
        raise ValueError(f"guide {source!r} makes {gc}x{gs}x{gs} images of {gk} classes, the model {mc}x{ms}x{ms} of "
                         f"{mk}: a guide must be a model of the same data")


class GuidedDenoiser:
    """D_w(x; sigma, c) of ``main`` (and ``guide``; without one, classifier-free guidance with the null class) with the
    row labels ``labels`` [B] (``None``: the null class of a conditional model, nothing for an unconditional one),
    evaluated on micro-batches of ``rows`` rows (``SamplerSettings.micro_batch``) that carry each row's label along,
    so that a row's result depends only on its own input, label and sigma."""

    def __init__(self, main: VEDenoiser, settings: SamplerSettings, labels: torch.Tensor | None = None,
                 guide: VEDenoiser | None = None):
        self.main, self.guide, self.settings, self.labels = main, guide, settings, labels

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return in_micro_batches(self._evaluate, x, sigma, self.settings.micro_batch, self.labels)

    def _evaluate(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        active = guides_at(self.settings, sigma)
        if not active.any():
            return self.main(x, sigma, labels)
        if self.guide is not None:
            d_main, d_guide = self.main(x, sigma, labels), self.guide(x, sigma, labels)
        else:  # both branches of classifier-free guidance in one call of 2B rows
            null = torch.full((x.shape[0],), self.main.num_classes, dtype=torch.long, device=x.device)
            both = torch.cat([null if labels is None else labels.to(x.device), null])
            d_main, d_guide = self.main(torch.cat([x, x]), torch.cat([sigma, sigma]), both).chunk(2)
        guided = torch.lerp(d_guide, d_main, self.settings.guidance_scale)
        return torch.where(active.reshape(-1, *[1] * (x.ndim - 1)), guided, d_main)


def check_labels(denoiser: VEDenoiser, labels: Sequence[int] | torch.Tensor | None) -> None:
    """A ``ValueError`` naming the label unless every one is a class of ``denoiser`` (0..K-1), or for labels given
    to an unconditional model."""
    if labels is None:
        return
    values = torch.as_tensor(labels).tolist()
    k = denoiser.num_classes
    if not k:
        raise ValueError(f"labels {values[:8]} given to an unconditional model (num_classes=0): leave them out")
    bad = [c for c in values if not 0 <= c < k]
    if bad:
        raise ValueError(f"label {bad[0]} is not a class of this model (num_classes={k}: labels 0..{k - 1})")


def guided(denoiser: VEDenoiser, settings: SamplerSettings, labels: Sequence[int] | torch.Tensor | None = None,
           guide: VEDenoiser | None = None) -> tuple[Denoiser, SamplerSettings]:
    """The denoiser to sample with and its settings: ``denoiser`` and ``settings`` themselves without labels or
    guidance (the unguided sampler, byte for byte), else a ``GuidedDenoiser``, which micro-batches itself, and the
    settings with ``micro_batch`` 0. A ``ValueError`` for a bad label, or for guidance with nothing to guide with
    (an unconditional model without a guide)."""
    check_labels(denoiser, labels)
    if settings.guidance_scale != 1 and guide is None and not denoiser.num_classes:
        raise ValueError(f"guidance_scale={settings.guidance_scale:g} needs a conditional model (classifier-free "
                         f"guidance) or a guide model (autoguidance: --model.guide_ckpt_path)")
    if labels is None and settings.guidance_scale == 1:
        return denoiser, settings
    rows = None if labels is None else torch.as_tensor(labels, dtype=torch.long)
    return GuidedDenoiser(denoiser, settings, rows, guide if settings.guidance_scale != 1 else None), \
        settings.replace(micro_batch=0)
