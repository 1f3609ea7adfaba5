"""FID (Heusel et al. 2017) through torchmetrics' ``FrechetInceptionDistance``, on pluggable feature networks, and
FD-pixels, the second, independent quality measure reported beside it.

Images are float tensors in [-1, 1], any size, 1 or 3 channels. ``features="inception"`` is the standard
InceptionV3 pool3 space (2048-d; needs torch-fidelity and its weights); ``features="digits"`` ("FID-digits",
the offline default) is the 64-d penultimate layer of ``DigitsFeatureNet``, a small CNN classifier of
scikit-learn's 8 x 8 digits shipped as package data. FID-digits numbers are comparable with each other only,
never with published Inception FIDs.

FID-digits is one learned feature space, blind to what its classifier does not need. ``PixelFD`` ("FD-pixels") needs
no network: the Frechet distance on the top principal components of raw pixels to half of the real images, as a
ratio to that of the other half, so that 1.0 means "as close to the data as other real digits".
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance, NoTrainInceptionV3


Features = Literal["digits", "inception"]
FEATURES: tuple[str, ...] = get_args(Features)
DIGITS_WEIGHTS = Path(__file__).parent / "assets" / "digits_features.safetensors"
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")  # what torch-fidelity downloads


# ---------------------------------------------------------------- the digits data set and its feature network


def digits_images(image_size: int, channels: int) -> torch.Tensor:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, no download), in [-1, 1]."""
    from sklearn.datasets import load_digits

    x = torch.from_numpy(load_digits().images).float().unsqueeze(1) / 16.0  # [N, 1, 8, 8] in [0, 1]
    if image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
    return (x.clamp(0, 1) * 2 - 1).expand(-1, channels, -1, -1).contiguous()


def digits_with_labels() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1797 digits as [N, 1, 8, 8] float32 images in [-1, 1] (pixels 0..16) and their labels."""
    from sklearn.datasets import load_digits

    return digits_images(8, 1), torch.as_tensor(load_digits().target)


def digits_split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fixed stratified 80/20 train/held-out split of ``digits_with_labels()``: x_train, y_train, x_test, y_test."""
    from sklearn.model_selection import train_test_split

    x, y = digits_with_labels()
    train, test = train_test_split(torch.arange(len(y)), test_size=0.2, stratify=y, random_state=0)
    return x[train], y[train], x[test], y[test]


class DigitsFeatureNet(nn.Module):
    """CNN classifier of 8 x 8 digits; ``forward`` gives its 64-d penultimate features, ``head`` the 10 logits.

    Inputs in [-1, 1] of any size and channel count are averaged to one channel and area-resized to 8 x 8 first.
    """

    num_features = 64

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 4 x 4
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 2 x 2
            nn.Flatten(), nn.Linear(256, self.num_features), nn.ReLU(),
        )
        self.head = nn.Linear(self.num_features, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().mean(1, keepdim=True)
        if x.shape[-2:] != (8, 8):
            x = F.interpolate(x, size=(8, 8), mode="area")
        return self.body(x)


def digits_feature_net(path: str | Path = DIGITS_WEIGHTS) -> DigitsFeatureNet:
    """The trained ``DigitsFeatureNet`` (``scripts/train_digits_features.py``), frozen, in eval mode."""
    net = DigitsFeatureNet()
    net.load_state_dict(load_file(str(path)))
    return net.requires_grad_(False).eval()


# ---------------------------------------------------------------- InceptionV3


class InceptionFeatures(nn.Module):
    """torchmetrics' InceptionV3 (2048-d pool3) on [-1, 1] images: uint8 RGB as in EDM's ``x * 127.5 + 128``."""

    num_features = 2048

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x * 127.5 + 128).clamp(0, 255).to(torch.uint8)
        return self.net(x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x)


def inception_features(timeout: float = 20.0) -> InceptionFeatures:
    """InceptionV3 features; raises ``RuntimeError`` quickly when torch-fidelity or the weights are missing.

    torch-fidelity downloads the weights once into ``torch.hub.get_dir()/checkpoints``; ``timeout`` bounds each
    socket operation of that download so an offline machine fails instead of hanging.
    """
    cache = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_URL.rsplit("/", 1)[1]
    how = (f"It needs `pip install torch-fidelity` and the weights file at {cache}: on a connected machine, `python -c "
           f"\"from kve_lightning.metrics import inception_features; inception_features()\"` downloads it there (from "
           f"{INCEPTION_URL}); copy it across for offline use. features='digits' needs no download.")
    try:
        import torch_fidelity  # noqa: F401
    except ImportError as e:
        raise RuntimeError(f"features='inception' needs torch-fidelity, which is not installed. {how}") from e
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)
    try:
        net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"])
    except OSError as e:
        raise RuntimeError(f"could not load the InceptionV3 weights for features='inception' ({e}). {how}") from e
    finally:
        socket.setdefaulttimeout(previous)
    return InceptionFeatures(net)


# ---------------------------------------------------------------- FID


def feature_net(features: Features = "digits") -> nn.Module:
    """The feature extractor named ``features``: ``"digits"`` or ``"inception"``."""
    if features == "digits":
        return digits_feature_net()
    if features == "inception":
        return inception_features()
    raise ValueError(f"unknown features={features!r}; expected one of {FEATURES}")


@torch.no_grad()
def build_fid(
    real: torch.Tensor | None = None,
    features: Features = "digits",
    batch_size: int = 500,
    device: torch.device | str | None = None,
) -> FrechetInceptionDistance:
    """A torchmetrics FID on ``features`` whose real statistics survive ``reset()`` (``reset_real_features=False``).

    With ``real`` (images in [-1, 1]) they are accumulated here, once, in batches of ``batch_size``; afterwards
    ``update(fake, real=False)`` / ``compute()`` / ``reset()`` touch the fake statistics only.
    """
    fid = FrechetInceptionDistance(feature=feature_net(features), reset_real_features=False).to(device)
    if real is not None:
        for batch in real.split(batch_size):
            fid.update(batch.to(fid.device), real=True)
    return fid


@torch.no_grad()
def fid_from_images(real: torch.Tensor, fake: torch.Tensor, features: str = "digits", batch_size: int = 500) -> float:
    """FID between two sets of images in [-1, 1]."""
    fid = build_fid(real, features, batch_size)
    for batch in fake.split(batch_size):
        fid.update(batch, real=False)
    return fid.compute().item()


def feature_moments(features: torch.Tensor, counts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean [d] and unbiased covariance [d, d] of ``features`` [n, d] in float64, as ``FrechetInceptionDistance``
    accumulates them; with ``counts`` [B, n] (how often each row is drawn in each of B resamples of n rows), those of
    every resample: [B, d] and [B, d, d]."""
    f = features.double()
    n = f.shape[0]
    if counts is None:
        mu = f.mean(0)
        return mu, (f.T @ f - n * torch.outer(mu, mu)) / (n - 1)
    w = counts.double()
    mu = w @ f / n
    second = torch.einsum("bn,nd,ne->bde", w, f, f)
    return mu, (second - n * mu[:, :, None] * mu[:, None, :]) / (n - 1)


def matrix_sqrt(cov: torch.Tensor) -> torch.Tensor:
    """The symmetric square root of a covariance matrix (its negative rounding-error eigenvalues set to 0)."""
    values, vectors = torch.linalg.eigh(cov)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance(mu1: torch.Tensor, sqrt_cov1: torch.Tensor, mu2: torch.Tensor, cov2: torch.Tensor) -> torch.Tensor:
    """FID of N(mu1, cov1), N(mu2, cov2) (Heusel et al. 2017): ||mu1 - mu2||^2 + tr(cov1 + cov2 - 2 (cov1 cov2)^(1/2)).

    Takes ``sqrt_cov1`` = cov1^(1/2) (``matrix_sqrt``, computed once for fixed real statistics): cov1 cov2 is similar
    to the symmetric cov1^(1/2) cov2 cov1^(1/2), so tr (cov1 cov2)^(1/2) is the sum of the square roots of that one's
    eigenvalues. ``mu2``/``cov2`` may have a leading batch dimension (bootstrap resamples)."""
    trace_sqrt = torch.linalg.eigvalsh(sqrt_cov1 @ cov2 @ sqrt_cov1).clamp(min=0).sqrt().sum(-1)
    trace1, trace2 = sqrt_cov1.square().sum(), cov2.diagonal(dim1=-2, dim2=-1).sum(-1)  # tr cov1 = ||cov1^(1/2)||_F^2
    return (mu1 - mu2).square().sum(-1) + trace1 + trace2 - 2 * trace_sqrt


def digits_fid_floor(seed: int = 0) -> float:
    """FID-digits between two disjoint random halves of the digits data set: the real-vs-real floor at n ~ 900."""
    x, _ = digits_with_labels()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    half = len(x) // 2
    return fid_from_images(x[perm[:half]], x[perm[half : 2 * half]])


# ---------------------------------------------------------------- FD-pixels

PIXEL_COMPONENTS = 16  # of the 64 pixels of a digit: 85 % of their variance


class PixelPCA(nn.Module):
    """Raw pixels on the top ``components`` principal axes of ``real`` [N, C, H, W] (float64): FD-pixels' features."""

    def __init__(self, real: torch.Tensor, components: int = PIXEL_COMPONENTS):
        super().__init__()
        flat = real.flatten(1).double()
        if not 1 <= components <= min(flat.shape):
            raise ValueError(f"components must be in [1, {min(flat.shape)}], got components={components}")
        mean = flat.mean(0)
        _, _, axes = torch.linalg.svd(flat - mean, full_matrices=False)
        self.register_buffer("mean", mean)
        self.register_buffer("axes", axes[:components].T.contiguous())
        self.num_features = components

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.flatten(1).double() - self.mean) @ self.axes


def chunked_frechet(mu: torch.Tensor, sqrt_cov: torch.Tensor, features: torch.Tensor, chunk: int,
                    counts: torch.Tensor | None = None) -> torch.Tensor:
    """The mean Frechet distance (``frechet_distance``) to N(mu, cov) of the consecutive ``chunk``-row sets of
    ``features`` [n, d] (a remainder of fewer rows is left out); with ``counts`` [B, n], resampling each set's rows
    within it, one distance per resample [B]. At a fixed set size every model's distance has the same small-sample
    bias, which at n = 180 is most of the real-vs-real distance."""
    sets = features.shape[0] // chunk
    if sets < 1:
        raise ValueError(f"need at least {chunk} samples, got {features.shape[0]}")
    total = 0
    for k in range(sets):
        rows = slice(k * chunk, (k + 1) * chunk)
        moments = feature_moments(features[rows], None if counts is None else counts[:, rows])
        total = total + frechet_distance(mu, sqrt_cov, *moments)
    return total / sets


class PixelFD:
    """FD-pixels: the Frechet distance in ``PixelPCA`` space of sets of ``set_size`` samples to one half of the real
    images (a fixed random half, the reference; the axes fitted on it), averaged over the sets, divided by the same
    distance of the other half's first ``set_size`` images (``floor``), as FID-digits' floor pairs two halves. 1.0:
    samples as close to the reference as other real images are; above, further (a model that copies its training
    images can score below 1). At a fixed set size every model's distance has the same small-sample bias. The floor
    depends on the halving (across random halvings of the digits, 0.144 +- 0.034 at 898), the same for every model
    judged on one data set.

    Args:
        real: the real images [N, C, H, W] in [-1, 1], N >= 4.
        set_size: samples per set (default and at most: the other half's size).
        components: principal axes kept (at most the reference's size and the pixel count).
        seed: of the halving.
    """

    def __init__(self, real: torch.Tensor, set_size: int | None = None, components: int = PIXEL_COMPONENTS,
                 seed: int = 0):
        if len(real) < 4:
            raise ValueError(f"FD-pixels needs at least 4 real images, got {len(real)}")
        order = torch.randperm(len(real), generator=torch.Generator().manual_seed(seed))
        reference, other = real[order[:len(real) - len(real) // 2]], real[order[len(real) - len(real) // 2:]]
        self.set_size = len(other) if set_size is None else min(set_size, len(other))
        if self.set_size < 2:
            raise ValueError(f"FD-pixels needs sets of at least 2 images, got set_size={set_size}")
        self.features = PixelPCA(reference, min(components, *reference.flatten(1).shape))
        mu, cov = feature_moments(self.features(reference))
        self.mu, self.sqrt_cov = mu, matrix_sqrt(cov)
        self.floor = self.distance(self.features(other[:self.set_size])).item()

    def distance(self, features: torch.Tensor, counts: torch.Tensor | None = None) -> torch.Tensor:
        """The mean distance of ``features`` (``self.features`` of the samples) in sets of ``set_size``."""
        return chunked_frechet(self.mu, self.sqrt_cov, features, self.set_size, counts)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> float:
        """FD-pixels of ``images`` [n, C, H, W] in [-1, 1] (n >= ``set_size``), as a multiple of the floor."""
        return self.distance(self.features(images.cpu())).item() / self.floor


class Quality:
    """The two measures every table and search here reports for one set of samples: FID on ``features`` and
    FD-pixels (``PixelFD``), both against ``real``.

    Args:
        real: the real images [N, C, H, W] in [-1, 1] (the tables: all 1,797 digits).
        set_size: FD-pixels' set size (default: half of ``real``).
        features: the FID's feature network.
        device: where the FID's network runs (FD-pixels runs on the CPU).
    """

    def __init__(self, real: torch.Tensor, set_size: int | None = None, features: Features = "digits",
                 device: torch.device | str | None = None):
        self.fid = build_fid(real, features, device=device)
        self.pixels = PixelFD(real, set_size)

    @torch.no_grad()
    def __call__(self, samples: torch.Tensor, batch_size: int = 500) -> tuple[float, float]:
        """(FID, FD-pixels) of ``samples`` [n, C, H, W] in [-1, 1]."""
        self.fid.reset()
        for batch in samples.split(batch_size):
            self.fid.update(batch.to(self.fid.device), real=False)
        return self.fid.compute().item(), self.pixels(samples)
