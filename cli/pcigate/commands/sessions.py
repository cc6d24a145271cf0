"""``pcigate sessions [filters]``, ``sessions show ID``, ``sessions sync``, ``sessions download ID``."""

from __future__ import annotations

from typing import Annotated

import typer

from pcigate.commands._common import JsonOpt, broker, output, settings

app = typer.Typer(
    name="sessions",
    help="List recorded sessions, show one, or sync the spool.",
    invoke_without_command=True,
    no_args_is_help=False,
    rich_markup_mode=None,
)

_COLUMNS = [
    ("id", lambda s: s.session_id),
    ("user", lambda s: s.user),
    ("kind", lambda s: s.client_kind),
    ("target", lambda s: s.target),
    ("level", lambda s: s.level),
    ("status", lambda s: s.status),
    ("started", lambda s: s.started_at),
    ("ended", lambda s: s.ended_at),
    ("recording", lambda s: s.recording_sha256[:12] if s.recording_sha256 else None),
]


@app.callback()
def list_sessions(
    ctx: typer.Context,
    user: Annotated[str | None, typer.Option("--user", help="Only this user's sessions.")] = None,
    target: Annotated[str | None, typer.Option("--target", help="Only sessions on this target.")] = None,
    since: Annotated[
        str | None, typer.Option("--since", help='Started at/after: ISO date/time or a duration ago ("24h").')
    ] = None,
    until: Annotated[
        str | None, typer.Option("--until", help='Started before: ISO date/time or a duration ago ("1h").')
    ] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=10000, help="At most this many sessions.")] = 50,
    json_flag: JsonOpt = False,
) -> None:
    """List sessions (yours; every session for auditors)."""
    if ctx.invoked_subcommand is not None:
        return
    from pcigate.config import parse_time
    from pcigate.models import SessionSummary

    since_at = parse_time(since) if since else None
    until_at = parse_time(until) if until else None
    out = output(ctx, json_flag)
    items: list[SessionSummary] = []
    cursor: str | None = None
    with broker(ctx) as client:
        while len(items) < limit:
            page = client.list_sessions(
                user=user,
                target=target,
                since=since_at,
                until=until_at,
                limit=min(limit - len(items), 500),
                cursor=cursor,
            )
            items.extend(page.items)
            cursor = page.next_cursor
            if not cursor or not page.items:
                break
    out.table(items[:limit], _COLUMNS, title="sessions")


@app.command("show")
def show(
    ctx: typer.Context,
    session_id: Annotated[str, typer.Argument(metavar="ID", help="The session id.")],
    json_flag: JsonOpt = False,
) -> None:
    """Show one session."""
    out = output(ctx, json_flag)
    with broker(ctx) as client:
        summary = client.get_session(session_id)
    out.record(summary)


@app.command("sync")
def sync(ctx: typer.Context, json_flag: JsonOpt = False) -> None:
    """Upload spooled recordings and send owed session ends now."""
    from pcigate import spool
    from pcigate.errors import RecordingError

    out = output(ctx, json_flag)
    s = settings(ctx)
    with broker(ctx, sync_spool=False) as client:
        try:
            results = spool.flush(client, s, progress=out.progress)
        except OSError as exc:  # the spool directory itself (each entry's own failures are in the results)
            raise spool.state_error(exc) from None
    if out.json_mode:
        out.json(results)
    else:
        if not results:
            out.info("nothing to sync")
        for r in results:
            if r.uploaded:
                out.info(f"session {r.session_id}: recording uploaded ({r.events} events)")
            elif r.ended and not r.kept:
                out.info(f"session {r.session_id}: ended")
            if r.kept:
                out.warn(f"session {r.session_id}: kept in the spool: {r.error}")
            elif r.error:
                out.warn(f"session {r.session_id}: {r.error}")
    if any(r.kept for r in results):
        raise RecordingError("some recordings could not be uploaded; they stay in the spool")


@app.command("download")
def download(
    ctx: typer.Context,
    session_id: Annotated[str, typer.Argument(metavar="ID", help="The session id.")],
    out_path: Annotated[
        str, typer.Option("--output", "-o", metavar="FILE", help='Write here ("-": standard output).')
    ],
    cast: Annotated[
        bool, typer.Option("--asciicast", help="A terminal session as a plain asciicast v2 file (asciinema).")
    ] = False,
) -> None:
    """Download a session's recording (streamed), as stored or (--asciicast) for asciinema's players."""
    import os
    import sys

    from pcigate.errors import UsageError

    out = output(ctx, False)
    fmt = "asciicast" if cast else "pcigate"
    with broker(ctx) as client:
        if out_path == "-":
            size, _ = client.download_recording(session_id, sys.stdout.buffer.write, format=fmt)
            sys.stdout.flush()
            return
        tmp = f"{out_path}.part"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        except OSError as exc:
            raise UsageError(f"cannot write {out_path}: {exc.strerror}") from None
        try:
            with os.fdopen(fd, "wb") as fh:
                size, sha = client.download_recording(session_id, fh.write, format=fmt)
            os.replace(tmp, out_path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    out.info(f"{out_path}: {size} bytes" + ("" if cast else f", sha256 {sha}"))
