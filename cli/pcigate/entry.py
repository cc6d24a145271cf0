"""The ``pcigate`` console script (and ``python -m pcigate``).

Only :mod:`pcigate.startup` (stdlib) is imported before the CLI's start-up settings are in force, so that
typer, the commands and everything they import load without cyclic garbage collection (``startup.begin``):
that import is most of ``--help`` and a third of ``connect``'s start-up, and collecting during it costs
~4 ms for nothing.
"""

from __future__ import annotations

from pcigate import startup


def run() -> None:
    startup.mark("start")  # the interpreter is up; the libraries and the commands are next
    startup.begin()
    from pcigate.app import main

    main()
