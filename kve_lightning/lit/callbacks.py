"""What validation shows besides its loss, one ``Callback`` each: the sample grid and its denoising trajectory, the
inpainting grid, FID and bits/dim.

Each runs on rank 0 at the validations that end epochs n, 2n, ... (n = ``every_n_epochs``; never in the sanity
check) with the weights
validation uses: the EMA's, where a ``WeightAveraging`` callback (``kve_lightning.lit.ema.EMA``) swaps them in. The
``kve`` CLI adds all four (``--sample_grid.*``, ``--inpaint_grid.*``, ``--fid.*``, ``--bpd.*``); in Python, pass
them to the ``Trainer`` like any callback. Nothing here is collective.
"""

from __future__ import annotations

import math

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, WeightAveraging
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader
from torchvision.utils import make_grid

from kve_lightning.lit.data import FlipDataset
from kve_lightning.masks import MASK_SPECS, complete, inpainting_grid, parse_mask
from kve_lightning.metrics import Features, Quality
from kve_lightning.sampling import ALGORITHM2
from kve_lightning.storage import to_unit


def _at_least(name: str, value: int, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {name}={value!r}")


def held_out_images(trainer: L.Trainer, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``count`` images of the data module's held-out split, [N, C, H, W] in [-1, 1], and their labels
    [N] (-1 for unlabelled images)."""
    held_out = trainer.datamodule.val_set
    items = [held_out[i] for i in range(min(count, len(held_out)))]
    return torch.stack([image for image, _ in items]), torch.tensor([int(label) for _, label in items])


def class_labels(pl_module: L.LightningModule, labels: torch.Tensor) -> list[int] | None:
    """``labels`` for a conditional model (``num_classes`` > 0), ``None`` (nothing to condition on) for an
    unconditional one."""
    return labels.tolist() if pl_module.hparams.get("num_classes", 0) else None


class Evaluation(Callback):
    """Runs ``evaluate`` on rank 0 at the validations that end epochs n, 2n, ... (n = ``every_n_epochs``; with
    ``check_val_every_n_epoch`` k, choose n a multiple of k), where the averaged weights are in
    place: at the epoch's start if every ``WeightAveraging`` callback comes before this one (it has swapped them in
    by then), else at its end (before those after this one swap them out again)."""

    def __init__(self, every_n_epochs: int):
        _at_least("every_n_epochs", every_n_epochs, 0)
        self.every_n_epochs = every_n_epochs

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        raise NotImplementedError

    def _averaging_after_me(self, trainer: L.Trainer) -> bool:
        callbacks = trainer.callbacks
        return any(isinstance(c, WeightAveraging) for c in callbacks[callbacks.index(self) + 1:])

    def _run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        due = self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0
        if due and not trainer.sanity_checking and trainer.is_global_zero:
            self.evaluate(trainer, pl_module)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._averaging_after_me(trainer):
            self._run(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._averaging_after_me(trainer):
            self._run(trainer, pl_module)


class SampleGrid(Evaluation):
    """Logs ``samples/grid`` (``size`` samples, seeds ``seed``, ``seed`` + 1, ...) and ``samples/trajectory`` (x_hat
    and D(x_hat) at ``trajectory_cols`` steps for the first ``trajectory_rows`` of them) to TensorBoard. A
    conditional model's grid has one row per class, ``size`` // K samples each (at least one), the same seeds in
    every row.

    Args:
        size: samples in the grid (0: none).
        seed: the first seed; sample k uses seed + k, so the grid is the same images as ``kve sample --seeds``.
        trajectory_rows: samples whose denoising trajectory is shown beside the grid.
        trajectory_cols: steps shown per trajectory.
        every_n_epochs: log at the validations that end epochs n, 2n, ... (0: never).
    """

    def __init__(self, size: int = 64, seed: int = 0, trajectory_rows: int = 4, trajectory_cols: int = 8,
                 every_n_epochs: int = 1):
        super().__init__(every_n_epochs)
        for name, value, low in (("size", size, 0), ("seed", seed, 0), ("trajectory_rows", trajectory_rows, 0),
                                 ("trajectory_cols", trajectory_cols, 1)):
            _at_least(name, value, low)
        self.size, self.seed, self.rows, self.cols = size, seed, min(trajectory_rows, size), trajectory_cols

    def images(self, pl_module: L.LightningModule) -> tuple[torch.Tensor, torch.Tensor]:
        """The grid and the trajectory strip, both [C, H, W] in [0, 1]."""
        keep = set(torch.linspace(0, pl_module.sampler.num_steps - 1, self.cols).round().long().tolist())
        frames: list[tuple[torch.Tensor, torch.Tensor]] = []

        def record(i: int, sigma_hat: float, x_hat: torch.Tensor, denoised: torch.Tensor) -> None:
            if i in keep:
                frames.append((x_hat[:self.rows].clone(), denoised[:self.rows].clone()))

        classes = pl_module.hparams.get("num_classes", 0)
        if classes:
            per_class = max(1, self.size // classes)
            seeds = [self.seed + j for _ in range(classes) for j in range(per_class)]
            samples = pl_module.sample(seeds, callback=record, labels=[c for c in range(classes) for _ in
                                                                       range(per_class)])
            grid = make_grid(to_unit(samples), nrow=per_class, padding=1)
        else:
            samples = pl_module.sample(range(self.seed, self.seed + self.size), callback=record)
            grid = make_grid(to_unit(samples), nrow=math.ceil(math.sqrt(self.size)), padding=1)
        # rows: x_hat of sample 0, denoised of sample 0, x_hat of sample 1, ...; columns: steps
        strip = torch.stack([torch.stack([f[j][r] for f in frames]) for r in range(self.rows) for j in (0, 1)])
        return grid, make_grid(to_unit(strip.flatten(0, 1)), nrow=len(frames), padding=1)

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.size and isinstance(pl_module.logger, TensorBoardLogger):
            grid, strip = self.images(pl_module)
            pl_module.logger.experiment.add_image("samples/grid", grid, trainer.global_step)
            if self.rows:
                pl_module.logger.experiment.add_image("samples/trajectory", strip, trainer.global_step)


class InpaintingGrid(Evaluation):
    """Logs ``samples/inpainting``: per held-out image, original | masked | ``completions`` completions (seeds
    ``seed``, ...), as ``kve inpaint`` writes its grid; a conditional model completes each image in its own class,
    with the model's guidance (as ``kve inpaint --labels``).

    Args:
        images: held-out images shown (0: none).
        completions: completions per image.
        mask: the pixels to fill, as ``kve inpaint --mask`` names them.
        seed: the first completion's seed.
        every_n_epochs: log at the validations that end epochs n, 2n, ... (0: never).
    """

    def __init__(self, images: int = 8, completions: int = 4, mask: str = "bottom", seed: int = 0,
                 every_n_epochs: int = 1):
        super().__init__(every_n_epochs)
        for name, value, low in (("images", images, 0), ("completions", completions, 1), ("seed", seed, 0)):
            _at_least(name, value, low)
        if mask.lower().endswith(".png"):
            raise ValueError(f"mask must name a mask ({', '.join(MASK_SPECS[:-1])}), not a file: got mask={mask!r}")
        parse_mask(mask, 8)  # a bad name or random:P fails now, not at the first validation
        self.count, self.completions, self.mask, self.seed = images, completions, mask, seed

    def images(self, pl_module: L.LightningModule, originals: torch.Tensor, labels: list[int] | None = None
               ) -> torch.Tensor:
        """The grid of ``originals`` [N, C, H, W] in [-1, 1] (of classes ``labels``, for a conditional model):
        [C, H', W'] in [0, 1]."""
        mask = parse_mask(self.mask, originals.shape[-1]).to(pl_module.device)
        seeds = [self.seed + k for k in range(self.completions)]
        rows = originals.to(pl_module.device).repeat_interleave(len(seeds), 0)
        settings = pl_module.sampler  # inpainting runs Algorithm 2: Heun for the solvers that take no projection
        settings = settings if settings.solver in ALGORITHM2 else settings.replace(solver="heun")
        row_labels = None if labels is None else [c for c in labels for _ in seeds]
        denoiser, settings = pl_module.sampling_denoiser(settings, row_labels)
        x = complete(denoiser, rows, mask, seeds * len(originals), settings)
        return inpainting_grid(originals, mask.cpu(), x.unflatten(0, (len(originals), len(seeds))).cpu())

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.count and isinstance(pl_module.logger, TensorBoardLogger):
            images, labels = held_out_images(trainer, self.count)
            grid = self.images(pl_module, images, class_labels(pl_module, labels))
            pl_module.logger.experiment.add_image("samples/inpainting", grid, trainer.global_step)


class FID(Evaluation):
    """Logs ``val/fid``, FID (``kve_lightning.metrics``) of ``num_samples`` samples (seeds 10**6, ...) against the
    training images, and beside it ``val/fd_pixels``, FD-pixels of the same samples against them (``PixelFD``: a
    multiple of the distance between two halves of the training images; 1.0 is a perfect model): two independent
    measures, never one (``Quality``). A conditional model samples every class alike (seed s gets class s mod K)
    with its guidance. The real statistics are computed once per process.

    Args:
        every_n_epochs: log at the validations that end epochs n, 2n, ... (0: never).
        num_samples: samples per FID (compare FIDs at equal counts of at least 500).
        features: "digits" (offline, the shipped digits network) or "inception" (needs torch-fidelity).
    """

    def __init__(self, every_n_epochs: int = 0, num_samples: int = 1000, features: Features = "digits"):
        super().__init__(every_n_epochs)
        _at_least("num_samples", num_samples, 2)
        self.num_samples, self.features = num_samples, features
        self._quality: Quality | None = None

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._quality is None:
            train = trainer.datamodule.train_set
            train = train.dataset if isinstance(train, FlipDataset) else train  # no random flips: no global RNG use
            loader = DataLoader(train, batch_size=512, generator=torch.Generator())
            real = torch.cat([images for images, _ in loader])
            self._quality = Quality(real, self.num_samples, self.features, device=pl_module.device)
        seeds = torch.arange(10**6, 10**6 + self.num_samples)
        labels = class_labels(pl_module, seeds % max(1, pl_module.hparams.get("num_classes", 0)))
        samples = torch.cat([pl_module.sample(seeds[k:k + 256], labels=None if labels is None else labels[k:k + 256])
                             .clamp(-1, 1) for k in range(0, len(seeds), 256)])
        fid, pixels = self._quality(samples)
        pl_module.log("val/fid", fid, rank_zero_only=True)
        pl_module.log("val/fd_pixels", pixels, rank_zero_only=True)


class BitsPerDim(Evaluation):
    """Logs ``val/bpd``: the mean bits/dim (``KarrasVeModule.bits_per_dim``) of the first ``num_images`` held-out
    images; a conditional model's is -log2 p(x | c) / d with each image's label.

    Args:
        every_n_epochs: log at the validations that end epochs n, 2n, ... (0: never).
        num_images: held-out images integrated.
    """

    def __init__(self, every_n_epochs: int = 0, num_images: int = 64):
        super().__init__(every_n_epochs)
        _at_least("num_images", num_images, 1)
        self.num_images = num_images

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        images, labels = held_out_images(trainer, self.num_images)
        labels = class_labels(pl_module, labels)
        bpd = pl_module.bits_per_dim(torch.arange(len(images)), images.to(pl_module.device),
                                     None if labels is None else torch.tensor(labels))
        pl_module.log("val/bpd", bpd.mean().item(), rank_zero_only=True)
