"""scripts/benchmark_solvers.py on a tiny untrained model: every row and budget, the NFE each cell spent, both
metrics and the mixture's sliced W2, k-diffusion's samplers equal to ours where they are the same algorithm, a
`kve tune` config as a row, and our rows alone without k-diffusion."""

import importlib.util
from pathlib import Path

import pytest
import yaml

from conftest import untrained_checkpoint

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark_solvers.py"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPT.parent))  # it imports the mixture of benchmark_samplers.py
    spec = importlib.util.spec_from_file_location("benchmark_solvers", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_solver_at_every_budget(bench, tmp_path, capsys):
    ckpt = untrained_checkpoint(tmp_path / "tiny.ckpt", sigma_max=10.0)
    config = tmp_path / "tuned.yaml"
    config.write_text(yaml.safe_dump({"model": {"num_steps": 5, "solver": "dpmpp_2m_sde", "eta": 0.5}}))
    md = tmp_path / "b" / "solvers.md"
    results = bench.main(["--ckpt_path", str(ckpt), "--nfe", "3,8", "--n", "6", "--batch-size", "4",
                          "--config", str(config), "--out-md", str(md),
                          "--out-png", str(tmp_path / "b" / "solvers.png")])
    text = md.read_text()
    assert text in capsys.readouterr().out and (tmp_path / "b" / "solvers.png").stat().st_size > 0
    assert md.with_suffix(".json").stat().st_size > 0
    labels = [r["label"] for r in results]
    kd = importlib.util.find_spec("k_diffusion") is not None
    assert labels[:len(bench.ROWS)] == list(bench.ROWS) and labels[len(bench.ROWS)] == "`kve tune` winner (tuned.yaml)"
    assert len(labels) == len(bench.ROWS) + 1 + (len(bench.K_DIFFUSION) if kd else 0)
    for r in results[:len(bench.ROWS)] + results[len(bench.ROWS) + 1:]:
        assert text.count(f"\n| {r['label']} |") == 2  # the quality table and the sliced-W2 table
        two_per_step = any(word in r["label"] for word in ("Restart", "Heun", "Algorithm 2", "sample_heun"))
        # Heun-based rows spend 2N - 1 (+ 4 for restart's [3, 1, ...]): 3 and 7 of 8; restart cannot spend 3
        expected = {3: None if "Restart" in r["label"] else 3, 8: 7 if two_per_step else 8}
        assert {nfe: r[nfe]["nfe"] if nfe in r else None for nfe in (3, 8)} == expected
        for c in (r[nfe] for nfe in (3, 8) if nfe in r):
            assert c["fid"] > 0 and c["fd_pixels"] > 0 and 0 < c["sw2"] < 10  # numbers, not NaN
    assert set(results[len(bench.ROWS)]) == {"label", "kind", 5}  # the config's own NFE: 5 steps, one each
    assert "| - |" in text and "(7)" in text


@pytest.mark.skipif(importlib.util.find_spec("k_diffusion") is None, reason="k-diffusion is not installed")
def test_k_diffusion_rows_equal_ours_where_the_algorithms_are_the_same(bench, tmp_path):
    """The same start and per-step noise in both: k-diffusion's sample_heun, sample_dpmpp_2m and
    sample_dpmpp_2m_sde give our deterministic Heun, DPM-Solver++(2M) and (2M) SDE rows' figures."""
    ckpt = untrained_checkpoint(tmp_path / "tiny.ckpt", sigma_max=10.0)
    results = {r["label"]: r for r in bench.main(["--ckpt_path", str(ckpt), "--nfe", "5", "--n", "6"])}
    pairs = {"Heun, deterministic, EDM rho = 7": "sample_heun", "DPM-Solver++(2M), EDM rho = 7": "sample_dpmpp_2m",
             "DPM-Solver++(2M) SDE, eta 1, midpoint, S_noise 1, EDM rho = 7": "sample_dpmpp_2m_sde"}
    for ours, theirs in pairs.items():
        a, b = results[ours][5], results[f"k-diffusion `{theirs}`, Karras rho = 7"][5]
        assert a["nfe"] == b["nfe"] == 5
        for key in ("fid", "fd_pixels", "sw2"):
            assert a[key] == pytest.approx(b[key], rel=1e-3), (ours, key)
    assert results["k-diffusion `sample_lms`, Karras rho = 7"][5]["fid"] != results[
        "DPM-Solver++(2M), EDM rho = 7"][5]["fid"]  # a different algorithm does differ


def test_without_k_diffusion_our_rows_still_run(bench, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench, "k_diffusion_sampling", lambda: None)
    ckpt = untrained_checkpoint(tmp_path / "tiny.ckpt", sigma_max=10.0)
    results = bench.main(["--ckpt_path", str(ckpt), "--nfe", "5", "--n", "4"])
    assert [r["label"] for r in results] == list(bench.ROWS)
    assert "k-diffusion is not installed: running our rows only" in capsys.readouterr().err
