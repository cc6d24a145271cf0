"""Suite-wide pytest wiring.

* Everything under ``tests/integration/`` is marked ``integration`` automatically (select with
  ``-m integration``, skip with ``-m "not integration"`` or ``--no-integration``).
* ``--keep-stack`` keeps the integration stack's work directory (logs, broker DB, recordings) for a
  post-mortem.
* Hypothesis has no per-example deadline: on these shared 2-core machines the first example of a test can
  take a few hundred ms (a first import, a busy neighbour), and a deadline then fails a correct test.
  Speed is measured by the benchmarks, not asserted here.
* The CLI's warm start (``pcigate.resident``) is off for every CLI the tests run (``PCIGATE_RESIDENT=0``),
  unless a test turns it on (``Stack.cli_env``, tests/integration/test_warm_start.py): a helper left behind
  would outlive the run.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from hypothesis import settings

os.environ["PCIGATE_RESIDENT"] = "0"
settings.register_profile("pcigate", deadline=None)
settings.load_profile("pcigate")

INTEGRATION_DIR = Path(__file__).resolve().parent / "integration"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("pcigate")
    group.addoption("--no-integration", action="store_true", default=False,
                    help="skip tests that need the real stack (tests/integration)")
    group.addoption("--keep-stack", action="store_true", default=False,
                    help="keep the integration stack's work directory (its path is printed)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip = pytest.mark.skip(reason="--no-integration given")
    for item in items:
        if INTEGRATION_DIR in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.integration)
            if config.getoption("--no-integration"):
                item.add_marker(skip)


def _helpers_since(started: float) -> list[psutil.Process]:
    """Warm-start helpers (pcigate.resident) that started after ``started`` (a process's create_time)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "create_time"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if "import pcigate.resident" in cmd and (proc.info["create_time"] or 0) >= started:
            found.append(proc)
    return found


@pytest.fixture(scope="session", autouse=True)
def no_helper_left_behind() -> Iterator[None]:
    """Every warm-start helper the tests started is gone when they end (they outlive a CI run otherwise)."""
    started = time.time() - 1
    yield
    deadline = time.monotonic() + 10
    while (left := [p for p in _helpers_since(started) if p.status() != psutil.STATUS_ZOMBIE]):
        if time.monotonic() > deadline:
            where = [p.info["cmdline"][-1] for p in left]
            for p in left:
                p.kill()
            pytest.fail(f"warm-start helpers left running by the tests: {where}")
        time.sleep(0.1)
