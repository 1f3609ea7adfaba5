"""Hostile and careless use (a red team's findings): payload checkpoints from any path kind, --overwrite that must not
delete inputs, non-finite weights and settings, broken files in a sample folder, file modes, odd images."""

import http.server
import json
import os
import random
import shutil
import stat
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import REPO, TINY_MODEL_ARGS, assert_refused, export_script, sample_script
from kve_lightning.cli import cli_main
from kve_lightning.lit.data import ImageDataModule, parse_seeds
from kve_lightning.lit.module import KarrasVeModule
from kve_lightning.interop.pipeline import KarrasVeLightningPipeline

CONFIG = f"--config={REPO / 'configs' / 'digits.yaml'}"


@pytest.fixture(autouse=True)
def plain_argv(monkeypatch):
    """As a user runs it: no pytest arguments in sys.argv (LightningCLI warns when both it and args are given)."""
    monkeypatch.setattr("sys.argv", ["kve"])


class Payload:
    """Unpickled, it creates ``marker``: a stand-in for arbitrary code in a malicious checkpoint."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.makedirs, (str(self.marker),)


def payload_checkpoint(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": Payload(marker), "hyper_parameters": {}}, path)
    return path


def test_url_checkpoint_is_refused_before_any_request(tmp_path, capsys, monkeypatch):
    """A payload served on 127.0.0.1: `kve predict --ckpt_path http://...` refuses it without fetching it."""
    payload_checkpoint(tmp_path / "www" / "model.ckpt", tmp_path / "pwned")
    requests = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(tmp_path / "www"), **kwargs)

        def log_message(self, *args):
            requests.append(args)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.chdir(tmp_path)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/model.ckpt"
        for weights_only, needle in (([], "local checkpoint files only"),
                                     (["--weights_only=false"], "--weights_only false is refused")):
            assert_refused(lambda: cli_main(["predict", f"--ckpt_path={url}", "--out=out", *weights_only]),
                           capsys, "kve: error:", needle, folder=tmp_path)
    finally:
        server.shutdown()
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "out").exists() and requests == []


def test_planted_last_ckpt_is_refused_with_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    payload_checkpoint(tmp_path / "runs" / "digits" / "checkpoints" / "last.ckpt", tmp_path / "pwned")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    for sub in ("predict", "fit", "validate"):
        assert_refused(lambda: cli_main([sub, CONFIG, *TINY_MODEL_ARGS, "--ckpt_path=last"]), capsys,
                       "last.ckpt", "would unpickle os.makedirs", folder=tmp_path)
    assert not (tmp_path / "pwned").exists()
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # no stray version_0


def test_overwrite_replaces_an_earlier_export_only(trained_run, tmp_path, capsys, monkeypatch):
    root, ckpt = trained_run
    run = tmp_path / "run"
    shutil.copytree(root / "runs" / "digits", run)
    run_ckpt = run / "checkpoints" / "last.ckpt"
    monkeypatch.chdir(tmp_path)
    snapshot = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert_refused(lambda: export_script(["--ckpt_path", str(run_ckpt), "--out", str(run), "--overwrite", "true"]),
                   capsys, "holds the working directory or the checkpoint", folder=tmp_path)
    assert_refused(lambda: export_script(["--ckpt_path", str(ckpt), "--out", str(run), "--overwrite", "true"]),
                   capsys, "earlier export only", "checkpoints", folder=tmp_path)
    assert_refused(lambda: export_script(["--ckpt_path", str(ckpt), "--out", ".", "--overwrite", "true"]), capsys,
                   "working directory", folder=tmp_path)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == snapshot
    assert sorted(os.listdir(tmp_path)) == ["run"]  # no ..XXXX.old folder either
    export_script(["--ckpt_path", str(ckpt), "--out", "export"])
    export_script(["--ckpt_path", str(ckpt), "--out", "export", "--overwrite", "true",
                   "--model.num_steps", "3"])  # an export: replaced
    config = json.loads((tmp_path / "export" / "scheduler" / "scheduler_config.json").read_text())
    assert config["num_steps"] == 3 and sorted(os.listdir(tmp_path)) == ["export", "run"]


def test_non_finite_weights_and_settings_are_refused_naming_them(trained_run, tmp_path, capsys, monkeypatch):
    _, ckpt = trained_run
    monkeypatch.chdir(tmp_path)
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    name = next(k for k in checkpoint["state_dict"] if k.endswith("conv_in.weight"))
    checkpoint["state_dict"][name] = checkpoint["state_dict"][name].clone().fill_(float("nan"))
    torch.save(checkpoint, tmp_path / "nan.ckpt")
    assert_refused(lambda: sample_script(["--ckpt_path", "nan.ckpt", "--out", "out"]), capsys, "non-finite", name,
                   folder=tmp_path)
    assert_refused(lambda: cli_main(["predict", "--ckpt_path=nan.ckpt", "--out=out"]), capsys, name, folder=tmp_path)
    assert_refused(lambda: export_script(["--ckpt_path", "nan.ckpt", "--out", "export"]), capsys, name,
                   folder=tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["nan.ckpt"]

    export_script(["--ckpt_path", str(ckpt), "--out", "good"])
    weights = tmp_path / "good" / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    for broken, change in (("missing", lambda t: t.pop("conv_in.weight")),
                           ("nan", lambda t: t["conv_in.bias"].fill_(float("inf")))):
        shutil.copytree(tmp_path / "good", tmp_path / broken)
        changed = {k: v.clone() for k, v in tensors.items()}
        change(changed)
        save_file(changed, tmp_path / broken / "unet" / "diffusion_pytorch_model.safetensors")
        assert_refused(lambda: sample_script(["--pipeline", broken, "--out", "out"]), capsys, broken,
                       "conv_in.weight" if broken == "missing" else "conv_in.bias", folder=tmp_path)
    config_path = tmp_path / "good" / "scheduler" / "scheduler_config.json"
    config_path.write_text(config_path.read_text().replace('"s_churn": 80.0', '"s_churn": NaN'))
    with pytest.raises(ValueError, match="s_churn=nan"):
        KarrasVeLightningPipeline.from_pretrained(tmp_path / "good")
    assert not (tmp_path / "out").exists()


def test_broken_pngs_in_a_sample_folder_are_sampled_again(trained_run, tmp_path):
    _, ckpt = trained_run
    args = ["--ckpt_path", str(ckpt), "--seeds", "0-4", "--grid", "true"]
    sample_script([*args, "--out", str(tmp_path / "whole")])
    sample_script([*args, "--out", str(tmp_path / "broken")])
    (tmp_path / "broken" / "000001.png").write_bytes(b"")
    good = (tmp_path / "whole" / "000002.png").read_bytes()
    (tmp_path / "broken" / "000002.png").write_bytes(good[: len(good) // 2])
    Image.new("RGB", (8, 8)).save(tmp_path / "broken" / "000003.png")  # another mode
    sample_script([*args, "--out", str(tmp_path / "broken")])
    whole, broken = ({p.name: p.read_bytes() for p in (tmp_path / d).iterdir()} for d in ("whole", "broken"))
    assert broken == whole


def test_written_files_follow_the_umask(trained_run, tmp_path):
    _, ckpt = trained_run
    old = os.umask(0o022)
    try:
        sample_script(["--ckpt_path", str(ckpt), "--seeds", "0", "--grid", "true", "--out", str(tmp_path / "s")])
        export_script(["--ckpt_path", str(ckpt), "--out", str(tmp_path / "e")])
    finally:
        os.umask(old)
    for path in [*(tmp_path / "s").iterdir(), *(tmp_path / "e").rglob("*"), tmp_path / "e"]:
        expected = 0o755 if path.is_dir() else 0o644
        assert stat.S_IMODE(path.stat().st_mode) == expected, path


def test_folder_images_of_every_depth_and_mode_load_as_their_values(tmp_path):
    """16-bit grayscale scaled by its bit depth (not clipped to white), RGBA and palette images by their colours."""
    levels = np.linspace(0, 1, 64).reshape(8, 8)
    Image.fromarray((levels * 65535).round().astype(np.uint16)).save(tmp_path / "a16.png")
    Image.fromarray((levels * 255).round().astype(np.uint8)).save(tmp_path / "b8.png")
    Image.fromarray((levels * 255).round().astype(np.uint8)).convert("RGBA").save(tmp_path / "c_rgba.png")
    Image.fromarray((levels * 255).round().astype(np.uint8)).convert("P").save(tmp_path / "d_palette.png")
    assert Image.open(tmp_path / "a16.png").mode.startswith("I")
    data = ImageDataModule(dataset="folder", root=str(tmp_path), image_size=8, channels=1)
    images = [data.full_dataset()[i][0] for i in range(4)]
    expected = torch.from_numpy(levels).float()[None] * 2 - 1
    for image in images:  # 8-bit rounding: within half a level of 2 / 255
        torch.testing.assert_close(image, expected, rtol=0, atol=1 / 255 + 1e-6)


def test_divergence_is_one_line_and_exit_code_3(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert_refused(lambda: cli_main(["fit", CONFIG, *TINY_MODEL_ARGS, "--model.lr=1e10", "--model.warmup_steps=0",
                                     "--model.max_bad_steps=2", "--trainer.max_steps=20",
                                     "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false"]),
                   capsys, "FloatingPointError", "max_bad_steps=2", code=3)


def test_shipped_configs_train_without_a_logger(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli_main(["fit", CONFIG, *TINY_MODEL_ARGS, "--trainer.logger=false", "--trainer.fast_dev_run=1"])


def test_seed_and_step_counts_are_bounded_before_any_allocation(capsys, tmp_path, trained_run):
    _, ckpt = trained_run
    with pytest.raises(ValueError, match="more than 1,000,000 seeds"):
        parse_seeds("0-100000000")
    assert_refused(lambda: sample_script(["--ckpt_path", str(ckpt), "--out", str(tmp_path / "o"), "--seeds",
                                          "0-100000000"]), capsys, "1,000,000", folder=tmp_path)
    assert_refused(lambda: sample_script(["--ckpt_path", str(ckpt), "--out", str(tmp_path / "o"), "--model.num_steps",
                                          "1000000000000"]), capsys, "num_steps=1000000000000", folder=tmp_path)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flags, needles", [
    (["--device", "bogus"], ["'bogus'", "not a torch device"]),
    (["--device", "cuda:7"], ["'cuda:7'", "not available"]),
    (["--grid", "true"], ["grid.png", "is a directory"]),
])
def test_sample_refuses_bad_devices_and_a_grid_folder(trained_run, tmp_path, capsys, flags, needles):
    _, ckpt = trained_run
    (tmp_path / "out" / "grid.png").mkdir(parents=True)
    assert_refused(lambda: sample_script(["--ckpt_path", str(ckpt), "--out", str(tmp_path / "out"), "--seeds", "0",
                                          *flags]), capsys, *needles, folder=tmp_path)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["grid.png"]


def test_messages_say_what_is_wrong_with_a_path(trained_run, tmp_path, capsys):
    _, ckpt = trained_run
    (tmp_path / "empty.ckpt").write_bytes(b"")
    assert_refused(lambda: sample_script(["--ckpt_path", str(tmp_path / "empty.ckpt"), "--out", str(tmp_path / "o")]),
                   capsys, "not a readable checkpoint: ", "Error", folder=tmp_path)
    assert_refused(lambda: sample_script(["--pipeline", str(ckpt), "--out", str(tmp_path / "o")]), capsys, "is a file",
                   folder=tmp_path)
    assert_refused(lambda: sample_script(["--ckpt_path", str(tmp_path), "--out", str(tmp_path / "o")]), capsys,
                   "is a directory", folder=tmp_path)


def test_cleanup_deletes_only_temporaries_of_dead_writers(tmp_path):
    from kve_lightning.storage import open_sample_folder, writer_id

    host = writer_id().rsplit("-", 1)[0]
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    names = {"alive": f".000001.png.{host}-{live.pid}.abc123.tmp", "dead": f".000002.png.{host}-{dead.pid}.abc123.tmp",
             "remote": f".000003.png.otherhost-{dead.pid}.abc123.tmp", "anonymous": ".000004.png.k1ll3d_x.tmp"}
    try:
        for name in names.values():
            (tmp_path / name).write_bytes(b"\x89PNG")
        open_sample_folder(tmp_path, {"kve_lightning_samples": 1})
        left = {p.name for p in tmp_path.iterdir()}
    finally:
        live.kill()
        live.wait()
    assert left == {names["alive"], names["remote"], "manifest.json"}


@pytest.mark.parametrize("same", [True, False], ids=["same settings", "other settings"])
def test_two_processes_racing_on_one_folder(trained_run, tmp_path, same):
    """Two `kve sample` processes started together on one new folder: with the same settings both finish and the
    folder is a clean run's; with other settings exactly one wins, the other is refused, and the folder is the
    winner's alone."""
    _, ckpt = trained_run
    command = [shutil.which("kve"), "sample", "--ckpt_path", str(ckpt), "--seeds", "0-15", "--batch_size", "4"]
    flags = [["--model.num_steps", "3"], ["--model.num_steps", "3" if same else "2"]]
    procs = [subprocess.Popen([*command, *f, "--out", str(tmp_path / "race")], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for f in flags]
    codes = [p.wait(timeout=300) for p in procs]
    errors = [p.stderr.read() for p in procs]
    assert sorted(codes) == ([0, 0] if same else [0, 2]), errors
    winner = flags[codes.index(0)]
    sample_script(["--ckpt_path", str(ckpt), "--seeds", "0-15", *winner, "--out", str(tmp_path / "clean")])
    race, clean = ({p.name: p.read_bytes() for p in (tmp_path / d).iterdir()} for d in ("race", "clean"))
    assert race == clean


def test_a_seeds_image_does_not_depend_on_its_batch(trained_run):
    """Property: over random batch sizes (1 to 40) and neighbours, every seed's image equals its image sampled
    alone, bit for bit (the UNet runs on padded micro-batches of the checkpoint's micro_batch = 64 rows)."""
    _, ckpt = trained_run
    module = KarrasVeModule.from_checkpoint(ckpt)
    assert module.sampler.micro_batch == 64
    rng = random.Random(0)
    alone: dict[int, torch.Tensor] = {}
    for _ in range(25):
        seeds = rng.sample(range(200), rng.randint(1, 150))
        images = module.sample(seeds)
        for seed, image in zip(seeds, images):
            if seed not in alone and len(alone) < 12:
                alone[seed] = module.sample([seed])[0]
            if seed in alone:
                assert torch.equal(image, alone[seed]), (seed, len(seeds))
    assert len(alone) == 12


def test_an_export_naming_another_scheduler_is_refused_before_writing(trained_run, tmp_path, capsys):
    _, ckpt = trained_run
    export_script(["--ckpt_path", str(ckpt), "--out", str(tmp_path / "e")])
    index = tmp_path / "e" / "model_index.json"
    index.write_text(json.dumps(json.loads(index.read_text()) | {"scheduler": ["diffusers", "DDPMScheduler"]}))
    (tmp_path / "e" / "scheduler" / "scheduler_config.json").write_text('{"_class_name": "DDPMScheduler"}')
    assert_refused(lambda: sample_script(["--pipeline", str(tmp_path / "e"), "--out", str(tmp_path / "o")]), capsys,
                   "DDPMScheduler", folder=tmp_path)
    assert not (tmp_path / "o").exists()


def test_a_dangling_manifest_link_is_not_a_missing_manifest(trained_run, tmp_path, capsys):
    _, ckpt = trained_run
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "manifest.json").symlink_to(tmp_path / "nowhere.json")
    assert_refused(lambda: sample_script(["--ckpt_path", str(ckpt), "--out", str(tmp_path / "out"), "--seeds", "0"]),
                   capsys, "manifest.json", "cannot read", folder=tmp_path)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["manifest.json"]


def test_ckpt_path_best_needs_a_monitored_metric(trained_run, capsys, tmp_path, monkeypatch):
    root, _ = trained_run
    monkeypatch.chdir(tmp_path)
    assert_refused(lambda: cli_main(["predict", CONFIG, *TINY_MODEL_ARGS, "--ckpt_path=best",
                                     f"--trainer.default_root_dir={root / 'runs' / 'digits'}", "--out=out"]),
                   capsys, "--ckpt_path best", "monitors a metric", folder=tmp_path)
    assert list(tmp_path.iterdir()) == []
