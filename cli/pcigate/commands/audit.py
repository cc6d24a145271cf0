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
def verify(
    ctx: typer.Context,
    since: Annotated[
        str | None,
        typer.Option("--since", help="Re-hash only recordings uploaded since (the chain is checked whole)."),
    ] = None,
    json_flag: JsonOpt = False,
) -> None:
    """Check the whole hash chain, its signed checkpoints and the stored recordings; name the first bad
    event. Exit 16 when anything fails."""
    from pcigate.config import parse_time
    from pcigate.errors import AuditInvalid

    out = output(ctx, json_flag)
    with broker(ctx) as client:
        result = client.audit_verify(parse_time(since) if since else None)
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


def _pci_mapping() -> bytes | None:
    """docs/pci-dss.md: shipped in the wheel as pcigate/pci-dss.md; read from the source tree otherwise."""
    from importlib import resources
    from pathlib import Path

    try:
        return (resources.files("pcigate") / "pci-dss.md").read_bytes()
    except (FileNotFoundError, OSError):
        pass
    src = Path(__file__).resolve().parents[3] / "docs" / "pci-dss.md"
    return src.read_bytes() if src.is_file() else None


@app.command("evidence")
def evidence(
    ctx: typer.Context,
    out_path: Annotated[str, typer.Argument(metavar="OUT.zip", help="The zip file to write.")],
    since: Annotated[
        str | None, typer.Option("--since", help='From this time: ISO date/time or a duration ago ("90d").')
    ] = None,
    until: Annotated[str | None, typer.Option("--until", help="Before this time (as --since).")] = None,
    json_flag: JsonOpt = False,
) -> None:
    """Write an evidence pack for an assessor: the audit events, the session index, the recordings, the
    verification result, the PCI DSS mapping, and a manifest with the SHA-256 of every file."""
    import hashlib
    import json
    import os
    import zipfile
    from datetime import UTC, datetime
    from pathlib import Path

    from pcigate.config import parse_time
    from pcigate.errors import AuditInvalid, UsageError
    from pcigate.models import SessionSummary

    target = Path(out_path)
    if target.suffix.lower() != ".zip":
        raise UsageError("the evidence pack is a .zip file")
    since_at = parse_time(since) if since else None
    until_at = parse_time(until) if until else None
    out = output(ctx, json_flag)
    tmp = target.with_name(f".{target.name}.partial")
    manifest: dict[str, dict[str, object]] = {}
    problems: list[str] = []

    def add(zf: zipfile.ZipFile, name: str, data: bytes) -> None:
        zf.writestr(name, data)
        manifest[name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}

    with broker(ctx) as client:
        result = client.audit_verify()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "wb") as fh, zipfile.ZipFile(fh, "w", zipfile.ZIP_DEFLATED) as zf:
                add(zf, "verification.json", result.model_dump_json(indent=2).encode())
                lines: list[bytes] = []
                after = 0
                while True:
                    page = client.audit_events(since=since_at, until=until_at, after=after, limit=1000)
                    lines += [e.model_dump_json().encode() + b"\n" for e in page.items]
                    if not page.next_cursor or not page.items:
                        break
                    after = int(page.next_cursor)
                add(zf, "events.ndjson", b"".join(lines))
                sessions: list[SessionSummary] = []
                cursor: str | None = None
                while True:
                    sp = client.list_sessions(since=since_at, until=until_at, limit=200, cursor=cursor)
                    sessions += sp.items
                    cursor = sp.next_cursor
                    if not cursor or not sp.items:
                        break
                add(zf, "sessions.json", json.dumps([s.model_dump(mode="json") for s in sessions],
                                                    indent=2).encode())
                for s in sessions:
                    if not s.recording_sha256:
                        continue
                    name = f"recordings/{s.session_id}.rec"
                    with zf.open(name, "w", force_zip64=True) as entry:
                        size, digest = client.download_recording(s.session_id, entry.write)
                    manifest[name] = {"sha256": digest, "size": size}
                    if digest != s.recording_sha256:
                        problems.append(f"recording of session {s.session_id} does not match its digest")
                mapping = _pci_mapping()
                if mapping is not None:
                    add(zf, "pci-dss.md", mapping)
                meta = {"generated_at": datetime.now(UTC).isoformat(), "broker": client.base_url,
                        "since": since_at.isoformat() if since_at else None,
                        "until": until_at.isoformat() if until_at else None,
                        "verification_ok": result.ok and not problems, "problems": problems,
                        "files": manifest}
                zf.writestr("manifest.json", json.dumps(meta, indent=2))
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    summary = {"path": str(target), "events": len(lines), "sessions": len(sessions),
               "recordings": sum(1 for n in manifest if n.startswith("recordings/")),
               "verification_ok": result.ok and not problems}
    if out.json_mode:
        out.json(summary)
    else:
        verdict = "ok" if summary["verification_ok"] else "FAILED"
        out.info(f"evidence pack {target}: {summary['events']} events, {summary['sessions']} sessions, "
                 f"{summary['recordings']} recordings; verification {verdict}")
    if not result.ok or problems:
        raise AuditInvalid("the evidence pack was written, but verification failed: "
                           + (result.error or "; ".join(problems)))
