"""The reaper's loop: what a failing pass leaves in the log."""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy.orm.exc import StaleDataError

from pcigate_broker import reaper


def _run_two_passes(monkeypatch: pytest.MonkeyPatch, error: Exception) -> None:
    passes: list[int] = []

    def failing_pass(broker: Any) -> int:
        passes.append(1)
        raise error

    monkeypatch.setattr(reaper, "reap_pass", failing_pass)
    sessions = SimpleNamespace(reaper_interval_seconds=0.01)
    broker: Any = SimpleNamespace(settings=SimpleNamespace(sessions=sessions))

    async def main() -> None:
        task = asyncio.create_task(reaper.run_reaper(broker))
        while len(passes) < 2:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())


def test_rows_changed_under_the_sealer_are_one_warning_and_the_loop_goes_on(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Injected: the race (an event deleted outside the broker between the sealer's read and its update, as
    the tamper tests do to the live broker's SQLite file) cannot be timed from outside."""
    caplog.set_level(logging.WARNING, logger=reaper.__name__)
    stale = StaleDataError("UPDATE statement on table 'audit_events' expected to update 1 row(s)")
    _run_two_passes(monkeypatch, stale)
    warnings = [r for r in caplog.records if "changed or deleted outside the broker" in r.getMessage()]
    assert len(warnings) >= 2
    assert all(r.levelno == logging.WARNING and r.exc_info is None for r in warnings)


def test_any_other_failing_pass_keeps_its_traceback(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=reaper.__name__)
    _run_two_passes(monkeypatch, RuntimeError("boom"))
    failed = [r for r in caplog.records if "reaper pass failed" in r.getMessage()]
    assert failed
    assert failed[0].exc_info is not None
