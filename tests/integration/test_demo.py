"""The README's first command keeps working: the demo journey runs end to end on a stack of its own.

(`.ci/demo` is `.ci/bootstrap` + this module; the bootstrap itself is exercised by `.ci/run`.)
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_demo_journey() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tests.stack.demo"], cwd=ROOT, capture_output=True, text=True, timeout=240,
        stdin=subprocess.DEVNULL,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    for step in ("$ pcigate login --device", "$ pcigate whoami", "$ pcigate targets",
                 "$ pcigate connect prod-db", "$ pcigate sessions"):
        assert step in out, out[-4000:]
    assert "Grace Hopper" in out  # the query ran through the tunnel
    assert "card 4111 11** **** 1111 seen by webops" in out  # ssh with a certificate, the number masked
    assert "recording uploaded" in out
    assert "dynamic database roles left: 0" in out
    # connect and ssh through the warm start, as users have it (which of the two: the helper's timing)
    assert re.search(r"\[demo\] it ran (in a fork of the warm-start helper|in-process)", out), out[-4000:]
    assert "Traceback" not in out
