"""Training objectives of EDM's design space: the EDM preconditioning against exact math, the loss against EDM's
`EDMLoss` formula, sigma_data auto, and an EDM-objective model through every path that works off D(x; sigma)."""

import json
import logging
import math
from types import SimpleNamespace

import pytest
import torch

from conftest import SHORT_FIT_ARGS, assert_refused
from kve_lightning.cli import cli_main
from kve_lightning.denoiser import VEDenoiser, dsm_loss, sample_sigmas
from kve_lightning.lit.data import ImageDataModule
from kve_lightning.lit.module import KarrasVeModule
from kve_lightning.sampling import SOLVERS

MU, S, SIGMA_D = 0.3, 0.6, 0.75


def exact_denoiser(x, sigma):
    """E[y | y + sigma n = x] for y ~ N(MU, S^2 I)."""
    return MU + S**2 / (S**2 + sigma**2) * (x - MU)


class OptimalF(torch.nn.Module):
    """A stand-in UNet whose output makes D exact: given the network input c_in x (in diffusers' [0, 1] convention)
    and the timestep sigma / 2, it returns the F that EDM's Table 1 formulas, written out here, make optimal,
    divided by the timestep as a Fourier UNet's output is."""

    config = {"time_embedding_type": "fourier"}

    def __init__(self, precond):
        super().__init__()
        self.precond = precond

    def forward(self, u, t):
        sigma = (2 * t).reshape(-1, 1, 1, 1)
        net_input = 2 * u - 1  # what center_input_sample makes of it
        if self.precond == "ve":  # c_skip = 1, c_out = sigma, c_in = 1
            x = net_input
            F = (exact_denoiser(x, sigma) - x) / sigma
        else:  # c_in = 1 / sqrt(sigma^2 + sigma_d^2), c_skip = sigma_d^2 / (...), c_out = sigma sigma_d / sqrt(...)
            x = net_input * (sigma**2 + SIGMA_D**2).sqrt()
            c_skip = SIGMA_D**2 / (sigma**2 + SIGMA_D**2)
            c_out = sigma * SIGMA_D / (sigma**2 + SIGMA_D**2).sqrt()
            F = (exact_denoiser(x, sigma) - c_skip * x) / c_out
        return SimpleNamespace(sample=F / t.reshape(-1, 1, 1, 1))


@pytest.mark.parametrize("precond", ["ve", "edm"])
def test_the_optimal_f_of_each_preconditioning_gives_the_exact_posterior_mean(precond):
    """Both preconditionings recover D(x; sigma) = the exact posterior mean from their optimal F, to float64
    rounding, over sigma from 0.002 to 80."""
    torch.manual_seed(0)
    x = torch.randn(16, 1, 4, 4, dtype=torch.float64) * 3
    sigma = torch.logspace(math.log10(0.002), math.log10(80), 16, dtype=torch.float64)
    D = VEDenoiser(OptimalF(precond), precond, SIGMA_D)(x, sigma)
    torch.testing.assert_close(D, exact_denoiser(x, sigma.reshape(-1, 1, 1, 1)), rtol=1e-10, atol=1e-10)


def test_the_loss_is_edms_edmloss_on_the_same_draws():
    """training_step's draws (global generator: ln sigma ~ N(P_mean, P_std^2), then the noise) and EDM's
    `EDMLoss.__call__` written out on the same draws: the same per-sample loss (mean over elements)."""
    module = KarrasVeModule(image_size=8, precond="edm", sigma_data=SIGMA_D, sigma_dist="log_normal",
                            loss_weight="edm", p_mean=-1.2, p_std=1.2, micro_batch=0)
    y = torch.rand(6, 1, 8, 8) * 2 - 1
    torch.manual_seed(3)
    sigma = sample_sigmas(6, "cpu", "log_normal", (0.02, 80), -1.2, 1.2)
    ours = dsm_loss(module.denoiser, y, sigma, torch.randn_like(y), "edm", SIGMA_D)
    torch.manual_seed(3)  # EDMLoss: rnd_normal, sigma, weight, n, D_yn, loss
    rnd_normal = torch.randn([y.shape[0], 1, 1, 1])
    sigma_ref = (rnd_normal * 1.2 + -1.2).exp()
    weight = (sigma_ref**2 + SIGMA_D**2) / (sigma_ref * SIGMA_D) ** 2
    n = torch.randn_like(y) * sigma_ref
    D_yn = module.denoiser(y + n, sigma_ref.flatten())
    theirs = (weight * ((D_yn - y) ** 2)).flatten(1).mean(1)
    torch.testing.assert_close(sigma, sigma_ref.flatten())
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_sigma_data_auto_is_the_training_splits_std_and_bad_values_are_refused(tmp_path, capsys):
    root = tmp_path / "run"
    cli_main(["fit", *SHORT_FIT_ARGS, "--trainer.max_steps=1", "--trainer.max_epochs=1", "--model.precond=edm",
              "--model.sigma_data=auto", f"--trainer.default_root_dir={root}"])
    hparams = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)["hyper_parameters"]
    assert hparams["sigma_data"] == pytest.approx(ImageDataModule().data_std(), rel=1e-12)
    assert "kve: sigma_data auto = 0.75" in capsys.readouterr().err
    for flag, needle in (("--model.sigma_data=-1", "sigma_data"), ("--model.precond=vp", "precond"),
                         ("--model.sigma_dist=uniform", "sigma_dist"), ("--model.p_std=0", "p_std")):
        assert_refused(lambda: cli_main(["fit", *SHORT_FIT_ARGS, flag, f"--trainer.default_root_dir={tmp_path / 'x'}"]),
                       capsys, needle)


@pytest.fixture(scope="module")
def edm_run(tmp_path_factory):
    """A few steps of the EDM objective: (root, checkpoint)."""
    root = tmp_path_factory.mktemp("edm")
    cli_main(["fit", *SHORT_FIT_ARGS, "--trainer.max_steps=3", "--trainer.max_epochs=1", "--model.precond=edm",
              "--model.sigma_data=0.75", "--model.sigma_dist=log_normal", "--model.loss_weight=edm",
              f"--trainer.default_root_dir={root}"])
    return root, root / "checkpoints" / "last.ckpt"


def pngs(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


def test_an_edm_checkpoint_samples_alike_from_predict_sample_and_its_export(edm_run, tmp_path):
    _, ckpt = edm_run
    module = KarrasVeModule.from_checkpoint(ckpt)
    assert (module.denoiser.precond, module.denoiser.sigma_data) == ("edm", 0.75)
    flags = ["--seeds=0-2", "--model.num_steps=3"]
    cli_main(["sample", f"--ckpt_path={ckpt}", *flags, f"--out={tmp_path / 'sample'}"])
    cli_main(["predict", f"--ckpt_path={ckpt}", *flags, f"--out={tmp_path / 'predict'}"])
    cli_main(["export", f"--ckpt_path={ckpt}", f"--out={tmp_path / 'export'}"])
    cli_main(["sample", f"--pipeline={tmp_path / 'export'}", *flags, f"--out={tmp_path / 'pipeline'}"])
    assert len(pngs(tmp_path / "sample")) == 4  # 3 seeds and the grid
    assert pngs(tmp_path / "sample") == pngs(tmp_path / "predict") == pngs(tmp_path / "pipeline")
    config = json.loads((tmp_path / "export" / "scheduler" / "scheduler_config.json").read_text())
    assert (config["precond"], config["sigma_data"]) == ("edm", 0.75)
    manifest = json.loads((tmp_path / "sample" / "manifest.json").read_text())
    assert (manifest["precond"], manifest["sigma_data"]) == ("edm", 0.75)
    # the same weights read as the VE preconditioning give other images: the preconditioning is part of them
    ve = KarrasVeModule.from_checkpoint(ckpt)
    ve.denoiser.precond = "ve"
    assert not torch.equal(ve.sample([0], num_steps=3), module.sample([0], num_steps=3))


def test_likelihood_and_inpainting_work_off_the_edm_denoiser(edm_run, tmp_path):
    _, ckpt = edm_run
    cli_main(["likelihood", f"--ckpt_path={ckpt}", "--n=2", "--ode_steps=2", f"--out={tmp_path / 'r.json'}"])
    assert math.isfinite(json.loads((tmp_path / "r.json").read_text())["bits_per_dim"])
    cli_main(["inpaint", f"--ckpt_path={ckpt}", "--n=1", "--seeds=0", "--mask=bottom", "--model.num_steps=3",
              f"--out={tmp_path / 'i'}"])
    assert (tmp_path / "i" / "00000_000000.png").is_file()


def test_an_edm_export_explains_itself_to_diffusers_karras_ve_pipeline(edm_run, trained_run, tmp_path, capfd):
    """diffusers' KarrasVePipeline assumes D = x + sigma F: an EDM export says so at export and when its UNet is
    loaded by diffusers (a one-line warning naming the fix), but not when our pipeline loads it; VE exports are as
    before."""
    from diffusers import UNet2DModel

    from kve_lightning.interop.pipeline import KarrasVeLightningPipeline

    _, ckpt = edm_run
    cli_main(["export", f"--ckpt_path={ckpt}", f"--out={tmp_path / 'edm'}"])
    assert "note: EDM preconditioning (sigma_data 0.75): diffusers' KarrasVePipeline" in capfd.readouterr().err
    records = []  # diffusers' own handler writes to the stderr of when it was made: listen to its logger instead
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("diffusers.configuration_utils")
    logger.addHandler(handler)
    try:
        UNet2DModel.from_pretrained(tmp_path / "edm" / "unet")
        warning = [line for line in records if "kve_preconditioning" in line]
        assert len(warning) == 1 and "\n" not in warning[0]
        assert "samples this UNet wrongly" in warning[0] and "KarrasVeLightningPipeline" in warning[0]
        records.clear()
        KarrasVeLightningPipeline.from_pretrained(tmp_path / "edm")
        assert not any("kve_preconditioning" in line for line in records)
    finally:
        logger.removeHandler(handler)
    _, ve_ckpt = trained_run
    cli_main(["export", f"--ckpt_path={ve_ckpt}", f"--out={tmp_path / 've'}"])
    assert "note:" not in capfd.readouterr().err
    assert "kve_preconditioning" not in json.loads((tmp_path / "ve" / "unet" / "config.json").read_text())


@pytest.mark.parametrize("solver", SOLVERS)
def test_every_solver_samples_the_edm_denoiser(edm_run, solver):
    """Every solver works off D(x; sigma) alone: on an EDM checkpoint each gives finite images that depend on the
    preconditioning (the same weights read as VE give others), at the NFE it says it spends."""
    _, ckpt = edm_run
    module = KarrasVeModule.from_checkpoint(ckpt)
    settings = dict(solver=solver, nfe_budget=7, restart_intervals=((2, 1, 0.5, 2.0),) if solver == "restart" else ())
    calls = []
    denoiser = module.denoiser.forward
    module.denoiser.forward = lambda x, sigma: calls.append(len(x)) or denoiser(x, sigma)
    x = module.sample([0, 1], **settings)
    assert x.isfinite().all() and len(calls) == module.sampler.replace(**settings).nfe <= 7
    module.denoiser.precond = "ve"
    assert not torch.equal(module.sample([0, 1], **settings), x)
