"""The ``pcigate`` console script (and ``python -m pcigate``).

Before anything else, the standard file descriptors are made sane (:func:`standard_fds`), and ``connect`` and
``ssh`` are handed to a warm helper when one is running (:mod:`pcigate.resident`). Otherwise only
:mod:`pcigate.startup` (stdlib) is imported before the CLI's start-up settings are in force, so that typer,
the commands and everything they import load without cyclic garbage collection (``startup.begin``): that
import is most of ``--help`` and a third of ``connect``'s start-up, and collecting during it costs ~4 ms for
nothing.
"""

from __future__ import annotations

import fcntl
import os
import sys

from pcigate import startup

_STREAMS = ("stdin", "stdout", "stderr")


def standard_fds() -> None:
    """Put ``/dev/null`` on any of fds 0-2 the command was started without (``pcigate connect db 2>&-``), as
    OpenSSH's ``sanitise_stdfd`` does, and give Python a stream on it.

    Started from its console script with fd 2 closed, CPython opens the script on the lowest free number, 2,
    and makes ``sys.stderr`` of it: every write to stderr then fails (EBADF, the script is read-only), and the
    session's closing line ended a session that went well with exit 1. Started otherwise, the first files
    pcigate opened would take those numbers (the spool entry, the recording, a socket to the database), and
    what is meant for stderr could be written into them. On ``/dev/null`` that output goes nowhere, as the
    user asked; psql inherits it too."""
    for fd in (0, 1, 2):
        try:
            mode = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
        except OSError:
            mode = None  # closed
        if mode is not None and (fd == 0 or mode != os.O_RDONLY):
            continue  # open, and usable that way
        null = os.open(os.devnull, os.O_RDWR)
        if null != fd:
            os.dup2(null, fd)  # over the script CPython read (it has parsed it), or onto a closed number
            os.close(null)
        os.set_inheritable(fd, True)
        name = _STREAMS[fd]
        stream = getattr(sys, name)
        if stream is None or stream.fileno() != fd:
            stream = open(fd, "r" if fd == 0 else "w", encoding="utf-8",  # noqa: SIM115 - for the process
                          errors="backslashreplace", closefd=False)
            setattr(sys, name, stream)
            setattr(sys, f"__{name}__", stream)


def run() -> None:
    standard_fds()
    startup.mark("start")  # the interpreter is up; the libraries and the commands are next
    from pcigate import resident

    status = resident.handoff(sys.argv)  # connect/ssh: a warm helper runs it (pcigate.resident)
    if status is not None:
        sys.exit(status)
    resident.prime(sys.argv)  # login, whoami, targets: a helper for the connect that follows
    if resident.absent():  # none answered: start one for the next command once this one is ready
        startup.when_ready(resident.start_helper)
    startup.begin()
    from pcigate.app import main

    main()
