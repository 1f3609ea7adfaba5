"""Scale-out on CPU: 2-process DDP (gloo) fit and predict, bf16-mixed, channels_last and a compiled UNet."""

import json
import math
import re

import lightning as L
import pytest
import torch

from conftest import REPO, TINY_MODEL_ARGS, TINY_UNET, run_kve
from kve_lightning import ImageDataModule, KarrasVeModule

pytestmark = pytest.mark.slow
DIGITS = f"--config={REPO / 'configs' / 'digits.yaml'}"
SHORT_FIT = ["--trainer.max_steps=4", "--trainer.max_epochs=1", "--trainer.limit_train_batches=4",
             "--trainer.check_val_every_n_epoch=1", "--trainer.limit_val_batches=2", "--trainer.num_sanity_val_steps=0",
             "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false", "--data.batch_size=8"]


def _ddp(devices):
    strategy = "ddp" if devices > 1 else "auto"
    return ["--trainer.accelerator=cpu", f"--trainer.devices={devices}", f"--trainer.strategy={strategy}"]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    run_kve("fit", DIGITS, *TINY_MODEL_ARGS, *SHORT_FIT, *_ddp(2), cwd=root)
    return root


def test_ddp_fit_writes_each_file_once_and_samples(ddp_run):
    ckpts = sorted(p.name for p in (ddp_run / "runs" / "digits" / "checkpoints").iterdir())
    assert ckpts == ["epoch=0-step=4.ckpt", "last.ckpt"]
    assert len(list(ddp_run.rglob("events.out.tfevents.*"))) == 1  # one logger, on rank 0
    module = KarrasVeModule.load_from_checkpoint(ddp_run / "runs" / "digits" / "checkpoints" / "last.ckpt",
                                                 map_location="cpu", weights_only=True).eval()
    images = module.sample([0, 1])
    assert images.shape == (2, 1, 8, 8) and images.isfinite().all()


def test_ddp_predict_matches_single_process_byte_for_byte(ddp_run, tmp_path):
    """Also when 2 ranks complete a folder that lacks some seeds (each rank skips the PNGs that exist)."""
    ckpt = ddp_run / "runs" / "digits" / "checkpoints" / "last.ckpt"

    def predict(devices, out):
        run_kve("predict", DIGITS, *TINY_MODEL_ARGS, f"--ckpt_path={ckpt}", *_ddp(devices), "--trainer.logger=false",
                "--seeds=0-6", "--data.predict_batch_size=2", f"--out={out}",
                cwd=tmp_path)
        return {p.name: p.read_bytes() for p in sorted(out.iterdir())}

    outputs = {devices: predict(devices, tmp_path / f"out{devices}") for devices in (1, 2)}
    # 7 seeds over 2 ranks: none lost, none duplicated, one grid, the same manifest
    assert sorted(outputs[1]) == [f"{s:06d}.png" for s in range(7)] + ["grid.png", "manifest.json"]
    assert outputs[2] == outputs[1]
    for seed in (1, 4, 5):
        (tmp_path / "out1" / f"{seed:06d}.png").unlink()
    assert predict(2, tmp_path / "out1") == outputs[1]


def _tiny(**kwargs):
    torch.manual_seed(0)
    return KarrasVeModule(unet=json.loads(TINY_UNET), num_steps=3, **kwargs)


def _fit(module, tmp_path, **trainer_kwargs):
    trainer = L.Trainer(max_steps=3, limit_val_batches=0, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, **trainer_kwargs)
    trainer.fit(module, ImageDataModule(batch_size=8))
    return trainer


def test_bf16_mixed_with_channels_last_trains_on_cpu(tmp_path):
    module = _tiny(channels_last=True)
    trainer = _fit(module, tmp_path, precision="bf16-mixed", accelerator="cpu")
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert module.denoiser.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert module.denoiser.unet.conv_in.weight.dtype == torch.float32  # mixed precision keeps fp32 weights


def test_compiled_unet_checkpoint_loads_uncompiled(tmp_path, monkeypatch):
    # dynamo traces the UNet as usual; the "eager" backend skips inductor's C++ code generation (minutes on CPU)
    compile_module = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compile_module(self, backend="eager"))
    module = _tiny(compile=True)
    trainer = _fit(module, tmp_path, accelerator="cpu")
    ckpt = tmp_path / "compiled.ckpt"
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=True, map_location="cpu")["state_dict"]
    assert not any("_orig_mod" in k for k in state)
    plain = KarrasVeModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True).eval()
    module.eval()
    assert module.denoiser.unet._compiled_call_impl is not None and plain.denoiser.unet._compiled_call_impl is None
    torch.testing.assert_close(plain.sample([1, 2]), module.sample([1, 2]), rtol=1e-4, atol=1e-4)


def test_kve_test_bits_per_dim_is_the_same_on_one_and_two_ranks(ddp_run, tmp_path):
    """`kve test` logs test/bpd and its standard error over the held-out split; each rank integrates its own shard
    (179 images over 2 ranks in batches of 7: the distributed sampler pads with a repeat that must not count), and
    the gathered mean equals one process's."""
    ckpt = ddp_run / "runs" / "digits" / "checkpoints" / "last.ckpt"

    def test(devices):
        proc = run_kve("test", DIGITS, *TINY_MODEL_ARGS, f"--ckpt_path={ckpt}", *_ddp(devices), "--data.batch_size=7",
                       "--data.val_fraction=0.0995",
                       "--model.likelihood_steps=2", f"--trainer.default_root_dir={tmp_path / str(devices)}",
                       cwd=tmp_path)
        values = dict(re.findall(r"(test/bpd\w*)\s+([0-9.]+)", proc.stdout))
        return float(values["test/bpd"]), float(values["test/bpd_stderr"])

    (one, one_se), (two, two_se) = test(1), test(2)
    assert math.isfinite(one) and 0 < one_se < one  # a barely trained model: far above log2(17) = 4.09
    assert two == pytest.approx(one, rel=1e-5) and two_se == pytest.approx(one_se, rel=1e-3)
