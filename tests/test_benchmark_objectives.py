"""scripts/benchmark_objectives.py on two tiny untrained models: every objective, NFE and mode in the table."""

import importlib.util
import json
from pathlib import Path

import yaml

from conftest import untrained_checkpoint

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark_objectives.py"


def test_every_row_has_both_metrics_at_every_nfe_and_mode(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("benchmark_objectives", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    ve = untrained_checkpoint(tmp_path / "ve.ckpt", sigma_max=10.0)
    edm = untrained_checkpoint(tmp_path / "edm.ckpt", sigma_max=10.0, precond="edm", sigma_data=0.75,
                               sigma_dist="log_normal", loss_weight="edm")
    (tmp_path / "tuned.yaml").write_text(yaml.safe_dump({"model": {"num_steps": 18, "s_noise": 0.9, "s_min": 0.5}}))
    md = tmp_path / "objectives.md"
    results = bench.main(["--row", f"VE={ve}", "--row", f"EDM={edm},{tmp_path / 'tuned.yaml'}", "--nfe", "3,5",
                          "--n", "4", "--ode-steps", "1", "--out-md", str(md)])
    text = md.read_text()
    assert text in capsys.readouterr().out and (tmp_path / "objectives.png").stat().st_size > 0
    assert [(r["label"], r["precond"], r["loss_weight"]) for r in results] == [("VE", "ve", "ve"),
                                                                              ("EDM", "edm", "edm")]
    assert results[1]["tuned"] == {"s_noise": 0.9, "s_min": 0.5}  # N comes from the NFE, not from the file
    for r in results:
        cells = [r[mode][nfe] for mode in ("deterministic", "churn") for nfe in ("3", "5")]
        assert all(c["fid"] > 0 and c["fd_pixels"] > 0 for c in cells) and r["bpd"] > 0
        assert text.count(f"| {r['label']} |") == 1
    assert json.loads(md.with_suffix(".json").read_text())[1]["deterministic"]["3"] == results[1]["deterministic"]["3"]
    # an untrained network's samples differ by objective: the rows are not one model twice
    assert results[0]["deterministic"]["3"] != results[1]["deterministic"]["3"]
