"""The generated shell completions and help reference in completions/ are current."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_completions_are_current() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "completions" / "generate.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr + " (run: .venv/bin/python completions/generate.py)"


def test_completion_scripts_call_back_into_pcigate() -> None:
    for name, marker in [
        ("pcigate.bash", "complete_bash"),
        ("pcigate.zsh", "complete_zsh"),
        ("pcigate.fish", "complete_fish"),
    ]:
        text = (ROOT / "completions" / name).read_text()
        assert f"_PCIGATE_COMPLETE={marker}" in text


def test_bash_completion_candidates() -> None:
    env = {
        "COMP_WORDS": "pcigate sess",
        "COMP_CWORD": "1",
        "_PCIGATE_COMPLETE": "complete_bash",
        "PATH": "/usr/bin",
    }
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "pcigate")], env=env, capture_output=True, text=True, timeout=30
    )
    assert proc.stdout.split() == ["sessions"]
