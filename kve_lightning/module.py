"""The Lightning module: VE denoising score matching, and the stochastic Karras VE sampler for grids and predict."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal, Sequence

import lightning as L
import torch
from diffusers import UNet2DModel
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader
from torchvision.utils import make_grid

from kve_lightning.checkpoint import read_checkpoint
from kve_lightning.data import FlipDataset
from kve_lightning.denoiser import VEDenoiser, default_unet_config, dsm_loss, ve_loss
from kve_lightning.ema import EMA
from kve_lightning.images import to_unit
from kve_lightning.inpainting import complete, inpainting_grid, parse_mask
from kve_lightning.likelihood import bits_per_dim_per_image, index_generators, mean_and_stderr
from kve_lightning.metrics import FEATURES, Features, build_fid
from kve_lightning.phema import PostHocEMA
from kve_lightning.rng import get_rng_states, set_rng_states
from kve_lightning.sampling import SamplerSettings, sample_karras_ve

def unet_config(image_size: int, channels: int, unet: dict[str, Any] | None) -> dict[str, Any]:
    """The ``UNet2DModel`` keyword arguments for ``channels`` x ``image_size`` x ``image_size`` images:
    ``default_unet_config`` updated with ``unet``; a ``ValueError`` naming a size or channel count it cannot take."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got channels={channels}")
    config = {k: v for k, v in default_unet_config().items() if k not in ("sample_size", "in_channels", "out_channels")}
    config |= dict(unet or {})
    config |= dict(sample_size=image_size, in_channels=channels, out_channels=channels)
    factor = 2 ** (len(config["down_block_types"]) - 1)
    if image_size < factor or image_size % factor:
        raise ValueError(
            f"image_size={image_size} cannot pass the UNet's {len(config['down_block_types']) - 1} down-samplings: "
            f"it must be a positive multiple of {factor}"
        )
    return config


INPAINT_COMPLETIONS = 4  # completions per image in the validation inpainting grid


class KarrasVeModule(L.LightningModule):
    """A VE score model trained by denoising score matching over log-uniform sigmas, sampled with EDM Algorithm 2.

    Args:
        image_size: the images' height and width in pixels (the CLI takes it from ``--data.image_size``).
        channels: the images' channel count, 1 or 3 (the CLI takes it from ``--data.channels``).
        unet: ``UNet2DModel`` keyword arguments over ``default_unet_config`` (Fourier embedding is required).
        sigma_max: sigma_0, the largest noise level, also the top of the training noise range (``SamplerSettings``);
            "auto" in the ``kve`` CLI, which replaces it before the module is built by the training split's largest
            pairwise distance (``ImageDataModule.max_pairwise_distance``, Song & Ermon 2020, technique 1), or with
            ``--ckpt_path`` by the checkpoint's number. In Python, pass that number.
        clamp_denoised: clip D(x; sigma) to the data range [-1, 1] while sampling (on for image models, off in
            Algorithm 2 as written; see ``SamplerSettings``).
        micro_batch: run the UNet on chunks of exactly this many rows while sampling, so that an image's bytes
            depend on its seed only, not on its batch (0: whole batches; see ``SamplerSettings``).
        lr: the peak learning rate of AdamW.
        betas: AdamW's (beta1, beta2).
        weight_decay: AdamW's decoupled weight decay.
        warmup_steps: optimizer steps of linear learning-rate warm-up from 0.
        ema_decay: the EMA decay of the weights used for validation, sampling and checkpoints (0 turns EMA off).
        ema_warmup: the EMA's warm-up: its decay is min(ema_decay, (1 + n) / (ema_warmup + n)) at update n.
        phema_stds: relative stds of the power-function EMAs to track for post-hoc EMA (EDM2: [0.05, 0.10]); their
            snapshots go to ``ROOT/phema`` and ``kve-phema`` reconstructs any other std from them (empty: off).
        phema_every_n_steps: optimizer steps between post-hoc EMA snapshots.
        grid_size: samples in the validation grid logged to TensorBoard (0: no grid).
        grid_seed: the grid's first seed; image k uses seed grid_seed + k.
        trajectory_rows: grid samples whose denoising trajectory is logged beside the grid.
        inpaint_grid_images: held-out images whose bottom half is completed ``INPAINT_COMPLETIONS`` times (seeds
            grid_seed, ...) in the validation grid ``samples/inpainting`` (0: no inpainting grid).
        trajectory_cols: steps shown per trajectory.
        val_num_sigmas: fixed sigmas, log-spaced over [sigma_min, sigma_max], of the validation loss.
        val_seed: the seed of the validation loss's fixed noise.
        max_bad_steps: stop after this many consecutive steps skipped for a non-finite loss or gradient.
        channels_last: keep the UNet's weights and the training batches in channels-last memory format.
        compile: ``torch.compile`` the UNet in place (state-dict keys unchanged: checkpoints load uncompiled).
        fid_every_n_epochs: log ``val/fid`` every n epochs (0: never).
        fid_num_samples: samples per FID, against the training images.
        fid_features: the FID's features: "digits" (offline) or "inception" (metrics.py).
        likelihood_steps: RK4 steps of the probability-flow ODE for bits/dim (``kve test``, ``val/bpd``; 4 NFE each).
        likelihood_probes: Hutchinson probes per image for bits/dim.
        bpd_every_n_epochs: log ``val/bpd`` of the first ``bpd_num_images`` held-out images every n epochs (0: never).
        bpd_num_images: held-out images in ``val/bpd``.
        **sampler: the other fields of ``SamplerSettings``, at its defaults unless given; [sigma_min, sigma_max] is
            also the training noise range. They are stored flat in the hyper-parameters and can change whenever a
            checkpoint is loaded.
    """

    def __init__(
        self,
        image_size: int = 8,
        channels: int = 1,
        unet: dict[str, Any] | None = None,
        sigma_max: float | Literal["auto"] = SamplerSettings.sigma_max,
        clamp_denoised: bool = True,
        micro_batch: int = 64,
        lr: float = 2e-4,
        betas: Sequence[float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        warmup_steps: int = 200,
        ema_decay: float = 0.999,
        ema_warmup: float = 10.0,
        phema_stds: Sequence[float] = (),
        phema_every_n_steps: int = 250,
        grid_size: int = 64,
        grid_seed: int = 0,
        trajectory_rows: int = 4,
        inpaint_grid_images: int = 8,
        trajectory_cols: int = 8,
        val_num_sigmas: int = 8,
        val_seed: int = 0,
        max_bad_steps: int = 10,
        channels_last: bool = False,
        compile: bool = False,
        fid_every_n_epochs: int = 0,
        fid_num_samples: int = 1000,
        fid_features: Features = "digits",
        likelihood_steps: int = 64,
        likelihood_probes: int = 1,
        bpd_every_n_epochs: int = 0,
        bpd_num_images: int = 64,
        **sampler: Any,
    ):
        super().__init__()
        self.save_hyperparameters()
        if sigma_max == "auto":
            raise ValueError("sigma_max='auto' is resolved from the data by the kve CLI; in Python pass the number "
                             "ImageDataModule.max_pairwise_distance() returns")
        self.sampler = SamplerSettings(sigma_max=sigma_max, clamp_denoised=clamp_denoised, micro_batch=micro_batch,
                                       **sampler)
        self.hparams.update(self.sampler.to_dict())  # every setting, flat: weights-only loading reads it back
        if lr <= 0 or warmup_steps < 0 or min(grid_size, inpaint_grid_images) < 0 or val_num_sigmas < 1:
            raise ValueError(f"need lr > 0, warmup_steps >= 0, grid_size >= 0, inpaint_grid_images >= 0, "
                             f"val_num_sigmas >= 1; got lr={lr}, warmup_steps={warmup_steps}, grid_size={grid_size}, "
                             f"inpaint_grid_images={inpaint_grid_images}, val_num_sigmas={val_num_sigmas}")
        if max_bad_steps < 1:
            raise ValueError(f"max_bad_steps must be >= 1, got max_bad_steps={max_bad_steps}")
        if phema_stds:
            PostHocEMA(phema_stds, phema_every_n_steps)  # checks the settings now, not when fitting starts
        self.denoiser = VEDenoiser(UNet2DModel(**unet_config(image_size, channels, unet)))
        if fid_every_n_epochs < 0 or fid_num_samples < 2 or fid_features not in FEATURES:
            raise ValueError(f"need fid_every_n_epochs >= 0, fid_num_samples >= 2, fid_features in {FEATURES}; got "
                             f"{fid_every_n_epochs}, {fid_num_samples}, {fid_features!r}")
        if likelihood_steps < 1 or likelihood_probes < 1 or bpd_every_n_epochs < 0 or bpd_num_images < 1:
            raise ValueError(f"need likelihood_steps >= 1, likelihood_probes >= 1, bpd_every_n_epochs >= 0, "
                             f"bpd_num_images >= 1; got {likelihood_steps}, {likelihood_probes}, "
                             f"{bpd_every_n_epochs}, {bpd_num_images}")
        self._fid: dict[str, Any] = {}  # a plain dict: the FID metric stays out of state_dict
        self._test_bpd: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.skipped_steps = 0
        self.consecutive_bad_steps = 0
        # fixed validation sigmas, log-spaced over [sigma_min, sigma_max]
        self.val_sigmas = torch.logspace(math.log10(self.sampler.sigma_min), math.log10(self.sampler.sigma_max),
                                         val_num_sigmas).tolist()

    @classmethod
    def from_checkpoint(cls, ckpt: str | Path) -> KarrasVeModule:
        """The module a `kve fit` checkpoint holds (``read_checkpoint``: weights-only, checked), in eval mode; a
        ``ValueError`` naming the file if its hyper-parameters and weights do not make one."""
        checkpoint = read_checkpoint(ckpt)
        state, hparams = checkpoint["state_dict"], checkpoint["hyper_parameters"]
        try:
            module = cls(**{k: v for k, v in hparams.items() if not k.startswith("_")})
            module.load_state_dict(state)
        except (TypeError, ValueError, RuntimeError) as err:  # hparams or weights of another model version
            raise ValueError(f"{str(ckpt)!r} does not match KarrasVeModule: {err}") from None
        return module.eval()

    def setup(self, stage: str) -> None:
        if self.device.type == "cuda":
            torch.set_float32_matmul_precision("high")
        if self.hparams.channels_last:
            self.denoiser.unet.to(memory_format=torch.channels_last)
        if self.hparams.compile:
            self.denoiser.unet.compile()

    def _memory_format(self, y: torch.Tensor) -> torch.Tensor:
        return y.contiguous(memory_format=torch.channels_last) if self.hparams.channels_last else y

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """D(x; sigma)."""
        return self.denoiser(x, sigma)

    # ------------------------------------------------------------------ training

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        y = self._memory_format(batch)
        losses, sigma = ve_loss(self.denoiser, y, self.sampler.sigma_min, self.sampler.sigma_max)
        self._last_sigmas = (sigma.detach(), losses.detach())
        loss = losses.mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=y.shape[0])
        if self._trainer is not None:
            self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=y.shape[0])
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        """Skip a step whose loss or gradient is not finite: its gradients are dropped, so no weight (nor the EMA)
        moves. Gradients are all-reduced before this hook, so every rank decides alike. ``max_bad_steps``
        consecutive skips stop the run with an error."""
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if not grads or torch.stack([g.isfinite().all() for g in grads]).all():
            self.consecutive_bad_steps = 0
            return
        self.skipped_steps += 1
        self.consecutive_bad_steps += 1
        sigma, losses = self._last_sigmas
        bad = sigma[~losses.isfinite()].tolist()
        rank_zero_warn(f"non-finite loss or gradient at step {self.global_step} (sigma of non-finite losses: "
                       f"{[round(s, 4) for s in bad] or 'none; gradient only'}): step skipped")
        for p in self.parameters():
            p.grad = None
        self.log("train/skipped_steps", float(self.skipped_steps))
        if self.consecutive_bad_steps >= self.hparams.max_bad_steps:
            raise FloatingPointError(f"{self.consecutive_bad_steps} consecutive steps with a non-finite loss or "
                                     f"gradient (max_bad_steps={self.hparams.max_bad_steps}): stopping; lower lr?")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Never write non-finite weights. Store the random generators' states and the skipped-step counters, which
        ``on_load_checkpoint`` restores for an exact resume."""
        bad = [k for k, v in checkpoint["state_dict"].items() if v.is_floating_point() and not v.isfinite().all()]
        if bad:
            raise FloatingPointError(f"refusing to save a checkpoint with non-finite weights in {bad[:5]}")
        checkpoint["kve_resume"] = {"rng_states": get_rng_states(), "skipped_steps": self.skipped_steps,
                                    "consecutive_bad_steps": self.consecutive_bad_steps}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """When fitting resumes (``ckpt_path``), restore what ``on_save_checkpoint`` stored; the Trainer restores the
        optimizer, the learning-rate schedule, the loops (global step, epoch) and the EMA callback itself."""
        resume = checkpoint.get("kve_resume")
        if resume is None or self._trainer is None or self._trainer.state.fn != "fit":
            return
        set_rng_states(resume["rng_states"])
        self.skipped_steps = resume["skipped_steps"]
        self.consecutive_bad_steps = resume["consecutive_bad_steps"]

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        """The DSM loss at fixed sigmas with fixed noise: comparable across epochs and runs."""
        y = self._memory_format(batch)
        g = torch.Generator().manual_seed(self.hparams.val_seed * 1_000_003 + batch_idx)
        eps = torch.randn(y.shape, generator=g).to(y)
        losses = []
        for sigma in self.val_sigmas:
            loss = dsm_loss(self.denoiser, y, torch.full((y.shape[0],), sigma, device=y.device), eps).mean()
            self.log(f"val/loss_sigma_{sigma:.3g}", loss, batch_size=y.shape[0], sync_dist=True)
            losses.append(loss)
        self.log("val/loss", torch.stack(losses).mean(), prog_bar=True, batch_size=y.shape[0], sync_dist=True)

    def on_validation_epoch_start(self) -> None:
        """On rank 0: FID every ``fid_every_n_epochs`` epochs, and the sample grid and trajectory strip.
        Callbacks' hooks run before this one, so the EMA weights are in place; nothing here is collective."""
        hp = self.hparams
        if self.trainer.sanity_checking or not self.trainer.is_global_zero:
            return
        if hp.fid_every_n_epochs and (self.current_epoch + 1) % hp.fid_every_n_epochs == 0:
            self.log("val/fid", self.fid(), rank_zero_only=True)
        if hp.bpd_every_n_epochs and (self.current_epoch + 1) % hp.bpd_every_n_epochs == 0:
            held_out = self.trainer.datamodule.val_set
            images = torch.stack([held_out[i] for i in range(min(hp.bpd_num_images, len(held_out)))])
            bpd = self.bits_per_dim(torch.arange(len(images)), images.to(self.device))
            self.log("val/bpd", bpd.mean().item(), rank_zero_only=True)
        if hp.grid_size and isinstance(self.logger, TensorBoardLogger):
            grid, strip = self.sample_grid()
            self.logger.experiment.add_image("samples/grid", grid, self.global_step)
            self.logger.experiment.add_image("samples/trajectory", strip, self.global_step)
        if hp.inpaint_grid_images and isinstance(self.logger, TensorBoardLogger):
            held_out = self.trainer.datamodule.val_set
            images = torch.stack([held_out[i] for i in range(min(hp.inpaint_grid_images, len(held_out)))])
            self.logger.experiment.add_image("samples/inpainting", self.inpainting_grid(images), self.global_step)

    # ------------------------------------------------------------------ likelihood

    def bits_per_dim(self, index: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """Bits/dim of each image (``likelihood.bits_per_dim_per_image``) at the data's quantization, its
        dequantization noise and probes from ``torch.Generator().manual_seed(index)``: an image's value depends on
        its index in its split, not on its batch or rank."""
        levels = getattr(self.trainer.datamodule, "levels", 256) if self._trainer is not None else 256
        return bits_per_dim_per_image(self.denoiser, images, levels, generator=index_generators(index),
                                      steps=self.hparams.likelihood_steps, num_probes=self.hparams.likelihood_probes,
                                      sigma_min=self.sampler.sigma_min, sigma_max=self.sampler.sigma_max)

    def on_test_epoch_start(self) -> None:
        self._test_bpd = []

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        """``batch``: (indices in the held-out split, images). Each rank integrates its own images, no collective."""
        index, images = batch
        self._test_bpd.append((index.cpu(), self.bits_per_dim(index, images)))

    def on_test_epoch_end(self) -> None:
        """Gather every rank's (index, bpd) once, drop the duplicates a distributed sampler pads with, and log
        ``test/bpd`` (the mean over held-out images) and ``test/bpd_stderr``."""
        index = torch.cat([i for i, _ in self._test_bpd]).to(self.device)
        bpd = torch.cat([b for _, b in self._test_bpd]).to(self.device)
        if self.trainer.world_size > 1:
            index, bpd = self.all_gather(index).flatten(), self.all_gather(bpd).flatten()
        unique = {int(i): float(b) for i, b in zip(index.cpu(), bpd.cpu())}
        mean, stderr = mean_and_stderr(torch.tensor(list(unique.values()), dtype=torch.float64))
        self.log("test/bpd", mean, rank_zero_only=True)
        self.log("test/bpd_stderr", stderr, rank_zero_only=True)

    @torch.no_grad()
    def fid(self) -> float:
        """FID (``fid_features``) of ``fid_num_samples`` samples (seeds from 10**6) against the training images.

        The real statistics are computed once per process and kept outside the module's state (not checkpointed).
        """
        hp = self.hparams
        if "metric" not in self._fid:
            train = self.trainer.datamodule.train_set
            train = train.dataset if isinstance(train, FlipDataset) else train  # no random flips: no global RNG use
            real = torch.cat(list(DataLoader(train, batch_size=512, generator=torch.Generator())))
            self._fid["metric"] = build_fid(real, hp.fid_features, device=self.device)
        metric = self._fid["metric"]
        metric.reset()
        seeds = torch.arange(10**6, 10**6 + hp.fid_num_samples)
        for chunk in seeds.split(256):
            metric.update(self.sample(chunk).clamp(-1, 1), real=False)
        return metric.compute().item()

    @torch.no_grad()
    def sample_grid(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A grid of ``grid_size`` samples (seeds grid_seed, ...) and a strip of x_hat / denoised over the steps
        for the first ``trajectory_rows`` of them; both [C, H, W] in [0, 1]."""
        hp = self.hparams
        rows = min(hp.trajectory_rows, hp.grid_size)
        num_steps = self.sampler.num_steps
        keep = set(torch.linspace(0, num_steps - 1, hp.trajectory_cols).round().long().tolist())
        frames: list[tuple[torch.Tensor, torch.Tensor]] = []

        def record(i, sigma_hat, x_hat, denoised):
            if i in keep:
                frames.append((x_hat[:rows].clone(), denoised[:rows].clone()))

        seeds = torch.arange(hp.grid_seed, hp.grid_seed + hp.grid_size)
        images = self.sample(seeds, callback=record)
        grid = make_grid(to_unit(images), nrow=math.ceil(math.sqrt(hp.grid_size)), padding=1)
        # rows: x_hat of sample 0, denoised of sample 0, x_hat of sample 1, ...; columns: steps
        strip = torch.stack([torch.stack([f[j][r] for f in frames]) for r in range(rows) for j in (0, 1)])
        strip = make_grid(to_unit(strip.flatten(0, 1)), nrow=len(frames), padding=1)
        return grid, strip

    @torch.no_grad()
    def inpainting_grid(self, images: torch.Tensor) -> torch.Tensor:
        """Per image: original | bottom half masked | ``INPAINT_COMPLETIONS`` completions (seeds grid_seed, ...);
        [C, H, W] in [0, 1]."""
        mask = parse_mask("bottom", self.hparams.image_size).to(self.device)
        seeds = [self.hparams.grid_seed + k for k in range(INPAINT_COMPLETIONS)]
        rows = images.to(self.device).repeat_interleave(len(seeds), 0)
        x = complete(self.denoiser, rows, mask, seeds * len(images), self.sampler)
        return inpainting_grid(images, mask.cpu(), x.unflatten(0, (len(images), len(seeds))).cpu())

    # ------------------------------------------------------------------ sampling

    @torch.no_grad()
    def sample(self, seeds: torch.Tensor | Sequence[int], callback=None, **overrides: Any) -> torch.Tensor:
        """One image per integer seed, each from its own ``torch.Generator``: an image depends only on its seed
        and the sampler settings (the module's, with ``overrides`` of ``SamplerSettings`` fields), not on the batch
        or rank. In [-1, 1] units, unclamped. No seeds (a predict batch whose images all exist), no images."""
        hp = self.hparams
        seeds = [int(s) for s in seeds]
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        settings = self.sampler.replace(**overrides)
        shape = (len(seeds), hp.channels, hp.image_size, hp.image_size)
        if not seeds:
            return torch.empty(shape, device=self.device)
        return sample_karras_ve(self.denoiser, shape, settings=settings, generator=gens, device=self.device,
                                callback=callback)

    def predict_step(self, batch: torch.Tensor, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        """``batch``: integer seeds [B]. Returns images in [0, 1], [B, C, H, W]."""
        return to_unit(self.sample(batch))

    # ------------------------------------------------------------------ optimisation

    def configure_optimizers(self):
        hp = self.hparams
        # the non-fused AdamW: gradient clipping with the fused one fails under mixed precision (lightning < 2.6.7)
        opt = torch.optim.AdamW(self.parameters(), lr=hp.lr, betas=tuple(hp.betas), weight_decay=hp.weight_decay,
                                fused=False)
        warmup = max(hp.warmup_steps, 1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def configure_callbacks(self):
        """EMA on by default while fitting, post-hoc EMA snapshots if ``phema_stds``; predict and validate use the
        (EMA) weights the checkpoint holds."""
        hp = self.hparams
        if self.trainer.state.fn != "fit":
            return []
        return ([EMA(hp.ema_decay, hp.ema_warmup)] if hp.ema_decay > 0 else []) + (
            [PostHocEMA(hp.phema_stds, hp.phema_every_n_steps)] if hp.phema_stds else [])

