"""log_likelihood and bits_per_dim against closed-form densities: a Gaussian mixture, a full-covariance Gaussian,
and the bins of a quantized Gaussian."""

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import assert_refused, export_script
from kve_lightning.cli import cli_main
from kve_lightning.exact import GaussianMixture
from kve_lightning.likelihood import bits_per_dim, log_likelihood

SIGMA_MIN, SIGMA_MAX = 0.02, 100.0


@pytest.fixture(scope="module")
def mixture():
    """Three components in 1 x 4 x 4 (d = 16), unequal weights and widths."""
    g = torch.Generator().manual_seed(3)
    means = torch.rand((3, 1, 4, 4), generator=g, dtype=torch.float64) * 1.6 - 0.8
    return GaussianMixture(torch.tensor([0.5, 0.3, 0.2]), means, torch.tensor([0.05, 0.15, 0.3]))


def held_out(mixture, n, seed):
    """Draws of the mixture convolved with N(0, sigma_min^2 I): the density log_likelihood evaluates."""
    g = torch.Generator().manual_seed(seed)
    y, _ = mixture.sample(n, generator=g)
    return y + SIGMA_MIN * torch.randn(y.shape, generator=g, dtype=torch.float64)


def test_exact_divergence_reproduces_the_mixture_density(mixture):
    """With the exact prior the error is the ODE solver's: RK4 in ln(sigma), 4th order (64 steps: ~2e-5 nats per
    dimension here, 16x less per doubling); the goal is 1e-3. With the default prior N(0, sigma_max^2 I) the error
    adds the prior's, which the module docstring bounds by about R / sigma_max nats (R = 3 here): checked at
    sigma_max = 1000, where it is below 1e-3 per dimension too."""
    x = held_out(mixture, 8, seed=1)
    exact = mixture.log_prob(x, SIGMA_MIN)
    info = {}
    ll = log_likelihood(mixture.denoiser, x, divergence="exact", prior_log_prob=lambda z: mixture.log_prob(z, SIGMA_MAX),
                        info=info)
    assert info["nfe"] == 4 * 64 and ll.shape == (8,)
    assert (ll - exact).abs().max() / 16 < 1e-4
    coarse = log_likelihood(mixture.denoiser, x, divergence="exact", steps=16,
                            prior_log_prob=lambda z: mixture.log_prob(z, SIGMA_MAX))
    assert (coarse - exact).abs().max() > 4 * (ll - exact).abs().max()  # the test can tell a worse solve
    gaussian_prior = log_likelihood(mixture.denoiser, x, divergence="exact", sigma_max=1000.0)
    assert (gaussian_prior - exact).abs().max() / 16 < 1e-3


def test_full_covariance_gaussian_in_closed_form():
    """N(mu, C) in d = 16 with a random full covariance: D(x; sigma) = mu + C (C + sigma^2 I)^-1 (x - mu), and
    log p_{sigma_min} = log N(x; mu, C + sigma_min^2 I)."""
    g = torch.Generator().manual_seed(5)
    d = 16
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    cov = q @ torch.diag(torch.logspace(-2, -0.5, d, dtype=torch.float64)) @ q.T
    mu = torch.rand(d, generator=g, dtype=torch.float64) - 0.5

    def denoiser(x, sigma):
        flat = x.flatten(1)
        out = []
        for row, s in zip(flat, sigma):
            out.append(mu + cov @ torch.linalg.solve(cov + s**2 * torch.eye(d, dtype=x.dtype), row - mu))
        return torch.stack(out).reshape(x.shape)

    def log_n(x, sigma):
        return torch.distributions.MultivariateNormal(mu, cov + sigma**2 * torch.eye(d, dtype=torch.float64)
                                                      ).log_prob(x.flatten(1))

    x = (mu + torch.randn(6, d, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cov).T).reshape(6, 1, 4, 4)
    ll = log_likelihood(denoiser, x, divergence="exact", prior_log_prob=lambda z: log_n(z, SIGMA_MAX))
    assert (ll - log_n(x, SIGMA_MIN)).abs().max() / d < 1e-4


def test_hutchinson_is_unbiased(mixture):
    """One point, 400 rows with their own generators: 400 independent single-probe estimates in one batch. With the
    same RK4 steps the trajectory does not depend on the probes and the integral is linear in the divergence, so
    their mean must be within 3 standard errors of the exact-divergence value."""
    x = held_out(mixture, 1, seed=2).expand(400, -1, -1, -1).clone()
    gens = [torch.Generator().manual_seed(s) for s in range(400)]
    for probe in ("rademacher", "gaussian"):
        est = log_likelihood(mixture.denoiser, x, steps=8, generator=gens, probe=probe)
        exact = log_likelihood(mixture.denoiser, x[:1], steps=8, divergence="exact")
        se = est.std() / math.sqrt(len(est))
        assert est.std() > 0 and (est.mean() - exact[0]).abs() < 3 * se, (probe, est.mean(), exact, se)


def test_a_rows_value_does_not_depend_on_its_batch(mixture):
    x = held_out(mixture, 5, seed=4)
    batch = log_likelihood(mixture.denoiser, x, steps=8, num_probes=2,
                           generator=[torch.Generator().manual_seed(10 + i) for i in range(5)])
    for i in range(5):
        alone = log_likelihood(mixture.denoiser, x[i:i + 1], steps=8, num_probes=2,
                               generator=[torch.Generator().manual_seed(10 + i)])
        torch.testing.assert_close(alone[0], batch[i], rtol=0, atol=1e-9)


def test_dequantization_offset_against_the_bins_of_a_gaussian():
    """A 1-D Gaussian N(0, s^2) quantized to 17 levels in [-1, 1] (w = 1/8). For an observed level y, the
    dequantized bound has the closed form E_u[-log2 p(y + w(u - 1/2))] - log2 w with p = N(0, s^2 + sigma_min^2)
    (the bin's mean of x^2 is y^2 + w^2 / 12); it lies above -log2 P(bin) by a small gap. bits_per_dim over 400
    dequantization draws must match the closed form within 3 standard errors plus the ODE's error."""
    s, levels = 0.4, 17
    w = 2 / (levels - 1)
    var = s**2 + SIGMA_MIN**2

    def denoiser(x, sigma):
        return s**2 / (s**2 + sigma.reshape(-1, 1) ** 2) * x

    normal = torch.distributions.Normal(0.0, math.sqrt(var))
    for j in (8, 10, 13):
        y = -1 + j * w
        bound = ((0.5 * math.log(2 * math.pi * var) + (y**2 + w**2 / 12) / (2 * var)) / math.log(2) - math.log2(w))
        p_bin = float(normal.cdf(torch.tensor(y + w / 2)) - normal.cdf(torch.tensor(y - w / 2)))
        # the variational gap, about Var_bin(log p) / 2 = (y / var)^2 w^2 / 24 nats: 0.014 bits at y = 0.625
        assert 0 < bound - (-math.log2(p_bin)) < 0.02
        images = torch.full((400, 1), y, dtype=torch.float64)
        mean, se = bits_per_dim(denoiser, images, levels, divergence="exact", steps=16,
                                generator=torch.Generator().manual_seed(j))
        assert abs(mean - bound) < 3 * se + 1e-4, (j, mean, bound, se)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(x=torch.zeros(3)), "shape"),
    (dict(x=torch.full((2, 4), float("nan"))), "finite"),
    (dict(sigma_min=2.0, sigma_max=1.0), "sigma_min=2.0"),
    (dict(num_probes=0), "num_probes=0"),
    (dict(divergence="trace"), "'trace'"),
    (dict(probe="uniform"), "'uniform'"),
    (dict(steps=0), "steps=0"),
])
def test_bad_input_names_the_value(kwargs, needle):
    args = dict(x=torch.zeros(2, 4)) | kwargs
    with pytest.raises(ValueError, match=needle):
        log_likelihood(lambda x, s: x, **args)


@pytest.mark.parametrize("levels", [1, 2.5])
def test_bits_per_dim_needs_two_levels_or_more(levels):
    with pytest.raises(ValueError, match="levels"):
        bits_per_dim(lambda x, s: x, torch.zeros(2, 4), levels)


def test_kve_likelihood_reports_the_same_bits_from_checkpoint_and_export(trained_run, tmp_path):
    _, ckpt = trained_run
    export_script(["--ckpt_path", str(ckpt), "--out", str(tmp_path / "e")])
    common = ["--n", "6", "--ode_steps", "2", "--batch_size", "4"]
    cli_main(["likelihood", "--ckpt_path", str(ckpt), *common, "--out", str(tmp_path / "ckpt.json")])
    cli_main(["likelihood", "--pipeline", str(tmp_path / "e"), *common, "--out", str(tmp_path / "model.json")])
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("ckpt", "model"))
    assert a["images"] == 6 and a["levels"] == 17 and a["nfe_per_image"] == 8 and a["split"] == "val"
    assert a["dataset"] == b["dataset"] == "digits" and a["split_seed"] == b["split_seed"]  # the checkpoint's split
    assert math.isfinite(a["bits_per_dim"]) and a["stderr"] > 0
    assert b["bits_per_dim"] == pytest.approx(a["bits_per_dim"], rel=1e-6)


@pytest.mark.parametrize("flags, needle", [(["--ode_steps", "0"], "--ode_steps"), (["--probes", "0"], "--probes"),
                                           (["--n", "0"], "--n"), (["--batch_size", "0"], "--batch_size"),
                                           (["--out", "{tmp}"], "is a directory"),
                                           (["--out", "{tmp}/no/r.json"], "does not exist")])
def test_kve_likelihood_bad_input(trained_run, tmp_path, capsys, flags, needle):
    _, ckpt = trained_run
    args = ["likelihood", "--ckpt_path", str(ckpt), "--out", str(tmp_path / "r.json"),
            *[f.format(tmp=tmp_path) for f in flags]]
    line = assert_refused(lambda: cli_main(args), capsys, needle, folder=tmp_path)
    assert line.startswith("kve likelihood: error:"), line
    assert list(tmp_path.iterdir()) == []


def test_benchmark_script_prints_its_table(trained_run, monkeypatch, capsys):
    """scripts/benchmark_likelihood.py end to end on the tiny checkpoint (1 ODE step, one mixture)."""
    import runpy

    _, ckpt = trained_run
    monkeypatch.setattr("sys.argv", ["benchmark_likelihood.py", "--ckpt_path", str(ckpt), "--steps", "1",
                                     "--components", "2", "--fit-draws", "1"])
    runpy.run_path(str(Path(__file__).parents[1] / "scripts" / "benchmark_likelihood.py"), run_name="__main__")
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "bits/dim" not in line]
    assert len(rows) == 3 and "GaussianMixture, 2 full-covariance" in out and "| 4.087 | 0 |" in out
    assert all(math.isfinite(float(row.split("|")[2])) for row in rows)
