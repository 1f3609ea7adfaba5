"""Exponential moving average of the weights, with a warm-up, on top of Lightning's ``WeightAveraging``."""

from __future__ import annotations

from functools import partial

import torch
from lightning.pytorch.callbacks import WeightAveraging


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
