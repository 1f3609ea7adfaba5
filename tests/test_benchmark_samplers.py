"""scripts/benchmark_samplers.py: its metrics, its diffusers baseline, and a --fast run end to end."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from kve_lightning.exact import GaussianMixture

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark_samplers.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("benchmark_samplers", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sliced_w2_of_a_shift(bench):
    """Projections of x + c are those of x shifted by <c, theta>: SW2 = sqrt(mean_theta <c, theta>^2)."""
    x = torch.randn(300, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    theta = torch.nn.functional.normalize(torch.randn(64, 4, dtype=torch.float64), dim=1)
    c = torch.tensor([0.3, -0.1, 0.2, 0.5], dtype=torch.float64)
    assert bench.sliced_w2(x, x, theta) == 0
    assert bench.sliced_w2(x, x + c.reshape(1, 1, 2, 2), theta) == pytest.approx((theta @ c).square().mean().sqrt().item())
    assert bench.sliced_w2(x, x[torch.randperm(300)], theta) == pytest.approx(0, abs=1e-12)  # order-free


def test_mode_weight_error_of_exact_labels(bench):
    gm = bench.mixture()
    assert gm.event_shape == (1, 8, 8) and len(set(gm.stds.tolist())) == 5 and len(set(gm.weights.tolist())) == 5
    x, labels = gm.sample(4000, torch.Generator().manual_seed(0))
    assert torch.equal(gm.nearest_mean(x), labels)  # well separated: nearest mean is the true component
    assert bench.mode_weight_error(gm, gm.means) == pytest.approx(0.4 - 1 / 5)  # one point per mean


def test_diffusers_baseline_is_heun_on_sigma_squared_schedule(bench):
    """The diffusers row walks its sigma^2-valued schedule (1e4 down to 4e-4) with 2N - 1 evaluations."""
    gm = GaussianMixture(torch.ones(1), torch.zeros(1, 1, 2, 2), torch.tensor([0.3]))
    sigmas = []

    def denoiser(x, sigma):
        sigmas.append(sigma[0].item())
        return gm.denoiser(x, sigma)

    x = bench.diffusers_karras_ve(denoiser, (8, 1, 2, 2), 6, torch.Generator().manual_seed(0))
    assert len(sigmas) == 2 * 6 - 1 and x.dtype == torch.float64
    assert sigmas[0] == pytest.approx(1e4, rel=1e-6) and sigmas[-1] == pytest.approx(0.02**2, rel=1e-5)


@pytest.mark.parametrize("name, nfe", [("euler_maruyama", lambda n: n), ("predictor_corrector", lambda n: 2 * n)])
def test_score_sde_baselines_converge_on_a_gaussian(bench, name, nfe):
    """On N(0.2, 0.3^2) the score_sde samplers land near the right mean and std, with their stated NFE."""
    gm = GaussianMixture(torch.ones(1), torch.full((1, 1, 4, 4), 0.2), torch.tensor([0.3]))
    calls = []

    def denoiser(x, sigma):
        calls.append(1)
        return gm.denoiser(x, sigma)

    x = getattr(bench, name)(denoiser, (2000, 1, 4, 4), 200, torch.Generator().manual_seed(0))
    assert len(calls) == nfe(200)
    assert x.mean().item() == pytest.approx(0.2, abs=0.01)
    assert x.std().item() == pytest.approx(0.3, rel=0.05)


def test_fast_mode_writes_every_row(bench, tmp_path, capsys):
    md, png = tmp_path / "b" / "samplers.md", tmp_path / "b" / "samplers.png"
    results = bench.main(["--fast", "--seed", "1", "--out-md", str(md), "--out-png", str(png)])
    text = md.read_text()
    assert text in capsys.readouterr().out
    assert png.stat().st_size > 10_000
    for name in bench.SAMPLERS:
        assert text.count(f"| {name} |") == 2  # one row in each table
    assert text.count(f"| {bench.FLOOR} |") == 2
    assert sum(line.startswith(("- HOLDS", "- FAILS")) for line in text.splitlines()) == 2
    assert "First NFE with sliced W2 within the floor band" in text
    for r in results:  # honest NFE: counted calls, as each sampler's formula says
        expected = {"heun": 2 * r["steps"] - 1, "em": r["steps"], "pc": 2 * r["steps"]}
        kind = "em" if r["sampler"] == bench.EM else "pc" if r["sampler"].startswith("(f)") else "heun"
        assert r["nfe"] == expected[kind]
        assert math.isfinite(r["sw2"]) and 0 <= r["mode"] <= 1


def test_target_verdicts_account_for_the_noise(bench):
    floor = {"sw2": (0.04, 0.01), "mode": (0.01, 0.004)}  # tol = 2 sqrt(2) 0.01 = 0.028
    rows = [(bench.DEFAULT, 35, 0.04), (bench.DEFAULT, 1023, 0.04), (bench.EM, 1023, 0.10),
            (bench.DIFFUSERS, 35, 0.50), (bench.DIFFUSERS, 1023, 0.05)]
    results = [dict(sampler=s, target=t, nfe=t, sw2=v) for s, t, v in rows]
    (v1, t1), (v2, t2) = bench.targets(results, floor)
    assert v1 == "HOLDS" and "0.0400 at 35 NFE vs 0.1000 at 1023 NFE" in t1
    assert v2 == "HOLDS (within the noise)" and "significantly better at 35 NFE" in t2
    results[2]["sw2"], results[4]["sw2"] = 0.03, 0.035  # ours now higher than both, by less than tol
    assert [v for v, _ in bench.targets(results, floor)] == ["FAILS (within the noise)"] * 2
    results[4]["sw2"] = 0.001  # now significantly worse than diffusers at 1023
    assert bench.targets(results, floor)[1][0] == "FAILS"
