"""scripts/gpu_check.py (run by scripts/gpu_check.sh): time limits, failures recorded while the other parts run on,
the exit codes, and the whole check in --smoke mode on CPU."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def sleeper(tmp_path: Path, deaf: bool) -> list[str]:
    """A process that starts a child writing the file `alive` after 2 s, then sleeps; ignoring SIGINT if `deaf`
    (ignored signals stay ignored in the child)."""
    child = f"import time; time.sleep(2); open({str(tmp_path / 'alive')!r}, 'w')"
    return python(("import signal; signal.signal(signal.SIGINT, signal.SIG_IGN); " if deaf else "")
                  + f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {child!r}]); "
                  + "time.sleep(30)")


@pytest.mark.parametrize("deaf", [False, True])
def test_a_part_past_its_limit_is_stopped_with_its_children(gpu_check, tmp_path, monkeypatch, deaf):
    """SIGINT at the limit: a part that heeds it ends by it (within a grace long enough for any load); one that
    ignores it is killed GRACE_S later; its child goes with it."""
    monkeypatch.setattr(gpu_check, "GRACE_S", 0.5 if deaf else 60)
    start = time.monotonic()
    part = gpu_check.run_part(sleeper(tmp_path, deaf), 1.5, tmp_path / "log")
    took = time.monotonic() - start
    assert part["status"] == "timed out" and part["limit_s"] == 1.5
    assert part["returncode"] == (-signal.SIGKILL if deaf else -signal.SIGINT)
    time.sleep(max(0.0, 4.5 - took))  # the child started before 1.5 s, so it would have written its file by 3.5 s
    assert not (tmp_path / "alive").exists()


def test_a_failing_part_is_recorded_and_the_others_still_run(gpu_check, tmp_path, monkeypatch):
    fake = {"env": (60, python("print('env')")), "tests": (60, python("import sys; sys.exit(3)")),
            "train": (1, python("import time; time.sleep(30)")), "sampling": (60, python("print('sampled')"))}
    monkeypatch.setattr(gpu_check, "parts", lambda out, smoke: fake)
    assert gpu_check.main([str(tmp_path / "out"), "--smoke"]) == 1
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    status = {name: (p["status"], p["returncode"]) for name, p in report["parts"].items()}
    assert status["env"] == ("passed", 0) and status["tests"] == ("failed", 3) and status["sampling"] == ("passed", 0)
    assert status["train"][0] == "timed out"
    assert (tmp_path / "out" / "sampling.log").read_text() == "sampled\n"
    md = (tmp_path / "out" / "gpu_check.md").read_text()
    assert "| tests | failed |" in md and "| train | timed out |" in md and "| sampling | passed |" in md
    assert "python -c 'import sys; sys.exit(3)'" in md  # the commands, with the interpreter as plain `python`


def test_bad_out_and_no_cuda_exit_2_writing_nothing(gpu_check, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit) as err:
        gpu_check.main([str(tmp_path / "file")])
    assert err.value.code == 2
    assert f"{str(tmp_path / 'file')!r} exists and is not a folder" in capsys.readouterr().err
    if torch.cuda.is_available():
        return
    with pytest.raises(SystemExit) as err:
        gpu_check.main([str(tmp_path / "out")])
    assert err.value.code == 2 and "no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_smoke_run_end_to_end(tmp_path):
    """`bash scripts/gpu_check.sh OUT --smoke`: every part passes and its figures reach the JSON and the markdown."""
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), str(tmp_path / "out"), "--smoke"],
                          capture_output=True, text=True, env=os.environ | {"PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = tmp_path / "out"
    report = json.loads((out / "gpu_check.json").read_text())
    assert {name: p["status"] for name, p in report["parts"].items()} == dict.fromkeys(
        ["env", "tests", "train", "sampling"], "passed")
    parts = {name: p["result"] for name, p in report["parts"].items()}
    assert parts["env"]["torch"] == torch.__version__
    assert parts["tests"]["tests"] == 1 and parts["tests"]["failures"] == parts["tests"]["errors"] == 0
    assert torch.cuda.is_available() or parts["tests"]["cuda"]["tests_using_cuda"] == []
    runs = parts["train"]["runs"]
    assert list(runs) == ["fp32", "bf16+cl"] and all(r[0]["img_per_s"] > 0 for r in runs.values())
    assert parts["train"]["failed"] == {} and parts["train"]["steps"] == 2
    assert set(parts["sampling"]["seconds"]) == {"ours", "diffusers"} and parts["sampling"]["nfe"] == 3
    md = (out / "gpu_check.md").read_text()
    assert parts["train"]["table"] in md and parts["sampling"]["table"] in md
    assert proc.stdout.strip() == md.strip()


def test_benchmark_train_records_a_failed_run(tmp_path):
    """A run that fails is named in --json and the table, and the benchmark exits 1."""
    config = tmp_path / "bad.yaml"
    config.write_text("data: {batch_size: 4, channels: 2}\n")  # 2 channels: refused by the data and the model
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "benchmark_train.py"), "--config", str(config),
                           "--variants", "fp32", "--steps", "2", "--warmup", "1", "--repeats", "1",
                           "--json", str(tmp_path / "train.json")], capture_output=True, text=True)
    assert proc.returncode == 1, proc.stderr
    summary = json.loads((tmp_path / "train.json").read_text())
    assert summary["runs"] == {"fp32": []} and summary["failed"]["fp32"]["returncode"] != 0
    assert "channels must be 1 or 3, got channels=2" in summary["failed"]["fp32"]["stderr_tail"]
    assert "| fp32 | failed | | |" in summary["table"] and summary["table"] in proc.stdout
