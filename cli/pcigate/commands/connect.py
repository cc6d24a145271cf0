"""``pcigate connect TARGET [-- psql args]``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from pcigate.commands._common import JsonOpt, LevelOpt, SessionForOpt, broker, output, settings

if TYPE_CHECKING:
    from pcigate.session import ConnectRequest


def connect(
    ctx: typer.Context,
    target: Annotated[str, typer.Argument(metavar="TARGET", help="Target name (see: pcigate targets).")],
    psql_args: Annotated[
        list[str] | None, typer.Argument(metavar="PSQL_ARGS", help="Passed to psql after `--`.")
    ] = None,
    level: LevelOpt = None,
    duration: SessionForOpt = None,
    port: Annotated[
        int,
        typer.Option("--port", "-p", min=0, max=65535, help="Local tunnel port (default: any free port)."),
    ] = 0,
    no_exec: Annotated[
        bool, typer.Option("--no-exec", help="Do not run psql; print how to connect and wait for Ctrl-C.")
    ] = False,
    forwards: Annotated[
        list[str] | None,
        typer.Option("--forward", "-L", metavar="[127.0.0.1:]LPORT:HOST:PORT",
                     help="ssh targets: forward a local loopback port to HOST:PORT as the target sees it."),
    ] = None,
    json_flag: JsonOpt = False,
) -> None:
    """Open a recorded session on TARGET and run psql (ssh targets: a terminal, or with -L a port forward).

    The broker mints short-lived database credentials; a local tunnel on 127.0.0.1 logs in with them and
    records every statement; psql talks to the tunnel only. Arguments after `--` go to psql. When psql
    exits the credentials are revoked and the recording is uploaded.
    """
    from pcigate import startup

    startup.mark("command")  # typer has parsed the arguments (pydantic included)
    from pcigate.config import parse_duration
    from pcigate.models import MAX_SESSION_SECONDS
    from pcigate.session import ConnectRequest

    request = ConnectRequest(
        target=target,
        level=level,
        ttl_seconds=parse_duration(duration, at_most=MAX_SESSION_SECONDS) if duration is not None else None,
        port=port,
        no_exec=no_exec,
        psql_args=list(psql_args or []),
        forwards=list(forwards or []),
    )
    run_session(ctx, request, json_flag)


def run_session(ctx: typer.Context, request: ConnectRequest, json_flag: bool = False) -> None:
    """Run a session (connect, ssh) and exit with its status."""
    from pcigate.session import Connector

    with broker(ctx) as client:
        # The output (rich) is made when first used: its import is not on the way to the broker call.
        connector = Connector(client, settings(ctx), lambda: output(ctx, json_flag), sign_in=client.bearer)
        status = connector.run(request)
    raise typer.Exit(status)
