"""Algorithm 2 against exact math: closed-form denoisers and the exact probability-flow ODE."""

import dataclasses
import math

import pytest
import torch

from kve_lightning import karras_ve_sigmas, sample_karras_ve
from kve_lightning.sampling import SamplerSettings
from kve_lightning.exact import GaussianMixture, gaussian_pf_ode_solution


def three_gaussians(dim_hw=4, std=0.2):
    """Three well-separated components in 1 x 4 x 4 (dimension 16) with unequal weights."""
    g = torch.Generator().manual_seed(1)
    means = torch.stack([torch.full((1, dim_hw, dim_hw), 0.6), torch.full((1, dim_hw, dim_hw), -0.6),
                         torch.rand((1, dim_hw, dim_hw), generator=g) * 1.2 - 0.6])
    means[2, :, :2] = 0.6
    means[2, :, 2:] = -0.6
    return GaussianMixture(torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64), means, torch.full((3,), std))


# ---------------------------------------------------------------- schedules


def test_ve_schedule_endpoints_monotone_geometric():
    s = karras_ve_sigmas(18, 0.02, 100.0, "ve", dtype=torch.float64)
    assert s.shape == (19,) and s[-1] == 0
    assert s[0].item() == pytest.approx(100.0) and s[-2].item() == pytest.approx(0.02)
    assert (s[:-1] > s[1:]).all()
    ratios = s[1:-1] / s[:-2]
    expected = (0.02 / 100.0) ** (1 / 17)
    torch.testing.assert_close(ratios, torch.full_like(ratios, expected), rtol=1e-12, atol=0)
    # sigma_i = sqrt(t_i) with t_i of the VE column of EDM Table 1
    i = torch.arange(18, dtype=torch.float64)
    t = 100.0**2 * (0.02**2 / 100.0**2) ** (i / 17)
    torch.testing.assert_close(s[:-1], t.sqrt(), rtol=1e-12, atol=0)


def test_edm_schedule_endpoints_and_rho():
    s = karras_ve_sigmas(10, 0.002, 80.0, "edm", rho=7.0, dtype=torch.float64)
    assert s.shape == (11,) and s[-1] == 0 and (s[:-1] > s[1:]).all()
    assert s[0].item() == pytest.approx(80.0) and s[-2].item() == pytest.approx(0.002)
    # the rho-th root is linear in i
    root = s[:-1] ** (1 / 7)
    torch.testing.assert_close(root[1:] - root[:-1], (root[1] - root[0]).expand(9), rtol=1e-9, atol=0)
    assert karras_ve_sigmas(5).dtype == torch.float32


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(num_steps=1), "num_steps"),
        (dict(sigma_min=0.0), "sigma_min"),
        (dict(sigma_min=-1.0), "sigma_min"),
        (dict(sigma_min=100.0, sigma_max=100.0), "sigma_max"),
        (dict(s_churn=-1.0), "s_churn"),
        (dict(s_noise=-0.5), "s_noise"),
        (dict(s_min=2.0, s_max=1.0), "s_min"),
        (dict(schedule="cosine"), "schedule"),
        (dict(solver="rk4"), "solver"),
        (dict(sigmas=torch.ones(2, 3)), "sigmas"),
        (dict(sigmas=torch.tensor([1.0, 2.0, 0.0])), "descending"),
        (dict(sigmas=torch.tensor([2.0, 1.0, 0.5])), "end in 0"),
        (dict(generator=[torch.Generator(), torch.Generator()]), "generator"),
        (dict(latents=torch.zeros(4, 1, 2, 2)), "latents"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name):
        sample_karras_ve(lambda x, s: x, (3, 1, 2, 2), **kwargs)


@pytest.mark.parametrize("kwargs, name", [(dict(num_steps=0), "num_steps"), (dict(schedule="x"), "schedule"),
                                          (dict(sigma_min=5.0, sigma_max=1.0), "sigma_min")])
def test_bad_schedule_arguments(kwargs, name):
    args = dict(num_steps=10) | kwargs
    with pytest.raises(ValueError, match=name):
        karras_ve_sigmas(**args)


BAD_SETTINGS = [
    (dict(num_steps=1), "num_steps=1"),
    (dict(num_steps=10**12), "num_steps=1000000000000"),
    (dict(num_steps=2.5), "num_steps=2.5"),
    (dict(num_steps=True), "num_steps=True"),
    (dict(sigma_min=0.0), "sigma_min=0"),
    (dict(sigma_max=1e30), "sigma_max=1e+30"),
    (dict(sigma_max=math.inf), "sigma_max=inf"),
    (dict(s_churn=math.nan), "s_churn=nan"),
    (dict(s_noise=math.inf), "s_noise=inf"),
    (dict(s_min=-0.1), "s_min=-0.1"),
    (dict(s_max=math.nan), "s_max=nan"),
    (dict(rho=0.0), "rho=0"),
    (dict(rho="7"), "rho='7'"),
    (dict(s_churn=None), "s_churn=None"),
    (dict(clamp_denoised="no"), "clamp_denoised='no'"),
    (dict(clamp_denoised=1), "clamp_denoised=1"),
    (dict(schedule="cosine"), "'cosine'"),
    (dict(solver="rk4"), "'rk4'"),
]


@pytest.mark.parametrize("kwargs, needle", BAD_SETTINGS, ids=[str(k) for k, _ in BAD_SETTINGS])
def test_sampler_settings_name_every_bad_value(kwargs, needle):
    with pytest.raises(ValueError) as err:
        SamplerSettings(**kwargs)
    assert needle in str(err.value)
    if None in kwargs.values():
        return  # an override of None means "not given"
    for door in (lambda: SamplerSettings().replace(**kwargs), lambda: sample_karras_ve(lambda x, s: x, (1, 1, 2, 2),
                                                                                        **kwargs)):
        with pytest.raises(ValueError) as err:
            door()
        assert needle in str(err.value)


def test_sampler_settings_normalise_replace_and_round_trip():
    settings = SamplerSettings(num_steps=18, s_churn=0, sigma_max=10)
    assert settings.s_churn == 0.0 and isinstance(settings.s_churn, float) and isinstance(settings.sigma_max, float)
    assert settings.replace(num_steps=None, s_noise=1.0) == SamplerSettings(num_steps=18, s_churn=0.0,
                                                                          sigma_max=10.0, s_noise=1.0)
    with pytest.raises(ValueError, match="num_stepz"):
        settings.replace(num_stepz=3)
    assert SamplerSettings.from_mapping(settings.to_dict() | {"lr": 1.0}) == settings
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.num_steps = 3
    torch.testing.assert_close(settings.sigmas(), karras_ve_sigmas(18, 0.02, 10.0, dtype=torch.float64),
                               rtol=0, atol=0)


def test_sample_karras_ve_takes_settings_or_keywords_alike():
    mixture = three_gaussians()
    settings = SamplerSettings(num_steps=5, schedule="edm", rho=5.0, s_churn=10.0, s_max=50.0, solver="euler")
    a = sample_karras_ve(mixture.denoiser, (3, 1, 4, 4), settings=settings, generator=torch.Generator().manual_seed(0))
    b = sample_karras_ve(mixture.denoiser, (3, 1, 4, 4), generator=torch.Generator().manual_seed(0),
                         **settings.to_dict())
    c = sample_karras_ve(mixture.denoiser, (3, 1, 4, 4), settings=settings.replace(rho=7.0),
                         generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)  # rho reaches the schedule


# ---------------------------------------------------------------- exact distributions


def test_default_sampler_reproduces_gaussian_mixture():
    gm = three_gaussians()
    n = 2000
    x = sample_karras_ve(gm.denoiser, (n, *gm.event_shape), generator=torch.Generator().manual_seed(0),
                         dtype=torch.float64)
    labels = gm.nearest_mean(x)
    weights = torch.bincount(labels, minlength=3).double() / n
    # binomial standard error of a weight is at most sqrt(0.25 / 2000) = 0.011: allow ~3.5 of them
    torch.testing.assert_close(weights, gm.weights, atol=0.04, rtol=0)
    for k in range(3):
        xk = x[labels == k].flatten(1)
        nk = xk.shape[0]
        # per-coordinate standard error of a component mean: std / sqrt(n_k) <= 0.2 / sqrt(300) = 0.012
        torch.testing.assert_close(xk.mean(0), gm.means[k].flatten(), atol=5 * 0.2 / math.sqrt(nk), rtol=0)
        # pooled variance over 16 coordinates: relative standard error sqrt(2 / (16 n_k)) <= 2.1%;
        # stopping at sigma_min = 0.02 shrinks it by s^2 / (s^2 + sigma_min^2) ~ 1%; allow 10%
        var = xk.var(0).mean().item()
        assert var == pytest.approx(0.2**2, rel=0.10)


def _pf_ode_error(num_steps, solver, mean=0.3, std=0.5):
    """Max error of x at sigma_{N-1} (before the final step to 0) against the exact ODE solution."""
    sigmas = karras_ve_sigmas(num_steps, 0.02, 100.0, "ve", dtype=torch.float64)
    gm = GaussianMixture(torch.ones(1), torch.full((1, 1, 2, 2), mean), torch.tensor([std]))
    # latents are unit noise, scaled by sigma_0: x_0 = sigma_0 * latents (as EDM and diffusers)
    latents = torch.randn((64, 1, 2, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x0 = sigmas[0] * latents
    seen = {}
    sample_karras_ve(gm.denoiser, x0.shape, sigmas=sigmas, s_churn=0.0, solver=solver, latents=latents,
                     callback=lambda i, sigma_hat, x_hat, denoised: seen.__setitem__(i, x_hat))
    x_last = seen[num_steps - 1]
    exact = gaussian_pf_ode_solution(x0, sigmas[0].item(), sigmas[-2].item(), mean, std)
    return (x_last - exact).abs().max().item()


@pytest.mark.parametrize("solver, order", [("heun", 2), ("euler", 1)])
def test_order_of_accuracy_on_exact_ode(solver, order):
    steps = [64, 128, 256] if solver == "heun" else [128, 256, 512]
    errors = [_pf_ode_error(n, solver) for n in steps]
    observed = [math.log2(a / b) for a, b in zip(errors, errors[1:])]
    if order == 2:
        assert min(observed) > 1.8, (errors, observed)
    else:
        assert 0.8 < min(observed) and max(observed) < 1.3, (errors, observed)


def test_latents_are_unit_noise_scaled_by_sigma_0():
    """x_0 = sigma_0 * latents, as the sampler draws it from its generator (EDM's edm_sampler, diffusers): without
    churn the per-step noise has no effect, so the latents drawn from a generator give that generator's sample."""
    gm = three_gaussians()
    shape = (4, *gm.event_shape)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    for settings in (SamplerSettings(num_steps=6, s_churn=0.0), SamplerSettings(num_steps=6, s_churn=0.0,
                                                                               sigma_max=3.0, solver="euler")):
        drawn = sample_karras_ve(gm.denoiser, shape, settings=settings, dtype=torch.float64,
                                 generator=torch.Generator().manual_seed(7))
        given = sample_karras_ve(gm.denoiser, shape, settings=settings, latents=latents)
        assert torch.equal(drawn, given)
        first = []
        sample_karras_ve(gm.denoiser, shape, settings=settings, latents=latents,
                         callback=lambda i, sigma_hat, x_hat, denoised: first.append(x_hat) if i == 0 else None)
        assert torch.equal(first[0], settings.sigma_max * latents)


def test_batch_invariance_with_per_row_generators():
    gm = three_gaussians()
    seeds = list(range(100, 116))
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    batch = sample_karras_ve(gm.denoiser, (16, *gm.event_shape), num_steps=12, generator=gens)
    for k in (0, 5, 15):
        alone = sample_karras_ve(gm.denoiser, (1, *gm.event_shape), num_steps=12,
                                 generator=[torch.Generator().manual_seed(seeds[k])])
        assert torch.equal(batch[k], alone[0])


def test_one_noise_draw_per_step_even_without_churn():
    """The generator state after sampling is the same with and without churn: one eps per step either way."""
    gm = three_gaussians()
    states = []
    for churn in (0.0, 80.0):
        g = torch.Generator().manual_seed(3)
        sample_karras_ve(gm.denoiser, (2, *gm.event_shape), num_steps=7, s_churn=churn, generator=g)
        states.append(torch.randn(1, generator=g).item())
    assert states[0] == states[1]
    g = torch.Generator().manual_seed(3)
    torch.randn((8 * 2, *gm.event_shape), generator=g)  # x_0 and 7 per-step draws
    assert torch.randn(1, generator=g).item() == states[0]


def test_churn_window_and_nfe_count():
    """gamma_i = min(S_churn / N, sqrt(2) - 1) inside [S_tmin, S_tmax] and 0 outside; NFE = 2N - 1 for Heun."""
    sigmas = karras_ve_sigmas(10, dtype=torch.float64)
    hats, calls = [], []

    def denoiser(x, sigma):
        calls.append(sigma[0].item())
        return torch.zeros_like(x)

    sample_karras_ve(denoiser, (1, 1, 2, 2), sigmas=sigmas, s_churn=5.0, s_min=0.05, s_max=1.0,
                     callback=lambda i, sh, xh, d: hats.append(sh))
    assert len(calls) == 2 * 10 - 1
    for s, h in zip(sigmas[:-1].tolist(), hats):
        gamma = min(5.0 / 10, math.sqrt(2) - 1) if 0.05 <= s <= 1.0 else 0.0
        assert h == pytest.approx((1 + gamma) * s, rel=1e-12)
    assert any(h != s for s, h in zip(sigmas.tolist(), hats)) and any(h == s for s, h in zip(sigmas.tolist(), hats))
    calls.clear()
    sample_karras_ve(denoiser, (1, 1, 2, 2), sigmas=sigmas, solver="euler")
    assert len(calls) == 10


def test_clamp_denoised_projects_onto_the_data_range():
    """A denoiser that overshoots the data range gives samples in [-1, 1] only with clamp_denoised; for the exact
    denoiser of data inside [-1, 1] at every sigma used, the clip changes nothing."""
    wild = lambda x, sigma: 3 * torch.ones_like(x)  # noqa: E731
    kwargs = dict(num_steps=6, generator=torch.Generator().manual_seed(0))
    assert sample_karras_ve(wild, (2, 1, 2, 2), **kwargs).max() > 2
    kwargs["generator"] = torch.Generator().manual_seed(0)
    assert torch.equal(sample_karras_ve(wild, (2, 1, 2, 2), clamp_denoised=True, **kwargs), torch.ones(2, 1, 2, 2))
    point = GaussianMixture(torch.ones(1, dtype=torch.float64), torch.full((1, 1, 2, 2), 0.5), torch.tensor([1e-9]))
    a, b = (sample_karras_ve(point.denoiser, (3, 1, 2, 2), clamp_denoised=c, dtype=torch.float64,
                             generator=torch.Generator().manual_seed(1)) for c in (False, True))
    assert torch.equal(a, b)
