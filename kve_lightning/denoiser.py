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
        c_skip, c_out, c_in = 1, c, 1  # EDM Table 1, VE column
        # c_noise = ln(sigma / 2): the Fourier UNet takes the log of its timestep sigma / 2 and divides its output
        # by it, so F(x; c_noise) = (sigma / 2) * unet((x + 1) / 2, sigma / 2) in diffusers' [0, 1] input convention
        return c_skip * x + c_out * (c / 2) * self.unet(c_in * (x + 1) / 2, sigma / 2).sample


def dsm_loss(denoiser: VEDenoiser, y: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Per-sample VE denoising score matching: (1 / sigma^2) ||D(y + sigma eps; sigma) - y||^2, mean over elements.

    Equals ||F + eps||^2 (EDM Eq. 2 with lambda(sigma) = 1 / sigma^2, VE column of Table 1). Kept in float32.
    """
    c = sigma.reshape(-1, *([1] * (y.ndim - 1)))
    D = denoiser(y + c * eps, sigma).float()
    return ((D - y.float()) ** 2 / c.float() ** 2).flatten(1).mean(1)


def ve_loss(denoiser: VEDenoiser, y: torch.Tensor, sigma_min: float, sigma_max: float
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """The VE training loss of a batch: ``dsm_loss`` at sigma = sigma_min (sigma_max / sigma_min)^u, u ~ U(0, 1)
    (log-uniform on [sigma_min, sigma_max]), eps ~ N(0, I), drawn from the global generator. Returns the per-sample
    losses [B] and their sigmas [B]."""
    u = torch.rand(y.shape[0], device=y.device)
    sigma = sigma_min * (sigma_max / sigma_min) ** u
    return dsm_loss(denoiser, y, sigma, torch.randn_like(y)), sigma
