"""Distributions with a closed-form denoiser, the exact references for tests and sampler benchmarks."""

from __future__ import annotations

import math

import torch


class GaussianMixture:
    """Isotropic Gaussian mixture sum_k w_k N(mu_k, s_k^2 I) over tensors of shape ``means.shape[1:]``.

    Each component's denoiser is D_k(x; sigma) = mu_k + s_k^2 / (s_k^2 + sigma^2) (x - mu_k); the mixture's is
    their sum weighted by the responsibilities of the noisy density p(x; sigma) = sum_k w_k N(mu_k, (s_k^2 +
    sigma^2) I). Computed in float64 whatever the input dtype.
    """

    def __init__(self, weights: torch.Tensor, means: torch.Tensor, stds: torch.Tensor):
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        self.means = torch.as_tensor(means, dtype=torch.float64)
        self.stds = torch.as_tensor(stds, dtype=torch.float64)
        if not (len(self.weights) == len(self.means) == len(self.stds)):
            raise ValueError("weights, means and stds need one entry per component")
        if (self.weights <= 0).any() or abs(float(self.weights.sum()) - 1) > 1e-6:
            raise ValueError(f"weights must be positive and sum to 1, got {self.weights.tolist()}")

    @property
    def event_shape(self) -> tuple[int, ...]:
        return tuple(self.means.shape[1:])

    def responsibilities(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """r_k(x; sigma), shape [B, K]."""
        x = x.double().flatten(1)
        mu = self.means.flatten(1).to(x.device)
        var = self.stds.to(x.device)[None] ** 2 + sigma.double().reshape(-1, 1) ** 2  # [B, K]
        sq = (x**2).sum(1, keepdim=True) - 2 * x @ mu.T + (mu**2).sum(1)[None]  # ||x - mu_k||^2, [B, K]
        log_p = self.weights.log().to(x.device) - 0.5 * sq / var - 0.5 * x.shape[1] * var.log()
        return torch.softmax(log_p, dim=1)

    def log_prob(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """log p(x; sigma) = log sum_k w_k N(x; mu_k, (s_k^2 + sigma^2) I) per row, float64."""
        x = x.double().flatten(1)
        mu = self.means.flatten(1).to(x.device)
        var = self.stds.to(x.device)[None] ** 2 + sigma**2  # [1, K]
        sq = torch.cdist(x, mu) ** 2  # [B, K]
        log_n = -0.5 * sq / var - 0.5 * x.shape[1] * (2 * math.pi * var).log()
        return torch.logsumexp(self.weights.log().to(x.device) + log_n, dim=1)

    def denoiser(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """D(x; sigma) = E[y | y + sigma n = x] = sum_k r_k (mu_k + shrink_k (x - mu_k)), exactly."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).expand(x.shape[0])
        r = self.responsibilities(x, sigma)  # [B, K]
        var = self.stds.to(x.device)[None] ** 2  # [1, K]
        shrink = var / (var + sigma.reshape(-1, 1) ** 2)  # [B, K]
        xf, mu = x.double().flatten(1), self.means.flatten(1).to(x.device)
        D = (r * shrink).sum(1, keepdim=True) * xf + (r * (1 - shrink)) @ mu
        return D.reshape(x.shape).to(x.dtype)

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """n exact draws (float64) and their component labels."""
        labels = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn((n, *self.event_shape), generator=generator, dtype=torch.float64)
        scale = self.stds[labels].reshape(-1, *([1] * len(self.event_shape)))
        return self.means[labels] + scale * noise, labels

    def nearest_mean(self, x: torch.Tensor) -> torch.Tensor:
        """Index of the closest component mean for each row of x."""
        return torch.cdist(x.double().flatten(1), self.means.flatten(1).to(x.device)).argmin(1)


def gaussian_pf_ode_solution(
    x_a: torch.Tensor, sigma_a: float, sigma_b: float, mean: torch.Tensor | float, std: float
) -> torch.Tensor:
    """Exact probability-flow ODE map for data N(mean, std^2 I): x(sigma_b) - mean = (x(sigma_a) - mean) *
    sqrt((std^2 + sigma_b^2) / (std^2 + sigma_a^2))."""
    return mean + (x_a - mean) * ((std**2 + sigma_b**2) / (std**2 + sigma_a**2)) ** 0.5
