"""FID-digits (torchmetrics FID on the shipped digits feature network), the InceptionV3 error path, and FD-pixels."""

import sys
import types
import urllib.error

import pytest
import torch
import torch.nn.functional as F

from kve_lightning.metrics import (
    DIGITS_WEIGHTS,
    build_fid,
    digits_feature_net,
    digits_fid_floor,
    digits_with_labels,
    digits_split,
    feature_net,
    fid_from_images,
    InceptionFeatures,
    inception_features,
    PixelFD,
    PixelPCA,
    chunked_frechet,
    feature_moments,
)


@pytest.fixture(scope="module")
def halves():
    x, _ = digits_with_labels()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return x[perm[:898]], x[perm[898:1796]]


def test_digits_images_range_and_split_is_fixed_and_stratified():
    x, y = digits_with_labels()
    assert x.shape == (1797, 1, 8, 8) and x.min() == -1 and x.max() == 1
    x_train, y_train, x_test, y_test = digits_split()
    assert len(x_test) == 360 and len(x_train) == 1437
    assert torch.equal(digits_split()[3], y_test)
    # every class is in the held-out split in (almost) its overall proportion
    torch.testing.assert_close(torch.bincount(y_test) / len(y_test), torch.bincount(y) / len(y), atol=0.01, rtol=0)


def test_shipped_feature_net_held_out_accuracy():
    assert DIGITS_WEIGHTS.stat().st_size < 1_000_000
    net = digits_feature_net()
    assert not any(p.requires_grad for p in net.parameters())
    _, _, x_test, y_test = digits_split()
    with torch.no_grad():
        accuracy = (net.head(net(x_test)).argmax(1) == y_test).double().mean().item()
    assert accuracy >= 0.95


def test_feature_net_accepts_any_size_and_channels():
    net = digits_feature_net()
    x, _ = digits_with_labels()
    x = x[:16]
    with torch.no_grad():
        f8 = net(x)
        f16 = net(F.interpolate(x, size=16, mode="nearest").expand(-1, 3, -1, -1))  # area-resized back exactly
    assert f8.shape == (16, 64)
    torch.testing.assert_close(f16, f8)


def test_fid_digits_real_floor_far_below_noise_and_blur(halves):
    a, b = halves
    floor = digits_fid_floor()
    assert floor == pytest.approx(fid_from_images(a, b))
    noise = fid_from_images(a, torch.rand(b.shape, generator=torch.Generator().manual_seed(1)) * 2 - 1)
    blurred = fid_from_images(a, F.avg_pool2d(b, 3, stride=1, padding=1, count_include_pad=False))
    assert 0 < floor < 20
    assert noise > 20 * floor and blurred > 20 * floor


def test_build_fid_keeps_real_statistics_across_reset(halves):
    a, b = halves
    fid = build_fid(a, batch_size=100)
    assert fid.real_features_num_samples == len(a)
    fid.update(b, real=False)
    first = fid.compute().item()
    fid.reset()
    assert fid.real_features_num_samples == len(a) and fid.fake_features_num_samples == 0
    fid.update(b[:450], real=False)
    fid.update(b[450:], real=False)
    assert fid.compute().item() == pytest.approx(first, rel=1e-5)


def test_unknown_features_name():
    with pytest.raises(ValueError, match="features"):
        feature_net("vgg")


def test_inception_without_torch_fidelity_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # makes `import torch_fidelity` fail
    with pytest.raises(RuntimeError, match="torch-fidelity, which is not installed.*pip install torch-fidelity"):
        build_fid(features="inception")


def test_inception_offline_weights_error_is_clear(monkeypatch):
    """torch-fidelity present but the weights download fails: a RuntimeError naming the file and the fix."""
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setitem(sys.modules, "torch_fidelity", types.ModuleType("torch_fidelity"))
    monkeypatch.setattr("kve_lightning.metrics.NoTrainInceptionV3", offline)
    with pytest.raises(RuntimeError, match="could not load the InceptionV3 weights.*name resolution.*weights-inception-2015-12-05-6726825d.pth"):
        inception_features()


def test_inception_features_get_uint8_rgb():
    """[-1, 1] -> uint8 as EDM writes images (x * 127.5 + 128, clipped); one channel repeated to three."""
    seen = []

    class Recorder(torch.nn.Module):
        def forward(self, x):
            seen.append(x)
            return torch.zeros(len(x), 2048)

    out = InceptionFeatures(Recorder())(torch.tensor([-1.0, 0.0, 1.0]).reshape(1, 1, 1, 3))
    assert out.shape == (1, 2048)
    assert seen[0].dtype == torch.uint8 and seen[0].shape == (1, 3, 1, 3)
    assert seen[0][0, :, 0].tolist() == [[0, 128, 255]] * 3


def test_pixel_pca_gives_the_principal_components():
    """The reference's features are centred and uncorrelated, with variances the top eigenvalues of the pixel
    covariance (float64 throughout: agreement to rounding)."""
    x, _ = digits_with_labels()
    pca = PixelPCA(x, components=16)
    mu, cov = feature_moments(pca(x))
    eigenvalues = torch.linalg.eigvalsh(feature_moments(x.flatten(1))[1]).flip(0)[:16]
    torch.testing.assert_close(mu, torch.zeros(16, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(cov, torch.diag(eigenvalues), atol=1e-10, rtol=1e-10)
    with pytest.raises(ValueError, match="components=65"):
        PixelPCA(x, components=65)


def test_chunked_frechet_is_the_mean_of_closed_form_distances():
    """Against ||mu1 - mu2||^2 + tr(C1 + C2 - 2 sqrtm(C1 C2)) with scipy's sqrtm, set by set (a remainder of rows
    left out); resampling every row once gives the same value."""
    from scipy.linalg import sqrtm

    g = torch.Generator().manual_seed(0)
    real = torch.randn(500, 3, generator=g, dtype=torch.float64)
    fake = torch.randn(250, 3, generator=g, dtype=torch.float64) * 1.3 + 0.2
    mu, cov = feature_moments(real)
    sqrt_cov = torch.from_numpy(sqrtm(cov.numpy()).real)
    expected = []
    for rows in (slice(0, 120), slice(120, 240)):
        m, c = feature_moments(fake[rows])
        trace_sqrt = sqrtm(cov.numpy() @ c.numpy()).real.trace()
        expected.append(((mu - m).square().sum() + cov.trace() + c.trace() - 2 * trace_sqrt).item())
    assert chunked_frechet(mu, sqrt_cov, fake, 120).item() == pytest.approx(sum(expected) / 2, rel=1e-9)
    ones = torch.ones(2, 250, dtype=torch.float64)
    torch.testing.assert_close(chunked_frechet(mu, sqrt_cov, fake, 120, ones),
                               torch.full((2,), sum(expected) / 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="at least 300 samples, got 250"):
        chunked_frechet(mu, sqrt_cov, fake, 300)


def test_fd_pixels_is_near_one_for_other_real_digits_and_far_above_for_degraded_ones():
    """FD-pixels of 1,200 digits (halves of 600 and 600), judging the other 597 in one set. Over 30 random draws of
    the 1,200 the unseen 597 scored 0.54 to 1.58 (median 0.89; the floor is one noisy draw too), blurred digits 22
    to 56, and digits pulled 20 % towards the mean (a less varied model) 3.0 to 5.5 times the unseen ones: bands
    that do not overlap. The other half scores 1 by definition."""
    x, _ = digits_with_labels()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    real, unseen = x[perm[:1200]], x[perm[1200:]]
    fd = PixelFD(real, set_size=597)
    other_half = real[torch.randperm(1200, generator=torch.Generator().manual_seed(0))[600:]]
    assert fd(other_half) == pytest.approx(1.0) and fd.set_size == 597
    assert 0.4 < fd(unseen) < 2.0
    assert fd(F.avg_pool2d(unseen, 3, stride=1, padding=1, count_include_pad=False)) > 10
    mean = real.mean(0)
    assert fd(mean + 0.8 * (unseen - mean)) > 2 * fd(unseen)
    assert PixelFD(real).set_size == 600  # default: the other half
    with pytest.raises(ValueError, match="at least 2 images, got set_size=1"):
        PixelFD(real, set_size=1)
    with pytest.raises(ValueError, match="at least 4 real images, got 3"):
        PixelFD(real[:3])
