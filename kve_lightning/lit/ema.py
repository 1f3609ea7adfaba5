"""Averages of the weights while training: the fixed-decay EMA (on Lightning's ``WeightAveraging``) and the
power-function EMAs of post-hoc EMA (EDM2; the math is in ``kve_lightning.phema``)."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, WeightAveraging
from lightning.pytorch.utilities import rank_zero_info
from safetensors.torch import save

from kve_lightning.phema import ema_beta, list_snapshots, snapshot_name, std_to_gamma
from kve_lightning.storage import save_atomic, weights_sha256


def ema_update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor, decay: float,
               warmup: float) -> None:
    """theta_ema <- beta theta_ema + (1 - beta) theta, with beta_n = min(decay, (1 + n) / (warmup + n)).

    The warm-up keeps the early average close to the current weights, so short runs are not dominated by the
    random initial weights (the first update copies them; beta rises from 2 / (warmup + 1) towards ``decay``).
    One host read of n per update, then a fused in-place lerp over all tensors.
    """
    n = int(num_averaged)
    beta = min(decay, (1 + n) / (warmup + n))
    torch._foreach_lerp_(averaged, current, 1 - beta)


class EMA(WeightAveraging):
    """EMA of all parameters and buffers, updated after every optimizer step.

    As for every ``WeightAveraging``: validation runs with the averaged weights, checkpoints store them in
    ``state_dict`` (the raw weights in ``current_model_state``), and they replace the raw weights when fitting ends.
    """

    def __init__(self, decay: float = 0.999, warmup: float = 10.0):
        if not 0 <= decay < 1:
            raise ValueError(f"ema decay must be in [0, 1), got decay={decay}")
        if not warmup >= 1:
            raise ValueError(f"ema warmup must be >= 1, got warmup={warmup}")
        super().__init__(multi_avg_fn=partial(ema_update, decay=decay, warmup=warmup))



class PostHocEMA(Callback):
    """Tracks power-function EMAs of the raw training weights (all parameters) and saves them as snapshots, from
    which ``kve phema`` reconstructs the EMA of any relative std after training (EDM2 Sec. 3).

    Updated after every optimizer step, from the weights the optimizer just wrote (the fixed-decay ``EMA`` swaps its
    average in only for validation, so both can run side by side). Each snapshot is ``phema-STEP-STD.safetensors``,
    written atomically by rank 0 every ``snapshot_every_n_steps`` steps and when training ends, with its step, std and
    origin (the step tracking began) as JSON in the header. The running averages are part of the checkpoint
    (``state_dict``), so a resumed run continues them exactly.

    Args:
        stds: the relative standard deviations sigma_rel of the tracked profiles (EDM2: 0.05 and 0.10).
        snapshot_every_n_steps: save each profile's average every n optimizer steps.
        dirpath: the snapshots' folder (default: ``phema`` in the trainer's ``default_root_dir``).
    """

    def __init__(self, stds: Sequence[float] = (0.05, 0.10), snapshot_every_n_steps: int = 250,
                 dirpath: str | Path | None = None):
        self.gammas = {float(std): std_to_gamma(float(std)) for std in stds}  # a ValueError for an impossible std
        if not stds or len({snapshot_name(0, s) for s in self.gammas}) != len(stds):
            raise ValueError(f"phema stds must be distinct (to 4 decimals) and at least one, got {list(stds)}")
        if snapshot_every_n_steps < 1:
            raise ValueError(f"snapshot_every_n_steps must be >= 1, got {snapshot_every_n_steps}")
        self.every = snapshot_every_n_steps
        self.dirpath = None if dirpath is None else Path(dirpath)
        self.origin = self.step = 0
        self.run = ""  # the run's identity in every snapshot: the SHA-256 prefix of the weights tracking began at
        self.averages: dict[float, dict[str, torch.Tensor]] = {}
        self._key = self._generate_state_key(stds=list(self.gammas), dirpath=None if dirpath is None else str(dirpath))

    @property
    def state_key(self) -> str:
        return self._key

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.dirpath is None:
            self.dirpath = Path(trainer.default_root_dir) / "phema"

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """A fresh start begins its averages at the current weights and refuses a folder holding snapshots (another
        run's: mixing them would corrupt every reconstruction); a resumed one moves its averages to the weights'
        device and deletes the snapshots of its stds written after its checkpoint (a continuation rewrites them).
        Rank 0 checks the folder and every rank raises its finding (none waits on a rank that failed)."""
        resumed = bool(self.averages)
        problem = trainer.strategy.broadcast(self._check_folder(resumed, trainer.ckpt_path) if trainer.is_global_zero
                                             else None)
        if problem:
            raise FileExistsError(problem)
        if not resumed:
            self.origin = self.step = trainer.global_step
            self.run = weights_sha256(pl_module)[:16]
            self.averages = {std: {n: p.detach().clone() for n, p in pl_module.named_parameters()}
                             for std in self.gammas}
        for average in self.averages.values():
            for name, p in pl_module.named_parameters():
                average[name] = average[name].to(p)

    def _check_folder(self, resumed: bool, ckpt_path: str | None) -> str | None:
        try:
            snapshots = list_snapshots(self.dirpath)
        except ValueError as err:  # a broken or foreign phema-* file
            return str(err)
        later = [s for s in snapshots if not resumed or (s.std in self.gammas and s.step > self.step)]
        if later and not resumed and ckpt_path:  # resumed, but the checkpoint tracked other stds (or none)
            return (f"phema folder {str(self.dirpath)!r} holds snapshots of stds {sorted({s.std for s in later})}, "
                    f"and the resumed checkpoint {str(ckpt_path)!r} tracked no post-hoc EMA of stds "
                    f"{sorted(self.gammas)}: resume with the stds it tracked (--model.phema_stds), or move the "
                    f"snapshots away")
        if later and not resumed:
            return (f"phema folder {str(self.dirpath)!r} already holds snapshots of stds "
                    f"{sorted({s.std for s in later})} (up to step {later[-1].step}) and this run starts afresh: move "
                    f"them away, or resume their run with --ckpt_path")
        for snapshot in later:
            rank_zero_info(f"post-hoc EMA: removing {snapshot.path.name}, written after the resumed checkpoint")
            snapshot.path.unlink()
        return None

    @torch.no_grad()
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        """After each optimizer step (once per step under gradient accumulation): theta_hat <- lerp(theta_hat,
        theta, 1 - beta) for every profile, and a snapshot every ``snapshot_every_n_steps`` steps."""
        step = trainer.global_step
        if step <= self.step:
            return
        params = [p.detach() for p in pl_module.parameters()]
        for std, gamma in self.gammas.items():
            beta = ema_beta(gamma, step - self.origin, step - self.step)
            torch._foreach_lerp_(list(self.averages[std].values()), params, 1 - beta)
        self.step = step
        if step % self.every == 0:
            self._save(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.step > self.origin and self.step % self.every:
            self._save(trainer)

    def _save(self, trainer: L.Trainer) -> None:
        if not trainer.is_global_zero:
            return
        self.dirpath.mkdir(parents=True, exist_ok=True)
        for std, average in self.averages.items():
            meta = {"phema": json.dumps({"step": self.step, "std": std, "origin": self.origin, "run": self.run})}
            payload = save({n: v.detach().cpu().contiguous() for n, v in average.items()}, metadata=meta)
            save_atomic(self.dirpath / snapshot_name(self.step, std), lambda f: f.write(payload))

    def state_dict(self) -> dict:
        return {"origin": self.origin, "step": self.step, "run": self.run,
                "averages": {str(std): average for std, average in self.averages.items()}}

    def load_state_dict(self, state_dict: dict) -> None:
        self.origin, self.step, self.run = state_dict["origin"], state_dict["step"], state_dict.get("run", "")
        self.averages = {float(std): dict(average) for std, average in state_dict["averages"].items()}
