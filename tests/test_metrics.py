"""FID-digits (torchmetrics FID on the shipped digits feature network) and the InceptionV3 error path."""

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
