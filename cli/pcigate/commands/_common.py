"""Shared option aliases and helpers of the commands (light imports only)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from pcigate.config import Settings

if TYPE_CHECKING:
    from pcigate.client import BrokerClient
    from pcigate.output import Output

JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]
# connect and ssh: the session's level and length
LevelOpt = Annotated[
    str | None, typer.Option("--level", "-l", help="Access level (default: the target's default level).")
]
SessionForOpt = Annotated[
    str | None,
    typer.Option(
        "--for",
        metavar="DURATION",
        help='Session length, e.g. "30m", "1h" (default and maximum: the level\'s cap).',
    ),
]

SPOOL_SYNC_TIMEOUT = 2.0


def settings(ctx: typer.Context) -> Settings:
    root = ctx.find_root()
    obj = root.obj
    return obj if isinstance(obj, Settings) else Settings()


def output(ctx: typer.Context, json_flag: bool = False) -> Output:
    from pcigate.output import Output

    return Output(json_mode=json_flag or settings(ctx).json)


def broker(ctx: typer.Context, *, sync_spool: bool = True, authenticated: bool = True) -> BrokerClient:
    """A client for the configured broker; first, quietly, upload what the spool still owes it."""
    from pcigate.client import BrokerClient
    from pcigate.config import check_broker_url

    s = settings(ctx)
    check_broker_url(s.broker_url)
    if not authenticated:
        return BrokerClient(s.broker_url)
    from pcigate.auth.credentials import Credentials

    creds = Credentials(s)
    if sync_spool:
        from pcigate import spool

        spool.flush_quietly(s, creds, timeout=SPOOL_SYNC_TIMEOUT)
    return BrokerClient(
        s.broker_url,
        token=creds.bearer,
        on_refresh=creds.refresh,
        on_unauthorized=creds.drop,
        auth_hint=creds.hint,
    )
