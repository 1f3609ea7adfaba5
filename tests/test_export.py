"""Export: checkpoint -> diffusers folder (safetensors + JSON only), sampling from it without pickle, diffusers' own
KarrasVePipeline on it, and bad input (clear errors, nothing half-written)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from diffusers import KarrasVePipeline, UNet2DModel
from diffusers.schedulers.deprecated.scheduling_karras_ve import KarrasVeScheduler
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from conftest import TINY_UNET, assert_refused, export_script, sample_script
from kve_lightning.interop.export import export_checkpoint
from kve_lightning.storage import to_unit
from kve_lightning.lit.module import KarrasVeModule
from kve_lightning.sampling import SamplerSettings
from kve_lightning.interop.pipeline import KarrasVeLightningPipeline

EXPORTED_FILES = {"model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                  "scheduler/scheduler_config.json"}

# Runs `python -m kve_lightning ARGS` (what the installed `kve` runs) with pickle loading and network connections
# replaced by an error.
NO_PICKLE_NO_NETWORK = """
import pickle, runpy, socket, sys, torch
def forbidden(*args, **kwargs):
    raise AssertionError("pickle or network used on the sampling path")
torch.load = pickle.load = pickle.loads = socket.socket.connect = forbidden
sys.argv = ["kve", *sys.argv[1:]]
runpy.run_module("kve_lightning", run_name="__main__", alter_sys=True)
"""


def files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def pngs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    """The `kve fit` checkpoint of ``trained_run`` and its export by the script: (checkpoint, folder)."""
    _, ckpt = trained_run
    out = tmp_path_factory.mktemp("export") / "model"
    export_script(["--ckpt_path", str(ckpt), "--out", str(out)])
    return ckpt, out


@pytest.fixture(scope="module")
def rgb_ckpt(tmp_path_factory):
    """A 3-channel checkpoint written by Lightning after one training step (EMA on, as in `kve fit`)."""
    torch.manual_seed(0)
    module = KarrasVeModule(image_size=8, channels=3, unet=json.loads(TINY_UNET), num_steps=3)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, DataLoader(torch.rand(4, 3, 8, 8) * 2 - 1, batch_size=4))
    path = tmp_path_factory.mktemp("rgb") / "rgb.ckpt"
    trainer.save_checkpoint(path)
    return path


def test_export_holds_ema_weights_and_sampler_settings_as_safetensors_and_json(exported):
    ckpt, out = exported
    assert files(out) == EXPORTED_FILES
    assert os.listdir(out.parent) == ["model"]  # no temporary folder left beside it
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    weights = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    ema = {k.removeprefix("denoiser.unet."): v for k, v in checkpoint["state_dict"].items()}
    raw = {k.removeprefix("denoiser.unet."): v for k, v in checkpoint["current_model_state"].items()}
    assert weights.keys() == ema.keys() and all(torch.equal(weights[k], ema[k]) for k in ema)
    assert any(not torch.equal(weights[k], raw[k]) for k in raw)  # the EMA weights, not the raw ones
    config = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    hparams = checkpoint["hyper_parameters"]
    assert SamplerSettings.from_mapping(config) == SamplerSettings.from_mapping(hparams)
    assert (config["train_sigma_min"], config["train_sigma_max"]) == (hparams["train_sigma_min"],
                                                                      hparams["train_sigma_max"])
    assert all(k in config for k in SamplerSettings().to_dict())  # every setting written out
    assert json.loads((out / "unet" / "config.json").read_text())["sample_size"] == hparams["image_size"]


def test_from_pretrained_gives_the_checkpoint_images(exported):
    ckpt, out = exported
    module = KarrasVeModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True).eval()
    pipe = KarrasVeLightningPipeline.from_pretrained(out, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    steps = pipe.scheduler.config.num_steps
    assert steps == module.hparams.num_steps
    images = pipe(seeds=[3, 4, 5], num_inference_steps=steps, output_type="pt").images
    torch.testing.assert_close(images, to_unit(module.sample([3, 4, 5])), rtol=0, atol=1e-5)
    overrides = dict(schedule="edm", s_churn=0.0, s_noise=1.0)
    images = pipe(seeds=[6], num_inference_steps=3, output_type="pt", **overrides).images
    torch.testing.assert_close(images, to_unit(module.sample([6], num_steps=3, **overrides)), rtol=0, atol=1e-5)


def test_sample_script_from_folder_offline_and_without_pickle_writes_the_checkpoint_pngs(exported, tmp_path):
    ckpt, out = exported
    seeds = ["--seeds", "3-7,11", "--grid", "true"]
    env = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", NO_PICKLE_NO_NETWORK, "sample",
                           "--pipeline", str(out), "--out", str(tmp_path / "model"), "--batch_size", "4", *seeds],
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    sample_script(["--ckpt_path", str(ckpt), "--out", str(tmp_path / "ckpt"), *seeds])
    expected = pngs(tmp_path / "ckpt")
    assert len(expected) == 7 and "grid.png" in expected and pngs(tmp_path / "model") == expected
    flags = ["--seeds", "2", "--model.num_steps", "3", "--model.schedule", "edm", "--model.solver", "euler",
             "--model.s_churn", "5"]
    sample_script(["--pipeline", str(out), "--out", str(tmp_path / "model_flags"), *flags])
    sample_script(["--ckpt_path", str(ckpt), "--out", str(tmp_path / "ckpt_flags"), *flags])
    assert len(pngs(tmp_path / "model_flags")) == 2 and pngs(tmp_path / "model_flags") == pngs(tmp_path / "ckpt_flags")


def test_diffusers_karras_ve_pipeline_runs_the_exported_unet(rgb_ckpt, tmp_path):
    out = export_checkpoint(rgb_ckpt, tmp_path / "rgb")
    unet = UNet2DModel.from_pretrained(out, subfolder="unet", use_safetensors=True)
    theirs = KarrasVePipeline(unet=unet, scheduler=KarrasVeScheduler())
    theirs.set_progress_bar_config(disable=True)
    images = theirs(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                    output_type="np").images
    assert images.shape == (2, 8, 8, 3) and np.isfinite(images).all() and 0 <= images.min() <= images.max() <= 1
    loaded = KarrasVePipeline.from_pretrained(out, scheduler=KarrasVeScheduler(), use_safetensors=True)
    assert isinstance(loaded.scheduler, KarrasVeScheduler) and loaded.unet.config.in_channels == 3
    ours = KarrasVeLightningPipeline.from_pretrained(out, use_safetensors=True)
    ours.set_progress_bar_config(disable=True)
    pil = ours(seeds=[0, 1], num_inference_steps=3).images
    assert [(im.mode, im.size) for im in pil] == [("RGB", (8, 8))] * 2
    module = KarrasVeModule.load_from_checkpoint(rgb_ckpt, map_location="cpu", weights_only=True).eval()
    torch.testing.assert_close(ours(seeds=[0, 1], num_inference_steps=3, output_type="pt").images,
                               to_unit(module.sample([0, 1])), rtol=0, atol=1e-5)


def _bad_checkpoints(folder: Path, ckpt: Path) -> dict[str, Path]:
    """Missing, truncated, foreign (weights of something else), a pickle that would run code, and a kve checkpoint
    whose hyper-parameters do not fit its weights."""
    truncated = folder / "truncated.ckpt"
    truncated.write_bytes(ckpt.read_bytes()[:2000])
    foreign = folder / "foreign.ckpt"
    torch.save({"state_dict": {"weight": torch.ones(2)}, "hyper_parameters": {}}, foreign)
    evil = folder / "evil.ckpt"
    torch.save({"state_dict": RunsCode(folder / "pwned")}, evil)
    mismatched = folder / "mismatched.ckpt"
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    checkpoint["hyper_parameters"]["channels"] = 3
    torch.save(checkpoint, mismatched)
    return dict(missing=folder / "missing.ckpt", truncated=truncated, foreign=foreign, evil=evil, mismatched=mismatched)


class RunsCode:
    """Unpickled, it would create a folder: a stand-in for arbitrary code in a malicious checkpoint."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return os.makedirs, (str(self.path),)


@pytest.mark.parametrize(
    "kind, needle",
    [
        ("missing", "does not exist"),
        ("truncated", "not a readable checkpoint"),
        ("foreign", "not a kve-lightning checkpoint"),
        ("evil", "unpickle os.makedirs"),
        ("mismatched", "does not match KarrasVeModule"),
    ],
)
def test_export_bad_checkpoint_exits_2_with_one_line_and_writes_nothing(trained_run, tmp_path, capsys, kind, needle):
    _, ckpt = trained_run
    bad = _bad_checkpoints(tmp_path, ckpt)[kind]
    # nothing under tmp_path changes: no output folder, no temporary folder, and evil.ckpt ran nothing
    line = assert_refused(lambda: export_script(["--ckpt_path", str(bad), "--out", str(tmp_path / "out")]), capsys,
                          bad.name, needle, folder=tmp_path)
    assert line.startswith("kve export: error: "), line


def test_export_refuses_a_non_empty_folder_unless_overwrite(exported, tmp_path, capsys):
    ckpt, _ = exported
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_refused(lambda: export_script(["--ckpt_path", str(ckpt), "--out", str(out)]), capsys, str(out),
                   "--overwrite true", folder=tmp_path)
    assert files(out) == {"keep.txt"}
    # --overwrite true replaces an earlier export only
    assert_refused(lambda: export_script(["--ckpt_path", str(ckpt), "--out", str(out), "--overwrite", "true"]),
                   capsys, "earlier export only", "keep.txt", folder=tmp_path)
    assert files(out) == {"keep.txt"}
    (out / "keep.txt").unlink()
    export_script(["--ckpt_path", str(ckpt), "--out", str(out)])
    (out / "unet" / "stale.bin").write_text("")
    export_script(["--ckpt_path", str(ckpt), "--out", str(out), "--overwrite", "true"])
    assert files(out) == EXPORTED_FILES and os.listdir(tmp_path) == ["out"]
    (tmp_path / "file").write_text("")
    assert_refused(lambda: export_script(["--ckpt_path", str(ckpt), "--out", str(tmp_path / "file"),
                                          "--overwrite", "true"]), capsys, "not a directory", folder=tmp_path)
    (tmp_path / "empty").mkdir()
    export_script(["--ckpt_path", str(ckpt), "--out", str(tmp_path / "empty")])  # an empty folder is fine
    assert files(tmp_path / "empty") == EXPORTED_FILES


def test_export_failing_midway_leaves_the_old_folder_untouched(exported, tmp_path, monkeypatch):
    ckpt, _ = exported

    def save_half(self, directory, **kwargs):
        (Path(directory) / "model_index.json").write_text("{")
        raise OSError("disk full")

    export_checkpoint(ckpt, tmp_path / "out")
    before = {p: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()}
    monkeypatch.setattr(KarrasVeLightningPipeline, "save_pretrained", save_half)
    with pytest.raises(OSError, match="disk full"):
        export_checkpoint(ckpt, tmp_path / "out", overwrite=True)
    with pytest.raises(OSError, match="disk full"):
        export_checkpoint(ckpt, tmp_path / "new")
    assert os.listdir(tmp_path) == ["out"]
    assert {p: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()} == before


def test_loading_a_folder_without_unet_is_a_clear_error(exported, tmp_path, capsys):
    _, out = exported
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    shutil.rmtree(broken / "unet")
    with pytest.raises(ValueError, match="has no unet"):
        KarrasVeLightningPipeline.from_pretrained(broken)
    for folder in (broken, tmp_path / "missing"):
        assert_refused(lambda: sample_script(["--pipeline", str(folder), "--out", str(tmp_path / "o")]), capsys,
                       str(folder), folder=tmp_path)
        assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("source", [[], ["--ckpt_path", "a.ckpt", "--pipeline", "dir"]])
def test_sample_script_needs_exactly_one_source(tmp_path, capsys, source):
    assert_refused(lambda: sample_script([*source, "--out", str(tmp_path / "o")]), capsys, "--ckpt_path",
                   "--pipeline", folder=tmp_path)
    assert not (tmp_path / "o").exists()

