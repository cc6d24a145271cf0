"""Regenerate the shell completion scripts and the CLI help reference from the CLI itself.

    .venv/bin/python completions/generate.py          # write completions/*
    .venv/bin/python completions/generate.py --check  # exit 1 when a file is stale (CI, tests)

Completion scripts come from typer/click's own shell-completion source (``_PCIGATE_COMPLETE=source_bash``,
``source_zsh``, ``source_fish``); they call back into ``pcigate`` for the actual candidates.
``pcigate-help.txt`` is every command's ``--help`` at a fixed width, so that a change of the CLI's
surface shows in review.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHELLS = {"bash": "pcigate.bash", "zsh": "pcigate.zsh", "fish": "pcigate.fish"}
HELP_COMMANDS: list[list[str]] = [
    [],
    ["login"],
    ["logout"],
    ["whoami"],
    ["targets"],
    ["connect"],
    ["ssh"],
    ["replay"],
    ["sessions"],
    ["sessions", "show"],
    ["sessions", "sync"],
    ["sessions", "download"],
]
HELP_FILE = "pcigate-help.txt"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PCIGATE_", "_PCIGATE_", "_TYPER_"))}
    env.update(COLUMNS="100", LINES="50", NO_COLOR="1", TERM="dumb", LC_ALL="C.UTF-8", PCIGATE_RESIDENT="0",
               **extra)
    return env


def _pcigate(args: list[str], **env: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "pcigate", *args],
        capture_output=True,
        text=True,
        env=_env(**env),
        check=True,
        timeout=60,
    )
    return proc.stdout


def render() -> dict[str, str]:
    files = {name: _pcigate([], _PCIGATE_COMPLETE=f"source_{shell}") for shell, name in SHELLS.items()}
    sections = []
    for cmd in HELP_COMMANDS:
        title = " ".join(["pcigate", *cmd])
        sections.append(f"$ {title} --help\n{_pcigate([*cmd, '--help'])}")
    files[HELP_FILE] = "\n".join(sections)
    return files


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    for name, content in render().items():
        path = HERE / name
        current = path.read_text(encoding="utf-8") if path.exists() else None
        if current == content:
            continue
        stale.append(name)
        if not check:
            path.write_text(content, encoding="utf-8")
    if check and stale:
        sys.stderr.write(f"stale: {', '.join(stale)}; run: python completions/generate.py\n")
        return 1
    for name in stale:
        sys.stdout.write(f"wrote completions/{name}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
