"""One `kve`: every subcommand's help and vocabulary, config files, the layers' imports, the evaluation callbacks'
weights, the model's own noise range, EDM's conventions (latents, S_tmax = inf) and older checkpoints."""

import inspect
import io
import json
import math
import subprocess
import sys
from importlib import import_module
from pathlib import Path

import docstring_parser
import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import REPO, TINY_MODEL_ARGS, assert_refused
from kve_lightning.cli import COMMANDS, cli_main
from kve_lightning.exact import GaussianMixture
from kve_lightning.lit.callbacks import SampleGrid
from kve_lightning.lit.module import KarrasVeModule
from kve_lightning.sampling import SamplerSettings, randn_per_row, sample_karras_ve

CONFIG = f"--config={REPO / 'configs' / 'digits.yaml'}"


def help_text(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli_main([*args, "--help"])
    assert exit_info.value.code == 0
    return " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_subcommand_lists_its_options_with_their_descriptions(command, capsys):
    text = help_text(capsys, command)
    run = import_module(f"kve_lightning.cli.{command}").run
    docs = {p.arg_name: " ".join(p.description.split()) for p in docstring_parser.parse(run.__doc__).params}
    for name, parameter in inspect.signature(run).parameters.items():
        if name == "model":  # the sampler settings, one flag each
            settings_docs = docstring_parser.parse(SamplerSettings.__doc__).params
            for p in settings_docs:
                assert f"--model.{p.arg_name} " in text and " ".join(p.description.split())[:40] in text, p.arg_name
        elif name == "data":
            assert "--data.dataset " in text and "--data.split_seed " in text
        else:
            assert f"--{name} " in text, name
            assert docs[name][:40] in text, (name, docs[name])
    assert "--config " in text and "--print_config" in text


def test_kve_help_lists_every_subcommand(capsys):
    text = help_text(capsys)
    for command in ("fit", "validate", "test", "predict", *COMMANDS):
        assert command in text
    fit = help_text(capsys, "fit")
    for flag in ("--seeds", "--out", "--sample_grid.size", "--inpaint_grid.images", "--fid.every_n_epochs",
                 "--bpd.every_n_epochs", "--model.train_sigma_max", "--model.extrapolate"):
        assert flag in fit, flag


def test_kve_sample_takes_kve_tune_output_and_kve_fit_configs(trained_run, tmp_path):
    _, ckpt = trained_run
    best = tmp_path / "best.yaml"
    best.write_text("# kve tune: ...\nmodel:\n  num_steps: 3\n  s_churn: 1.5\n  s_noise: 0.9\n")
    cli_main(["sample", f"--ckpt_path={ckpt}", f"--config={best}", "--seeds=0-1", f"--out={tmp_path / 'tuned'}"])
    manifest = json.loads((tmp_path / "tuned" / "manifest.json").read_text())
    assert manifest["sampler"]["num_steps"] == 3 and manifest["sampler"]["s_noise"] == 0.9
    # a kve fit config: its sampler settings (18 steps, its S_tmin and S_noise) and its seeds; sigma_max: auto
    # means the checkpoint's, its training settings and other sections are not sampling's
    cli_main(["sample", f"--ckpt_path={ckpt}", CONFIG, "--seeds=0", f"--out={tmp_path / 'fit'}"])
    sampler = json.loads((tmp_path / "fit" / "manifest.json").read_text())["sampler"]
    fit = yaml.safe_load((REPO / "configs" / "digits.yaml").read_text())["model"]
    names = ("num_steps", "s_min", "s_noise", "clamp_denoised")
    assert [sampler[k] for k in names] == [fit[k] for k in names]
    assert sampler["sigma_max"] == KarrasVeModule.from_checkpoint(ckpt).sampler.sigma_max
    assert sorted(p.name for p in (tmp_path / "fit").iterdir()) == ["000000.png", "grid.png", "manifest.json"]
    # a VE model's manifest is that of earlier versions: their folders resume (extrapolate changes no image)
    manifest = json.loads((tmp_path / "fit" / "manifest.json").read_text())
    assert "precond" not in manifest and "extrapolate" not in manifest["sampler"]
    # the other subcommands read the same config without kve predict's seeds and out
    cli_main(["export", f"--ckpt_path={ckpt}", CONFIG, f"--out={tmp_path / 'export'}"])
    assert json.loads((tmp_path / "export" / "scheduler" / "scheduler_config.json").read_text())["s_noise"] == \
        fit["s_noise"]


@pytest.mark.parametrize("text, needle", [
    ("model:\n  bogus: 1\n", "bogus"),
    ("bogus: 1\n", "bogus"),
    ("model:\n  num_steps: 3\n  num_steps: 4\n", "num_steps"),
])
def test_a_config_key_no_subcommand_knows_is_refused(trained_run, tmp_path, capsys, text, needle):
    _, ckpt = trained_run
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    out = tmp_path / "out"
    assert_refused(lambda: cli_main(["sample", f"--ckpt_path={ckpt}", f"--config={config}", f"--out={out}"]),
                   capsys, needle, folder=tmp_path)
    assert not out.exists()


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_an_unknown_option_is_refused_in_one_line(command, tmp_path, capsys):
    line = assert_refused(lambda: cli_main([command, "--no_such_option=1", f"--out={tmp_path / 'o'}"]), capsys,
                          "--no_such_option", folder=tmp_path)
    assert line.startswith(f"kve {command}: error:")


def test_the_sampler_imports_no_framework():
    code = ("import sys; import kve_lightning.sampling; from kve_lightning import sample_karras_ve; "
            "print(sorted(m for m in ('lightning', 'diffusers', 'torchmetrics', 'pytorch_lightning') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    # the lazy names still resolve
    import kve_lightning

    assert kve_lightning.KarrasVeModule is KarrasVeModule


def grid_uint8(grid: torch.Tensor) -> np.ndarray:
    """TensorBoard's conversion of an add_image float tensor in [0, 1]: scaled by 255 and truncated."""
    return (grid.permute(1, 2, 0).numpy() * 255).clip(0, 255).astype(np.uint8)


def logged_grid(root: Path) -> tuple[int, np.ndarray]:
    """The step and the pixels [H, W, 3] of the last ``samples/grid`` in the run's TensorBoard events."""
    events = sorted(root.rglob("events.out.tfevents.*"))
    image = EventAccumulator(str(events[-1].parent), size_guidance={"images": 0}).Reload().Images("samples/grid")[-1]
    return image.step, np.array(Image.open(io.BytesIO(image.encoded_image_string)).convert("RGB"))


def test_the_logged_grid_is_the_ema_weights_of_the_checkpoint(tmp_path):
    """The grid validation logs at step s equals sampling the checkpoint written at step s (its state_dict holds the
    EMA weights), and differs from the raw weights' grid, so the test tells the two apart."""
    root = tmp_path / "run"
    cli_main(["fit", CONFIG, *TINY_MODEL_ARGS, "--sample_grid.size=4", "--inpaint_grid.images=0",
              "--model.ema_decay=0.9", "--model.ema_warmup=1", "--trainer.max_epochs=1",
              "--trainer.limit_train_batches=5", "--trainer.limit_val_batches=1", "--trainer.check_val_every_n_epoch=1",
              "--trainer.num_sanity_val_steps=0", "--trainer.enable_progress_bar=false",
              f"--trainer.default_root_dir={root}", "--data.batch_size=16"])
    ckpt = root / "checkpoints" / "last.ckpt"
    step, logged = logged_grid(root)
    checkpoint = torch.load(ckpt, weights_only=True)
    assert checkpoint["global_step"] == step == 5
    grid = SampleGrid(size=4, trajectory_rows=2, trajectory_cols=3)
    module = KarrasVeModule.from_checkpoint(ckpt)
    assert np.array_equal(grid_uint8(grid.images(module)[0]), logged)
    module.load_state_dict(checkpoint["current_model_state"])  # the raw weights WeightAveraging keeps beside them
    assert not np.array_equal(grid_uint8(grid.images(module)[0]), logged)


def test_sampling_outside_the_trained_noise_range_is_refused(trained_run, tmp_path, capsys):
    _, ckpt = trained_run
    trained = KarrasVeModule.from_checkpoint(ckpt).train_sigmas
    for flag in ("--model.sigma_max=200", "--model.sigma_min=0.001"):
        for command in ("sample", "export", "inpaint", "tune"):
            extra = ["--mask=bottom", "--n=1"] if command == "inpaint" else []
            line = assert_refused(lambda: cli_main([command, f"--ckpt_path={ckpt}", flag, *extra,
                                                    f"--out={tmp_path / 'o'}"]), capsys, "trained range",
                                  f"{trained[1]:g}", folder=tmp_path)
            assert flag.split("=")[1] in line
        assert_refused(lambda: cli_main(["predict", f"--ckpt_path={ckpt}", flag, f"--out={tmp_path / 'o'}"]),
                       capsys, "trained range", folder=tmp_path)
    # said explicitly, it samples there
    cli_main(["sample", f"--ckpt_path={ckpt}", "--model.sigma_max=200", "--model.extrapolate=true",
              "--model.num_steps=2", "--seeds=0", f"--out={tmp_path / 'far'}"])
    assert (tmp_path / "far" / "000000.png").is_file()


def test_resuming_keeps_the_training_range_and_refuses_to_move_it(trained_run, tmp_path, capsys):
    _, ckpt = trained_run
    trained = KarrasVeModule.from_checkpoint(ckpt).train_sigmas
    args = ["fit", CONFIG, *TINY_MODEL_ARGS, f"--ckpt_path={ckpt}", f"--trainer.default_root_dir={tmp_path}",
            "--trainer.enable_progress_bar=false", "--trainer.limit_val_batches=0"]
    assert_refused(lambda: cli_main([*args, "--model.train_sigma_max=50"]), capsys, "train_sigma_max=50.0",
                   "checkpoint", folder=tmp_path)
    # a sampler range inside the trained one is a sampling setting: training goes on over the checkpoint's range
    cli_main([*args, "--model.sigma_max=5", "--trainer.max_steps=8", "--trainer.limit_train_batches=8"])
    resumed = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["hyper_parameters"]
    assert (resumed["train_sigma_min"], resumed["train_sigma_max"]) == trained and resumed["sigma_max"] == 5


def strict_json(path: Path):
    def refuse(name):
        raise AssertionError(f"{path} holds {name}: not strict JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


def test_an_infinite_s_max_round_trips_through_manifest_and_export(trained_run, tmp_path):
    _, ckpt = trained_run
    assert SamplerSettings(s_max="inf", s_min=0).s_max == math.inf
    common = ["--model.s_max=inf", "--model.s_min=0", "--model.num_steps=3", "--seeds=0-1"]
    cli_main(["sample", f"--ckpt_path={ckpt}", *common, f"--out={tmp_path / 's'}"])
    assert strict_json(tmp_path / "s" / "manifest.json")["sampler"]["s_max"] == "inf"
    cli_main(["sample", f"--ckpt_path={ckpt}", *common, f"--out={tmp_path / 's'}"])  # the same settings: accepted
    cli_main(["export", f"--ckpt_path={ckpt}", "--model.s_max=inf", f"--out={tmp_path / 'e'}"])
    assert strict_json(tmp_path / "e" / "scheduler" / "scheduler_config.json")["s_max"] == "inf"
    cli_main(["sample", f"--pipeline={tmp_path / 'e'}", *common[1:], f"--out={tmp_path / 'p'}"])
    for name in ("000000.png", "000001.png"):
        assert (tmp_path / "s" / name).read_bytes() == (tmp_path / "p" / name).read_bytes()


def edm_sampler(net, latents, randn_like, num_steps, sigma_min, sigma_max, rho, S_churn, S_min, S_max, S_noise):
    """NVlabs/edm generate.py's ``edm_sampler`` as its authors wrote it (their net's round_sigma is the identity
    here), the reference for ``sample_karras_ve``'s latents and schedule."""
    step_indices = torch.arange(num_steps, dtype=torch.float64)
    t_steps = (sigma_max ** (1 / rho) + step_indices / (num_steps - 1)
               * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    t_steps = torch.cat([t_steps, torch.zeros_like(t_steps[:1])])
    x_next = latents.to(torch.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        gamma = min(S_churn / num_steps, np.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0
        t_hat = t_cur + gamma * t_cur
        x_hat = x_cur + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * randn_like(x_cur)
        denoised = net(x_hat, t_hat).to(torch.float64)
        d_cur = (x_hat - denoised) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        if i < num_steps - 1:
            denoised = net(x_next, t_next).to(torch.float64)
            d_prime = (x_next - denoised) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


@pytest.mark.parametrize("s_churn, s_max", [(0.0, math.inf), (40.0, math.inf), (40.0, 1.0)])
def test_latents_are_unit_noise_as_in_edm_sampler(s_churn, s_max):
    """The same unit latents and per-seed noise give EDM's samples to float64 rounding, on an exact mixture."""
    gm = GaussianMixture([0.3, 0.7], torch.tensor([[-1.0, 0.5], [0.8, -0.2]]), [0.1, 0.3])
    seeds = [3, 7, 11]
    settings = dict(num_steps=12, sigma_min=0.02, sigma_max=20.0, rho=7.0, s_churn=s_churn, s_min=0.0, s_max=s_max,
                    s_noise=1.007)

    def draws():  # EDM's StackedRandomGenerator: latents first, then one noise tensor per step, per seed
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        return gens, randn_per_row((len(seeds), 2), gens, "cpu", torch.float64)

    gens, latents = draws()
    ours = sample_karras_ve(gm.denoiser, latents.shape, schedule="edm", generator=gens, latents=latents, **settings)
    gens, latents = draws()
    theirs = edm_sampler(lambda x, t: gm.denoiser(x, t.expand(x.shape[0])), latents,
                         lambda x: randn_per_row(x.shape, gens, "cpu", torch.float64), num_steps=12, sigma_min=0.02,
                         sigma_max=20.0, rho=7.0, S_churn=s_churn, S_min=0.0, S_max=s_max, S_noise=1.007)
    assert torch.allclose(ours, theirs, rtol=1e-12, atol=1e-12), (ours - theirs).abs().max()


def test_a_checkpoint_of_before_this_layout_loads_and_samples_alike(trained_run, tmp_path):
    """Older checkpoints held the evaluators' settings as hyper-parameters and no training range of their own."""
    _, ckpt = trained_run
    checkpoint = torch.load(ckpt, weights_only=True)
    hparams = checkpoint["hyper_parameters"]
    old = {k: v for k, v in hparams.items() if not k.startswith("train_sigma") and k != "extrapolate"}
    old |= {"grid_size": 4, "grid_seed": 0, "trajectory_rows": 2, "trajectory_cols": 3, "inpaint_grid_images": 8,
            "fid_every_n_epochs": 0, "fid_num_samples": 1000, "fid_features": "digits", "bpd_every_n_epochs": 0,
            "bpd_num_images": 64}
    torch.save(checkpoint | {"hyper_parameters": old}, tmp_path / "old.ckpt")
    module = KarrasVeModule.from_checkpoint(tmp_path / "old.ckpt")
    assert module.train_sigmas == (hparams["sigma_min"], hparams["sigma_max"])
    assert torch.equal(module.sample([0, 1]), KarrasVeModule.from_checkpoint(ckpt).sample([0, 1]))
    cli_main(["sample", f"--ckpt_path={tmp_path / 'old.ckpt'}", "--seeds=0", f"--out={tmp_path / 'o'}"])
    cli_main(["sample", f"--ckpt_path={ckpt}", "--seeds=0", f"--out={tmp_path / 'n'}"])
    assert (tmp_path / "o" / "000000.png").read_bytes() == (tmp_path / "n" / "000000.png").read_bytes()
