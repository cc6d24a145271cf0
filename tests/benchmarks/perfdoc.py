"""docs/performance.md: a benchmark's section between its own markers (``<!-- bench_NAME:begin/end -->``)."""

from __future__ import annotations

import re
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
