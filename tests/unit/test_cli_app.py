"""The root command: the ``--help`` fast path, the one error handler, the exit code table."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pcigate import errors, startup
from pcigate.errors import ExitCode

PCIGATE = Path(sys.executable).parent / "pcigate"
HEAVY = ["httpx", "rich", "keyring", "authlib", "pydantic", "pcigate.models", "pcigate.client", "uvloop"]


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("PCIGATE_")}
    base["PCIGATE_RESIDENT"] = "0"  # no warm-start helper left behind (tests/conftest.py)
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


def test_connect_marks_its_start_up_phases_only_when_asked() -> None:
    """PCIGATE_TRACE_STARTUP=1 (tests/benchmarks/bench_connect.py): a line per phase on stderr, on the clock
    every process shares, in order; the broker is down here, so the phases end at the request."""
    args = ("--broker", "http://127.0.0.1:9", "connect", "prod-db", "--no-exec")
    t0 = time.monotonic() * 1000.0
    proc = run(*args, env={"PCIGATE_TOKEN": "x", startup.TRACE_ENV: "1"})
    t1 = time.monotonic() * 1000.0
    assert proc.returncode == ExitCode.BROKER_UNAVAILABLE
    lines = proc.stderr.splitlines()
    marks = [line.split() for line in lines if line.startswith(startup.TRACE_PREFIX + " ")]
    assert [m[1] for m in marks] == ["start", "command", "request"]
    times = [float(m[2]) for m in marks]
    assert t0 < times[0] <= times[1] <= times[2] < t1
    assert [line for line in lines if not line.startswith(startup.TRACE_PREFIX)] == [
        "error: cannot reach the broker at http://127.0.0.1:9"
    ]
    quiet = run(*args, env={"PCIGATE_TOKEN": "x"})
    assert quiet.returncode == ExitCode.BROKER_UNAVAILABLE
    assert quiet.stderr == "error: cannot reach the broker at http://127.0.0.1:9\n"


@pytest.mark.parametrize(("cmd", "text"), [("connect", "99999h"), ("ssh", "25h")])
def test_a_session_longer_than_a_day_is_a_usage_error(cmd: str, text: str) -> None:
    target = "prod-db" if cmd == "connect" else "web-1"
    proc = run(cmd, target, "--for", text, env={"PCIGATE_TOKEN": "x"})
    assert proc.returncode == ExitCode.USAGE
    assert proc.stderr == f"error: invalid duration '{text}': at most 24h\n"


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["connect", "x" * 3000], "error: invalid target: String should have at most 128 characters\n"),
        (
            ["connect", "prod-db", "--level", "l" * 65],
            "error: invalid level: String should have at most 64 characters\n",
        ),
    ],
)
def test_arguments_a_request_model_refuses_are_one_usage_line(args: list[str], line: str) -> None:
    proc = run(*args, "--no-exec", env={"PCIGATE_TOKEN": "x"})
    assert proc.returncode == ExitCode.USAGE
    assert proc.stderr == line


@pytest.mark.parametrize("sid", ["", ".", "..", "?a=b", "#", "../targets", "a/b", "é"])
def test_a_session_id_that_cannot_be_one_names_no_session(sid: str) -> None:
    """It never becomes another route of the broker (``../targets`` was GET /v1/targets)."""
    for args in (["sessions", "show", sid], ["replay", sid]):
        proc = run("--broker", "http://127.0.0.1:9", *args, env={"PCIGATE_TOKEN": "x"})
        assert proc.returncode == ExitCode.NOT_FOUND, proc.stderr
        assert proc.stderr == "error: no such session\n"


@pytest.mark.parametrize("cmd", [["connect", "prod-db"], ["ssh", "web-1"]])
def test_an_empty_duration_is_refused_not_ignored(cmd: list[str]) -> None:
    proc = run(*cmd, "--for=", env={"PCIGATE_TOKEN": "x"})
    assert proc.returncode == ExitCode.USAGE
    assert proc.stderr.startswith("error: invalid duration ''\n")


def test_bad_duration_is_usage_error() -> None:
    proc = run("connect", "prod-db", "--for", "soon", env={"PCIGATE_TOKEN": "x"})
    assert proc.returncode == ExitCode.USAGE
    assert proc.stderr.startswith("error: invalid duration 'soon'\nhint: ")


def test_unknown_option_is_usage() -> None:
    assert run("targets", "--nope").returncode == 2


@pytest.mark.parametrize(
    ("content", "error"),
    [
        (b"a" * (64 * 1024), "is larger than 16 KiB: not a token"),
        (b"\xff\xfe\x00token", "is not text: not a token"),
        (b"  \n", "is empty"),
    ],
)
def test_a_token_file_holding_no_token_is_a_usage_error(tmp_path: Path, content: bytes, error: str) -> None:
    path = tmp_path / "token"
    path.write_bytes(content)
    proc = run("--broker", "http://127.0.0.1:9", "--token-file", str(path), "targets")
    assert proc.returncode == ExitCode.USAGE
    assert proc.stderr == f"error: the token file {path} {error}\n"


def test_a_token_file_that_never_ends_is_refused_at_once() -> None:
    """Only the first 16 KiB are read: a wrong path to a device does not fill memory."""
    proc = run("--broker", "http://127.0.0.1:9", "--token-file", "/dev/zero", "targets")
    assert proc.returncode == ExitCode.USAGE
    assert proc.stderr == "error: the token file /dev/zero is larger than 16 KiB: not a token\n"


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


@pytest.mark.parametrize(
    ("args", "command"),
    [
        (["connect", "prod-db", "--", "-c", "select 1"], "connect"),
        (["--broker", "http://b", "--json", "sessions", "show", "x"], "sessions"),
        (["--broker", "connect", "ssh", "web-1"], "ssh"),  # "connect" is --broker's value
        (["--broker=http://b", "--token-file", "f", "targets"], "targets"),
        (["--help"], None),
        (["-h", "connect"], None),
        (["--version"], None),
        (["conect", "prod-db"], None),  # a typo: the whole app answers (and suggests)
        ([], None),
        (["--json"], None),
    ],
)
def test_invoked_command(args: list[str], command: str | None) -> None:
    from pcigate.app import invoked_command

    assert invoked_command(args) == command


def test_an_app_of_one_command_behaves_as_the_whole_app() -> None:
    """main() builds only the invoked command: its help and its usage errors must not change."""
    from typer.testing import CliRunner

    from pcigate.app import COMMANDS, app, build

    runner = CliRunner()
    cases = [[name, "--help"] for name in COMMANDS]
    cases += [["sessions", "show", "--help"], ["audit", "verify", "--help"], ["connect"],
              ["connect", "prod-db", "--port", "x"], ["sessions", "nope"]]
    for args in cases:
        whole = runner.invoke(app, args, prog_name="pcigate")
        one = runner.invoke(build(args[0]), args, prog_name="pcigate")
        assert (one.exit_code, one.output) == (whole.exit_code, whole.output), args
        assert whole.output.startswith("Usage: pcigate " + args[0]), args


def test_main_runs_just_the_invoked_command(monkeypatch: pytest.MonkeyPatch) -> None:
    import pcigate.app as app_mod

    built: list[str | None] = []
    real = app_mod.build

    def spy(only: str | None = None) -> object:
        built.append(only)
        return real(only)

    monkeypatch.setattr(app_mod, "build", spy)
    monkeypatch.setattr(sys, "argv", ["pcigate", "targets", "--help"])
    with pytest.raises(SystemExit) as exc:
        app_mod.main()
    assert exc.value.code == 0
    assert built == ["targets"]


@pytest.mark.parametrize("closed", ["2>&-", "1>&- 2>&-", "0<&-"])
def test_closed_standard_fds_get_dev_null_before_anything_is_opened(tmp_path: Path, closed: str) -> None:
    """Started with fds closed, the CLI puts /dev/null on them first: otherwise the first file it opens (a
    spool entry, the recording) takes number 2 and what is meant for stderr is written into it."""
    code = (
        "import os, sys\n"
        "from pcigate.entry import standard_fds\n"
        "standard_fds()\n"
        "sys.stderr.write('to nowhere\\n')\n"
        "f = open(sys.argv[1], 'w')\n"
        "f.write(f'{f.fileno()} {os.get_inheritable(0)}{os.get_inheritable(1)}{os.get_inheritable(2)} ')\n"
        "f.write(' '.join(os.path.realpath(f'/proc/self/fd/{n}') for n in (0, 1, 2) if n in\n"
        "        [int(x) for x in os.listdir('/proc/self/fd')]))\n"
    )
    out = tmp_path / "out"
    proc = subprocess.run(["bash", "-c", f'"$0" -c "$1" "$2" {closed}', sys.executable, code, str(out)],
                          capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 0, proc.stderr
    fileno, inheritable, *targets = out.read_text().split()
    assert int(fileno) > 2
    assert inheritable == "TrueTrueTrue"
    closed_fds = {int(c[0]) for c in closed.split()}
    assert all(targets[n] == "/dev/null" for n in closed_fds), targets
