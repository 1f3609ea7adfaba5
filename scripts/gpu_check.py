"""One-command GPU check, run by scripts/gpu_check.sh (at most 8 minutes on one H100; no downloads, no network):

    bash scripts/gpu_check.sh [OUT] [--smoke]          # OUT defaults to gpu_check/

Parts, each in its own process group under its own time limit; a part that fails or runs over is recorded and the
others still run; the exit code is 1 if any part did not pass:
  env       device, GPU memory, torch / CUDA / cuDNN / diffusers / lightning versions, the TF32 settings.
  tests     the test suite without the slow tests. Whatever picks its device itself runs on CUDA: the digits
            config's `trainer.accelerator: auto` (the shared `kve fit` fixture, `kve fit/predict/test` runs),
            Trainers built without an accelerator, and the console scripts' default `--device`; tests that pin
            cpu stay on cpu. scripts/pytest_cuda_usage.py lists the tests that allocated CUDA memory in the pytest
            process (the `python -m kve_lightning` subprocesses of some tests also use CUDA but are not counted).
  train     scripts/benchmark_train.py: Lightning training img/s of the CIFAR-10 config's UNet (batch 128, digits
            resized to 32 x 32 RGB) for fp32 / bf16-mixed / + channels_last / + compile, each in its own process,
            the first 30 steps (compilation included) left out, CUDA synchronized by Lightning's step.
  sampling  scripts/benchmark_sampling_speed.py: img/s of ours (`sample_karras_ve` + `VEDenoiser`) vs diffusers'
            `KarrasVePipeline` on the same CIFAR-10 UNet at the same NFE (18 steps = 35 NFE), batch 128,
            warm-up excluded, CUDA synchronized, best of 3.
Writes OUT/gpu_check.json and OUT/gpu_check.md (rewritten after each part), each part's log OUT/PART.log and its
results (env.json, tests.xml, tests_cuda.json, train.json, sampling.json). Without CUDA it exits 2; --smoke runs
every part at the smallest sizes on any device, to check the script: one fast test, two training runs of 2 steps
(fp32, and bf16-mixed + channels_last; compile left out: Inductor takes minutes on a CPU), 2 sampling steps.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from contextlib import suppress
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GRACE_S = 5  # a part past its limit gets SIGINT (pytest still writes its report), then SIGKILL this much later


def parts(out: str, smoke: bool) -> dict[str, tuple[int, list[str]]]:
    """Each part's time limit in seconds and its command, run from the repository root with ``out`` relative to it.
    The full limits add up to 440 s, plus GRACE_S for each part that runs over: within 8 minutes."""
    py = sys.executable
    if smoke:
        limits = dict(env=120, tests=300, train=600, sampling=300)
        # the least that runs every command for real: a test that imports no Lightning or diffusers, the baseline and
        # both options of the training variants in two processes, one timed step each, one sampled image of 3 NFE
        tests = ["tests/test_sampling.py::test_churn_window_and_nfe_count"]
        train = ["--config", "configs/digits.yaml", "--variants", "fp32,bf16+cl", "--batch-size", "2",
                 "--steps", "2", "--warmup", "1"]
        sampling = ["--size", "8", "--batch", "1", "--steps", "2", "--repeats", "1"]
    else:
        limits = dict(env=30, tests=160, train=190, sampling=60)
        tests = ["-m", "not slow", "--ignore=tests/test_gpu_check.py"]
        train = ["--config", "configs/cifar10.yaml", "--variants", "fp32,bf16,bf16+cl,bf16+cl+compile",
                 "--batch-size", "128", "--steps", "80", "--warmup", "30"]
        sampling = ["--config", "configs/cifar10.yaml", "--batch", "128", "--steps", "18", "--repeats", "3"]
    commands = {
        "env": [py, "scripts/gpu_check.py", "--env", f"{out}/env.json"],
        "tests": [py, "-m", "pytest", *tests, "-q", "-p", "no:cacheprovider", "-p", "pytest_cuda_usage",
                  "--cuda-usage", f"{out}/tests_cuda.json", f"--junitxml={out}/tests.xml"],
        "train": [py, "scripts/benchmark_train.py", *train, "--repeats", "1", "--json", f"{out}/train.json"],
        "sampling": [py, "scripts/benchmark_sampling_speed.py", *sampling, "--json", f"{out}/sampling.json"],
    }
    return {name: (limits[name], cmd) for name, cmd in commands.items()}


def environment() -> dict:
    """The machine and versions the figures belong to, and the float32 settings they depend on."""
    import diffusers
    import lightning
    import torch

    cuda = torch.cuda.is_available()
    gpu = torch.cuda.get_device_properties(0) if cuda else None
    return {
        "device": gpu.name if cuda else f"cpu {platform.processor() or platform.machine()}",
        "gpus": torch.cuda.device_count(), "gpu_memory_gib": round(gpu.total_memory / 2**30, 1) if cuda else None,
        "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if cuda else None,
        "diffusers": diffusers.__version__, "lightning": lightning.__version__,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
    }


def stop(proc: subprocess.Popen) -> None:
    """SIGINT to the part's process group, SIGKILL to what is left of it GRACE_S later."""
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGINT)
    with suppress(subprocess.TimeoutExpired):
        proc.wait(GRACE_S)
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def run_part(cmd: list[str], limit: float, log: Path) -> dict:
    """``cmd`` from the repository root in a new process group, output to ``log``, stopped after ``limit`` s."""
    path = [str(REPO), str(REPO / "scripts")] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
    env = os.environ | {"PYTHONPATH": os.pathsep.join(path), "PYTHONUNBUFFERED": "1"}
    start, timed_out = time.monotonic(), False
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            proc.wait(limit)
        except subprocess.TimeoutExpired:
            timed_out = True
            stop(proc)
        except BaseException:
            stop(proc)
            raise
    status = "timed out" if timed_out else "passed" if proc.returncode == 0 else "failed"
    return {"status": status, "returncode": proc.returncode, "seconds": round(time.monotonic() - start, 1),
            "limit_s": limit}


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def test_results(out: Path) -> dict | None:
    """Counts and failed tests from pytest's JUnit XML (our own run's), and the tests that used CUDA."""
    if not (out / "tests.xml").is_file():
        return None
    suite = ET.parse(out / "tests.xml").getroot().find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    return counts | {"failed": failed, "cuda": read_json(out / "tests_cuda.json")}


RESULTS = {"env": lambda out: read_json(out / "env.json"), "tests": test_results,
           "train": lambda out: read_json(out / "train.json"), "sampling": lambda out: read_json(out / "sampling.json")}


def markdown(report: dict) -> str:
    parts, lines = report["parts"], ["# GPU check", ""]
    if report["smoke"]:
        lines += ["**Smoke mode**: tiny sizes, no compile; these figures check the script and measure nothing.", ""]
    env = parts.get("env", {}).get("result")
    if env:
        gpu = f"{env['gpus']} GPU, {env['gpu_memory_gib']} GiB, " if env["gpus"] else ""
        lines += [f"{env['device']} ({gpu}{env['cpus']} CPUs); Python {env['python']}, torch {env['torch']}, "
                  f"CUDA {env['cuda']}, cuDNN {env['cudnn']}, diffusers {env['diffusers']}, lightning "
                  f"{env['lightning']}; float32 matmul precision {env['float32_matmul_precision']!r} (KarrasVeModule "
                  f"sets 'high' when it trains on CUDA), cuDNN TF32 {env['cudnn_allow_tf32']}.", ""]
    lines += ["| part | status | s | limit (s) |", "|---|---|---|---|"]
    lines += [f"| {name} | {p['status']} | {p['seconds']} | {p['limit_s']} |" for name, p in parts.items()]
    tests = parts.get("tests", {}).get("result")
    if tests:
        n_ok = tests["tests"] - tests["failures"] - tests["errors"] - tests["skipped"]
        lines += ["", "## Tests", "", f"{n_ok} passed, {tests['failures']} failed, {tests['errors']} errors, "
                  f"{tests['skipped']} skipped of {tests['tests']} run."]
        if tests["cuda"] is not None:
            lines.append(f"{len(tests['cuda']['tests_using_cuda'])} of them allocated CUDA memory in the pytest "
                         "process (the list is in tests_cuda.json).")
        lines += [f"- failed: `{name}`" for name in tests["failed"]]
    train = parts.get("train", {}).get("result")
    if train:
        lines += ["", "## Training img/s", "", f"`{train['config']}`'s UNet on {train['device']}, Lightning loop, "
                  f"batch {train['batch_size']}, {train['steps']} steps of which the first {train['warmup']} are left "
                  "out, each run in its own process:", "", train["table"]]
        lines += [f"- {name} failed (exit {f['returncode']}): see train.log" for name, f in train["failed"].items()]
    sampling = parts.get("sampling", {}).get("result")
    if sampling:
        lines += ["", "## Sampling img/s: ours vs diffusers' KarrasVePipeline", "", sampling["table"]]
    lines += ["", "## Commands", "", "From the repository root, with `PYTHONPATH=.:scripts`:", "", "```bash"]
    lines += [p["command"] for p in parts.values()] + ["```", ""]
    return "\n".join(lines)


def write(path: Path, text: str) -> None:
    from kve_lightning.storage import save_atomic

    save_atomic(path, lambda f: f.write(text.encode()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", nargs="?", default="gpu_check", help="output folder (default: gpu_check)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on any device: checks the script in minutes")
    p.add_argument("--env", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.env:
        write(args.env, json.dumps(environment(), indent=1))
        return 0
    out = Path(args.out).resolve()
    if out.exists() and not out.is_dir():
        p.exit(2, f"gpu_check: OUT {args.out!r} exists and is not a folder\n")
    import torch

    if not args.smoke and not torch.cuda.is_available():
        p.exit(2, "gpu_check: no CUDA device here (torch.cuda.is_available() is False); --smoke checks the script\n")
    out.mkdir(parents=True, exist_ok=True)
    rel = os.path.relpath(out, REPO)
    report = {"smoke": args.smoke, "out": args.out, "parts": {}}
    for name, (limit, cmd) in parts(rel, args.smoke).items():
        print(f"gpu_check: {name} (at most {limit} s) ...", file=sys.stderr, flush=True)
        part = run_part(cmd, limit, out / f"{name}.log")
        part["command"] = shlex.join(["python", *cmd[1:]])
        part["result"] = RESULTS[name](out)
        report["parts"][name] = part
        print(f"gpu_check: {name} {part['status']} in {part['seconds']} s", file=sys.stderr, flush=True)
        write(out / "gpu_check.json", json.dumps(report, indent=1))
        write(out / "gpu_check.md", markdown(report))
    print(markdown(report))
    return int(any(p["status"] != "passed" for p in report["parts"].values()))


if __name__ == "__main__":
    sys.exit(main())
