"""Resuming: `kve fit --ckpt_path` continues a run exactly (from end-of-epoch checkpoints), and an interrupted
`kve sample` or `kve predict` completes its folder without sampling a seed twice or mixing settings."""

import json
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from PIL import Image

from conftest import REPO, TINY_MODEL_ARGS, TINY_UNET, assert_refused, run_kve, sample_script
from kve_lightning import ImageDataModule, KarrasVeModule
from kve_lightning.cli import cli_main
from kve_lightning.cli.fit import KveCLI
from kve_lightning.rng import get_rng_states, set_rng_states

CONFIG = f"--config={REPO / 'configs' / 'digits.yaml'}"
LAST = Path("runs", "digits", "checkpoints", "last.ckpt")


def assert_states_close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


# ---------------------------------------------------------------------------------------------- training


def test_rng_states_round_trip_through_a_weights_only_file(tmp_path):
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    torch.save(get_rng_states(), tmp_path / "rng.pt")
    first = (torch.rand(3), np.random.rand(3), random.random())
    torch.rand(5), np.random.rand(5), random.random()
    set_rng_states(torch.load(tmp_path / "rng.pt", weights_only=True))
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[2] == again[2]


class CountSteps(Callback):
    def __init__(self):
        self.steps = 0

    def on_train_batch_end(self, *args) -> None:
        self.steps += 1


def fit(root: Path, max_epochs: int, val_every: int, ckpt_path=None):
    """Tiny UNet on digits with random flips, EMA and an lr warm-up, 3 steps per epoch, on CPU, deterministic.
    Returns the module, the steps this call ran, and its last.ckpt."""
    L.seed_everything(0)
    module = KarrasVeModule(unet=json.loads(TINY_UNET), num_steps=2, warmup_steps=4)
    counter = CountSteps()
    trainer = L.Trainer(max_epochs=max_epochs, limit_train_batches=3, limit_val_batches=1,
                        check_val_every_n_epoch=val_every, deterministic=True, accelerator="cpu", logger=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
                        callbacks=[ModelCheckpoint(dirpath=root, save_last=True), counter])
    trainer.fit(module, ImageDataModule(batch_size=16, hflip=True, num_workers=0), ckpt_path=ckpt_path)
    return module, counter.steps, torch.load(root / "last.ckpt", weights_only=True)


@pytest.mark.parametrize("val_every, resume_from", [(1, "last"), (2, "epoch file")])
def test_n_steps_resume_n_steps_equals_2n_steps(tmp_path, val_every, resume_from):
    """Weights, EMA, optimizer, lr schedule and step count after 6 + 6 resumed steps equal those after 12 steps,
    whether the checkpoint was written after a validation (every epoch) or at an epoch end without one."""
    whole, steps, ckpt_whole = fit(tmp_path / "whole", 4, val_every)
    assert steps == 12
    fit(tmp_path / "half", 2, val_every)
    if resume_from == "last":  # into the same folder
        resumed, steps, ckpt_resumed = fit(tmp_path / "half", 4, val_every, ckpt_path="last")
    else:  # into a new folder (in the old one, Lightning would write last-v1.ckpt beside last.ckpt)
        path = tmp_path / "half" / "epoch=1-step=6.ckpt"
        resumed, steps, ckpt_resumed = fit(tmp_path / "resumed", 4, val_every, ckpt_path=path)
    assert steps == 6 and ckpt_resumed["global_step"] == ckpt_whole["global_step"] == 12
    assert_states_close(ckpt_whole["state_dict"], ckpt_resumed["state_dict"])  # EMA weights
    assert_states_close(ckpt_whole["current_model_state"], ckpt_resumed["current_model_state"])  # raw weights
    assert_states_close(whole.state_dict(), resumed.state_dict())  # the EMA weights, copied in when fit ends
    assert ckpt_whole["averaging_state"] == ckpt_resumed["averaging_state"]
    adam_whole, adam_resumed = (c["optimizer_states"][0]["state"] for c in (ckpt_whole, ckpt_resumed))
    for i in adam_whole:
        assert_states_close(adam_whole[i], adam_resumed[i])
    assert ckpt_whole["lr_schedulers"] == ckpt_resumed["lr_schedulers"]


FIT_ARGS = [*TINY_MODEL_ARGS, "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=1",
            "--trainer.check_val_every_n_epoch=1", "--trainer.num_sanity_val_steps=0", "--trainer.deterministic=true",
            "--trainer.enable_progress_bar=false", "--data.batch_size=16", "--data.num_workers=0"]


def test_kve_fit_ckpt_path_last_resumes_in_a_fresh_process(tmp_path, monkeypatch):
    """The digits config keeps last.ckpt in runs/digits/checkpoints: a new `kve fit --ckpt_path last` process in
    the same folder finds it and ends where an uninterrupted run ends."""
    for name, epochs in (("whole", 2), ("half", 1)):
        (tmp_path / name).mkdir()
        monkeypatch.chdir(tmp_path / name)
        cli_main(["fit", CONFIG, *FIT_ARGS, f"--trainer.max_epochs={epochs}"])
    proc = run_kve("fit", CONFIG, *FIT_ARGS, "--trainer.max_epochs=2", "--ckpt_path=last", cwd=tmp_path / "half")
    output = proc.stdout + proc.stderr
    assert "Restored all states from the checkpoint" in output and str(LAST) in output, output[-3000:]
    whole, resumed = (torch.load(tmp_path / name / LAST, weights_only=True) for name in ("whole", "half"))
    assert whole["global_step"] == resumed["global_step"] == 6
    assert_states_close(whole["state_dict"], resumed["state_dict"])
    assert_states_close(whole["current_model_state"], resumed["current_model_state"])


FIT_CONFIGS = [p for p in sorted((REPO / "configs").glob("*.yaml")) if "trainer" in yaml.safe_load(p.read_text())]


@pytest.mark.parametrize("config", FIT_CONFIGS, ids=lambda p: p.name)  # the kve fit configs (not sampler-only ones)
def test_shipped_configs_keep_the_run_under_its_root(config, tmp_path, monkeypatch):
    """Every shipped config: checkpoints (last.ckpt included) under ROOT/checkpoints, TensorBoard under ROOT, where
    ROOT is the config's runs/<name> or whatever --trainer.default_root_dir says."""
    monkeypatch.chdir(tmp_path)
    for extra, root in (([], Path("runs") / config.stem), ([f"--trainer.default_root_dir={tmp_path / 'D'}"],
                                                            tmp_path / "D")):
        cli = KveCLI(KarrasVeModule, ImageDataModule, run=False,
                     args=[f"--config={config}", "--trainer.accelerator=cpu", "--trainer.devices=1",
                           "--trainer.strategy=auto", *extra])
        checkpoints = [c for c in cli.trainer.callbacks if isinstance(c, ModelCheckpoint)]
        assert len(checkpoints) == 1 and checkpoints[0].save_last is True
        assert Path(checkpoints[0].dirpath).resolve() == (root / "checkpoints").resolve()
        assert Path(cli.trainer.logger.save_dir).resolve() == root.resolve()


# ---------------------------------------------------------------------------------------------- sampling


def folder(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


@pytest.fixture
def sampled_seeds(monkeypatch):
    """The seeds ``KarrasVeModule.sample`` is called with, in this process."""
    seeds: list[int] = []
    sample = KarrasVeModule.sample

    def recording(self, batch, *args, **kwargs):
        seeds.extend(int(s) for s in batch)
        return sample(self, batch, *args, **kwargs)

    monkeypatch.setattr(KarrasVeModule, "sample", recording)
    return seeds


def test_killed_sample_script_resumes_to_the_uninterrupted_files(trained_run, tmp_path, sampled_seeds):
    _, ckpt = trained_run
    args = ["--ckpt_path", str(ckpt), "--seeds", "0-39"]
    out = tmp_path / "killed"
    proc = subprocess.Popen([shutil.which("kve"), "sample", *args, "--out", str(out),
                             "--batch_size", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while len(list(out.glob("*.png"))) < 3:
            assert proc.poll() is None, "kve sample ended before it was killed"
            time.sleep(0.005)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done = {p.name for p in out.glob("*.png")}
    assert 3 <= len(done) < 40
    (out / ".000039.png.k1ll3d_x.tmp").write_bytes(b"\x89PNG")  # what a kill in save_png leaves

    sample_script([*args, "--out", str(out), "--batch_size", "8", "--grid", "true"])
    assert sorted(f"{s:06d}.png" for s in sampled_seeds) == sorted({f"{s:06d}.png" for s in range(40)} - done)
    sample_script([*args, "--out", str(tmp_path / "whole"), "--batch_size", "40", "--grid", "true"])
    files = folder(out)
    assert set(files) == {f"{s:06d}.png" for s in range(40)} | {"grid.png", "manifest.json"}  # no temporary files
    assert files == folder(tmp_path / "whole")
    for name in files:
        if name.endswith(".png"):
            with Image.open(out / name) as im:
                im.load()


def test_sample_script_refuses_a_folder_of_other_settings(trained_run, tmp_path, capsys):
    _, ckpt = trained_run
    out = tmp_path / "out"
    sample_script(["--ckpt_path", str(ckpt), "--seeds", "0-2", "--out", str(out)])
    assert_refused(lambda: sample_script(["--ckpt_path", str(ckpt), "--seeds", "0-5", "--model.num_steps", "3",
                                          "--out", str(out)]),
                   capsys, "kve sample: error:", "num_steps: 4 there, 3 now", str(out), folder=out)
    (out / "manifest.json").unlink()  # seed PNGs of unknown origin
    assert_refused(lambda: sample_script(["--ckpt_path", str(ckpt), "--seeds", "0-5", "--out", str(out)]),
                   capsys, "kve sample: error:", "no manifest.json", folder=out)


def predict(out: Path, *args: str) -> None:
    cli_main(["predict", CONFIG, *TINY_MODEL_ARGS, "--seeds=3-7,11",
              "--data.predict_batch_size=2", f"--out={out}", "--trainer.logger=false",
              f"--trainer.default_root_dir={out.parent}", "--trainer.enable_progress_bar=false", *args])


def test_predict_and_sample_script_resume_each_others_folders(trained_run, tmp_path, capsys, monkeypatch,
                                                             sampled_seeds):
    """Same weights and settings, same manifest: `kve predict` samples only the seeds `kve sample` did not write (and
    all of them with --skip_existing false); other weights are refused with nothing written."""
    _, ckpt = trained_run
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    sample_script(["--ckpt_path", str(ckpt), "--seeds", "3-5", "--out", str(out)])
    manifest = (out / "manifest.json").read_bytes()
    inodes = {p.name: p.stat().st_ino for p in out.glob("[0-9]*.png")}
    sampled_seeds.clear()
    predict(out, f"--ckpt_path={ckpt}")
    assert sorted(sampled_seeds) == [6, 7, 11]
    assert (out / "manifest.json").read_bytes() == manifest
    assert {n: (out / n).stat().st_ino for n in inodes} == inodes  # not rewritten
    assert {p.name for p in out.glob("*.png")} == {f"{s:06d}.png" for s in (3, 4, 5, 6, 7, 11)} | {"grid.png"}

    sampled_seeds.clear()
    predict(out, f"--ckpt_path={ckpt}", "--skip_existing=false")
    assert sorted(sampled_seeds) == [3, 4, 5, 6, 7, 11]

    # the freshly initialised weights
    assert_refused(lambda: predict(out), capsys, "kve: error:", "weights_sha256", str(out), folder=out)
