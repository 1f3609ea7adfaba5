"""Inpainting images with a trained model: masks by name, one completion per (image, seed), and the
original | masked | completions grid that ``kve inpaint`` writes and validation logs as ``samples/inpainting``.

The sampler is ``sampling.inpaint_karras_ve``; this file only turns images, a mask and seeds into its inputs.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.utils import make_grid

from kve_lightning.sampling import GUIDANCE, RESAMPLE, Denoiser, SamplerSettings, inpaint_karras_ve

HALVES = ("bottom", "top", "left", "right")
MASK_SPECS = HALVES + ("center", "random:P", "FILE.png")


def parse_mask(spec: str, image_size: int) -> torch.Tensor:
    """The known pixels [1, 1, H, W] (bool, True = known, the same for every channel) of a mask ``spec``:

    - ``bottom``, ``top``, ``left``, ``right``: that half unknown (the larger half of an odd side);
    - ``center``: the central square of half the side unknown;
    - ``random:P``: each pixel unknown with probability P in [0, 1] (one fixed draw, seed 0);
    - a PNG file of the image's size, black and white (0 and 255) or 0 and 1: its white (or 1) pixels unknown, as in
      common inpainting tools; any other value is refused (a mask of levels has no one meaning).
    """
    h = image_size
    known = torch.ones(h, h, dtype=torch.bool)
    half = h // 2
    if spec in HALVES:
        region = {"bottom": (slice(half, h), slice(None)), "top": (slice(0, h - half), slice(None)),
                  "left": (slice(None), slice(0, h - half)), "right": (slice(None), slice(half, h))}[spec]
        known[region] = False
    elif spec == "center":
        side = max(1, round(h / 2))
        start = (h - side) // 2
        known[start:start + side, start:start + side] = False
    elif spec.startswith("random:"):
        try:
            p = float(spec.split(":", 1)[1])
        except ValueError:
            p = math.nan
        if not 0 <= p <= 1:
            raise ValueError(f"--mask {spec!r}: P must be a number in [0, 1]")
        known = torch.rand(h, h, generator=torch.Generator().manual_seed(0)) >= p
    elif re.search(r"\.png$", spec, re.IGNORECASE):
        path = Path(spec)
        if path.is_dir():
            raise IsADirectoryError(f"--mask {spec!r} is a directory, not a PNG file")
        if not path.is_file():
            raise FileNotFoundError(f"--mask {spec!r}: no such file")
        try:
            with Image.open(path) as image:
                gray = torch.from_numpy(np.array(image.convert("L"), copy=True))
        except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, ... for broken files
            raise ValueError(f"--mask {spec!r} is not a readable PNG ({err})") from None
        if tuple(gray.shape) != (h, h):
            raise ValueError(f"--mask {spec!r} is {gray.shape[1]}x{gray.shape[0]} pixels, the model's images are "
                             f"{h}x{h}")
        values = set(gray.unique().tolist())
        if not (values <= {0, 255} or values <= {0, 1}):
            raise ValueError(f"--mask {spec!r} holds the gray levels {sorted(values)[:6]}: a mask is black and white "
                             f"(0/255, white = fill) or 0/1 (1 = fill)")
        known = gray == 0
    else:
        raise ValueError(f"--mask {spec!r} is not one of {', '.join(MASK_SPECS)}")
    return known[None, None]


def complete(denoiser: Denoiser, images: torch.Tensor, mask: torch.Tensor, seeds: Sequence[int],
             settings: SamplerSettings, resample: int = RESAMPLE, guidance: float = GUIDANCE) -> torch.Tensor:
    """Row k: image k [B, C, H, W] in [-1, 1] with its unknown pixels drawn by ``inpaint_karras_ve`` from the
    generator ``manual_seed(seeds[k])``, so a completion depends on its image, mask and seed only. In [-1, 1]."""
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    return inpaint_karras_ve(denoiser, images, mask, resample=resample, guidance=guidance, settings=settings,
                             generator=generators)


def masked_view(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The images as the sampler sees them: unknown pixels mid-gray (0 in [-1, 1])."""
    return torch.where(mask.to(images.device), images, torch.zeros_like(images))


def inpainting_grid(originals: torch.Tensor, mask: torch.Tensor, completions: torch.Tensor) -> torch.Tensor:
    """One row per image: original | masked | its completions. ``originals`` [N, C, H, W] and ``completions``
    [N, S, C, H, W] in [-1, 1]; returns [C, H', W'] in [0, 1]."""
    rows = torch.cat([originals[:, None], masked_view(originals, mask)[:, None], completions], 1)
    return make_grid((rows.flatten(0, 1) / 2 + 0.5).clamp(0, 1), nrow=rows.shape[1], padding=1)
