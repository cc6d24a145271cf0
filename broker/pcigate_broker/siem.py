"""Forward the sealed audit chain to SIEMs: at least once, in order, from a persistent cursor.

Each destination (``[[audit.forward]]``) has a cursor row (``audit_forward_cursors``: the last ``seq`` it
acknowledged). :func:`forward_once` sends the next batch of sealed events after the cursor and moves the
cursor only after the destination accepted the whole batch, so a SIEM that is down receives everything when it
comes back (it may see a batch twice if the broker stops between sending and moving the cursor: receivers
deduplicate by ``seq``, which every event carries). One forwarder per destination at a time across replicas
(a PostgreSQL advisory lock per destination).

Formats:

* ``https``: one POST per batch, ``Content-Type: application/x-ndjson``, one ``AuditEventInfo`` JSON object
  per line, ``X-Pcigate-Signature: t=..,v1=HMAC-SHA256`` with a secret (as the webhooks);
* ``syslog``: RFC 5424 messages over TCP (TLS per RFC 5425 unless ``tls = false`` to a loopback collector),
  octet-counted framing (RFC 6587): ``<PRI>1 TIMESTAMP HOST pcigate-broker - ACTION [pcigate@32473 seq=".."
  outcome=".." actor=".."] <event JSON>``. Facility authpriv (10); severity notice, warning for refusals,
  error for failures.
"""

from __future__ import annotations

import hashlib
import json
import logging
import socket
import ssl
import time
import zlib
from datetime import UTC, datetime

import httpx
from sqlalchemy import select, text
from sqlalchemy.orm import Session, sessionmaker

from pcigate.audit_models import AuditEventInfo

from . import audit
from .notify import signature
from .settings import SiemSettings
from .store.tables import AuditEvent, ForwardCursor

log = logging.getLogger(__name__)

_FACILITY = 10  # authpriv
_SEVERITY = {"success": 5, "denied": 4, "failure": 3, "error": 3}
_SD_ID = "pcigate@32473"  # private enterprise number 32473 is reserved for documentation (RFC 5612)


class ForwardError(Exception):
    pass


def _sd_value(v: object) -> str:
    return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def syslog_message(e: AuditEventInfo, hostname: str) -> bytes:
    pri = _FACILITY * 8 + _SEVERITY.get(e.outcome, 5)
    ts = e.at.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
    sd_items = [("seq", e.seq), ("outcome", e.outcome), ("actor", e.actor), ("target", e.target),
                ("session", e.session_id)]
    sd = "[" + _SD_ID + "".join(f' {k}="{_sd_value(v)}"' for k, v in sd_items if v is not None) + "]"
    msgid = (e.action or "-").replace(" ", "_")[:32]
    body = json.dumps(e.model_dump(mode="json"), separators=(",", ":"), ensure_ascii=False)
    line = f"<{pri}>1 {ts} {hostname[:255]} pcigate-broker - {msgid} {sd} {body}".encode()
    return str(len(line)).encode() + b" " + line  # RFC 6587 octet counting


def _lock(db: Session, name: str) -> bool:
    if db.get_bind().dialect.name != "postgresql":
        return True
    key = zlib.crc32(f"pcigate-forward:{name}".encode())
    return bool(db.execute(text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": key}).scalar())


def _send_https(dest: SiemSettings, events: list[AuditEventInfo], client: httpx.Client) -> None:
    assert dest.url is not None
    body = b"".join(json.dumps(e.model_dump(mode="json"), separators=(",", ":")).encode() + b"\n"
                    for e in events)
    headers = {"Content-Type": "application/x-ndjson", "User-Agent": "pcigate-broker",
               "X-Pcigate-Batch": f"{events[0].seq}-{events[-1].seq}",
               "X-Content-SHA256": hashlib.sha256(body).hexdigest()}
    if dest.secret is not None:
        headers["X-Pcigate-Signature"] = signature(dest.secret.get_secret_value().encode(), int(time.time()),
                                                   body)
    try:
        r = client.post(dest.url, content=body, headers=headers, timeout=dest.timeout_seconds)
    except httpx.HTTPError as exc:
        raise ForwardError(f"{type(exc).__name__}") from None
    if not 200 <= r.status_code < 300:
        raise ForwardError(f"HTTP {r.status_code}")


def _send_syslog(dest: SiemSettings, events: list[AuditEventInfo]) -> None:
    assert dest.host is not None
    hostname = socket.gethostname()
    data = b"".join(syslog_message(e, hostname) for e in events)
    try:
        with socket.create_connection((dest.host, dest.port), timeout=dest.timeout_seconds) as raw:
            if dest.tls:
                ctx = ssl.create_default_context(cafile=str(dest.ca_file) if dest.ca_file else None)
                with ctx.wrap_socket(raw, server_hostname=dest.host) as tls:
                    tls.sendall(data)
                    # close_notify, and the collector's in answer: it has read everything we sent
                    tls.unwrap()
            else:
                raw.sendall(data)
                raw.shutdown(socket.SHUT_WR)
                raw.recv(1)  # the collector closes when it has read everything
    except (OSError, ssl.SSLError) as exc:
        raise ForwardError(f"{type(exc).__name__}: {exc}") from None


def forward_once(db: Session, dest: SiemSettings, *, client: httpx.Client | None = None,
                 max_batches: int = 20) -> int:
    """Send what ``dest`` has not acknowledged yet (up to ``max_batches`` batches). Returns the events sent.
    Raises :class:`ForwardError` when the destination refused or could not be reached (the cursor stays)."""
    sent = 0
    own = client is None
    http = client or httpx.Client(follow_redirects=False)
    try:
        for _ in range(max_batches):
            if not _lock(db, dest.name):
                db.rollback()
                return sent
            cursor = db.get(ForwardCursor, dest.name)
            after = cursor.seq if cursor is not None else 0
            rows = list(db.scalars(select(AuditEvent).where(AuditEvent.seq > after)
                                   .order_by(AuditEvent.seq).limit(dest.batch)))
            if not rows:
                db.rollback()
                return sent
            events = [audit.to_info(r) for r in rows]
            if dest.kind == "https":
                _send_https(dest, events, http)
            else:
                _send_syslog(dest, events)
            last = int(rows[-1].seq or after)
            now = datetime.now(UTC)
            if cursor is None:
                db.add(ForwardCursor(name=dest.name, seq=last, updated_at=now))
            else:
                cursor.seq = last
                cursor.updated_at = now
            db.commit()
            sent += len(events)
        return sent
    except Exception:
        db.rollback()
        raise
    finally:
        if own:
            http.close()


def forward_all(broker_sessions: sessionmaker[Session], destinations: list[SiemSettings],
                state: dict[str, float]) -> None:
    """One forwarding pass over every destination; a failing one is retried with back-off (``state`` keeps
    when each may be tried next) and never holds up the others."""
    now = time.monotonic()
    for dest in destinations:
        if state.get(f"{dest.name}:next", 0.0) > now:
            continue
        with broker_sessions() as db:
            try:
                n = forward_once(db, dest)
                state[f"{dest.name}:fails"] = 0.0
                if n:
                    log.info("audit forwarded to %s: %d events", dest.name, n)
            except ForwardError as exc:
                fails = state.get(f"{dest.name}:fails", 0.0) + 1
                state[f"{dest.name}:fails"] = fails
                state[f"{dest.name}:next"] = now + min(60.0, 2.0 ** (fails - 1))
                log.warning("audit forwarding to %s failed (%s); retrying later", dest.name, exc)
