"""Hostile and careless use, round 2: what a red team found in tune, phema, likelihood, inpaint, test and --config.
One test per finding (numbered as in the issue); every refusal is one line, exit 2, nothing written."""

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import REPO, SHORT_FIT_ARGS, TINY_MODEL_ARGS, assert_refused, folder_state
from kve_lightning.cli import cli_main
from kve_lightning.lit.data import ImageDataModule
from kve_lightning.masks import parse_mask
from kve_lightning.phema import list_snapshots
from kve_lightning.sampling import SamplerSettings
from kve_lightning.search import RANGES, Move, moved
from kve_lightning.storage import writer_id

CONFIG = f"--config={REPO / 'configs' / 'digits.yaml'}"
TUNE = ["--nfe=3", "--n=4", "--batch_size=4", "--bootstrap=5", "--budget=0.05"]


# ------------------------------------------------------------------------------------------------ 1-3: data loss


@pytest.mark.parametrize("command, output", [
    (["likelihood", "--n=2", "--ode_steps=1"], "--out"),
    (["tune", *TUNE], "--out"),
    (["tune", *TUNE], "--plot"),
])
def test_1_an_output_that_is_the_input_checkpoint_is_refused(trained_run, tmp_path, capsys, command, output):
    _, ckpt = trained_run
    before = ckpt.read_bytes()
    out = [f"--out={tmp_path / 'o.yaml'}"] if output == "--plot" else []
    assert_refused(lambda: cli_main([*command, f"--ckpt_path={ckpt}", *out, f"{output}={ckpt}"]), capsys,
                   output, "--ckpt_path", folder=tmp_path)
    assert ckpt.read_bytes() == before


def test_1_inpaint_never_writes_into_its_images_folder(trained_run, tmp_path, capsys):
    _, ckpt = trained_run
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(images / "a.png")
    for out in (images, images / "completions"):
        assert_refused(lambda: cli_main(["inpaint", f"--ckpt_path={ckpt}", f"--images={images}", "--mask=bottom",
                                         f"--out={out}"]), capsys, "--images", folder=tmp_path)


def test_2_an_earlier_result_is_replaced_only_with_overwrite(trained_run, tmp_path, capsys):
    _, ckpt = trained_run
    earlier = tmp_path / "best.yaml"
    earlier.write_text("model: {num_steps: 2}\n")
    for command in (["tune", *TUNE], ["likelihood", "--n=2", "--ode_steps=1"]):
        assert_refused(lambda: cli_main([*command, f"--ckpt_path={ckpt}", f"--out={earlier}"]), capsys,
                       "exists", "--overwrite true", folder=tmp_path)
    assert earlier.read_text() == "model: {num_steps: 2}\n"
    cli_main(["likelihood", "--n=2", "--ode_steps=1", f"--ckpt_path={ckpt}", f"--out={earlier}", "--overwrite=true"])
    assert "bits_per_dim" in json.loads(earlier.read_text())


@pytest.mark.parametrize("target", ["phema", "checkpoints"])
def test_3_overwrite_never_reaches_the_runs_snapshots_checkpoints_or_logs(phema_run, tmp_path, capsys, target):
    run, ckpt = phema_run
    victim = sorted((run / "phema").iterdir())[0] if target == "phema" else ckpt
    assert_refused(lambda: cli_main(["phema", f"--snapshots={run}", f"--ckpt_path={ckpt}", "--std=0.07",
                                     f"--out={victim}", "--overwrite=true"]), capsys, str(victim), folder=run)
    assert list_snapshots(run / "phema")  # still readable


# ------------------------------------------------------------------------------------------------ 4-9: silent results


@pytest.fixture(scope="module")
def seed7_run(tmp_path_factory):
    """A checkpoint trained with --data.split_seed 7."""
    root = tmp_path_factory.mktemp("seed7")
    cli_main(["fit", *SHORT_FIT_ARGS, "--trainer.max_steps=2", "--trainer.max_epochs=1", "--data.split_seed=7",
              f"--trainer.default_root_dir={root}"])
    return root / "checkpoints" / "last.ckpt"


def test_4_held_out_images_are_the_checkpoints_own(seed7_run, tmp_path, capsys):
    cli_main(["likelihood", f"--ckpt_path={seed7_run}", "--n=3", "--ode_steps=1", f"--out={tmp_path / 'r.json'}"])
    report = json.loads((tmp_path / "r.json").read_text())
    assert (report["split_seed"], report["split"], report["val_fraction"]) == (7, "val", 0.1)
    cli_main(["inpaint", f"--ckpt_path={seed7_run}", "--n=2", "--mask=bottom", "--seeds=0", "--model.num_steps=2",
              "--resample=1", "--guidance=0", f"--out={tmp_path / 'i'}"])
    seed7 = ImageDataModule(split_seed=7)
    seed7.setup("fit")
    known = parse_mask("bottom", 8)[0, 0]
    completed = np.array(Image.open(tmp_path / "i" / "00001_000000.png"))
    assert np.array_equal(completed[known.numpy()], np.round((seed7.val_set[1][0][0][known] + 1) * 127.5).numpy())
    for command in (["likelihood", "--n=1", "--ode_steps=1", f"--out={tmp_path / 'x.json'}"],
                    ["inpaint", "--n=1", "--mask=bottom", f"--out={tmp_path / 'x'}"]):
        assert_refused(lambda: cli_main([*command, f"--ckpt_path={seed7_run}", "--data.split_seed=0"]), capsys,
                       "--data.split_seed 0", "7", folder=tmp_path)
    assert_refused(lambda: cli_main(["test", CONFIG, *TINY_MODEL_ARGS, f"--ckpt_path={seed7_run}",
                                     "--data.split_seed=0", f"--trainer.default_root_dir={tmp_path}"]), capsys,
                   "--data.split_seed 0", folder=tmp_path)


def test_5_sampling_outside_the_trained_range_is_refused(trained_run, tmp_path, capsys):
    _, ckpt = trained_run
    assert_refused(lambda: cli_main(["sample", f"--ckpt_path={ckpt}", "--model.sigma_max=200", f"--out={tmp_path}"]),
                   capsys, "[0.02, 200]", "trained range", folder=tmp_path)


def test_6_the_outputs_of_one_command_never_collide(trained_run, tmp_path, capsys):
    _, ckpt = trained_run
    assert_refused(lambda: cli_main(["tune", *TUNE, f"--ckpt_path={ckpt}", f"--out={tmp_path / 'best.png'}"]),
                   capsys, "--out", "--plot", folder=tmp_path)


def nan_snapshot(run: Path, folder: Path) -> Path:
    """A copy of the run's snapshots with the newest one's tensors NaN under a valid header."""
    folder.mkdir()
    for p in (run / "phema").iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    newest = sorted(folder.iterdir())[-1]
    from safetensors import safe_open

    with safe_open(newest, framework="pt") as f:
        meta = f.metadata()
    save_file({k: torch.full_like(v, float("nan")) for k, v in load_file(newest).items()}, newest, metadata=meta)
    return folder


@pytest.mark.parametrize("case, needle", [
    ("max_error nan", "max_error"),
    ("nan snapshot", "non-finite"),
    ("other run", "run"),
    ("colliding stds", "are both"),
    ("list with std", "--list true only lists"),
])
def test_7_kve_phema_refuses_what_it_cannot_do_exactly(phema_run, tmp_path, capsys, case, needle):
    run, ckpt = phema_run
    args = [f"--snapshots={run}", f"--ckpt_path={ckpt}", "--std=0.07", f"--out={tmp_path / 'o-{std}.ckpt'}"]
    if case == "max_error nan":
        args.append("--max_error=nan")
    elif case == "nan snapshot":
        args[0] = f"--snapshots={nan_snapshot(run, tmp_path / 'nan')}"
    elif case == "other run":
        checkpoint = torch.load(ckpt, weights_only=True)
        for state in checkpoint["callbacks"].values():
            if isinstance(state, dict) and "averages" in state:
                state["run"] = "0123456789abcdef"
        torch.save(checkpoint, tmp_path / "other.ckpt")
        args[1] = f"--ckpt_path={tmp_path / 'other.ckpt'}"
    elif case == "colliding stds":
        args[2] = "--std=0.07,0.07000001"
    elif case == "list with std":
        args.append("--list=true")
    assert_refused(lambda: cli_main(["phema", *args]), capsys, needle, folder=tmp_path)
    assert not list(tmp_path.glob("o-*"))


def test_8_a_mask_is_read_by_its_values_and_other_inputs_are_not_misread(trained_run, tmp_path, capsys):
    mask = np.zeros((8, 8), np.uint8)
    mask[4:] = 1  # 0/1 valued: 1 = fill
    Image.fromarray(mask).save(tmp_path / "01.png")
    assert torch.equal(parse_mask(str(tmp_path / "01.png"), 8), parse_mask("bottom", 8))
    Image.fromarray(mask * 255).save(tmp_path / "bw.png")
    assert torch.equal(parse_mask(str(tmp_path / "bw.png"), 8), parse_mask("bottom", 8))
    Image.fromarray(mask * 100).save(tmp_path / "gray.png")
    with pytest.raises(ValueError, match="gray levels"):
        parse_mask(str(tmp_path / "gray.png"), 8)
    # a float TIFF has no range to read it by
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.full((8, 8), np.nan, np.float32), mode="F").save(images / "a.tiff")
    _, ckpt = trained_run
    assert_refused(lambda: cli_main(["inpaint", f"--ckpt_path={ckpt}", f"--images={images}", "--mask=bottom",
                                     f"--out={tmp_path / 'out'}"]), capsys, "a.tiff", "mode F", folder=tmp_path)


def test_9_reports_and_defaults(trained_run, tmp_path, capsys):
    _, ckpt = trained_run
    cli_main(["likelihood", f"--ckpt_path={ckpt}", "--n=1", "--ode_steps=1", f"--out={tmp_path / 'one.json'}"])
    report = json.loads((tmp_path / "one.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert report["stderr"] is None and report["images"] == 1
    assert_refused(lambda: cli_main(["test", CONFIG, *TINY_MODEL_ARGS, f"--trainer.default_root_dir={tmp_path}"]),
                   capsys, "--ckpt_path", folder=tmp_path)
    assert_refused(lambda: cli_main(["inpaint", f"--ckpt_path={ckpt}", "--mask=bottom", "--guidance=1e308",
                                     f"--out={tmp_path / 'o'}"]), capsys, "--guidance", "1e+308", folder=tmp_path)
    # S_noise stays in its range however far the search steps
    settings = SamplerSettings(s_noise=1.4)
    for sign in (1, -1):
        s = settings
        while (step := moved(s, Move("s_noise", 0.5, "linear"), sign, 0)) is not None:
            s = step
        assert s.s_noise == RANGES["s_noise"][sign > 0]


# ------------------------------------------------------------------------------------------------ 10-14: tracebacks


def test_10_an_alias_bomb_ends_in_one_line_under_a_memory_limit(tmp_path):
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{b}: &{b} [*{a}, *{a}, *{a}, *{a}, *{a}, *{a}, *{a}, *{a}, *{a}, *{a}]\n" for a, b in zip("abcdefgh", "bcdefghi"))
    (tmp_path / "bomb.yaml").write_text(bomb + "model: {s_churn: *i}\n")  # 10**9 leaves in 12 lines
    limit = "import resource; resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30)); "
    for command in ("fit", "sample"):
        code = limit + f"from kve_lightning.cli import cli_main; cli_main([{command!r}, '--config', 'bomb.yaml'])"
        proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                              timeout=300)
        lines = [line for line in proc.stderr.splitlines() if "error:" in line]
        assert proc.returncode == 2 and len(lines) == 1 and "alias" in lines[0], proc.stderr[-2000:]
    assert resource.getrlimit(resource.RLIMIT_AS)[0] != 6 << 30  # the limit was the child's only


def test_11_a_snapshot_header_no_run_writes_is_refused_naming_the_file(phema_run, tmp_path, capsys):
    run, ckpt = phema_run
    folder = tmp_path / "snapshots"
    folder.mkdir()
    first = sorted((run / "phema").iterdir())[0]
    for step, std in ((0, 0.05), (4, 0.5)):
        bad = folder / f"phema-{step:09d}-{std:.4f}.safetensors"
        save_file(load_file(first), bad, metadata={"phema": json.dumps({"step": step, "std": std, "origin": 0})})
        assert_refused(lambda: cli_main(["phema", f"--snapshots={folder}", "--list=true"]), capsys, bad.name,
                       "impossible header")
        bad.unlink()


def test_12_kve_fit_on_a_weights_only_checkpoint_says_so(phema_run, tmp_path, capsys):
    run, ckpt = phema_run
    cli_main(["phema", f"--snapshots={run}", f"--ckpt_path={ckpt}", "--std=0.07", f"--out={tmp_path / 'w.ckpt'}"])
    root = tmp_path / "resume"
    root.mkdir()
    assert_refused(lambda: cli_main(["fit", CONFIG, *TINY_MODEL_ARGS, f"--ckpt_path={tmp_path / 'w.ckpt'}",
                                     f"--trainer.default_root_dir={root}"]), capsys, "weights only", "kve sample",
                   folder=root)
    assert not list(root.iterdir())


def test_13_likelihood_bounds_its_probes_and_steps(trained_run, tmp_path, capsys):
    _, ckpt = trained_run
    for flag in ("--probes=1000000000", "--ode_steps=1000000000"):
        assert_refused(lambda: cli_main(["likelihood", f"--ckpt_path={ckpt}", flag, f"--out={tmp_path / 'r.json'}"]),
                       capsys, flag.split("=")[0], folder=tmp_path)


def test_14_ctrl_c_in_the_first_arm_of_kve_tune_writes_nothing_and_says_so(trained_run, tmp_path):
    """A real SIGINT to a real process while its first (Table 5) arm samples."""
    _, ckpt = trained_run
    proc = subprocess.Popen([sys.executable, "-m", "kve_lightning", "tune", f"--ckpt_path={ckpt}", "--nfe=999",
                             "--n=64", "--batch_size=1", "--out=best.yaml"], cwd=tmp_path,
                            stderr=subprocess.PIPE, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
    err = ""
    deadline = time.monotonic() + 240
    while "arm:" not in err and time.monotonic() < deadline:  # the first arm's progress bar
        err += proc.stderr.read(1)
    assert "arm:" in err, err[-2000:]
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    rest = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, (err + rest)[-2000:]
    assert "interrupted during the first (Table 5) arm: no arm finished, nothing written" in rest
    assert "Traceback" not in err + rest and sorted(p.name for p in tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------ 15: clear errors


def test_15_messages_name_the_file_and_the_setting(trained_run, phema_run, tmp_path, capsys):
    _, ckpt = trained_run
    (tmp_path / "bad.yaml").write_text("model:\n  s_churn: [1\n")
    (tmp_path / "binary.yaml").write_bytes(bytes(range(256)))
    for name in ("bad.yaml", "binary.yaml"):
        for command in (["fit"], ["sample", f"--ckpt_path={ckpt}", f"--out={tmp_path / 'o'}"]):
            assert_refused(lambda: cli_main([*command, f"--config={tmp_path / name}"]), capsys, name,
                           folder=tmp_path)
    (tmp_path / "floats.yaml").write_text("model:\n  s_min: 1e-2\n  num_steps: 2\n")
    cli_main(["sample", f"--ckpt_path={ckpt}", f"--config={tmp_path / 'floats.yaml'}", "--seeds=0",
              f"--out={tmp_path / 'f'}"])
    assert json.loads((tmp_path / "f" / "manifest.json").read_text())["sampler"]["s_min"] == 0.01
    (tmp_path / "dir.png").mkdir()
    assert_refused(lambda: cli_main(["inpaint", f"--ckpt_path={ckpt}", f"--mask={tmp_path / 'dir.png'}",
                                     f"--out={tmp_path / 'o'}"]), capsys, "is a directory")
    assert_refused(lambda: cli_main(["fit", CONFIG, *TINY_MODEL_ARGS, "--model.phema_stds=[0.05]",
                                     "--model.phema_every_n_steps=0"]), capsys, "phema_every_n_steps=0")


def test_15_resuming_with_other_phema_stds_says_what_to_do(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli_main(["fit", *SHORT_FIT_ARGS, "--trainer.max_epochs=1", "--model.phema_stds=[0.05,0.1]",
              "--model.phema_every_n_steps=2"])
    assert_refused(lambda: cli_main(["fit", *SHORT_FIT_ARGS, "--trainer.max_epochs=2", "--ckpt_path=last",
                                     "--model.phema_stds=[0.07]"]), capsys, "tracked no post-hoc EMA of stds [0.07]",
                   "--model.phema_stds", code=2)


def test_15_a_dead_writers_temporary_file_is_cleaned(phema_run, tmp_path):
    run, ckpt = phema_run
    host = writer_id().rsplit("-", 1)[0]
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".o.ckpt.{host}-{dead.pid}.abc123.tmp"
    stale.write_bytes(b"half a checkpoint")
    cli_main(["phema", f"--snapshots={run}", f"--ckpt_path={ckpt}", "--std=0.07", f"--out={tmp_path / 'o.ckpt'}"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.ckpt"]
    assert folder_state(tmp_path)[tmp_path / "o.ckpt"] != b"half a checkpoint"


def test_7_a_checkpoint_that_tracked_no_post_hoc_ema_is_not_the_run_of_snapshots(phema_run, trained_run, tmp_path,
                                                                                  capsys):
    run, _ = phema_run
    _, other = trained_run  # the same architecture, trained without post-hoc EMA
    assert_refused(lambda: cli_main(["phema", f"--snapshots={run}", f"--ckpt_path={other}", "--std=0.07",
                                     f"--out={tmp_path / 'o.ckpt'}"]), capsys, "tracked no post-hoc EMA",
                   folder=tmp_path)


@pytest.mark.parametrize("command", ["sample", "likelihood", "tune"])
def test_1_a_url_is_no_checkpoint_in_any_subcommand(tmp_path, capsys, command):
    assert_refused(lambda: cli_main([command, "--ckpt_path=https://example.com/x.ckpt", f"--out={tmp_path / 'o'}"]),
                   capsys, "'https://example.com/x.ckpt'", "local files only", folder=tmp_path)
