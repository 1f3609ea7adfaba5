"""The Lightning module: VE denoising score matching, the validation loss, sampling (EDM Algorithm 2) and bits/dim.

What validation shows besides its loss (sample grids, FID, bits/dim) is in ``kve_lightning.lit.callbacks``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal, Sequence, get_args

import lightning as L
import torch
from diffusers import UNet2DModel
from lightning.pytorch.utilities import rank_zero_warn

from kve_lightning.interop.checkpoint import read_checkpoint
from kve_lightning.denoiser import (SIGMA_DATA, LossWeight, Precond, SigmaDist, VEDenoiser, dsm_loss, sample_sigmas,
                                    unet_config)
from kve_lightning.guidance import check_guide, check_labels, guided
from kve_lightning.lit.ema import EMA, PostHocEMA
from kve_lightning.storage import to_unit
from kve_lightning.likelihood import bits_per_dim_per_image, index_generators, mean_and_stderr, with_labels

from kve_lightning.rng import get_rng_states, set_rng_states
from kve_lightning.sampling import MAX_SIGMA, SamplerSettings, sample_karras_ve

# hyper-parameters of earlier versions, now the settings of the evaluation callbacks (kve_lightning.lit.callbacks)
RETIRED = frozenset({"grid_size", "grid_seed", "trajectory_rows", "trajectory_cols", "inpaint_grid_images",
                     "fid_every_n_epochs", "fid_num_samples", "fid_features", "bpd_every_n_epochs", "bpd_num_images"})


def checkpoint_hparams(hparams: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's hyper-parameters as ``KarrasVeModule`` takes them: Lightning's private keys and ``RETIRED``
    ones dropped; a checkpoint of before the training range was stored apart was trained on its sampler's."""
    hparams = {k: v for k, v in hparams.items() if not k.startswith("_") and k not in RETIRED}
    return {"train_sigma_min": hparams.get("sigma_min", SamplerSettings.sigma_min),
            "train_sigma_max": hparams.get("sigma_max", SamplerSettings.sigma_max), "num_classes": 0} | hparams


class KarrasVeModule(L.LightningModule):
    """A VE score model trained by denoising score matching over log-uniform sigmas, sampled with EDM Algorithm 2;
    class-conditional with ``num_classes`` > 0, guided (classifier-free guidance, autoguidance) by the
    ``guidance_*`` sampler settings (``kve_lightning.guidance``).

    Args:
        image_size: the images' height and width in pixels (the CLI takes it from ``--data.image_size``).
        channels: the images' channel count, 1 or 3 (the CLI takes it from ``--data.channels``).
        unet: ``UNet2DModel`` keyword arguments over ``default_unet_config`` (Fourier embedding is required).
        sigma_max: sigma_0, the largest noise level, and the top of the training noise range (``SamplerSettings``);
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
            snapshots go to ``ROOT/phema`` and ``kve phema`` reconstructs any other std from them (empty: off).
        phema_every_n_steps: optimizer steps between post-hoc EMA snapshots.
        val_num_sigmas: fixed sigmas, log-spaced over [sigma_min, sigma_max], of the validation loss.
        val_seed: the seed of the validation loss's fixed noise.
        max_bad_steps: stop after this many consecutive steps skipped for a non-finite loss or gradient.
        channels_last: keep the UNet's weights and the training batches in channels-last memory format.
        compile: ``torch.compile`` the UNet in place (state-dict keys unchanged: checkpoints load uncompiled).
        likelihood_steps: RK4 steps of the probability-flow ODE for bits/dim (``kve test``, ``val/bpd``; 4 NFE each).
        likelihood_probes: Hutchinson probes per image for bits/dim.
        precond: the denoiser's preconditioning (EDM Table 1): "ve" (D = x + sigma F, the VE recipe) or "edm"
            (c_skip, c_out, c_in from ``sigma_data``; ``VEDenoiser``).
        sigma_data: the data's standard deviation in [-1, 1] units, for "edm" preconditioning and loss weight;
            "auto" in the ``kve`` CLI: the training split's (``ImageDataModule.data_std``).
        sigma_dist: the training noise levels: "log_uniform" on [train_sigma_min, train_sigma_max] (the VE recipe)
            or "log_normal", ln sigma ~ N(p_mean, p_std^2) (EDM).
        p_mean: the mean of ln sigma for "log_normal" (EDM: -1.2).
        p_std: the standard deviation of ln sigma for "log_normal" (EDM: 1.2).
        loss_weight: lambda(sigma): "ve" 1 / sigma^2 or "edm" (sigma^2 + sigma_data^2) / (sigma sigma_data)^2.
        train_sigma_min: the bottom of the training noise range (default: ``sigma_min``); the model's own once trained,
            stored in its checkpoint, and a sampler reaching below it is refused (``SamplerSettings.extrapolate``).
        train_sigma_max: the top of the training noise range (default: ``sigma_max``), likewise.
        num_classes: K, the classes of a class-conditional model (0: unconditional; the data's labels are ignored).
            The UNet gets ``num_class_embeds`` K + 1, index K being the null class of classifier-free guidance.
        label_dropout: the probability that a training image's label is replaced by the null class (classifier-free
            guidance; k-diffusion's ``cond_dropout_rate`` 0.1).
        class_names: the names of the classes, label k naming class k (``kve fit`` takes the data's).
        guide_ckpt_path: a checkpoint of a weaker model of the same data (an earlier checkpoint, a smaller UNet)
            that guides sampling when ``guidance_scale`` != 1: autoguidance (Karras et al. 2024); without one a
            conditional model guides with its null class.
        **sampler: the other fields of ``SamplerSettings``, at its defaults unless given. They are stored flat in
            the hyper-parameters and may change whenever a checkpoint is loaded; the training range may not.
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
        val_num_sigmas: int = 8,
        val_seed: int = 0,
        max_bad_steps: int = 10,
        channels_last: bool = False,
        compile: bool = False,
        likelihood_steps: int = 64,
        likelihood_probes: int = 1,
        train_sigma_min: float | None = None,
        train_sigma_max: float | None = None,
        precond: Precond = "ve",
        sigma_data: float | Literal["auto"] = SIGMA_DATA,
        sigma_dist: SigmaDist = "log_uniform",
        p_mean: float = -1.2,
        p_std: float = 1.2,
        loss_weight: LossWeight = "ve",
        num_classes: int = 0,
        label_dropout: float = 0.1,
        class_names: Sequence[str] = (),
        guide_ckpt_path: str | None = None,
        **sampler: Any,
    ):
        super().__init__()
        self.save_hyperparameters()
        for name, value, method in (("sigma_max", sigma_max, "max_pairwise_distance"),
                                    ("sigma_data", sigma_data, "data_std")):
            if value == "auto":
                raise ValueError(f"{name}='auto' is resolved from the data by the kve CLI; in Python pass the number "
                                 f"ImageDataModule.{method}() returns")
        for name, value, allowed in (("sigma_dist", sigma_dist, get_args(SigmaDist)),
                                     ("loss_weight", loss_weight, get_args(LossWeight))):
            if value not in allowed:
                raise ValueError(f"unknown {name}={value!r}; expected one of {allowed}")
        if not p_std > 0 or not abs(p_mean) < 100:
            raise ValueError(f"need p_std > 0 and a finite p_mean, got p_mean={p_mean}, p_std={p_std}")
        self.sampler = SamplerSettings(sigma_max=sigma_max, clamp_denoised=clamp_denoised, micro_batch=micro_batch,
                                       **sampler)
        self.train_sigmas = (self.sampler.sigma_min if train_sigma_min is None else float(train_sigma_min),
                             self.sampler.sigma_max if train_sigma_max is None else float(train_sigma_max))
        if not 0 < self.train_sigmas[0] < self.train_sigmas[1] <= MAX_SIGMA:
            raise ValueError(f"need 0 < train_sigma_min < train_sigma_max <= {MAX_SIGMA:g}, got "
                             f"train_sigma_min={self.train_sigmas[0]}, train_sigma_max={self.train_sigmas[1]}")
        self.sampler.check_trained_range(*self.train_sigmas)
        # every setting flat, and the training range as numbers: weights-only loading reads them back
        self.hparams.update(self.sampler.to_dict())
        self.hparams.update(train_sigma_min=self.train_sigmas[0], train_sigma_max=self.train_sigmas[1])
        if lr <= 0 or warmup_steps < 0 or val_num_sigmas < 1:
            raise ValueError(f"need lr > 0, warmup_steps >= 0, val_num_sigmas >= 1; got lr={lr}, "
                             f"warmup_steps={warmup_steps}, val_num_sigmas={val_num_sigmas}")
        if max_bad_steps < 1:
            raise ValueError(f"max_bad_steps must be >= 1, got max_bad_steps={max_bad_steps}")
        if likelihood_steps < 1 or likelihood_probes < 1:
            raise ValueError(f"need likelihood_steps >= 1, likelihood_probes >= 1; got {likelihood_steps}, "
                             f"{likelihood_probes}")
        if phema_every_n_steps < 1:
            raise ValueError(f"phema_every_n_steps must be >= 1, got phema_every_n_steps={phema_every_n_steps}")
        if phema_stds:
            PostHocEMA(phema_stds, phema_every_n_steps)  # checks the settings now, not when fitting starts
        if not 0 <= label_dropout <= 1:
            raise ValueError(f"label_dropout must be in [0, 1], got label_dropout={label_dropout!r}")
        if class_names and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class_names for num_classes={num_classes}")
        self.denoiser = VEDenoiser(UNet2DModel(**unet_config(image_size, channels, unet, num_classes)), precond,
                                   sigma_data)
        # the guide is no part of this model: kept out of its state dict (a plain attribute, not a submodule)
        self.__dict__["guide"] = None if guide_ckpt_path is None else self.load_guide(guide_ckpt_path)
        self._test_bpd: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.skipped_steps = 0
        self.consecutive_bad_steps = 0
        # fixed validation sigmas, log-spaced over the training range: comparable across epochs and sampler settings
        self.val_sigmas = torch.logspace(math.log10(self.train_sigmas[0]), math.log10(self.train_sigmas[1]),
                                         val_num_sigmas).tolist()

    def load_guide(self, path: str | Path) -> VEDenoiser:
        """The EMA denoiser of the checkpoint ``path`` as this model's guide (``check_guide``), frozen."""
        guide = KarrasVeModule.from_checkpoint(path, guide_ckpt_path=None)
        check_guide(self.denoiser, guide.denoiser, str(path))
        self.sampler.check_trained_range(*guide.train_sigmas)  # the guide was trained where it is called
        return guide.denoiser.requires_grad_(False)

    @classmethod
    def from_checkpoint(cls, ckpt: str | Path, **overrides: Any) -> KarrasVeModule:
        """The module a `kve fit` checkpoint holds (``read_checkpoint``: weights-only, checked), in eval mode; a
        ``ValueError`` naming the file if its hyper-parameters and weights do not make one."""
        checkpoint = read_checkpoint(ckpt)
        state, hparams = checkpoint["state_dict"], checkpoint["hyper_parameters"]
        try:
            module = cls(**checkpoint_hparams(hparams) | overrides)
            module.load_state_dict(state)
        except (TypeError, ValueError, RuntimeError) as err:  # hparams or weights of another model version
            raise ValueError(f"{str(ckpt)!r} does not match KarrasVeModule: {err}") from None
        return module.eval()

    def setup(self, stage: str) -> None:
        """Fitting a conditional model keeps the data's class names with it (a ``ValueError`` if it has another
        number of classes than ``num_classes``)."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if stage == "fit" and self.hparams.num_classes and hasattr(datamodule, "class_names"):
            names = datamodule.class_names()
            if len(names) != self.hparams.num_classes:
                why = "" if names else " (no class sub-folders)"
                raise ValueError(f"num_classes={self.hparams.num_classes} but the data set "
                                 f"{datamodule.hparams.dataset!r} has {len(names)} classes{why}")
            self.hparams.class_names = list(names)
        if self.device.type == "cuda":
            torch.set_float32_matmul_precision("high")
        if self.hparams.channels_last:
            self.denoiser.unet.to(memory_format=torch.channels_last)
        if self.hparams.compile:
            self.denoiser.unet.compile()

    def _memory_format(self, y: torch.Tensor) -> torch.Tensor:
        return y.contiguous(memory_format=torch.channels_last) if self.hparams.channels_last else y

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor | None = None
                ) -> torch.Tensor:
        """D(x; sigma), or D(x; sigma, c) of a conditional model."""
        return self.denoiser(x, sigma, class_labels)

    def batch_labels(self, labels: torch.Tensor | None) -> torch.Tensor | None:
        """The labels a batch trains or validates with: none for an unconditional model, else ``labels`` (a
        ``ValueError`` for unlabelled images or a label >= num_classes)."""
        if not self.hparams.num_classes:
            return None
        if labels is None or (labels < 0).any():
            raise ValueError(f"num_classes={self.hparams.num_classes} needs labelled images; the data set has none "
                             f"(a folder needs one sub-folder per class)")
        check_labels(self.denoiser, labels)
        return labels

    @staticmethod
    def split_batch(batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(images, labels) of a training or validation batch: an (image, label) pair of tensors, or images only."""
        return (batch, None) if torch.is_tensor(batch) else (batch[0], batch[1])

    # ------------------------------------------------------------------ training

    def training_loss(self, y: torch.Tensor, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-sample losses [B] of a batch and their sigmas [B]: ``dsm_loss`` with the objective's weight at
        sigmas of ``sigma_dist`` and noise eps ~ N(0, I), both from the global generator. A conditional model's
        ``labels`` then become the null class with probability ``label_dropout`` (from the global generator too;
        an unconditional model draws nothing more than before)."""
        hp = self.hparams
        sigma = sample_sigmas(y.shape[0], y.device, hp.sigma_dist, self.train_sigmas, hp.p_mean, hp.p_std)
        eps = torch.randn_like(y)
        if labels is not None:
            dropped = torch.rand(labels.shape, device=labels.device) < hp.label_dropout
            labels = labels.masked_fill(dropped, hp.num_classes)
        return dsm_loss(self.denoiser, y, sigma, eps, hp.loss_weight, hp.sigma_data, labels), sigma

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        """``batch``: (images, labels), or images."""
        images, labels = self.split_batch(batch)
        y = self._memory_format(images)
        losses, sigma = self.training_loss(y, self.batch_labels(labels))
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

    def validation_step(self, batch, batch_idx: int) -> None:
        """The DSM loss with the VE weight 1 / sigma^2 at fixed sigmas with fixed noise, whatever the training
        objective: comparable across epochs, runs and objectives. A conditional model's is D(x; sigma, c) with the
        images' own labels, also summed per class for ``on_validation_epoch_end``."""
        images, labels = self.split_batch(batch)
        labels = self.batch_labels(labels)
        y = self._memory_format(images)
        g = torch.Generator().manual_seed(self.hparams.val_seed * 1_000_003 + batch_idx)
        eps = torch.randn(y.shape, generator=g).to(y)
        losses = []
        for sigma in self.val_sigmas:
            per_image = dsm_loss(self.denoiser, y, torch.full((y.shape[0],), sigma, device=y.device), eps,
                                 labels=labels)
            self.log(f"val/loss_sigma_{sigma:.3g}", per_image.mean(), batch_size=y.shape[0], sync_dist=True)
            losses.append(per_image)
        per_image = torch.stack(losses).mean(0)
        self.log("val/loss", per_image.mean(), prog_bar=True, batch_size=y.shape[0], sync_dist=True)
        if labels is not None:
            k = self.hparams.num_classes
            self._val_class_loss += torch.zeros(k, device=y.device).index_add_(0, labels, per_image.float())
            self._val_class_count += torch.bincount(labels, minlength=k)

    def on_validation_epoch_start(self) -> None:
        k = self.hparams.num_classes
        self._val_class_loss = torch.zeros(k, device=self.device)
        self._val_class_count = torch.zeros(k, dtype=torch.long, device=self.device)

    def on_validation_epoch_end(self) -> None:
        """``val/loss_class_K`` of a conditional model: the mean validation loss of class K's held-out images, summed
        over every rank."""
        if not self.hparams.num_classes:
            return
        total = self.trainer.strategy.reduce(self._val_class_loss, reduce_op="sum")
        count = self.trainer.strategy.reduce(self._val_class_count, reduce_op="sum")
        for k in range(self.hparams.num_classes):
            if count[k] > 0:
                self.log(f"val/loss_class_{k}", (total[k] / count[k]).item())

    # ------------------------------------------------------------------ likelihood

    def bits_per_dim(self, index: torch.Tensor, images: torch.Tensor, labels: torch.Tensor | None = None
                     ) -> torch.Tensor:
        """Bits/dim of each image (``likelihood.bits_per_dim_per_image``) at the data's quantization, its
        dequantization noise and probes from ``torch.Generator().manual_seed(index)``: an image's value depends on
        its index in its split, not on its batch or rank. A conditional model's is -log2 p(x | c) / d with the
        images' ``labels`` (none: the null class)."""
        levels = getattr(self.trainer.datamodule, "levels", 256) if self._trainer is not None else 256
        denoiser = with_labels(self.denoiser, self.batch_labels(labels) if labels is not None else None)
        return bits_per_dim_per_image(denoiser, images, levels, generator=index_generators(index),
                                      steps=self.hparams.likelihood_steps, num_probes=self.hparams.likelihood_probes,
                                      sigma_min=self.train_sigmas[0], sigma_max=self.train_sigmas[1])

    def on_test_epoch_start(self) -> None:
        self._test_bpd = []

    def test_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        """``batch``: (indices in the held-out split, images, labels). Each rank integrates its own images, no
        collective."""
        index, images, labels = batch
        self._test_bpd.append((index.cpu(), self.bits_per_dim(index, images, labels)))

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

    # ------------------------------------------------------------------ sampling

    def sampling_denoiser(self, settings, labels=None):
        """The denoiser and settings of ``guided`` for this model, its guide (moved to this device) and ``labels``."""
        if self.guide is not None:
            self.guide.to(self.device)
        return guided(self.denoiser, settings, labels, self.guide)

    @torch.no_grad()
    def sample(self, seeds: torch.Tensor | Sequence[int], callback=None, labels: Sequence[int] | None = None,
               **overrides: Any) -> torch.Tensor:
        """One image per integer seed, each from its own ``torch.Generator``: an image depends only on its seed,
        its class label (``labels``, one per seed, for a conditional model; none: the null class) and the sampler
        settings (the module's, with ``overrides`` of ``SamplerSettings`` fields, guidance included), not on the
        batch or rank. In [-1, 1] units, unclamped. No seeds (a predict batch whose images all exist), no images.
        Settings that leave the trained noise range are refused (``SamplerSettings.check_trained_range``)."""
        hp = self.hparams
        seeds = [int(s) for s in seeds]
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        settings = self.sampler.replace(**overrides)
        settings.check_trained_range(*self.train_sigmas)
        if labels is not None and len(labels) != len(seeds):
            raise ValueError(f"{len(labels)} labels for {len(seeds)} seeds: give one label per seed")
        denoiser, settings = self.sampling_denoiser(settings, labels)
        shape = (len(seeds), hp.channels, hp.image_size, hp.image_size)
        if not seeds:
            return torch.empty(shape, device=self.device)
        return sample_karras_ve(denoiser, shape, settings=settings, generator=gens, device=self.device,
                                callback=callback)

    def predict_step(self, batch: torch.Tensor, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        """``batch``: integer seeds [B], or (seed, label) rows [B, 2]. Returns images in [0, 1], [B, C, H, W]."""
        if batch.ndim == 2:
            return to_unit(self.sample(batch[:, 0], labels=batch[:, 1].tolist()))
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

