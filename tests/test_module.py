"""KarrasVeModule: the loss, EMA, sampling by seed, a short real training run, and the FID callback."""

import json
import math

import lightning as L
import pytest
import torch

from conftest import TINY_UNET
from kve_lightning import ImageDataModule, KarrasVeModule
from kve_lightning.denoiser import dsm_loss
from kve_lightning.lit.callbacks import FID
from kve_lightning.lit.ema import EMA, ema_update

UNET = json.loads(TINY_UNET)


def tiny_module(**kwargs):
    torch.manual_seed(0)
    return KarrasVeModule(**(dict(unet=UNET, num_steps=4) | kwargs))


def test_dsm_loss_is_f_plus_eps_squared():
    """(1 / sigma^2) ||D(y + sigma eps; sigma) - y||^2 == ||F + eps||^2 with D = y + n + sigma F."""
    module = tiny_module()
    y = torch.rand(3, 1, 8, 8) * 2 - 1
    eps = torch.randn_like(y)
    sigma = torch.tensor([0.02, 1.0, 80.0])
    with torch.no_grad():
        x = y + sigma.view(-1, 1, 1, 1) * eps
        F = (module.denoiser(x, sigma) - x) / sigma.view(-1, 1, 1, 1)
        expected = ((F + eps) ** 2).flatten(1).mean(1)
        torch.testing.assert_close(dsm_loss(module.denoiser, y, sigma, eps), expected, rtol=1e-4, atol=1e-6)


def test_bad_module_settings_raise():
    with pytest.raises(ValueError, match="image_size=10"):
        KarrasVeModule(image_size=10, unet=UNET | {"down_block_types": ["DownBlock2D"] * 3,
                                                    "up_block_types": ["UpBlock2D"] * 3,
                                                    "block_out_channels": [8, 8, 8]})
    with pytest.raises(ValueError, match="channels"):
        KarrasVeModule(channels=2, unet=UNET)
    for kwargs, name in [(dict(sigma_min=0.0), "sigma_min"), (dict(num_steps=1), "num_steps"),
                         (dict(s_churn=-1.0), "s_churn"), (dict(s_min=2.0), "s_min"), (dict(solver="x"), "solver"),
                         (dict(schedule="x"), "schedule")]:
        with pytest.raises(ValueError, match=name):
            KarrasVeModule(unet=UNET, **kwargs)


def test_sample_depends_only_on_seed():
    module = tiny_module().eval()
    batch = module.sample([5, 6, 7, 8])
    alone = module.sample([7])
    torch.testing.assert_close(batch[2:3], alone, rtol=1e-5, atol=1e-5)
    # predict returns the same samples, mapped from [-1, 1] to [0, 1] and clipped there
    torch.testing.assert_close(module.predict_step(torch.tensor([5, 6]), 0), (batch[:2] / 2 + 0.5).clamp(0, 1),
                               rtol=1e-5, atol=1e-5)


def test_ema_warmup_tracks_early_weights():
    """beta_n = min(decay, (1 + n) / (warmup + n)): the n-th update moves the average by 1 - beta_n."""
    avg, cur = [torch.zeros(3)], [torch.ones(3)]
    ema_update(avg, cur, torch.tensor(1), decay=0.999, warmup=10.0)
    torch.testing.assert_close(avg[0], torch.full((3,), 1 - 2 / 11))
    avg = [torch.zeros(3)]
    ema_update(avg, cur, torch.tensor(10**6), decay=0.999, warmup=10.0)
    torch.testing.assert_close(avg[0], torch.full((3,), 0.001))
    with pytest.raises(ValueError, match="decay"):
        EMA(decay=1.0)


@pytest.mark.slow
def test_short_training_run_lowers_validation_loss(tmp_path):
    """~300 steps of the tiny UNet on digits bring val/loss clearly below its value at initialisation."""
    L.seed_everything(0)
    module = tiny_module(lr=2e-3, warmup_steps=20)
    data = ImageDataModule(batch_size=64)
    trainer = L.Trainer(max_steps=300, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, check_val_every_n_epoch=1000,
                        default_root_dir=tmp_path)
    first = trainer.validate(module, data, verbose=False)[0]["val/loss"]
    trainer.fit(module, data)
    last = trainer.validate(module, data, verbose=False)[0]["val/loss"]
    assert math.isfinite(last) and last < 0.6 * first, (first, last)


class PoisonedLoader(torch.utils.data.Dataset):
    """Digits-like batches; the items listed in ``nan_items`` are NaN."""

    def __init__(self, n, nan_items):
        self.x = torch.rand(n, 1, 8, 8) * 2 - 1
        self.x[list(nan_items)] = float("nan")

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i]


def _fit(module, dataset, steps):
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, shuffle=False)
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, loader)


def test_non_finite_batch_is_skipped():
    module = tiny_module(warmup_steps=0)
    with pytest.warns(UserWarning, match=r"non-finite loss or gradient at step 1 \(sigma of non-finite losses: \["):
        _fit(module, PoisonedLoader(16, nan_items=[5]), steps=4)  # batch 1 holds the NaN
    assert module.skipped_steps == 1 and module.consecutive_bad_steps == 0
    assert all(p.isfinite().all() for p in module.parameters())


def test_consecutive_non_finite_steps_stop_with_error():
    module = tiny_module(max_bad_steps=3)
    with pytest.raises(FloatingPointError, match="3 consecutive steps"):
        _fit(module, PoisonedLoader(32, nan_items=range(32)), steps=8)
    assert all(p.isfinite().all() for p in module.parameters())


def test_fid_logged_in_validation(tmp_path):
    module = tiny_module(num_steps=2)
    trainer = L.Trainer(max_steps=2, limit_train_batches=2, limit_val_batches=1, num_sanity_val_steps=0,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[FID(every_n_epochs=1, num_samples=16)])
    trainer.fit(module, ImageDataModule(batch_size=8))
    fid, pixels = trainer.callback_metrics["val/fid"], trainer.callback_metrics["val/fd_pixels"]
    assert torch.isfinite(fid) and fid > 0
    assert torch.isfinite(pixels) and pixels > 1  # two steps of training: far from the held-out digits' 1.0
    assert not any("fid" in k or "inception" in k for k in module.state_dict())
