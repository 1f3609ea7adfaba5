"""End to end through the `kve` CLI: fit, validate, TensorBoard grids, predict, `kve sample`, PNG files."""

import dataclasses
import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import REPO, TINY_MODEL_ARGS, run_kve, sample_script
from kve_lightning import ImageDataModule
from kve_lightning.cli import cli_main
from kve_lightning.cli.fit import KveCLI
from kve_lightning.storage import to_unit
from kve_lightning.lit.module import KarrasVeModule
from kve_lightning.sampling import SamplerSettings


def test_fit_writes_checkpoint_and_tensorboard_grid(trained_run):
    root, ckpt = trained_run
    events = sorted(root.rglob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(events[0].parent), size_guidance={"images": 0}).Reload()
    tags = acc.Tags()
    assert {"samples/grid", "samples/trajectory"} <= set(tags["images"])
    grid = acc.Images("samples/grid")[-1]
    # 4 images of 8 x 8 in a 2 x 2 grid with 1-pixel padding: 2 * (8 + 1) + 1 = 19
    assert (grid.width, grid.height) == (19, 19)
    # trajectory: 2 rows x (x_hat, denoised) = 4 rows, 3 columns
    strip = acc.Images("samples/trajectory")[-1]
    assert (strip.width, strip.height) == (3 * 9 + 1, 4 * 9 + 1)
    assert {"train/loss", "val/loss"} <= set(tags["scalars"])
    assert sum(t.startswith("val/loss_sigma_") for t in tags["scalars"]) == 8


def test_checkpoint_holds_ema_weights_and_rebuilds_alone(trained_run):
    _, ckpt = trained_run
    state = torch.load(ckpt, weights_only=True, map_location="cpu")
    assert "current_model_state" in state and "averaging_state" in state  # EMA was on
    ema, raw = state["state_dict"], state["current_model_state"]
    assert any(not torch.equal(ema[k], raw[k]) for k in ema)
    module = KarrasVeModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True).eval()
    for k, v in module.state_dict().items():
        assert torch.equal(v, ema[k])
    again = KarrasVeModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True).eval()
    torch.testing.assert_close(module.sample([3, 4]), again.sample([3, 4]), rtol=0, atol=0)


def test_validate_runs_from_checkpoint(trained_run, tmp_path):
    root, ckpt = trained_run
    cli_main(["validate", f"--config={REPO / 'configs' / 'digits.yaml'}", *TINY_MODEL_ARGS,
              f"--ckpt_path={ckpt}", f"--trainer.default_root_dir={tmp_path}", "--trainer.limit_val_batches=1",
              "--trainer.enable_progress_bar=false"])
    assert list(tmp_path.rglob("events.out.tfevents.*"))


def _pngs(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


def test_predict_and_sample_script_write_identical_pngs(trained_run, tmp_path):
    _, ckpt = trained_run
    out_predict, out_script, out_b1 = tmp_path / "predict", tmp_path / "script", tmp_path / "b1"
    run_kve("predict", f"--config={REPO / 'configs' / 'digits.yaml'}", *TINY_MODEL_ARGS, f"--ckpt_path={ckpt}",
            "--seeds=3-7,11", "--data.predict_batch_size=4", f"--out={out_predict}",
            f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false", cwd=tmp_path)
    files = _pngs(out_predict)
    assert set(files) == {f"{s:06d}.png" for s in (3, 4, 5, 6, 7, 11)} | {"grid.png"}
    with Image.open(out_predict / "000003.png") as im:
        assert im.size == (8, 8) and im.mode == "L"
    script = ["--ckpt_path", str(ckpt), "--seeds", "3-7,11"]
    sample_script([*script, "--out", str(out_script), "--batch_size", "8", "--grid", "true"])
    sample_script([*script, "--out", str(out_b1), "--batch_size", "1", "--grid", "false"])
    assert _pngs(out_script) == files  # same bytes as `kve predict`, grid included
    assert _pngs(out_b1) == {k: v for k, v in files.items() if k != "grid.png"}  # batch size 1 vs 8


def test_sample_script_overrides_and_matches_module(trained_run, tmp_path):
    _, ckpt = trained_run
    sample_script(["--ckpt_path", str(ckpt), "--out", str(tmp_path), "--seeds", "9", "--model.num_steps", "3",
                   "--model.schedule", "edm", "--model.s_churn", "0"])
    module = KarrasVeModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True).eval()
    expected = (to_unit(module.sample([9], num_steps=3, schedule="edm", s_churn=0.0))[0, 0] * 255).round()
    with Image.open(tmp_path / "000009.png") as im:
        assert np.array_equal(np.asarray(im), expected.to(torch.uint8).numpy())


@pytest.mark.parametrize("config", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_build(config, tmp_path, monkeypatch):
    """Every shipped config parses and builds; the data's image size and channels reach the UNet."""
    monkeypatch.chdir(tmp_path)
    cli = KveCLI(KarrasVeModule, ImageDataModule, run=False,
                 args=[f"--config={config}", "--data.image_size=16", "--trainer.accelerator=cpu",
                       "--trainer.devices=1", "--trainer.strategy=auto", "--trainer.logger=false"])
    unet_config = cli.model.denoiser.unet.config
    assert unet_config.sample_size == 16 == cli.model.hparams.image_size
    assert unet_config.in_channels == cli.datamodule.hparams.channels == unet_config.out_channels
    assert unet_config.time_embedding_type == "fourier"


# ------------------------------------------------------------------ sampler settings on a checkpoint


def manifest_sampler(folder):
    return json.loads((folder / "manifest.json").read_text())["sampler"]


def test_predict_applies_sampler_flags_over_the_checkpoint(trained_run, tmp_path, monkeypatch):
    """No config: the architecture and settings come from the checkpoint (trained with 4 steps and Table 5 churn),
    the flags replace the settings they name; the PNGs are `kve sample`'s with the same flags, byte for byte."""
    _, ckpt = trained_run
    monkeypatch.chdir(tmp_path)
    hparams = torch.load(ckpt, map_location="cpu", weights_only=True)["hyper_parameters"]
    config = yaml.safe_load((REPO / "configs" / "digits.yaml").read_text())["model"]
    assert hparams["num_steps"] == 4 and hparams["s_churn"] == 80.0
    assert hparams["clamp_denoised"] is config["clamp_denoised"] and hparams["s_noise"] == config["s_noise"]

    def predict(out, *flags):
        cli_main(["predict", f"--ckpt_path={ckpt}", "--seeds=3-5", f"--out={out}",
                  "--trainer.enable_progress_bar=false", *flags])
        return manifest_sampler(out)

    stored = SamplerSettings.from_mapping(hparams).to_dict()
    del stored["extrapolate"]  # changes no image: not in the manifest
    assert not [name for name in stored if "guidance" in name]  # no guidance (w = 1): as earlier versions wrote
    assert predict(tmp_path / "flags", "--model.num_steps=3", "--model.s_churn=0") == stored | {
        "num_steps": 3, "s_churn": 0.0}
    assert predict(tmp_path / "churn", "--model.s_churn=0") == stored | {"s_churn": 0.0}  # 4 steps, as trained
    # with the config of the run and its flags (TINY_MODEL_ARGS gives num_steps=4): the later flags win
    cli_main(["predict", f"--config={REPO / 'configs' / 'digits.yaml'}", *TINY_MODEL_ARGS, f"--ckpt_path={ckpt}",
              "--model.num_steps=3", "--model.s_churn=0", "--seeds=3-5",
              f"--out={tmp_path / 'config'}", "--trainer.logger=false"])
    sample_script(["--ckpt_path", str(ckpt), "--seeds", "3-5", "--model.num_steps", "3", "--model.s_churn", "0",
                   "--out", str(tmp_path / "kve-sample"), "--grid", "true"])
    expected = _pngs(tmp_path / "kve-sample")
    assert len(expected) == 4 and _pngs(tmp_path / "flags") == expected == _pngs(tmp_path / "config")
    assert _pngs(tmp_path / "churn") != expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["churn", "config", "flags", "kve-sample"]  # nothing else


def test_validate_samples_its_grid_with_the_given_settings(trained_run, tmp_path):
    """`kve validate --model.num_steps 2`: the trajectory strip has one column per step kept, here 2 (not 3)."""
    _, ckpt = trained_run
    cli_main(["validate", f"--ckpt_path={ckpt}", "--model.num_steps=2", f"--trainer.default_root_dir={tmp_path}",
              "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false"])
    events = sorted(tmp_path.rglob("events.out.tfevents.*"))
    acc = EventAccumulator(str(events[0].parent), size_guidance={"images": 0}).Reload()
    assert acc.Images("samples/trajectory")[-1].width == 2 * 9 + 1


# ------------------------------------------------------------------ one folder per run


def test_default_root_dir_holds_the_whole_run_and_last_resumes_there(tmp_path, monkeypatch):
    work, root = tmp_path / "work", tmp_path / "elsewhere" / "D"
    work.mkdir()
    monkeypatch.chdir(work)
    args = ["fit", f"--config={REPO / 'configs' / 'digits.yaml'}", *TINY_MODEL_ARGS, f"--trainer.default_root_dir={root}",
            "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1", "--trainer.check_val_every_n_epoch=1",
            "--trainer.num_sanity_val_steps=0", "--trainer.enable_progress_bar=false", "--data.batch_size=16"]
    cli_main([*args, "--trainer.max_epochs=1"])
    assert list(work.iterdir()) == []  # nothing under ./runs or anywhere else
    assert (root / "checkpoints" / "last.ckpt").is_file()
    assert list(root.rglob("events.out.tfevents.*")) and list(root.rglob("config.yaml"))
    cli_main([*args, "--trainer.max_epochs=2", "--ckpt_path=last", "--model.s_churn=5"])  # new sampler settings
    resumed = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == 4  # resumed at 2
    assert resumed["hyper_parameters"]["s_churn"] == 5.0 and resumed["hyper_parameters"]["num_steps"] == 4
    assert list(work.iterdir()) == []


# ------------------------------------------------------------------ help


def option_help(text: str) -> dict[str, str]:
    """``--option: description`` of an argparse help text, the "(type: ..., default: ...)" part left out."""
    blocks: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"^  (--[\w.-]+)(.*)$", line)
        if m:
            current = m[1]
            rest = re.split(r"\s{2,}", m[2], maxsplit=1)  # the flag's metavar or aliases, then its help
            blocks[current] = rest[1] if len(rest) == 2 else ""
        elif current and line.startswith("    "):
            blocks[current] += " " + line.strip()
        else:
            current = None
    return {k: re.sub(r"\(type: .*", "", v).strip() for k, v in blocks.items()}


GROUPS = ("--model", "--data", "--writer", "--sample_grid", "--inpaint_grid", "--fid", "--bpd")


@pytest.mark.parametrize("subcommand", ["fit", "predict"])
def test_every_model_data_writer_and_callback_option_explains_itself(subcommand):
    proc = subprocess.run([shutil.which("kve"), subcommand, "--help"], capture_output=True, text=True,
                          env=os.environ | {"COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    options = {k: v for k, v in option_help(proc.stdout).items()
               if (k.split(".")[0] in GROUPS and "." in k) or k in ("--seeds", "--out", "--grid", "--skip_existing")}
    assert len(options) >= 45 and {"--model.num_steps", "--model.rho", "--data.dataset", "--skip_existing", "--grid",
                                   "--sample_grid.size", "--fid.every_n_epochs", "--seeds", "--out"} <= set(options)
    assert [k for k, v in options.items() if not v] == []
    for choice in ("{ve,edm}", "{heun,euler,dpmpp_2m_sde,restart,dpmpp_2m,ipndm}",
                   "{digits,mnist5k,mnist,fashion_mnist,cifar10,folder}", "{digits,inception}"):
        assert choice in proc.stdout


@pytest.mark.parametrize("command", ["sample", "export"])
def test_installed_commands_have_a_flag_with_help_for_every_sampler_setting(command):
    proc = subprocess.run([shutil.which("kve"), command, "--help"], capture_output=True, text=True,
                          env=os.environ | {"COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    options = option_help(proc.stdout)
    assert [k for k, v in options.items() if not v] == []
    for f in dataclasses.fields(SamplerSettings):
        flag = f"--model.{f.name}"
        assert options.get(flag), (flag, proc.stdout[-3000:])
    assert "--model.num_steps" in proc.stdout and "{ve,edm}" in proc.stdout
