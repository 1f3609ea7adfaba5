"""``kve predict``'s output: one PNG per seed and a grid, into a sample folder with a manifest."""

from __future__ import annotations

import sys
from typing import Any

import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from kve_lightning.lit.data import batch_seeds
from kve_lightning.storage import (check_sample_folder, existing_seeds, open_sample_folder, prepare_output_dir,
                                   sample_manifest, save_grid, save_png, seed_path)


class PNGWriter(BasePredictionWriter):
    """Writes each predicted image as ``{seed:06d}.png`` as its batch ends (nothing kept in memory), then
    ``grid.png`` on rank 0 once every rank is done.

    Before the first batch, the folder's ``manifest.json`` must match the model's weights and sampler settings
    (or be absent, in a folder without seed PNGs, and then it is written): a ``ValueError`` otherwise, with nothing
    written. With ``skip_existing``, the data module (``ImageDataModule.skip_seeds``) leaves out the seeds whose
    PNG is there, so an interrupted ``kve predict`` or ``kve sample`` run resumes where it stopped.

    Args:
        output_dir: the folder for the PNGs (created if missing).
        grid: also write ``grid.png`` of the first ``grid_max_images`` seeds.
        grid_max_images: the most images ``grid.png`` shows.
        skip_existing: do not sample again the seeds whose PNG exists (``false``: sample and rewrite them).
    """

    def __init__(self, output_dir: str = "samples", grid: bool = True, grid_max_images: int = 256,
                 skip_existing: bool = True):
        super().__init__(write_interval="batch")
        self.output_dir = output_dir
        self.grid = grid
        self.grid_max_images = grid_max_images
        self.skip_existing = skip_existing

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "predict":
            prepare_output_dir(self.output_dir)

    def on_predict_start(self, trainer, pl_module) -> None:
        """Check the folder on every rank, then rank 0 writes the manifest and clears stale temporary files, then
        (after a barrier: no rank writes before) each rank marks the seeds already done. The checkpoint's weights
        are loaded by now."""
        datamodule = trainer.datamodule
        labels = getattr(datamodule, "labels", None)
        pl_module.sampling_denoiser(pl_module.sampler, labels)  # bad labels or guidance: refused before any write
        manifest = sample_manifest(pl_module.denoiser, pl_module.sampler,
                                   None if labels is None else dict(zip(datamodule.seeds, labels)), pl_module.guide)
        check_sample_folder(self.output_dir, manifest)
        if trainer.is_global_zero:
            open_sample_folder(self.output_dir, manifest)
        trainer.strategy.barrier()
        if hasattr(datamodule, "skip_seeds"):
            datamodule.skip_seeds = (existing_seeds(self.output_dir, datamodule.seeds, manifest) if self.skip_existing
                                     else set())

    def write_on_batch_end(self, trainer, pl_module, prediction: torch.Tensor, batch_indices, batch: torch.Tensor,
                           batch_idx: int, dataloader_idx: int) -> None:
        for seed, image in zip(batch_seeds(batch).tolist(), prediction):
            save_png(image, seed_path(self.output_dir, seed))

    def on_predict_end(self, trainer, pl_module) -> None:
        """The grid, and one line on stderr with the folder and the NFE per image (as ``kve sample`` prints it)."""
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            seeds: Any = trainer.datamodule.seeds if trainer.datamodule is not None else None
            if self.grid and seeds:
                save_grid(self.output_dir, seeds, self.grid_max_images)
            print(f"wrote the images to {self.output_dir} ({pl_module.sampler.nfe} network evaluations per image)",
                  file=sys.stderr)
