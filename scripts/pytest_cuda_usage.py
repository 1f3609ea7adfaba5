"""pytest plugin of scripts/gpu_check.py: which tests allocated CUDA memory in the pytest process.

    PYTHONPATH=scripts python -m pytest -p pytest_cuda_usage --cuda-usage OUT.json

A test counts when CUDA's peak allocated bytes rose above their level at its start during its setup, call or
teardown (a session fixture that trains on CUDA counts for the first test that asks for it). Work in subprocesses
that a test starts (``python -m kve_lightning ...``) is not seen.
"""

from __future__ import annotations

import json

import pytest
import torch

from kve_lightning.storage import save_atomic

_used: list[str] = []


def pytest_addoption(parser):
    parser.addoption("--cuda-usage", metavar="PATH", help="write the ids of the tests that allocated CUDA memory here")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    level = 0
    if torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()
        level = torch.cuda.memory_allocated()
    yield
    if torch.cuda.is_initialized() and torch.cuda.max_memory_allocated() > level:
        _used.append(item.nodeid)


def pytest_sessionfinish(session):
    path = session.config.getoption("--cuda-usage")
    if path:
        report = {"cuda_available": torch.cuda.is_available(), "tests_using_cuda": _used}
        save_atomic(path, lambda f: f.write(json.dumps(report, indent=1).encode()))
