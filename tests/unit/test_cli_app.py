"""The root command: the ``--help`` fast path, the one error handler, the exit code table."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pcigate import errors
from pcigate.errors import ExitCode

PCIGATE = Path(sys.executable).parent / "pcigate"
HEAVY = ["httpx", "rich", "keyring", "authlib", "pydantic", "pcigate.models", "pcigate.client", "uvloop"]


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("PCIGATE_")}
    base.update(env or {})
    return subprocess.run(
        [str(PCIGATE), *args], capture_output=True, text=True, env=base, timeout=30, stdin=subprocess.DEVNULL
    )


def test_help_imports_nothing_heavy() -> None:
    code = (
        "import sys\n"
        "sys.argv = ['pcigate', '--help']\n"
        "import pcigate.app\n"
        "try:\n"
        "    pcigate.app.main()\n"
        "except SystemExit:\n"
        "    pass\n"
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert "Usage: pcigate" in proc.stdout


def test_import_app_does_not_import_httpx() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, pcigate.app; print('httpx' in sys.modules, 'rich' in sys.modules)",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.stdout.split() == ["False", "False"]


def test_version() -> None:
    proc = run("--version")
    assert proc.returncode == 0
    assert proc.stdout.strip() == "pcigate 0.1.0"


@pytest.mark.parametrize(
    "cmd", [[], ["connect"], ["sessions"], ["login"], ["targets"], ["whoami"], ["logout"]]
)
def test_every_command_has_help_and_json(cmd: list[str]) -> None:
    proc = run(*cmd, "--help")
    assert proc.returncode == 0, proc.stderr
    assert "--json" in proc.stdout


def test_broker_down_is_one_line_exit_6() -> None:
    proc = run("--broker", "http://127.0.0.1:9", "targets", env={"PCIGATE_TOKEN": "x"})
    assert proc.returncode == ExitCode.BROKER_UNAVAILABLE
    assert proc.stderr == "error: cannot reach the broker at http://127.0.0.1:9\n"
    assert "Traceback" not in proc.stderr


def test_bad_duration_is_usage_error() -> None:
    proc = run("connect", "prod-db", "--for", "soon", env={"PCIGATE_TOKEN": "x"})
    assert proc.returncode == ExitCode.USAGE
    assert proc.stderr.startswith("error: invalid duration 'soon'\nhint: ")


def test_unknown_option_is_usage() -> None:
    assert run("targets", "--nope").returncode == 2


def test_missing_token_file(tmp_path: Path) -> None:
    proc = run("--token-file", str(tmp_path / "absent"), "whoami")
    assert proc.returncode == 2


def test_exit_code_table() -> None:
    """The documented exit codes are stable: scripts depend on them."""
    expected = {
        "UsageError": 2,
        "AuthRequired": 3,
        "AccessDenied": 4,
        "NotFound": 5,
        "BrokerUnavailable": 6,
        "VaultUnavailable": 7,
        "DatabaseUnavailable": 8,
        "PortInUse": 9,
        "PendingApproval": 10,
        "KeyringUnavailable": 11,
        "ProtocolError": 12,
        "RecordingError": 13,
    }
    for name, code in expected.items():
        cls = getattr(errors, name)
        assert issubclass(cls, errors.PcigateError)
        assert int(cls.exit_code) == code, name
    assert ExitCode.INTERRUPTED == 130
    assert len({int(getattr(errors, n).exit_code) for n in expected}) == len(expected)


def test_main_prints_error_and_hint(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import pcigate.app as app_mod

    def boom(*a: object, **k: object) -> None:
        raise errors.PortInUse("port 5432 is in use", hint="use --port")

    monkeypatch.setattr(app_mod, "app", boom)
    with pytest.raises(SystemExit) as exit_info:
        app_mod.main()
    assert exit_info.value.code == 9
    assert capsys.readouterr().err == "error: port 5432 is in use\nhint: use --port\n"


def test_main_keyboard_interrupt(monkeypatch: pytest.MonkeyPatch) -> None:
    import pcigate.app as app_mod

    def interrupted(*a: object, **k: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(app_mod, "app", interrupted)
    with pytest.raises(SystemExit) as exit_info:
        app_mod.main()
    assert exit_info.value.code == 130
