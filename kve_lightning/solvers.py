"""Solvers beyond Algorithm 2, over D(x; sigma) alone with sigma(t) = t: DPM-Solver++(2M) and its SDE variant
(Lu et al. 2022, k-diffusion's ``sample_dpmpp_2m`` / ``sample_dpmpp_2m_sde``), iPNDM (Zhang & Chen 2023,
zju-pi/diff-sampler's ``ipndm_sampler``) and Restart (Xu et al. 2023, Newbeeer/diffusion_restart_sampling's
``restart_sampler``).

Plain functions in k-diffusion's style: ``D(x, sigma)`` takes a Python float sigma (``sample_karras_ve`` wraps the
denoiser with micro-batching and the clip), ``x`` is the start x_0 = sigma_0 eps, ``sigmas`` the Python floats
sigma_0 > ... > sigma_N = 0 (built apart, ``karras_ve_sigmas``), ``noise()`` a standard normal tensor shaped like x,
each row from its own generator. ``callback(i, sigma_i, x_i, D(x_i; sigma_i))`` follows each step's first evaluation.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import torch

Denoise = Callable[[torch.Tensor, float], torch.Tensor]
Noise = Callable[[], torch.Tensor]
Callback = Callable[[int, float, torch.Tensor, torch.Tensor], None] | None
# Adams-Bashforth coefficients of iPNDM by order, newest derivative first
IPNDM_COEFFICIENTS = ((1.0,), (3 / 2, -1 / 2), (23 / 12, -16 / 12, 5 / 12), (55 / 24, -59 / 24, 37 / 24, -9 / 24))


def sample_dpmpp_2m(D: Denoise, x: torch.Tensor, sigmas: Sequence[float], callback: Callback = None) -> torch.Tensor:
    """DPM-Solver++(2M), one evaluation per step. With lambda = -ln sigma, h = lambda_{i+1} - lambda_i and
    r = h_{i-1} / h: x <- (sigma_{i+1} / sigma_i) x - expm1(-h) ((1 + 1/(2r)) D_i - 1/(2r) D_{i-1}), first order
    (D_i alone) on the first step; the last step, to sigma_N = 0, returns D_i."""
    denoised_prev = None
    for i, (sigma, sigma_next) in enumerate(zip(sigmas, sigmas[1:])):
        denoised = D(x, sigma)
        if callback is not None:
            callback(i, sigma, x, denoised)
        if sigma_next == 0:
            return denoised
        h = math.log(sigma / sigma_next)
        if denoised_prev is None:
            x = sigma_next / sigma * x - math.expm1(-h) * denoised
        else:
            r = math.log(sigmas[i - 1] / sigma) / h
            x = sigma_next / sigma * x - math.expm1(-h) * ((1 + 1 / (2 * r)) * denoised - denoised_prev / (2 * r))
        denoised_prev = denoised
    return x


def sample_dpmpp_2m_sde(D: Denoise, x: torch.Tensor, sigmas: Sequence[float], noise: Noise, eta: float = 1.0,
                        s_noise: float = 1.0, solver_type: str = "midpoint", callback: Callback = None) -> torch.Tensor:
    """DPM-Solver++(2M) SDE, one evaluation per step. With h = ln(sigma_i / sigma_{i+1}) and r = h_{i-1} / h:
    x <- (sigma_{i+1} / sigma_i) e^{-eta h} x + (1 - e^{-(1 + eta) h}) D_i, plus, from the second step,
    "midpoint" 1/2 (1 - e^{-(1 + eta) h}) (D_i - D_{i-1}) / r or "heun" ((1 - e^{-(1 + eta) h}) / (-(1 + eta) h) + 1)
    (D_i - D_{i-1}) / r, then + sigma_{i+1} sqrt(1 - e^{-2 eta h}) s_noise z with z = ``noise()`` (drawn at every
    step but the last, whatever eta). The last step, to sigma_N = 0, returns D_i."""
    denoised_prev = None
    for i, (sigma, sigma_next) in enumerate(zip(sigmas, sigmas[1:])):
        denoised = D(x, sigma)
        if callback is not None:
            callback(i, sigma, x, denoised)
        if sigma_next == 0:
            return denoised
        h = math.log(sigma / sigma_next)
        eta_h = eta * h
        decay = -math.expm1(-h - eta_h)  # 1 - e^{-(1 + eta) h}
        x = sigma_next / sigma * math.exp(-eta_h) * x + decay * denoised
        if denoised_prev is not None:
            r = math.log(sigmas[i - 1] / sigma) / h
            weight = 0.5 * decay if solver_type == "midpoint" else decay / (-h - eta_h) + 1
            x = x + weight / r * (denoised - denoised_prev)
        x = x + sigma_next * math.sqrt(-math.expm1(-2 * eta_h)) * s_noise * noise()
        denoised_prev = denoised
    return x


def sample_ipndm(D: Denoise, x: torch.Tensor, sigmas: Sequence[float], max_order: int = 4,
                 callback: Callback = None) -> torch.Tensor:
    """iPNDM: Adams-Bashforth on d_i = (x_i - D_i) / sigma_i, one evaluation per step,
    x_{i+1} = x_i + (sigma_{i+1} - sigma_i) sum_j a_j d_{i-j} (``IPNDM_COEFFICIENTS``) of order
    min(max_order, i + 1) while the history is short; the last step, to sigma_N = 0, returns D_i (diff-sampler's
    ``denoise_to_zero``: the first-order step to 0)."""
    history: list[torch.Tensor] = []  # d_i, d_{i-1}, ...
    for i, (sigma, sigma_next) in enumerate(zip(sigmas, sigmas[1:])):
        denoised = D(x, sigma)
        if callback is not None:
            callback(i, sigma, x, denoised)
        if sigma_next == 0:
            return denoised
        history = [(x - denoised) / sigma, *history][:max_order]
        slope = sum(a * d for a, d in zip(IPNDM_COEFFICIENTS[len(history) - 1], history))
        x = x + (sigma_next - sigma) * slope
    return x


def heun_step(D: Denoise, x: torch.Tensor, sigma: float, sigma_next: float, gamma: float, s_noise: float,
              eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float, torch.Tensor]:
    """One step of Algorithm 2: sigma_hat = (1 + gamma) sigma, x_hat = x + sqrt(sigma_hat^2 - sigma^2) S_noise eps,
    an Euler step to sigma_next and, unless sigma_next = 0, Heun's correction. Returns (x_next, x_hat, sigma_hat,
    D(x_hat; sigma_hat))."""
    sigma_hat = (1 + gamma) * sigma
    x_hat = x + math.sqrt(sigma_hat**2 - sigma**2) * s_noise * eps
    denoised = D(x_hat, sigma_hat)
    d = (x_hat - denoised) / sigma_hat
    x_next = x_hat + (sigma_next - sigma_hat) * d
    if sigma_next != 0:
        x_next = x_hat + (sigma_next - sigma_hat) * (d + (x_next - D(x_next, sigma_next)) / sigma_next) / 2
    return x_next, x_hat, sigma_hat, denoised


def sample_restart(D: Denoise, x: torch.Tensor, sigmas: Sequence[float], noise: Noise,
                   restarts: Mapping[int, tuple[int, Sequence[float]]], gamma: float = 0.0,
                   s_min: float = 0.0, s_max: float = math.inf, s_noise: float = 1.0, restart_gamma: float = 0.0,
                   callback: Callback = None) -> torch.Tensor:
    """Restart: Algorithm 2's Heun pass over ``sigmas`` (churn ``gamma`` inside [s_min, s_max]); after the step
    landing on sigma_j, for each ``restarts[j] = (K, [t_max, ..., t_min])`` (t_min = sigma_j), K times: the forward
    jump x += sqrt(t_max^2 - t_min^2) S_noise z, then Heun back over that grid with churn ``restart_gamma`` inside
    [s_min, s_max]. Every Heun step draws its churn noise, as in ``restart_sampler``."""
    for i, (sigma, sigma_next) in enumerate(zip(sigmas, sigmas[1:])):
        churn = gamma if s_min <= sigma <= s_max else 0.0
        x, x_hat, sigma_hat, denoised = heun_step(D, x, sigma, sigma_next, churn, s_noise, noise())
        if callback is not None:
            callback(i, sigma_hat, x_hat, denoised)
        repeats, grid = restarts.get(i + 1, (0, ()))
        for _ in range(repeats):
            x = x + math.sqrt(grid[0] ** 2 - grid[-1] ** 2) * s_noise * noise()
            for t, t_next in zip(grid, grid[1:]):
                churn = restart_gamma if s_min <= t <= s_max else 0.0
                x = heun_step(D, x, t, t_next, churn, s_noise, noise())[0]
    return x
