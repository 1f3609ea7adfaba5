"""VEDenoiser, and the sampler against diffusers' own KarrasVePipeline as an oracle."""

import pytest
import torch
from diffusers import KarrasVePipeline, UNet2DModel
from diffusers.schedulers.deprecated.scheduling_karras_ve import KarrasVeScheduler

from kve_lightning import VEDenoiser, sample_karras_ve
from kve_lightning.denoiser import default_unet_config
from kve_lightning.exact import GaussianMixture


def tiny_unet(channels=3, size=8, seed=0):
    torch.manual_seed(seed)
    return UNet2DModel(**default_unet_config(size, channels)).eval()


def test_denoiser_rejects_non_fourier_unet():
    cfg = default_unet_config(8, 1) | dict(time_embedding_type="positional")
    with pytest.raises(ValueError, match="fourier"):
        VEDenoiser(UNet2DModel(**cfg))


def test_denoiser_shapes_and_sigma_broadcast():
    D = VEDenoiser(tiny_unet(1))
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        out_vec = D(x, torch.full((3,), 0.7))
        out_scalar = D(x, 0.7)
    assert out_vec.shape == x.shape
    torch.testing.assert_close(out_vec, out_scalar)
    with pytest.raises(ValueError, match="sigma"):
        D(x, torch.ones(2))


def test_denoiser_tends_to_identity_as_sigma_vanishes():
    D = VEDenoiser(tiny_unet(1))
    x = torch.rand(2, 1, 8, 8) * 2 - 1
    with torch.no_grad():
        gaps = [(D(x, torch.full((2,), s)) - x).abs().max().item() for s in (1e-1, 1e-2, 1e-3, 1e-4)]
    assert gaps[-1] < 1e-3
    assert all(a > b for a, b in zip(gaps, gaps[1:]))  # D - x = sigma * F shrinks with sigma


def test_denoiser_is_edm_ve_preconditioning():
    """D = x + sigma * (sigma / 2) * unet((x + 1) / 2, sigma / 2), and the Fourier UNet divides by sigma / 2."""
    unet = tiny_unet(1)
    D = VEDenoiser(unet)
    x, sigma = torch.randn(2, 1, 8, 8), torch.tensor([0.3, 5.0])
    with torch.no_grad():
        expected = x + sigma.view(-1, 1, 1, 1) ** 2 / 2 * unet((x + 1) / 2, sigma / 2).sample
        torch.testing.assert_close(D(x, sigma), expected)


# ---------------------------------------------------------------- oracle: diffusers' KarrasVePipeline


class ExactGaussianUNet(UNet2DModel):
    """A UNet2DModel whose forward is the exact denoiser of N(0, 0.1^2) data, in the pipeline's units:
    it returns F with x + sigma * (sigma / 2) * F = D(x; sigma), where x = 2u - 1 and sigma = 2t."""

    def forward(self, sample, timestep, return_dict=True):
        t = torch.as_tensor(timestep, dtype=sample.dtype).reshape(-1, 1, 1, 1)
        x, sigma = 2 * sample - 1, 2 * t
        gm = GaussianMixture(torch.ones(1, dtype=torch.float64), torch.zeros(1, *sample.shape[1:]), torch.tensor([0.1]))
        D = gm.denoiser(x, sigma.flatten().expand(x.shape[0]))
        return type("Out", (), {"sample": (D - x) / (sigma * t)})()


def _record_unet_inputs(unet):
    calls = []

    def hook(module, args, kwargs):
        sample, timestep = args[:2]
        t = torch.as_tensor(timestep, dtype=sample.dtype).flatten().expand(sample.shape[0])
        calls.append((sample.detach().clone(), t.clone()))

    return calls, unet.register_forward_pre_hook(hook, with_kwargs=True)


def _run_both(unet, num_steps, s_churn, s_min, s_max, batch=2, seed=0):
    scheduler = KarrasVeScheduler(s_churn=s_churn, s_min=s_min, s_max=s_max)
    pipe = KarrasVePipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    calls_ref, handle = _record_unet_inputs(unet)
    ref = pipe(batch_size=batch, num_inference_steps=num_steps, generator=torch.Generator().manual_seed(seed),
               output_type="np").images
    handle.remove()

    # diffusers walks its (ascending, sigma^2-valued) schedule from the end and stops at 0
    sigmas = torch.cat([scheduler.schedule.flip(0), torch.zeros(1)])
    size = unet.config.sample_size
    g = torch.Generator().manual_seed(seed)
    # the pipeline's x_0 is N(0, init_noise_sigma^2) (100, though its schedule starts at sigma_0 = 1e4); our latents
    # are unit noise scaled by sigma_0 (x_0 = sigma_0 * latents), so pass x_0 / sigma_0
    x0 = torch.randn((batch, 3, size, size), generator=g) * scheduler.init_noise_sigma
    latents = x0 / sigmas[0]
    calls_ours, handle = _record_unet_inputs(unet)
    ours = sample_karras_ve(VEDenoiser(unet), latents.shape, sigmas=sigmas, s_churn=s_churn, s_min=s_min,
                            s_max=s_max, s_noise=scheduler.config.s_noise, generator=g, latents=latents)
    handle.remove()
    return ref, ours, calls_ref, calls_ours, sigmas


@pytest.mark.parametrize("s_min, s_max", [(0.01, 10.0), (0.05, 50.0)])
def test_matches_diffusers_pipeline_unet_inputs(s_min, s_max):
    """Every UNet call (sample and timestep) agrees with diffusers' pipeline to 1e-5 relative."""
    unet = tiny_unet(3)
    ref, ours, calls_ref, calls_ours, sigmas = _run_both(unet, 10, 80.0, s_min, s_max)
    active = [s_min <= s <= s_max for s in sigmas[:-1].tolist()]
    assert any(active) and not all(active)  # churn on some steps and off on others
    assert len(calls_ref) == len(calls_ours) == 2 * 10 - 1
    for (xa, ta), (xb, tb) in zip(calls_ref, calls_ours):
        assert ((xa - xb).abs().max() / xa.abs().max()).item() < 1e-5
        torch.testing.assert_close(ta, tb, rtol=1e-5, atol=0)


def test_matches_diffusers_pipeline_final_images_with_exact_denoiser():
    """With the exact denoiser of N(0, 0.1^2) the pipeline's clamp to [0, 1] hides nothing: compare images."""
    unet = ExactGaussianUNet(**default_unet_config(4, 3)).eval()
    ref, ours, *_ = _run_both(unet, 12, 80.0, 0.01, 10.0, batch=4)
    ours_img = (ours / 2 + 0.5).permute(0, 2, 3, 1).numpy()
    assert 0.02 < ours_img.min() and ours_img.max() < 0.98  # nothing clamped
    assert abs(ours_img - ref).max() < 1e-5
