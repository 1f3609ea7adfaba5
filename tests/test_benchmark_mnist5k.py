"""scripts/benchmark_mnist5k.py on a tiny untrained conditional model (the digits stand in for the 5,000 MNIST
digits: the checkpoint records no data settings)."""

import importlib.util
import math
from pathlib import Path

import pytest
from PIL import Image

from conftest import untrained_checkpoint
from kve_lightning.guidance import guided_nfe
from kve_lightning.lit.module import KarrasVeModule

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark_mnist5k.py"


def test_accuracy_rows_and_the_per_class_grid(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("benchmark_mnist5k", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    ckpt = untrained_checkpoint(tmp_path / "cond.ckpt", sigma_max=10.0, num_classes=10, num_steps=2)
    bench.main(["--ckpt_path", str(ckpt), "--scales", "1,2", "--per_class", "3", "--grid", str(tmp_path / "g.png")])
    out = capsys.readouterr().out
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| 1 |") or line.startswith("| 2 |")]
    assert [r[1] for r in rows] == ["3", "6"]  # guidance doubles the evaluations: 2 Heun steps, 3 NFE
    assert all(0 <= float(r[2].rstrip(" |")) <= 1 for r in rows)
    with Image.open(tmp_path / "g.png") as grid:  # 10 rows of 3, 8 x 8 images with 1-pixel padding, 4 x
        assert grid.size == (4 * (3 * 9 + 1), 4 * (10 * 9 + 1))
    (tmp_path / "tuned.yaml").write_text("# kve tune\nmodel:\n  num_steps: 3\n  guidance_sigma_max: 1.0\n")
    bench.main(["--ckpt_path", str(ckpt), "--scales", "1,2", "--per_class", "2", "--config",
                str(tmp_path / "tuned.yaml")])
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith(("| 1 |", "| 2 |"))]
    tuned = KarrasVeModule.from_checkpoint(ckpt).sampler.replace(num_steps=3, guidance_sigma_max=1.0)
    everywhere = guided_nfe(tuned.replace(guidance_scale=2.0, guidance_sigma_max=math.inf))
    assert [int(r[1]) for r in rows] == [5, guided_nfe(tuned.replace(guidance_scale=2.0))] and int(rows[1][1]) < everywhere
    with pytest.raises(SystemExit, match="unconditional"):
        bench.main(["--ckpt_path", str(untrained_checkpoint(tmp_path / "u.ckpt", sigma_max=10.0))])
