"""Log-likelihood and bits per dimension of a VE model through its probability-flow ODE (Song et al. 2021, App. D).

With sigma(t) = t the VE probability-flow ODE is dx/dsigma = f(x, sigma) = (x - D(x; sigma)) / sigma, and the
instantaneous change of variables gives

    log p_{sigma_min}(x(sigma_min)) = log p_{sigma_max}(x(sigma_max)) + int_{sigma_min}^{sigma_max} div f dsigma,

div f = (d - div_x D) / sigma. We integrate in s = ln(sigma), where both right-hand sides are smooth:
dx/ds = x - D(x; e^s) and d(int)/ds = d - div_x D, with a fixed-step classical Runge-Kutta (RK4) solver: every row
takes the same steps, so a row's value does not depend on its batch (an adaptive solver picks its steps from the
whole batch's error). Its accuracy is verified against exact mixture densities (tests/test_likelihood.py).

**Prior.** p_{sigma_max} is taken as N(0, sigma_max^2 I). For data y with |y| <= R the exact p_{sigma_max} is the
data convolved with N(0, sigma_max^2 I), and log p_{sigma_max}(x) - log N(x; 0, sigma_max^2 I) lies within
[-(|x| R + R^2 / 2), |x| R] / sigma_max^2; at x ~ sigma_max eps that is about R / sigma_max nats in all, typically
(x . y / sigma_max^2 has standard deviation |y| / sigma_max): for the 8x8 digits in [-1, 1] (R <= 8) at sigma_max
= 100, 0.08 nats per image, 0.002 bits per dimension. ``prior_log_prob`` replaces it (tests use the exact one).
"""

from __future__ import annotations

import math
from typing import Callable, Literal

import torch

from kve_lightning.sampling import Denoiser, Generator, rand_per_row, randn_per_row

Divergence = Literal["exact", "hutchinson"]
Probe = Literal["rademacher", "gaussian"]


def gaussian_prior_log_prob(x: torch.Tensor, sigma_max: float) -> torch.Tensor:
    """log N(x; 0, sigma_max^2 I) per row."""
    d = x[0].numel()
    return -0.5 * (x.flatten(1) ** 2).sum(1) / sigma_max**2 - 0.5 * d * math.log(2 * math.pi * sigma_max**2)


def _probes(x: torch.Tensor, num_probes: int, probe: Probe, generator: Generator) -> list[torch.Tensor]:
    """``num_probes`` tensors like x with E[v v^T] = I, row k from ``generator[k]`` when it is a list."""
    out = []
    for _ in range(num_probes):
        v = randn_per_row(x.shape, generator, x.device, x.dtype)
        out.append(v.sign() if probe == "rademacher" else v)
    return out


def _divergence(denoiser: Denoiser, x: torch.Tensor, sigma: torch.Tensor, probes: list[torch.Tensor] | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """D(x; sigma) and div_x D per row: exactly (one vector-Jacobian product per dimension) when ``probes`` is
    None, else Hutchinson's mean of v^T (dD/dx) v over the probes (one product each). Rows are independent, so
    the gradient of a batch sum gives each row's own product."""
    with torch.inference_mode(False), torch.enable_grad():  # also inside Lightning's validate/test loops
        x = x.clone().requires_grad_(True)
        D = denoiser(x, sigma)
        if probes is None:
            flat = D.flatten(1)
            div = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
            for i in range(flat.shape[1]):
                (g,) = torch.autograd.grad(flat[:, i].sum(), x, retain_graph=True)
                div = div + g.flatten(1)[:, i]
        else:
            div = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
            for k, v in enumerate(probes):
                v = v.clone()  # a normal tensor even if drawn in inference mode: autograd saves it
                (g,) = torch.autograd.grad((D * v).sum(), x, retain_graph=k < len(probes) - 1)
                div = div + (g * v).flatten(1).sum(1)
            div = div / len(probes)
    return D.detach(), div.detach()


def log_likelihood(
    denoiser: Denoiser,
    x: torch.Tensor,
    *,
    sigma_min: float = 0.02,
    sigma_max: float = 100.0,
    divergence: Divergence = "hutchinson",
    num_probes: int = 1,
    probe: Probe = "rademacher",
    steps: int = 64,
    generator: Generator = None,
    prior_log_prob: Callable[[torch.Tensor], torch.Tensor] | None = None,
    info: dict | None = None,
) -> torch.Tensor:
    """The natural-log density log p_{sigma_min}(x) of each row of ``x`` [B, ...] under the model (the data
    distribution convolved with N(0, sigma_min^2 I)), by the probability-flow ODE from sigma_min to sigma_max
    (module docstring). Returns a float tensor [B] in x's dtype.

    Args:
        denoiser: ``denoiser(x, sigma) -> D(x; sigma)``, differentiable in x, rows independent.
        x: the points, any shape [B, ...].
        sigma_min: where the density is evaluated (the model's smallest noise level).
        sigma_max: where the prior N(0, sigma_max^2 I) replaces the model's density.
        divergence: "exact" (one backward pass per dimension: the reference, fine for small dimensions) or
            "hutchinson" (``num_probes`` backward passes per evaluation; unbiased).
        num_probes: Hutchinson probes, drawn once and kept over the whole trajectory.
        probe: "rademacher" (+-1, lower variance) or "gaussian" probes.
        steps: RK4 steps in ln(sigma); NFE = 4 * steps denoiser evaluations (each with its divergence).
        generator: the probes' ``torch.Generator``, or one per row (a row's estimate then depends on its own only).
        prior_log_prob: ``log p_{sigma_max}(x)`` per row, instead of N(0, sigma_max^2 I).
        info: if given, receives ``{"nfe": ...}``.
    """
    if not torch.is_tensor(x) or x.ndim < 2 or x.shape[0] < 1:
        raise ValueError(f"x must be a tensor of shape [B, ...] with B >= 1, got {getattr(x, 'shape', type(x))}")
    if not x.is_floating_point() or not x.isfinite().all():
        raise ValueError("x must hold finite floating-point values")
    if not (0 < sigma_min < sigma_max and math.isfinite(sigma_max)):
        raise ValueError(f"need 0 < sigma_min < sigma_max < inf, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    if divergence not in ("exact", "hutchinson"):
        raise ValueError(f"unknown divergence={divergence!r}; expected 'exact' or 'hutchinson'")
    if probe not in ("rademacher", "gaussian"):
        raise ValueError(f"unknown probe={probe!r}; expected 'rademacher' or 'gaussian'")
    if isinstance(num_probes, bool) or not isinstance(num_probes, int) or num_probes < 1:
        raise ValueError(f"num_probes must be an integer >= 1, got num_probes={num_probes!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got steps={steps!r}")
    probes = _probes(x, num_probes, probe, generator) if divergence == "hutchinson" else None
    d = x[0].numel()
    batch = x.shape[0]

    def rhs(x: torch.Tensor, s: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(dx/ds, d(int div f dsigma)/ds) at s = ln(sigma)."""
        sigma = torch.full((batch,), math.exp(s), dtype=x.dtype, device=x.device)
        D, div_D = _divergence(denoiser, x, sigma, probes)
        return x - D, d - div_D

    s0, s1 = math.log(sigma_min), math.log(sigma_max)
    h = (s1 - s0) / steps
    integral = torch.zeros(batch, dtype=x.dtype, device=x.device)
    for i in range(steps):
        s = s0 + i * h
        k1 = rhs(x, s)
        k2 = rhs(x + h / 2 * k1[0], s + h / 2)
        k3 = rhs(x + h / 2 * k2[0], s + h / 2)
        k4 = rhs(x + h * k3[0], s + h)
        x = x + h / 6 * (k1[0] + 2 * k2[0] + 2 * k3[0] + k4[0])
        integral = integral + h / 6 * (k1[1] + 2 * k2[1] + 2 * k3[1] + k4[1])
    prior = prior_log_prob(x) if prior_log_prob is not None else gaussian_prior_log_prob(x, sigma_max)
    if info is not None:
        info["nfe"] = 4 * steps
    return prior.to(x.dtype) + integral


def bits_per_dim_per_image(
    denoiser: Denoiser,
    images: torch.Tensor,
    levels: int,
    *,
    num_draws: int = 1,
    generator: Generator = None,
    **kwargs,
) -> torch.Tensor:
    """Bits per dimension of each image of ``levels``-level data scaled to [-1, 1] (levels v_j = -1 + j w,
    w = 2 / (levels - 1); 256 for 8-bit images, 17 for scikit-learn's digits), with uniform dequantization inside
    each bin:

        bpd(y) = ( -E_u[log p(y + w (u - 1/2))] / ln 2  -  d log2 w ) / d,   u ~ U[0, 1)^d,

    an upper bound on -log2 P(bin of y) / d, the bits of the discrete data (-d log2 w is the offset of the [-1, 1]
    scaling: a bin of width w holds probability ~ p w^d). Averaged over ``num_draws`` dequantization draws; the
    draws and the Hutchinson probes come from ``generator`` (one per row: a row's value depends on its own only).
    ``kwargs`` go to ``log_likelihood``. Returns float64 [B] on the CPU.
    """
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 2:
        raise ValueError(f"levels must be an integer >= 2, got levels={levels!r}")
    if isinstance(num_draws, bool) or not isinstance(num_draws, int) or num_draws < 1:
        raise ValueError(f"num_draws must be an integer >= 1, got num_draws={num_draws!r}")
    w = 2 / (levels - 1)
    d = images[0].numel()
    per_image = torch.zeros(images.shape[0], dtype=torch.float64)
    for _ in range(num_draws):
        u = rand_per_row(images.shape, generator, images.device, images.dtype)
        log_p = log_likelihood(denoiser, images + w * (u - 0.5), generator=generator, **kwargs)
        per_image += (-log_p.double().cpu() / math.log(2) - d * math.log2(w)) / d
    return per_image / num_draws


def index_generators(index) -> list[torch.Generator]:
    """One generator per image, seeded by its index in its split: ``kve test``, ``kve likelihood`` and the
    likelihood benchmark draw the same dequantization and probes for an image, whatever its batch or rank."""
    return [torch.Generator().manual_seed(int(i)) for i in index]


def bits_per_dim(denoiser: Denoiser, images: torch.Tensor, levels: int, **kwargs) -> tuple[float, float]:
    """The mean of ``bits_per_dim_per_image`` over ``images`` and its standard error (NaN for one image)."""
    per_image = bits_per_dim_per_image(denoiser, images, levels, **kwargs)
    return mean_and_stderr(per_image)


def mean_and_stderr(values: torch.Tensor) -> tuple[float, float]:
    n = values.numel()
    return float(values.mean()), float(values.std() / math.sqrt(n)) if n > 1 else float("nan")


def with_labels(denoiser: Denoiser, labels: torch.Tensor | None) -> Denoiser:
    """The denoiser x, sigma -> D(x; sigma, labels) of a conditional model (``denoiser`` itself for no labels): the
    likelihood functions then give log p(x | c). The labels are copied at each call: autograd refuses tensors made in
    inference mode (Lightning's test loop)."""
    return denoiser if labels is None else lambda x, sigma: denoiser(x, sigma, labels.to(x.device).clone())


def class_bits_per_dim(denoiser: Denoiser, images: torch.Tensor, levels: int, index, num_classes: int, **kwargs
                       ) -> torch.Tensor:
    """Bits/dim of each image under each class c, -log2 p(x | c) / d up to the same offset [B, K]
    (``bits_per_dim_per_image`` of ``with_labels(denoiser, c)``), every class with the same dequantization and probes
    (fresh ``index_generators(index)`` for each): K probability-flow ODE solves per image."""
    labels = [torch.full((len(images),), c, dtype=torch.long) for c in range(num_classes)]
    return torch.stack([bits_per_dim_per_image(with_labels(denoiser, c), images, levels,
                                               generator=index_generators(index), **kwargs) for c in labels], 1)


def classify(class_bpd: torch.Tensor, dims: int, log_prior: torch.Tensor | None = None) -> torch.Tensor:
    """The generative classifier's class per image: argmax_c log p(x | c) + log p(c), with log p(x | c) = -d ln 2
    bpd_c + const from ``class_bits_per_dim`` [B, K] over ``dims`` = d dimensions (``log_prior``: uniform if None)."""
    log_joint = -class_bpd.double() * dims * math.log(2)
    return (log_joint if log_prior is None else log_joint + log_prior.double()).argmax(1)
