"""Shared fixtures: a tiny UNet and one short `kve fit` run whose checkpoint several tests sample from."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kve_lightning.cli import cli_main

REPO = Path(__file__).resolve().parents[1]

# A UNet small enough for tests: two resolutions of 16 and 32 channels, no attention.
TINY_UNET = ('{"block_out_channels": [16, 32], "layers_per_block": 1, "norm_num_groups": 8, '
             '"down_block_types": ["DownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "UpBlock2D"]}')
TINY_MODEL_ARGS = [f"--model.unet={TINY_UNET}", "--model.num_steps=4", "--sample_grid.size=4",
                   "--sample_grid.trajectory_rows=2", "--sample_grid.trajectory_cols=3"]


# a `kve fit` of 3 steps an epoch on digits with the tiny UNet, deterministic, without a logger
SHORT_FIT_ARGS = [f"--config={REPO / 'configs' / 'digits.yaml'}", *TINY_MODEL_ARGS, "--trainer.limit_train_batches=3",
                  "--trainer.limit_val_batches=1", "--trainer.check_val_every_n_epoch=1",
                  "--trainer.num_sanity_val_steps=0", "--trainer.deterministic=true",
                  "--trainer.enable_progress_bar=false", "--data.batch_size=16", "--data.num_workers=0",
                  "--trainer.logger=false"]


def untrained_checkpoint(path: Path, **hparams) -> Path:
    """A checkpoint of the tiny UNet, untrained (seed 0), on 8 x 8 gray images with ``hparams``: what `kve fit`
    writes less the training state, for tests of sampling's bookkeeping that need no trained weights."""
    import json

    import lightning
    import torch

    from kve_lightning.lit.module import KarrasVeModule

    torch.manual_seed(0)
    module = KarrasVeModule(image_size=8, channels=1, unet=json.loads(TINY_UNET), **hparams)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "pytorch-lightning_version": lightning.__version__}, path)
    return path


def run_kve(*args: str, cwd=None, check=True) -> subprocess.CompletedProcess:
    """``python -m kve_lightning ARGS`` in a subprocess (exit code and messages as a user sees them)."""
    proc = subprocess.run([sys.executable, "-m", "kve_lightning", *args], cwd=cwd, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"kve {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def sample_script(argv: list[str]) -> None:
    """``kve sample ARGV``, in process."""
    cli_main(["sample", *argv])


def export_script(argv: list[str]) -> None:
    """``kve export ARGV``, in process."""
    cli_main(["export", *argv])


def folder_state(folder: Path) -> dict:
    """Every path under ``folder`` with its bytes (None for a folder): what "nothing written" compares."""
    return {p: p.read_bytes() if p.is_file() else None for p in Path(folder).rglob("*")}


def assert_refused(call, capsys, *needles: str, code: int = 2, folder: Path | None = None) -> str:
    """The one check of bad input: ``call()`` exits with ``code`` (2) and exactly one error line (warnings may
    precede it) holding every needle, no traceback, and, given ``folder``, nothing under it changed. Returns the
    line."""
    before = folder_state(folder) if folder is not None else None
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        call()
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert exit_info.value.code == code, err[-3000:]
    assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
    assert all(n in errors[0] for n in needles), (needles, errors[0])
    if folder is not None:
        assert folder_state(folder) == before
    return errors[0]


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """`kve fit` on digits for 6 steps with one validation: returns (run dir, checkpoint path)."""
    root = tmp_path_factory.mktemp("fit")
    cwd = os.getcwd()
    os.chdir(root)  # the config writes runs/digits/... relative to the working directory
    try:
        cli_main([
            "fit", f"--config={REPO / 'configs' / 'digits.yaml'}", *TINY_MODEL_ARGS,
            "--trainer.max_steps=6", "--trainer.max_epochs=1", "--trainer.limit_train_batches=6",
            "--trainer.check_val_every_n_epoch=1", "--trainer.log_every_n_steps=1",
            "--trainer.limit_val_batches=1", "--trainer.num_sanity_val_steps=0", "--trainer.enable_progress_bar=false",
            "--data.batch_size=16",
        ])
    finally:
        os.chdir(cwd)
    ckpts = sorted(root.rglob("last.ckpt"))
    assert ckpts == [root / "runs" / "digits" / "checkpoints" / "last.ckpt"], list(root.rglob("*"))
    return root, ckpts[0]


@pytest.fixture(scope="session")
def phema_run(tmp_path_factory):
    """`kve fit` on digits for 6 steps with post-hoc EMA snapshots of 0.05 and 0.10 every 2: (run folder, last.ckpt)."""
    root = tmp_path_factory.mktemp("phema_run")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        cli_main(["fit", *SHORT_FIT_ARGS, "--trainer.max_steps=6", "--trainer.max_epochs=2",
                  "--model.phema_stds=[0.05,0.1]", "--model.phema_every_n_steps=2"])
    finally:
        os.chdir(cwd)
    return root / "runs" / "digits", root / "runs" / "digits" / "checkpoints" / "last.ckpt"
