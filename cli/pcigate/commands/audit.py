"""``pcigate audit [filters] [--json | --format cef]`` and ``pcigate audit verify`` (auditors)."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Annotated

import typer

from pcigate.commands._common import JsonOpt, broker, output

if TYPE_CHECKING:
    from pcigate.audit_models import AuditEventInfo

app = typer.Typer(
    name="audit",
    help="Read and verify the broker's tamper-evident audit log (auditors).",
    invoke_without_command=True,
    no_args_is_help=False,
    rich_markup_mode=None,
)

_COLUMNS = [
    ("seq", lambda e: e.seq),
    ("at", lambda e: e.at),
    ("actor", lambda e: e.actor),
    ("action", lambda e: e.action),
    ("target", lambda e: e.target),
    ("outcome", lambda e: e.outcome),
    ("session", lambda e: e.session_id),
    ("message", lambda e: e.message),
]

# CEF severity per outcome (0-10): refusals and failures stand out in a SIEM
_SEVERITY = {"success": 3, "denied": 6, "failure": 8, "error": 7}


def _cef_header(value: str) -> str:
    return value.replace("\\", "\\\\").replace("|", "\\|")


def _cef_ext(value: object) -> str:
    text = str(value)
    return (text.replace("\\", "\\\\").replace("=", "\\=").replace("\r", "\\r").replace("\n", "\\n"))


def to_cef(e: AuditEventInfo, version: str) -> str:
    """One event as an ArcSight Common Event Format line (CEF:0): header fields escaped for ``|`` and ``\\``,
    extension values for ``=``, ``\\`` and line breaks."""
    ext: list[tuple[str, object]] = [("rt", int(e.at.timestamp() * 1000)), ("act", e.action),
                                     ("outcome", e.outcome)]
    if e.actor:
        ext.append(("suser", e.actor))
    if e.target:
        ext += [("cs1Label", "target"), ("cs1", e.target)]
    if e.session_id:
        ext += [("cs2Label", "session"), ("cs2", e.session_id)]
    if e.request_id:
        ext += [("cs3Label", "request"), ("cs3", e.request_id)]
    if e.seq is not None:
        ext += [("cn1Label", "seq"), ("cn1", e.seq), ("cs4Label", "hash"), ("cs4", e.hash or "")]
    if e.message:
        ext.append(("msg", e.message))
    header = "|".join(_cef_header(x) for x in ("pcigate", "pcigate-broker", version, e.action, e.action))
    body = " ".join(f"{k}={_cef_ext(v)}" for k, v in ext)
    return f"CEF:0|{header}|{_SEVERITY.get(e.outcome, 5)}|{body}"


@app.callback()
def list_events(
    ctx: typer.Context,
    since: Annotated[
        str | None, typer.Option("--since", help='From this time: ISO date/time or a duration ago ("24h").')
    ] = None,
    until: Annotated[str | None, typer.Option("--until", help="Before this time (as --since).")] = None,
    actor: Annotated[str | None, typer.Option("--actor", help="Only this actor (token subject).")] = None,
    target: Annotated[str | None, typer.Option("--target", help="Only this target.")] = None,
    action: Annotated[
        str | None, typer.Option("--action", help="Only this action, e.g. session.open.")
    ] = None,
    fmt: Annotated[
        str, typer.Option("--format", help="table (default), json (same as --json) or cef.")
    ] = "table",
    limit: Annotated[int, typer.Option("--limit", min=1, max=1_000_000, help="At most this many.")] = 1000,
    json_flag: JsonOpt = False,
) -> None:
    """List audit events in chain order (oldest first)."""
    if ctx.invoked_subcommand is not None:
        return
    from pcigate import __version__
    from pcigate.config import parse_time
    from pcigate.errors import UsageError

    if fmt not in ("table", "json", "cef"):
        raise UsageError(f"unknown --format {fmt!r}: table, json or cef")
    out = output(ctx, json_flag or fmt == "json")
    since_at = parse_time(since) if since else None
    until_at = parse_time(until) if until else None
    items: list[AuditEventInfo] = []
    after = 0
    with broker(ctx) as client:
        while len(items) < limit:
            page = client.audit_events(since=since_at, until=until_at, actor=actor, target=target,
                                       action=action, after=after, limit=min(limit - len(items), 1000))
            if fmt == "cef" and not out.json_mode:
                for e in page.items:
                    sys.stdout.write(to_cef(e, __version__) + "\n")
            items.extend(page.items)
            if not page.next_cursor or not page.items:
                break
            after = int(page.next_cursor)
    if fmt != "cef" or out.json_mode:
        out.table(items[:limit], _COLUMNS, title="audit events")


@app.command("verify")
def verify(ctx: typer.Context, json_flag: JsonOpt = False) -> None:
    """Check the whole hash chain, its signed checkpoints and every stored recording; name the first bad
    event. Exit 16 when anything fails."""
    from pcigate.errors import AuditInvalid

    out = output(ctx, json_flag)
    with broker(ctx) as client:
        result = client.audit_verify()
    if out.json_mode:
        out.json(result)
    else:
        out.record(result)
    if not result.ok:
        raise AuditInvalid(f"audit log verification failed at event {result.first_bad_seq}: {result.error}")
    if not out.json_mode:
        signed = (f"signed through event {result.signed_through} (key {result.key_id})" if result.key_id
                  else "no signing key configured: chain only")
        out.info(f"audit log ok: {result.events} events, {result.recordings} recordings re-hashed; {signed}")
