"""KarrasVeLightningPipeline: diffusers' KarrasVePipeline call and outputs, our sampler's images, config round-trip."""

import json
import re

import numpy as np
import pytest
import torch
from diffusers import ImagePipelineOutput
from PIL import Image

from conftest import TINY_UNET
from kve_lightning.interop.export import module_pipeline
from kve_lightning.storage import to_pil, to_unit
from kve_lightning.lit.module import KarrasVeModule
from kve_lightning.interop.pipeline import KarrasVeLightningPipeline, KarrasVeLightningScheduler


@pytest.fixture(scope="module")
def module():
    """A tiny randomly initialised 1-channel model (D(x) != x); sigma_max = 0.5 keeps most pixels inside [0, 1]."""
    torch.manual_seed(0)
    return KarrasVeModule(image_size=8, channels=1, unet=json.loads(TINY_UNET), sigma_max=0.5, num_steps=3).eval()


@pytest.fixture(scope="module")
def pipe(module):
    pipe = module_pipeline(module)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_seeds_give_the_module_images(module, pipe):
    images = pipe(seeds=[3, 4, 5], num_inference_steps=3, output_type="pt").images
    torch.testing.assert_close(images, to_unit(module.sample([3, 4, 5])), rtol=0, atol=1e-5)
    overrides = dict(schedule="edm", s_churn=0.0, solver="euler", sigma_max=0.4)
    images = pipe(seeds=[7], num_inference_steps=4, output_type="pt", **overrides).images
    torch.testing.assert_close(images, to_unit(module.sample([7], num_steps=4, **overrides)), rtol=0, atol=1e-5)
    # one image per seed, whatever else is in the batch (to float rounding: kernels vary with the batch size)
    torch.testing.assert_close(pipe(seeds=[5], num_inference_steps=3, output_type="pt").images[0],
                               pipe(seeds=[9, 5], num_inference_steps=3, output_type="pt").images[1], rtol=0, atol=1e-6)


def test_overrides_change_the_images(pipe):
    base = pipe(seeds=[1], num_inference_steps=3, output_type="pt").images
    for override in (dict(s_churn=0.0), dict(schedule="edm"), dict(rho=3.0, schedule="edm"), dict(solver="euler")):
        assert not torch.equal(pipe(seeds=[1], num_inference_steps=3, output_type="pt", **override).images, base)
    assert not torch.equal(pipe(seeds=[1], num_inference_steps=4, output_type="pt").images, base)


def test_output_types_as_in_diffusers(pipe):
    def call(output_type, **kwargs):
        return pipe(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                    output_type=output_type, **kwargs)

    pt = call("pt")
    assert isinstance(pt, ImagePipelineOutput) and pt.images.shape == (2, 1, 8, 8)
    assert pt.images.std() > 0  # not a constant image
    array = call("np").images
    assert isinstance(array, np.ndarray) and array.dtype == np.float32 and array.shape == (2, 8, 8, 1)
    np.testing.assert_array_equal(array, pt.images.permute(0, 2, 3, 1).numpy())
    pil = call("pil").images
    assert isinstance(pil, list) and len(pil) == 2 and all(isinstance(im, Image.Image) for im in pil)
    assert (pil[0].mode, pil[0].size) == ("L", (8, 8))
    assert np.array_equal(np.asarray(pil[1]), np.asarray(to_pil(pt.images[1])))  # the PNG writer's 8-bit levels
    as_tuple = call("np", return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 1
    np.testing.assert_array_equal(as_tuple[0], array)  # the same generator seed, the same images


def test_default_call_uses_the_scheduler_settings(module, pipe):
    image = pipe(num_inference_steps=3, generator=[torch.Generator().manual_seed(2)], output_type="pt").images
    torch.testing.assert_close(image, to_unit(module.sample([2])), rtol=0, atol=1e-5)


def test_num_inference_steps_defaults_to_the_schedulers(pipe):
    assert pipe.scheduler.config.num_steps == 3
    default = pipe(seeds=[1], output_type="pt").images
    torch.testing.assert_close(default, pipe(seeds=[1], num_inference_steps=3, output_type="pt").images, rtol=0, atol=0)
    assert not torch.equal(default, pipe(seeds=[1], num_inference_steps=4, output_type="pt").images)


def test_progress_bar_counts_steps(pipe, capsys):
    pipe.set_progress_bar_config(disable=False)
    try:
        pipe(num_inference_steps=3, output_type="pt")
    finally:
        pipe.set_progress_bar_config(disable=True)
    assert "3/3" in capsys.readouterr().err


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(output_type="numpy"), "'numpy'"),
        (dict(batch_size=0), "batch_size=0"),
        (dict(seeds=[1, 2], generator=torch.Generator()), "not both"),
        (dict(seeds=[1, 2], batch_size=3), "batch_size=3"),
        (dict(batch_size=2, generator=[torch.Generator()]), "length 1"),
        (dict(schedule="cosine"), "'cosine'"),
        (dict(s_min=2.0, s_max=1.0), "s_min=2.0"),
        (dict(num_inference_steps=1), "num_steps=1"),
        (dict(seeds="12"), "seeds='12'"),
        (dict(batch_size=2.5), "batch_size=2.5"),
        (dict(clamp_denoised="no"), "clamp_denoised='no'"),
        (dict(sigma_max=1e300), "sigma_max=1e+300"),
        (dict(s_churn=float("nan")), "s_churn=nan"),
        (dict(num_stepz=3), "num_stepz"),
    ],
)
def test_bad_call_names_the_value(pipe, kwargs, needle):
    with pytest.raises(ValueError, match=re.escape(needle)):
        pipe(**kwargs)


def test_save_and_from_pretrained_round_trip(module, tmp_path):
    settings = dict(sigma_min=0.01, sigma_max=0.9, num_steps=5, schedule="edm", s_churn=40.0, s_min=0.1,
                    s_max=0.5, s_noise=1.003, solver="euler", rho=5.0)
    pipe = KarrasVeLightningPipeline(unet=module.denoiser.unet, scheduler=KarrasVeLightningScheduler(**settings))
    pipe.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "scheduler" / "scheduler_config.json").read_text())
    assert {k: config[k] for k in settings} == settings
    assert (config["train_sigma_min"], config["train_sigma_max"]) == (0.01, 0.9)  # default: the settings' range
    assert json.loads((tmp_path / "model_index.json").read_text())["scheduler"] == [
        "kve_lightning.interop.pipeline", "KarrasVeLightningScheduler"]
    loaded = KarrasVeLightningPipeline.from_pretrained(tmp_path, use_safetensors=True)
    assert isinstance(loaded.scheduler, KarrasVeLightningScheduler)
    assert {k: loaded.scheduler.config[k] for k in settings} == settings
    assert loaded.scheduler.trained == (0.01, 0.9)
    for (name, a), (_, b) in zip(module.denoiser.unet.state_dict().items(), loaded.unet.state_dict().items()):
        assert torch.equal(a, b), name
    loaded.set_progress_bar_config(disable=True)
    pipe.set_progress_bar_config(disable=True)
    torch.testing.assert_close(loaded(seeds=[0], output_type="pt").images, pipe(seeds=[0], output_type="pt").images,
                               rtol=0, atol=0)


def test_the_training_range_is_stored_and_guards_calls(module, pipe, tmp_path):
    """The module's training noise range goes into the scheduler config (train_sigma_min/train_sigma_max) and back;
    a call reaching outside it is refused unless extrapolate=True."""
    assert pipe.scheduler.trained == module.train_sigmas == (module.sampler.sigma_min, 0.5)
    pipe.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "scheduler" / "scheduler_config.json").read_text())
    assert (config["train_sigma_min"], config["train_sigma_max"]) == module.train_sigmas
    loaded = KarrasVeLightningPipeline.from_pretrained(tmp_path, use_safetensors=True)
    assert loaded.scheduler.trained == module.train_sigmas
    loaded.set_progress_bar_config(disable=True)
    for pipeline in (pipe, loaded):
        with pytest.raises(ValueError, match="leaves the model's trained range"):
            pipeline(seeds=[0], output_type="pt", sigma_max=0.6)
        with pytest.raises(ValueError, match="leaves the model's trained range"):
            pipeline(seeds=[0], output_type="pt", sigma_min=module.sampler.sigma_min / 2)
    images = pipe(seeds=[0], output_type="pt", sigma_max=0.6, extrapolate=True).images
    torch.testing.assert_close(images, to_unit(module.sample([0], sigma_max=0.6, extrapolate=True)), rtol=0,
                               atol=1e-5)


@pytest.mark.parametrize(
    "settings, needle",
    [(dict(s_min=2.0, s_max=1.0), "s_min=2.0"), (dict(solver="rk4"), "'rk4'"), (dict(sigma_min=0.0), "sigma_min=0")],
)
def test_scheduler_rejects_bad_settings(settings, needle):
    with pytest.raises(ValueError, match=needle):
        KarrasVeLightningScheduler(**settings)
