"""A hand-made PostgreSQL client for tunnel tests that need to send exact protocol bytes."""

from __future__ import annotations

import socket
import struct

from pcigate.masking import Masker, RowPlan
from pcigate.wire import pg
from pcigate.wire.scram import ScramClient


def raw_exchange(port: int, secret: str, *, params: dict[str, str] | None = None, after_final: bytes = b"",
                 expect_error: bool = False, stop_after_final: bool = False,
                 ) -> tuple[socket.socket, list[tuple[int, bytes]]]:
    """Log in to the tunnel with SCRAM by hand. ``after_final`` is sent in the same packet as the last SASL
    message; with ``expect_error`` the exchange continues to the first ErrorResponse; with
    ``stop_after_final`` it returns right after sending the last SASL message. Returns the socket and the
    messages received."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(pg.startup_message({"user": "whoever", "database": "prod", **(params or {})}))
    client = ScramClient("", secret)
    buf = b""
    msgs: list[tuple[int, bytes]] = []
    while True:
        chunk = s.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed after {msgs}")
        buf += chunk
        while len(buf) >= 5:
            t, n = struct.unpack("!BI", buf[:5])
            if len(buf) < n + 1:
                break
            body, buf = buf[5 : n + 1], buf[n + 1 :]
            msgs.append((t, body))
            if t == ord("R"):
                a = pg.parse_auth(body)
                if a.code == pg.AUTH_SASL:
                    s.sendall(pg.sasl_initial_response("SCRAM-SHA-256", client.first()))
                elif a.code == pg.AUTH_SASL_CONTINUE:
                    s.sendall(pg.sasl_response(client.final(a.data)) + after_final)
                    if stop_after_final:
                        return s, msgs
                elif a.code == pg.AUTH_SASL_FINAL:
                    client.verify(a.data)
            elif t == ord("E"):
                if expect_error:
                    return s, msgs
                raise AssertionError(pg.parse_error_fields(body))
            elif t == ord("Z") and not expect_error:
                return s, msgs


def raw_login(port: int, secret: str, **kw: bool | bytes | dict[str, str] | None) -> socket.socket:
    """Connect and authenticate with the tunnel by hand; returns the socket after ReadyForQuery."""
    return raw_exchange(port, secret, **kw)[0]  # type: ignore[arg-type]


def read_until(s: socket.socket, t: bytes, count: int = 1, *, nothing_after: bool = False,
               ) -> list[tuple[int, bytes]]:
    """Messages up to the ``count``-th message of type ``t`` (or until the peer closes). With
    ``nothing_after`` no further bytes may have arrived with it."""
    buf = b""
    out: list[tuple[int, bytes]] = []
    seen = 0
    while True:
        chunk = s.recv(65536)
        if not chunk:
            return out
        buf += chunk
        while len(buf) >= 5:
            mt, n = struct.unpack("!BI", buf[:5])
            if len(buf) < n + 1:
                break
            out.append((mt, buf[5 : n + 1]))
            buf = buf[n + 1 :]
            if mt == t[0]:
                seen += 1
                if seen == count:
                    if nothing_after:
                        assert not buf, f"unexpected bytes after the last message: {buf!r}"
                    return out


def datarow_body(*fields: bytes | None) -> bytes:
    """A DataRow message body: int16 count, then per field int32 length (-1: NULL) + bytes."""
    b = struct.pack("!h", len(fields))
    for f in fields:
        b += struct.pack("!i", -1) if f is None else struct.pack("!i", len(f)) + f
    return b


def datarow_fields(body: bytes) -> list[bytes | None]:
    """The fields of a DataRow message body (None: NULL); asserts it is well-formed."""
    (n,) = struct.unpack_from("!h", body, 0)
    pos, out = 2, []
    for _ in range(n):
        (ln,) = struct.unpack_from("!i", body, pos)
        pos += 4
        if ln == -1:
            out.append(None)
        else:
            assert ln >= 0
            assert pos + ln <= len(body)
            out.append(body[pos : pos + ln])
            pos += ln
    assert pos == len(body), "trailing bytes"
    return out


def datarow_frame(body: bytes) -> bytes:
    """A whole DataRow message: type, length, body."""
    return b"D" + struct.pack("!i", len(body) + 4) + body


def mask_as_the_tunnel_does(m: Masker, buf: bytes, plan: RowPlan) -> bytes:
    """Framed DataRows masked the way the tunnel's loop (``_Conn`` in pcigate.tunnel.pg) masks them: runs
    of rows in C (:meth:`Masker.mask_datarows`), a row the C walk leaves in Python
    (:meth:`Masker.mask_datarow`)."""
    out: list[bytes] = []
    pos = 0
    python_row = -1
    while pos < len(buf):
        (n,) = struct.unpack_from("!i", buf, pos + 1)
        nxt = pos + 1 + n
        if pos != python_row:
            got = m.mask_datarows(buf, pos, plan)
            assert got is not None, "the C module is built by the project's install (.ci/bootstrap)"
            masked, stop = got
            if stop > pos:
                out.append(bytes(masked) if masked is not None else buf[pos:stop])
                pos = stop
                continue
            python_row = pos
        new = m.mask_datarow(buf[pos + 5 : nxt], plan)
        out.append(buf[pos:nxt] if new is None else datarow_frame(new))
        pos = nxt
    return b"".join(out)
