"""EDM's VE preconditioning around a diffusers ``UNet2DModel`` with a Fourier time embedding."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import UNet2DModel


def default_unet_config(sample_size: int = 16, channels: int = 1) -> dict[str, Any]:
    """A small Fourier-embedding UNet config (two resolutions, attention at the lower one) for tests and digits."""
    return dict(
        sample_size=sample_size,
        in_channels=channels,
        out_channels=channels,
        time_embedding_type="fourier",
        center_input_sample=True,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=16,
        norm_num_groups=8,
    )


class VEDenoiser(torch.nn.Module):
    """D(x; sigma) = x + sigma * F(x; ln(sigma / 2)): EDM Table 1, VE column (c_skip = 1, c_out = sigma, c_in = 1).

    A Fourier ``UNet2DModel`` takes the log of its timestep and divides its output by it, so
    D(x; sigma) = x + sigma * (sigma / 2) * unet((x + 1) / 2, sigma / 2).sample, the call of diffusers'
    ``KarrasVePipeline``. With ``center_input_sample=True`` the UNet maps (x + 1) / 2 back to x itself.
    """

    def __init__(self, unet: UNet2DModel):
        super().__init__()
        embedding = unet.config.get("time_embedding_type")
        if embedding != "fourier":
            raise ValueError(
                f"VEDenoiser needs a UNet2DModel with time_embedding_type='fourier' (c_noise = ln(sigma / 2)), "
                f"got time_embedding_type={embedding!r}"
            )
        self.unet = unet

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, device=x.device, dtype=x.dtype)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        if sigma.shape != (x.shape[0],):
            raise ValueError(f"sigma must be a scalar or have shape [{x.shape[0]}], got {tuple(sigma.shape)}")
        c = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        return x + c * (c / 2) * self.unet((x + 1) / 2, sigma / 2).sample
