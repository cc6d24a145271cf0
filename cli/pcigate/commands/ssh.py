"""``pcigate ssh TARGET [-- command args]``."""

from __future__ import annotations

from typing import Annotated

import typer

from pcigate.commands._common import LevelOpt, SessionForOpt
from pcigate.commands.connect import run_session


def ssh(
    ctx: typer.Context,
    target: Annotated[str, typer.Argument(metavar="TARGET", help="An ssh target (see: pcigate targets).")],
    command: Annotated[
        list[str] | None, typer.Argument(metavar="COMMAND", help="Run this on the host (after `--`).")
    ] = None,
    level: LevelOpt = None,
    duration: SessionForOpt = None,
) -> None:
    """Open a recorded terminal session on TARGET with a short-lived certificate.

    The CLI makes a new ed25519 key in memory; the broker has the OpenBao SSH CA sign it for the level's
    principals until the session ends. The system ssh runs with host key checking on; the terminal is
    recorded (card numbers masked) and uploaded when you leave. The remote command's exit status is
    pcigate's.
    """
    from pcigate.config import parse_duration
    from pcigate.models import MAX_SESSION_SECONDS
    from pcigate.session import ConnectRequest

    request = ConnectRequest(
        target=target,
        level=level,
        ttl_seconds=parse_duration(duration, at_most=MAX_SESSION_SECONDS) if duration is not None else None,
        kind="ssh",
        command=list(command or []),
    )
    run_session(ctx, request)
