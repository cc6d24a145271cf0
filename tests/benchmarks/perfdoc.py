"""docs/performance.md: a benchmark's section between its own markers (``<!-- bench_NAME:begin/end -->``)."""

from __future__ import annotations

import argparse
import os
import platform
import re
from datetime import UTC, datetime
from pathlib import Path

PERF = Path(__file__).resolve().parents[2] / "docs" / "performance.md"


def write_marked(name: str, text: str, heading: str, intro: str = "") -> None:
    """Put ``text`` between the ``bench_<name>`` markers, or append a "## heading" section (with ``intro``
    before the markers) holding them."""
    begin, end = f"<!-- bench_{name}:begin -->", f"<!-- bench_{name}:end -->"
    doc = PERF.read_text() if PERF.exists() else "# Performance\n"
    block = f"{begin}\n{text}\n{end}"
    if begin in doc and end in doc:
        doc = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _m: block, doc, flags=re.S)
    else:
        doc = doc.rstrip("\n") + f"\n\n## {heading}\n\n" + (f"{intro}\n\n" if intro else "") + block + "\n"
    PERF.write_text(doc)


def bench_args(doc: str | None, rounds: int = 5) -> argparse.Namespace:
    """The in-process benchmarks' command line: ``--rounds N``, ``--no-write``."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0] if doc else None)
    ap.add_argument("--rounds", type=int, default=rounds)
    ap.add_argument("--no-write", action="store_true", help="print only, leave docs/performance.md alone")
    return ap.parse_args()


def measured(bench: str, rounds: int, what: str) -> str:
    """The first line of an in-process benchmark's section: when, where, how often, what."""
    when = datetime.now(UTC).strftime("%Y-%m-%d")
    return (f"Measured {when} on this machine ({os.cpu_count()} cores, Python {platform.python_version()}), "
            f"{rounds} rounds, medians (`python -m tests.benchmarks.{bench}`); {what}; load average at the "
            f"end {os.getloadavg()[0]:.1f} (shared machine: compare within one run).")
