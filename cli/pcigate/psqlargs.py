"""Which psql arguments given after ``pcigate connect TARGET --`` would take psql past the tunnel.

pcigate runs ``psql -h 127.0.0.1 -p PORT -d DB -U ROLE [ARGS...]``. psql keeps the last ``-h``, ``-p`` and
``-d`` it is given, so an ``-h``/``-p`` in ARGS, or a connection string given to ``-d``, points psql at
another server: it gets no password there (the passfile matches only the tunnel), so nothing leaks, but the
session's credentials are minted for nothing and psql's error blames the wrong thing. ``-W`` makes psql ask
for a password nobody knows. These are refused before the session is opened.

Harmless, and left to psql: ``-U`` (the tunnel logs in as the session's role whatever psql says), another
database name (the tunnel refuses it), positional DBNAME/USERNAME (psql ignores them once ``-d``/``-U`` are
given), unknown or ambiguous options (psql reports them itself).

Pure: scans argv by the rules of psql's ``getopt_long`` call (src/bin/psql/startup.c, PostgreSQL 15):
clustered short options (``-qXh host``, ``-hhost``), ``--long=value`` and ``--long value``, unambiguous
prefixes of long options (``--ho``), options after positional arguments (GNU argument permutation), and
``--`` ending the options.
"""

from __future__ import annotations

from collections.abc import Iterator

# psql's getopt_long short options; ":" after a letter: it takes a value
SHORT_OPTIONS = "aAbc:d:eEf:F:h:HlL:no:p:P:qR:sStT:U:v:VwWxXz?01"
# psql's long options -> (the short option they stand for, or the name for long-only ones; takes a value)
# (--help takes an optional value, only as --help=VALUE)
LONG_OPTIONS: dict[str, tuple[str, bool]] = {
    "echo-all": ("a", False),
    "no-align": ("A", False),
    "command": ("c", True),
    "dbname": ("d", True),
    "echo-queries": ("e", False),
    "echo-errors": ("b", False),
    "echo-hidden": ("E", False),
    "file": ("f", True),
    "field-separator": ("F", True),
    "field-separator-zero": ("z", False),
    "host": ("h", True),
    "html": ("H", False),
    "list": ("l", False),
    "log-file": ("L", True),
    "no-readline": ("n", False),
    "single-transaction": ("1", False),
    "output": ("o", True),
    "port": ("p", True),
    "pset": ("P", True),
    "quiet": ("q", False),
    "record-separator": ("R", True),
    "record-separator-zero": ("0", False),
    "single-step": ("s", False),
    "single-line": ("S", False),
    "tuples-only": ("t", False),
    "table-attr": ("T", True),
    "username": ("U", True),
    "set": ("v", True),
    "variable": ("v", True),
    "version": ("V", False),
    "no-password": ("w", False),
    "password": ("W", False),
    "expanded": ("x", False),
    "no-psqlrc": ("X", False),
    "csv": ("csv", False),
    "help": ("help", False),
}
_TAKES_VALUE = frozenset(SHORT_OPTIONS[i - 1] for i, ch in enumerate(SHORT_OPTIONS) if ch == ":")
_SHORT = frozenset(SHORT_OPTIONS.replace(":", ""))


def _long(name: str) -> tuple[str, bool] | None:
    """psql's long option ``name`` stands for, allowing an unambiguous prefix (None: unknown/ambiguous)."""
    if name in LONG_OPTIONS:
        return LONG_OPTIONS[name]
    found = {LONG_OPTIONS[n] for n in LONG_OPTIONS if n.startswith(name)}
    return found.pop() if len(found) == 1 else None


def options(args: list[str]) -> Iterator[tuple[str, str | None]]:
    """The options psql sees in ``args``, as (short letter or long-only name, value), in order. Stops at what
    psql itself would refuse (an unknown option, a missing value): psql reports that, and exits."""
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            return
        if arg.startswith("--"):
            name, eq, value = arg[2:].partition("=")
            known = _long(name)
            if known is None:
                return
            opt, takes = known
            if takes and not eq:
                if i >= len(args):
                    return
                value, i = args[i], i + 1
            yield opt, (value if takes or eq else None)
        elif arg.startswith("-") and arg != "-":
            j = 1
            while j < len(arg):
                ch = arg[j]
                j += 1
                if ch not in _SHORT:
                    return
                if ch not in _TAKES_VALUE:
                    yield ch, None
                    continue
                if j < len(arg):
                    yield ch, arg[j:]
                elif i < len(args):
                    yield ch, args[i]
                    i += 1
                else:
                    return
                break
        # else: a positional argument (DBNAME, USERNAME); getopt permutes, so options may follow


def _conninfo(value: str) -> bool:
    """A libpq connection string (``key=value ...``) or URI, as psql's ``-d`` accepts in place of a name."""
    return "=" in value or value.startswith(("postgresql://", "postgres://"))


def refusal(args: list[str]) -> str | None:
    """Why ``args`` cannot be given to psql in a pcigate session (one line), or None."""
    for opt, value in options(args):
        if opt in ("h", "p"):
            which = "host" if opt == "h" else "port"
            return (f"psql's {which} (-{opt}/--{which}) is set by pcigate: psql connects to the session's "
                    "tunnel on 127.0.0.1")
        if opt == "d" and value is not None and _conninfo(value):
            return ("psql's -d/--dbname takes a database name here, not a connection string: pcigate sets "
                    "the host, port and user")
        if opt == "W":
            return "psql's -W/--password would ask for a password: the tunnel signs in for you"
    return None
