"""scripts/benchmark_solvers.py on a tiny untrained model: every row and budget, the NFE each cell spent."""

import importlib.util
from pathlib import Path

from conftest import untrained_checkpoint

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark_solvers.py"


def test_the_table_has_every_solver_at_every_budget(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("benchmark_solvers", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    ckpt = untrained_checkpoint(tmp_path / "tiny.ckpt", sigma_max=10.0)
    md = tmp_path / "b" / "solvers.md"
    results = bench.main(["--ckpt_path", str(ckpt), "--nfe", "3,8", "--n", "6", "--batch-size", "4",
                          "--device", "cpu", "--out-md", str(md)])
    text = md.read_text()
    assert text in capsys.readouterr().out
    assert [r["label"] for r in results] == list(bench.ROWS)
    for r in results:
        assert f"| {r['label']} |" in text
        two_per_step = "Restart" in r["label"] or "Heun" in r["label"] or "Algorithm 2" in r["label"]
        # Heun-based rows spend 2N - 1 (+ 4 for restart's [3, 1, ...]): 3 and 7 of 8; restart cannot spend 3
        expected = {3: None if "Restart" in r["label"] else 3, 8: 7 if two_per_step else 8}
        assert {nfe: None if cell is None else cell[1] for nfe, cell in ((k, r[k]) for k in (3, 8))} == expected
        assert all(cell is None or cell[0] == cell[0] for cell in (r[3], r[8]))  # FIDs are numbers, not NaN
    assert "| - |" in text and "(7)" in text
