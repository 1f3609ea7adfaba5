"""Writing samples as PNG files: one per seed, ``{seed:06d}.png``, plus a grid; the same bytes from every entry point."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from PIL import Image
from torchvision.utils import make_grid


def to_pil(image: torch.Tensor) -> Image.Image:
    """[C, H, W] in [0, 1] (C = 1 or 3) -> 8-bit PIL image ("L" or "RGB"), rounding to the nearest level."""
    array = (image.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array, mode="L" if array.shape[-1] == 1 else "RGB")


def save_png(image: torch.Tensor | Image.Image, path: str | Path) -> None:
    """Write atomically (temporary file, then rename): a kill never leaves a truncated PNG behind."""
    path = Path(path)
    pil = image if isinstance(image, Image.Image) else to_pil(image)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            pil.save(f, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def seed_path(out_dir: str | Path, seed: int) -> Path:
    return Path(out_dir) / f"{seed:06d}.png"


def prepare_output_dir(out_dir: str | Path) -> Path:
    """Create ``out_dir`` (and parents); a clear error if it is a file or not writable."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"output path {str(out)!r} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    if not os.access(out, os.W_OK | os.X_OK):
        raise PermissionError(f"output directory {str(out)!r} is not writable")
    return out


def save_grid(out_dir: str | Path, seeds: Sequence[int], max_images: int = 256) -> Path:
    """``grid.png`` from the first ``max_images`` seeds' PNGs, read back from ``out_dir`` (memory stays flat)."""
    seeds = list(seeds)[:max_images]
    images = [torch.from_numpy(np.array(Image.open(seed_path(out_dir, s)), copy=True)) for s in seeds]
    batch = torch.stack([im[None] if im.ndim == 2 else im.permute(2, 0, 1) for im in images])
    grid = make_grid(batch, nrow=math.ceil(math.sqrt(len(seeds))), padding=1)
    path = Path(out_dir) / "grid.png"
    save_png(Image.fromarray(grid[0].numpy() if batch.shape[1] == 1 else grid.permute(1, 2, 0).numpy()), path)
    return path


class PNGWriter(BasePredictionWriter):
    """Writes each predicted image as ``{seed:06d}.png`` as its batch ends (nothing kept in memory), then
    ``grid.png`` on rank 0 once every rank is done.

    Args:
        output_dir: the folder for the PNGs (created if missing).
        grid: also write ``grid.png`` of the first ``grid_max_images`` seeds.
    """

    def __init__(self, output_dir: str = "samples", grid: bool = True, grid_max_images: int = 256):
        super().__init__(write_interval="batch")
        self.output_dir = output_dir
        self.grid = grid
        self.grid_max_images = grid_max_images

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "predict":
            prepare_output_dir(self.output_dir)

    def write_on_batch_end(self, trainer, pl_module, prediction: torch.Tensor, batch_indices, batch: torch.Tensor,
                           batch_idx: int, dataloader_idx: int) -> None:
        for seed, image in zip(batch.tolist(), prediction):
            save_png(image, seed_path(self.output_dir, seed))

    def on_predict_end(self, trainer, pl_module) -> None:
        trainer.strategy.barrier()
        if self.grid and trainer.is_global_zero:
            seeds: Any = trainer.datamodule.seeds if trainer.datamodule is not None else None
            if seeds:
                save_grid(self.output_dir, seeds, self.grid_max_images)
