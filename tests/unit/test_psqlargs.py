"""psql arguments after `connect TARGET --` that would take psql past the tunnel: the pure scanner, checked by
examples, by generated command lines, and against the real psql's own reading of them."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pcigate.psqlargs import options, refusal

# --- examples -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["-h", "db.internal"],
        ["-hdb.internal"],
        ["-qXh", "db.internal"],
        ["--host=db.internal"],
        ["--host", "db.internal"],
        ["--ho=db.internal"],  # an unambiguous prefix, as getopt_long takes it
        ["-p", "6432"],
        ["-Xp6432"],
        ["--port=6432"],
        ["-c", "select 1", "prod", "-p", "6432"],  # options after a positional argument still count
        ["-d", "host=db.internal dbname=prod"],
        ["--dbname=postgresql://db.internal/prod"],
        ["-dpostgres://db.internal/prod"],
        ["-W"],
        ["--password"],
    ],
)
def test_options_that_point_psql_elsewhere_are_refused(args: list[str]) -> None:
    assert refusal(args) is not None


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["-c", "select 1"],
        ["-c", "-h"],  # a value, not an option
        ["-v", "h=1", "--set", "p=2", "-vON_ERROR_STOP=1"],
        ["-U", "someone", "-d", "otherdb"],  # the tunnel keeps the session's role and refuses other databases
        ["prod", "someone"],  # positional DBNAME USERNAME: psql ignores them, -d and -U are given
        ["host=elsewhere"],  # the same: a positional connection string is ignored too
        ["--", "-h", "db.internal"],  # after `--`: positional
        ["-qAtX", "--csv", "-F,", "-P", "pager=off", "-o", "/dev/null", "-f", "x.sql", "-L", "log"],
        ["--p", "6432"],  # ambiguous (--port, --pset, --password): psql refuses it itself
        ["-Y"],  # unknown: psql's own error
        ["-w"],
    ],
)
def test_other_arguments_are_left_to_psql(args: list[str]) -> None:
    assert refusal(args) is None


def test_options_read_as_getopt_long_reads_them() -> None:
    assert list(options(["-qXc", "select 1", "db", "--set=a=1", "--var", "b=2", "-", "-?"])) == [
        ("q", None), ("X", None), ("c", "select 1"), ("v", "a=1"), ("v", "b=2"), ("?", None),
    ]
    assert list(options(["--help=commands", "--csv"])) == [("help", "commands"), ("csv", None)]
    assert list(options(["-c"])) == []  # a missing value: psql's error


# --- generated command lines --------------------------------------------------------------------------------

VALUES = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=12)
SAFE_UNITS = st.one_of(
    st.sampled_from([["-q"], ["-X"], ["-qAt"], ["--quiet"], ["--no-psqlrc"], ["--csv"], ["-e"], ["-x1"],
                     ["-w"]]),
    VALUES.map(lambda v: ["-c", v]),
    VALUES.map(lambda v: ["-qc", v]),
    VALUES.map(lambda v: ["--command", v]),
    VALUES.map(lambda v: ["--set=" + v]),
    VALUES.map(lambda v: ["-v", v]),
    VALUES.map(lambda v: ["-P", v]),
    VALUES.map(lambda v: ["-U", v]),
    st.text(st.characters(codec="ascii", exclude_characters="=\x00-"), min_size=1, max_size=8).map(
        lambda v: ["-d", v]),
    st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=8)
    .filter(lambda v: not v.startswith("-")).map(lambda v: [v]),  # positional
)
REFUSED_UNITS = st.one_of(
    st.sampled_from([["-h", "x"], ["-hx"], ["-qh", "x"], ["--host=x"], ["--host", "x"], ["--hos", "x"],
                     ["-p", "1"], ["-p1"], ["-Xp", "1"], ["--port=1"], ["--po", "1"], ["-W"], ["--password"],
                     ["-d", "host=x"], ["--dbname=postgresql://x/y"]]),
)


@given(st.lists(SAFE_UNITS, max_size=8), REFUSED_UNITS, st.data())
def test_a_refused_option_anywhere_before_the_end_of_options_is_found(
    units: list[list[str]], bad: list[str], data: st.DataObject
) -> None:
    at = data.draw(st.integers(0, len(units)), label="at")
    end = data.draw(st.one_of(st.none(), st.integers(0, len(units) + 1)), label="end of options")
    line = [*units[:at], bad, *units[at:]]
    if end is not None:
        line.insert(end, ["--"])
    args = [a for unit in line for a in unit]
    assert (refusal(args) is not None) == (end is None or end > at)
    assert refusal([a for unit in units for a in unit]) is None


# --- the real psql agrees -----------------------------------------------------------------------------------

PSQL = shutil.which("psql")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize(
    ("args", "elsewhere"),
    [
        (["--ho=127.0.0.9", "-c", "select 1"], True),
        (["-c", "select 1", "somedb", "-h127.0.0.9"], True),
        (["-qXh", "127.0.0.9", "-c", "select 1"], True),
        (["-d", "host=127.0.0.9 dbname=x", "-c", "select 1"], True),
        (["--", "-h", "127.0.0.9"], False),
        (["-c", "-h127.0.0.9"], False),
        (["host=127.0.0.9", "-c", "select 1"], False),
        (["-v", "h=127.0.0.9", "-c", "select 1"], False),
    ],
)
def test_the_real_psql_goes_elsewhere_exactly_when_refused(args: list[str], elsewhere: bool) -> None:
    """psql as pcigate runs it (its own -h/-p/-d/-U first, then the user's), against a closed loopback port:
    its error names the server it tried."""
    assert PSQL is not None, "psql (postgresql-client) is part of this machine's test stack"
    port = _closed_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")} | {"PGCONNECT_TIMEOUT": "2"}
    proc = subprocess.run(
        [PSQL, "-h", "127.0.0.1", "-p", str(port), "-d", "prod", "-U", "someone", "-w", *args],
        env=env, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL, check=False,
    )
    tried = re.search(r'connection to server at "([^"]+)", port (\d+)', proc.stderr)
    assert tried is not None, proc.stderr
    went_elsewhere = (tried.group(1), int(tried.group(2))) != ("127.0.0.1", port)
    assert went_elsewhere is elsewhere, proc.stderr
    assert (refusal(args) is not None) is elsewhere
