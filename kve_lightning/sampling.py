"""The stochastic Karras VE sampler (EDM, Karras et al. 2022, Algorithm 2, VE column of Table 1).

Plain functions over a ``denoiser(x, sigma) -> D(x; sigma)`` callable, ``sigma`` a float tensor of shape [B].
No framework: the Lightning module, the scripts and the diffusers pipeline all call ``sample_karras_ve``.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Generator = torch.Generator | Sequence[torch.Generator] | None

SCHEDULES = ("ve", "edm")
SOLVERS = ("heun", "euler")


def _check_range(sigma_min: float, sigma_max: float) -> None:
    if not sigma_min > 0:
        raise ValueError(f"sigma_min must be > 0, got sigma_min={sigma_min}")
    if not sigma_min < sigma_max:
        raise ValueError(f"sigma_min must be < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")


def karras_ve_sigmas(
    num_steps: int,
    sigma_min: float = 0.02,
    sigma_max: float = 100.0,
    schedule: str = "ve",
    rho: float = 7.0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Noise levels sigma_0 > ... > sigma_{N-1} > sigma_N = 0, a 1-D tensor of ``num_steps + 1`` values.

    ``"ve"`` (EDM Table 1, VE column): t_i = sigma_max^2 (sigma_min^2 / sigma_max^2)^(i/(N-1)), sigma = sqrt(t),
    i.e. sigma_i = sigma_max (sigma_min / sigma_max)^(i/(N-1)), geometric in sigma.
    ``"edm"`` (EDM Eq. 5): sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 2:
        raise ValueError(f"num_steps must be an integer >= 2, got num_steps={num_steps!r}")
    _check_range(sigma_min, sigma_max)
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule={schedule!r}; expected one of {SCHEDULES}")
    i = torch.arange(num_steps, dtype=torch.float64) / (num_steps - 1)
    if schedule == "ve":
        sigmas = sigma_max * (sigma_min / sigma_max) ** i
    else:
        if not rho > 0:
            raise ValueError(f"rho must be > 0, got rho={rho}")
        sigmas = (sigma_max ** (1 / rho) + i * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
    return sigmas.to(device=device, dtype=dtype)


def check_churn_and_solver(s_churn: float, s_min: float, s_max: float, s_noise: float, solver: str) -> None:
    """Raise a ``ValueError`` naming the first bad stochastic setting or solver."""
    if s_churn < 0:
        raise ValueError(f"s_churn must be >= 0, got s_churn={s_churn}")
    if s_noise < 0:
        raise ValueError(f"s_noise must be >= 0, got s_noise={s_noise}")
    if s_min > s_max:
        raise ValueError(f"s_min must be <= s_max, got s_min={s_min}, s_max={s_max}")
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver={solver!r}; expected one of {SOLVERS}")


def _check_sigmas(sigmas: torch.Tensor) -> list[float]:
    """Validate a custom schedule and return it as Python floats (read once: no host sync per step)."""
    sigmas = torch.as_tensor(sigmas)
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(f"sigmas must be a 1-D tensor of at least 2 values, got shape {tuple(sigmas.shape)}")
    values = sigmas.detach().double().cpu().tolist()
    if not all(math.isfinite(s) for s in values):
        raise ValueError(f"sigmas must be finite, got {values}")
    if values[-1] != 0:
        raise ValueError(f"sigmas must end in 0, got last value {values[-1]}")
    if any(a <= b for a, b in zip(values, values[1:])):
        raise ValueError(f"sigmas must be strictly descending, got {values}")
    return values


def randn_per_row(
    shape: Sequence[int], generator: Generator, device: torch.device | str | None, dtype: torch.dtype
) -> torch.Tensor:
    """Standard normal noise of ``shape``; with a list of generators, row k is drawn from ``generator[k]`` only.

    Noise is drawn on the generator's own device and then moved, so a CPU generator gives the same numbers
    whichever device the sample lives on.
    """
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"generator list has length {len(generator)} but the batch size is {shape[0]}")
        rows = [torch.randn(tuple(shape[1:]), generator=g, device=g.device, dtype=dtype) for g in generator]
        return torch.stack(rows).to(device)
    gen_device = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, device=gen_device, dtype=dtype).to(device)


@torch.no_grad()
def sample_karras_ve(
    denoiser: Denoiser,
    shape: Sequence[int],
    *,
    sigmas: torch.Tensor | None = None,
    num_steps: int = 50,
    sigma_min: float = 0.02,
    sigma_max: float = 100.0,
    schedule: str = "ve",
    s_churn: float = 80.0,
    s_min: float = 0.05,
    s_max: float = 1.0,
    s_noise: float = 1.007,
    solver: str = "heun",
    clamp_denoised: bool = False,
    generator: Generator = None,
    latents: torch.Tensor | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    callback: Callable[[int, float, torch.Tensor, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """EDM Algorithm 2 with sigma(t) = t, s(t) = 1; returns the final sample x_N, unclamped.

    Defaults are EDM Table 5's CIFAR-10 VE settings (S_churn 80, S_tmin 0.05, S_tmax 1, S_noise 1.007) on the
    VE schedule of Table 1 with sigma in [0.02, 100]. ``sigmas`` (descending, ending in 0) overrides
    ``num_steps``/``sigma_min``/``sigma_max``/``schedule``. The start is x_0 = sigma_0 * eps unless ``latents``
    is given (used as is); then one noise tensor eps_i is drawn per step, even where gamma_i = 0, so a step's
    noise does not depend on the churn window. ``generator`` may be one ``torch.Generator`` or one per batch row.
    ``solver="euler"`` skips the second-order correction (NFE = N instead of 2N - 1).
    ``clamp_denoised`` clips every D(x; sigma) to the data range [-1, 1] (not part of Algorithm 2): the exact
    denoiser E[y | x] of data in [-1, 1] lies there, so the clip leaves it unchanged and can only move a learned
    one closer to it; it keeps an imprecise high-sigma denoiser from steering samples far off the data range.
    ``callback(i, sigma_hat, x_hat, denoised)`` is called after each step's first denoiser evaluation.
    """
    check_churn_and_solver(s_churn, s_min, s_max, s_noise, solver)
    if sigmas is None:
        sigmas = karras_ve_sigmas(num_steps, sigma_min, sigma_max, schedule, dtype=torch.float64)
    sigma = _check_sigmas(sigmas)
    N = len(sigma) - 1
    if latents is not None:
        if tuple(latents.shape) != tuple(shape):
            raise ValueError(f"latents has shape {tuple(latents.shape)} but shape={tuple(shape)}")
        device, dtype = latents.device, latents.dtype
    batch = shape[0]

    def D(x: torch.Tensor, s: float) -> torch.Tensor:
        denoised = denoiser(x, torch.full((batch,), s, device=x.device, dtype=x.dtype))
        return denoised.clamp(-1, 1) if clamp_denoised else denoised

    x = latents if latents is not None else sigma[0] * randn_per_row(shape, generator, device, dtype)
    gamma_max = min(s_churn / N, math.sqrt(2) - 1)
    for i in range(N):
        gamma = gamma_max if s_min <= sigma[i] <= s_max else 0.0
        eps = randn_per_row(shape, generator, x.device, x.dtype)
        sigma_hat = (1 + gamma) * sigma[i]
        x_hat = x + math.sqrt(sigma_hat**2 - sigma[i] ** 2) * s_noise * eps
        denoised = D(x_hat, sigma_hat)
        d = (x_hat - denoised) / sigma_hat
        x = x_hat + (sigma[i + 1] - sigma_hat) * d
        if solver == "heun" and sigma[i + 1] != 0:
            d_prime = (x - D(x, sigma[i + 1])) / sigma[i + 1]
            x = x_hat + (sigma[i + 1] - sigma_hat) * (d + d_prime) / 2
        if callback is not None:
            callback(i, sigma_hat, x_hat, denoised)
    return x
