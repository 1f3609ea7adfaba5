"""EDM's preconditionings of a VE process around a diffusers ``UNet2DModel`` with a Fourier time embedding, and the
denoising score matching loss (EDM Table 1: the VE column and "ours")."""

from __future__ import annotations

import math
from typing import Any, Literal, get_args

import torch
from diffusers import UNet2DModel

Precond = Literal["ve", "edm"]
PRECONDS: tuple[str, ...] = get_args(Precond)
SigmaDist = Literal["log_uniform", "log_normal"]
LossWeight = Literal["ve", "edm"]
SIGMA_DATA = 0.5  # EDM's for CIFAR-10 in [-1, 1]


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


def unet_config(image_size: int, channels: int, unet: dict[str, Any] | None, num_classes: int = 0) -> dict[str, Any]:
    """The ``UNet2DModel`` keyword arguments for ``channels`` x ``image_size`` x ``image_size`` images:
    ``default_unet_config`` updated with ``unet``, and for ``num_classes`` K > 0 classes ``num_class_embeds`` K + 1
    (a label embedding added to the time embedding; index K is the null class of classifier-free guidance); a
    ``ValueError`` naming a size or channel count it cannot take."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got channels={channels}")
    config = {k: v for k, v in default_unet_config().items() if k not in ("sample_size", "in_channels", "out_channels")}
    config |= dict(unet or {})
    config |= dict(sample_size=image_size, in_channels=channels, out_channels=channels)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(f"num_classes must be an integer >= 0 (0: unconditional), got num_classes={num_classes!r}")
    if num_classes:
        config["num_class_embeds"] = num_classes + 1
    factor = 2 ** (len(config["down_block_types"]) - 1)
    if image_size < factor or image_size % factor:
        raise ValueError(
            f"image_size={image_size} cannot pass the UNet's {len(config['down_block_types']) - 1} down-samplings: "
            f"it must be a positive multiple of {factor}"
        )
    return config


def preconditioning(precond: str, sigma: torch.Tensor, sigma_data: float) -> tuple:
    """(c_skip, c_out, c_in) of EDM Table 1: "ve" (VE column: 1, sigma, 1) or "edm" ("ours": sigma_d^2 / (sigma^2 +
    sigma_d^2), sigma sigma_d / sqrt(sigma^2 + sigma_d^2), 1 / sqrt(sigma^2 + sigma_d^2))."""
    if precond == "ve":
        return 1, sigma, 1
    total = sigma**2 + sigma_data**2
    return sigma_data**2 / total, sigma * sigma_data / total.sqrt(), 1 / total.sqrt()


class VEDenoiser(torch.nn.Module):
    """D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) of a VE process (sigma(t) = t, s(t) = 1) around a Fourier
    ``UNet2DModel``, with EDM Table 1's VE preconditioning (``precond="ve"``: D = x + sigma F) or its own ("edm",
    with ``sigma_data``).

    A Fourier ``UNet2DModel`` takes the log of its timestep and divides its output by it, so with the timestep
    sigma / 2 (c_noise = ln(sigma / 2) for both preconditionings) F = (sigma / 2) unet((c_in x + 1) / 2, sigma / 2),
    and with ``center_input_sample=True`` the UNet maps (c_in x + 1) / 2 back to c_in x itself. For "ve" this is
    D = x + sigma (sigma / 2) unet((x + 1) / 2, sigma / 2).sample, the call of diffusers' ``KarrasVePipeline``.

    A class-conditional UNet (``num_class_embeds`` K + 1) takes ``class_labels`` [B] in 0..K-1, or K, the null
    class, which is also what no labels mean: D(x; sigma, c) and D(x; sigma, null) of classifier-free guidance.
    """

    def __init__(self, unet: UNet2DModel, precond: Precond = "ve", sigma_data: float = SIGMA_DATA):
        super().__init__()
        embedding = unet.config.get("time_embedding_type")
        if embedding != "fourier":
            raise ValueError(
                f"VEDenoiser needs a UNet2DModel with time_embedding_type='fourier' (c_noise = ln(sigma / 2)), "
                f"got time_embedding_type={embedding!r}"
            )
        if precond not in PRECONDS:
            raise ValueError(f"unknown precond={precond!r}; expected one of {PRECONDS}")
        if not 0 < sigma_data < math.inf:
            raise ValueError(f"sigma_data must be a positive number, got sigma_data={sigma_data!r}")
        self.unet = unet
        self.precond, self.sigma_data = precond, float(sigma_data)

    @property
    def num_classes(self) -> int:
        """K, the classes of a conditional UNet (its label embedding has K + 1 rows); 0 for an unconditional one."""
        return max(int(self.unet.config.get("num_class_embeds") or 1) - 1, 0)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float,
                class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """D(x; sigma) or, for a conditional UNet, D(x; sigma, class_labels) (``None``: the null class)."""
        sigma = torch.as_tensor(sigma, device=x.device, dtype=x.dtype)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        if sigma.shape != (x.shape[0],):
            raise ValueError(f"sigma must be a scalar or have shape [{x.shape[0]}], got {tuple(sigma.shape)}")
        c = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        c_skip, c_out, c_in = preconditioning(self.precond, c, self.sigma_data)
        labels = {}
        if self.num_classes:
            null = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
            labels["class_labels"] = null if class_labels is None else class_labels.to(x.device)
        elif class_labels is not None:
            raise ValueError("class labels given to an unconditional model (num_classes=0)")
        return c_skip * x + c_out * (c / 2) * self.unet((c_in * x + 1) / 2, sigma / 2, **labels).sample


def dsm_loss(denoiser: VEDenoiser, y: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor,
             weight: LossWeight = "ve", sigma_data: float = SIGMA_DATA, labels: torch.Tensor | None = None
             ) -> torch.Tensor:
    """Per-sample denoising score matching (EDM Eq. 2): lambda(sigma) ||D(y + sigma eps; sigma) - y||^2, mean over
    elements, with EDM Table 1's lambda: ``weight`` "ve" 1 / sigma^2 (then it equals ||F + eps||^2 of the VE
    preconditioning) or "edm" (sigma^2 + sigma_d^2) / (sigma sigma_d)^2. Kept in float32. ``labels``: the class
    of each row for a conditional denoiser, D(y + sigma eps; sigma, c)."""
    c = sigma.reshape(-1, *([1] * (y.ndim - 1))).float()
    conditioning = () if labels is None else (labels,)
    error = (denoiser(y + c.to(y.dtype) * eps, sigma, *conditioning).float() - y.float()) ** 2
    weighted = error / c**2 if weight == "ve" else error * (c**2 + sigma_data**2) / (c * sigma_data) ** 2
    return weighted.flatten(1).mean(1)


def sample_sigmas(batch: int, device, dist: str, sigma_range: tuple[float, float], p_mean: float, p_std: float
                  ) -> torch.Tensor:
    """The training noise levels of a batch, from the global generator: "log_uniform" on ``sigma_range`` (sigma_min
    (sigma_max / sigma_min)^u, u ~ U(0, 1): the VE recipe) or "log_normal" (ln sigma ~ N(p_mean, p_std^2): EDM)."""
    if dist == "log_uniform":
        sigma_min, sigma_max = sigma_range
        return sigma_min * (sigma_max / sigma_min) ** torch.rand(batch, device=device)
    return (torch.randn(batch, device=device) * p_std + p_mean).exp()
