"""PostgreSQL frontend/backend protocol v3: pure framing, parsing and serialising. No I/O.

Two kinds of framing:

* :func:`parse_startup` for the untyped packets a client sends first (StartupMessage, SSLRequest,
  GSSENCRequest, CancelRequest): ``int32 length`` + ``int32 code`` + body, capped at :data:`MAX_STARTUP`.
* :class:`MessageScanner` for the typed messages after that (``byte type`` + ``int32 length`` + body, the
  length counting itself, capped at :data:`MAX_MESSAGE`). The scanner is incremental (any chunking of a
  stream gives the same messages) and cheap: it walks headers only and hands out the bodies of the message
  types it was asked for; every other body (DataRow, CopyData, ...) is skipped without being copied, even
  when it spans chunks. Bodies of wanted types are kept up to ``keep`` bytes (the rest is skipped too and
  the message is flagged ``truncated``), so memory stays bounded whatever the peer sends.

Malformed input raises :class:`pcigate.errors.ProtocolError`; nothing else escapes.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

from pcigate.errors import ProtocolError

MAX_MESSAGE = 1 << 30  # 1 GiB, a typed message's length field (self-inclusive) may not exceed this
MAX_STARTUP = 10 * 1024  # 10 KiB for the untyped first packet
DEFAULT_KEEP = 128 * 1024  # bytes of a wanted message's body kept by the scanner

PROTOCOL_3_0 = 196608  # 3 << 16
SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
CANCEL_REQUEST_CODE = 80877102

# Message types the frontend (client) may send after the startup phase.
FRONTEND_TYPES = b"BCcdDEfFHPpQSX"
# Message types a backend (server) may send.
BACKEND_TYPES = b"123AcCdDEGHIKnNRsStTVvWZ"

# Authentication request codes (the int32 after an 'R').
AUTH_OK = 0
AUTH_CLEARTEXT = 3
AUTH_MD5 = 5
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12

_I32 = struct.Struct("!i")
_U32 = struct.Struct("!I")
_I16 = struct.Struct("!h")
_II = struct.Struct("!ii")
_HDR = struct.Struct("!BI")


# --------------------------------------------------------------------------------------------------------
# Startup phase
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StartupMessage:
    version: int
    params: dict[str, str]


@dataclass(frozen=True)
class SSLRequest:
    pass


@dataclass(frozen=True)
class GSSENCRequest:
    pass


@dataclass(frozen=True)
class CancelRequest:
    pid: int
    secret: int


StartupPacket = StartupMessage | SSLRequest | GSSENCRequest | CancelRequest


def parse_startup(buf: bytes | bytearray) -> tuple[StartupPacket, int] | None:
    """Parse the first untyped packet at the start of ``buf``.

    Returns ``(packet, bytes consumed)`` or ``None`` when more bytes are needed. Raises ProtocolError when the
    packet is malformed, too long, or asks for an unsupported protocol version.
    """
    if len(buf) < 4:
        return None
    (length,) = _I32.unpack_from(buf, 0)
    if length < 8 or length > MAX_STARTUP:
        raise ProtocolError(f"invalid startup packet length {length}")
    if len(buf) < length:
        return None
    (code,) = _I32.unpack_from(buf, 4)
    if code == SSL_REQUEST_CODE:
        if length != 8:
            raise ProtocolError("invalid SSLRequest length")
        return SSLRequest(), 8
    if code == GSSENC_REQUEST_CODE:
        if length != 8:
            raise ProtocolError("invalid GSSENCRequest length")
        return GSSENCRequest(), 8
    if code == CANCEL_REQUEST_CODE:
        if length != 16:
            raise ProtocolError("invalid CancelRequest length")
        pid, secret = _II.unpack_from(buf, 8)
        return CancelRequest(pid, secret), 16
    if code >> 16 != 3:
        raise ProtocolError(f"unsupported frontend protocol {code >> 16}.{code & 0xFFFF}")
    body = bytes(buf[8:length])
    if not body.endswith(b"\x00"):
        raise ProtocolError("startup packet not terminated")
    parts = body[:-1].split(b"\x00")
    if parts == [b""]:
        parts = []
    elif parts and parts[-1] == b"":
        parts = parts[:-1]
    else:
        raise ProtocolError("startup packet not terminated")
    if len(parts) % 2:
        raise ProtocolError("startup packet has an odd number of strings")
    params: dict[str, str] = {}
    for i in range(0, len(parts), 2):
        key = _decode(parts[i])
        if not key:
            raise ProtocolError("startup packet has an empty parameter name")
        params[key] = _decode(parts[i + 1])
    return StartupMessage(code, params), length


def startup_message(params: Mapping[str, str], version: int = PROTOCOL_3_0) -> bytes:
    body = b"".join(k.encode() + b"\x00" + v.encode() + b"\x00" for k, v in params.items()) + b"\x00"
    return _II.pack(len(body) + 8, version) + body


def ssl_request() -> bytes:
    return _II.pack(8, SSL_REQUEST_CODE)


def gssenc_request() -> bytes:
    return _II.pack(8, GSSENC_REQUEST_CODE)


def cancel_request(pid: int, secret: int) -> bytes:
    return _II.pack(16, CANCEL_REQUEST_CODE) + _II.pack(pid, secret)


# --------------------------------------------------------------------------------------------------------
# Typed messages
# --------------------------------------------------------------------------------------------------------


def message(mtype: bytes | int, body: bytes = b"") -> bytes:
    t = mtype if isinstance(mtype, int) else mtype[0]
    return _HDR.pack(t, len(body) + 4) + body


class Message(NamedTuple):
    """One typed message. ``body`` is complete unless ``truncated`` (then only the first ``keep`` bytes);
    ``length`` is the full body length. A named tuple: immutable and cheap to build on the hot path."""

    type: int
    body: bytes
    length: int
    truncated: bool = False
    mark: int = 0  # the scanner's ``copy_bytes`` when this message started (COPY progress between two marks)

    @property
    def tchar(self) -> str:
        return chr(self.type)


class MessageScanner:
    """Incremental framer over one direction of a connection.

    ``feed(chunk)`` returns the *wanted* messages completed in this chunk, in order; other messages are
    walked over (and counted in ``skipped``/``skipped_bytes`` and, for CopyData, ``copy_bytes``) but never
    copied. ``allowed`` lists the message types this side may send (anything else is a ProtocolError).
    """

    __slots__ = (
        "_blen",
        "_bmark",
        "_bneed",
        "_body",
        "_btype",
        "_hdr",
        "_kind",
        "_skip",
        "copy_bytes",
        "keep",
        "max_len",
        "offset",
        "skipped",
    )

    def __init__(
        self,
        wanted: Iterable[int] | bytes,
        allowed: bytes | None = None,
        *,
        keep: int = DEFAULT_KEEP,
        max_len: int = MAX_MESSAGE,
    ) -> None:
        kind = bytearray(256)  # 0 = not allowed, 1 = walk over, 2 = hand out
        for t in allowed if allowed is not None else range(256):
            kind[t] = 1
        for t in wanted:
            kind[t] = 2
        self._kind = bytes(kind)
        self.keep = keep
        self.max_len = max_len
        self._hdr = b""  # partial header carried over (0..4 bytes)
        self._skip = 0  # bytes of a walked-over body still to skip
        self._btype = -1  # type of a wanted message being collected (-1: none)
        self._body = bytearray()
        self._blen = 0  # full body length of the collected message
        self._bneed = 0  # bytes still to come for it
        self._bmark = 0
        self.offset = 0  # total bytes fed
        self.skipped = 0  # walked-over messages
        self.copy_bytes = 0  # CopyData payload bytes walked over

    @property
    def at_boundary(self) -> bool:
        """True when the bytes fed so far end exactly at a message boundary."""
        return not self._hdr and not self._skip and self._btype < 0

    def walked(self, nbytes: int) -> None:
        """Count ``nbytes`` of complete messages that the caller has already walked and checked (e.g. the C
        masking walk over a run of DataRows) as fed, without reading them again. They must be of types this
        scanner walks over (never hands out), and the scanner must be at a message boundary."""
        if not self.at_boundary:
            raise ValueError("walked() between message boundaries")
        self.offset += nbytes

    def feed(self, chunk: bytes | bytearray | memoryview) -> list[Message]:
        out: list[Message] = []
        end = len(chunk)
        self.offset += end
        pos = 0
        if self._skip:
            if self._skip >= end:
                self._skip -= end
                return out
            pos = self._skip
            self._skip = 0
        elif self._btype >= 0:
            pos = self._collect(chunk, 0, end, out)
            if self._btype >= 0:
                return out
        if self._hdr:
            need = 5 - len(self._hdr)
            hdr = self._hdr + bytes(chunk[pos : pos + need])
            if len(hdr) < 5:
                self._hdr = hdr
                return out
            self._hdr = b""
            pos += need
            t, n = _HDR.unpack(hdr)
            pos = self._start(chunk, pos, end, t, n, out)
            if pos >= end:
                return out
        # The hot loop: walk headers of complete messages.
        kind = self._kind
        unpack = _HDR.unpack_from
        max_len = self.max_len
        keep = self.keep + 4
        skipped = 0
        cbytes = 0
        walk_copy = kind[100] == 1
        try:
            while pos + 5 <= end:
                t, n = unpack(chunk, pos)
                if t == 100 and walk_copy and 4 <= n <= max_len:
                    # A run of CopyData (COPY OUT/IN): the tightest walk; its payload bytes are the run's
                    # length minus the 5-byte headers.
                    run0 = pos
                    cnt = 0
                    while True:
                        nxt = pos + 1 + n
                        if nxt > end:  # the run's last message continues in the next chunk
                            self._skip = nxt - end
                            skipped += cnt + 1
                            cbytes += (pos - run0) - 5 * cnt + n - 4
                            return out
                        pos = nxt
                        cnt += 1
                        if pos + 5 > end:
                            break
                        t, n = unpack(chunk, pos)
                        if t != 100 or n < 4 or n > max_len:
                            break
                    skipped += cnt
                    cbytes += (pos - run0) - 5 * cnt
                    continue
                k = kind[t]
                if k == 1 and 4 <= n <= max_len:
                    nxt = pos + 1 + n
                    if nxt > end:
                        self._skip = nxt - end
                        skipped += 1
                        if t == 100:
                            cbytes += n - 4
                        return out
                    skipped += 1
                    if t == 100:
                        cbytes += n - 4
                    pos = nxt
                    continue
                if k == 2 and 4 <= n <= keep:  # a wanted message that fits the keep limit
                    nxt = pos + 1 + n
                    if nxt <= end:
                        out.append(Message(t, bytes(chunk[pos + 5 : nxt]), n - 4, False,
                                           self.copy_bytes + cbytes))
                        pos = nxt
                        continue
                self.skipped += skipped
                self.copy_bytes += cbytes
                skipped = cbytes = 0
                pos = self._start(chunk, pos + 5, end, t, n, out)
            if pos < end:
                self._hdr = bytes(chunk[pos:end])
            return out
        finally:
            self.skipped += skipped
            self.copy_bytes += cbytes

    def _start(self, chunk: bytes | bytearray | memoryview, pos: int, end: int, t: int, n: int,
               out: list[Message]) -> int:
        """A header (type t, length n) ends at ``pos``; dispatch it. Returns the new position."""
        k = self._kind[t]
        if k == 0:
            raise ProtocolError(f"unexpected message type {t:#04x}")
        if n < 4 or n > self.max_len:
            raise ProtocolError(f"invalid message length {n}")
        blen = n - 4
        if k == 1:
            self.skipped += 1
            if t == 100:
                self.copy_bytes += blen
            if pos + blen > end:
                self._skip = pos + blen - end
                return end
            return pos + blen
        if pos + blen <= end:  # fast path: complete in this chunk
            out.append(Message(t, bytes(chunk[pos : pos + min(blen, self.keep)]), blen, blen > self.keep,
                               self.copy_bytes))
            return pos + blen
        self._bmark = self.copy_bytes
        self._btype = t
        self._blen = blen
        self._bneed = blen
        self._body = bytearray()
        return self._collect(chunk, pos, end, out)

    def _collect(self, chunk: bytes | bytearray | memoryview, pos: int, end: int, out: list[Message]) -> int:
        take = min(self._bneed, end - pos)
        room = self.keep - len(self._body)
        if room > 0:
            self._body += chunk[pos : pos + min(take, room)]
        self._bneed -= take
        pos += take
        if self._bneed == 0:
            blen = self._blen
            out.append(Message(self._btype, bytes(self._body), blen, blen > self.keep, self._bmark))
            self._btype = -1
            self._body = bytearray()
        return pos


def split_messages(data: bytes, allowed: bytes | None = None) -> list[Message]:
    """Frame a complete byte string into all its messages (tests, small buffers)."""
    sc = MessageScanner(range(256), allowed, keep=MAX_MESSAGE)
    msgs = sc.feed(data)
    if not sc.at_boundary:
        raise ProtocolError("incomplete message at end of data")
    return msgs


# --------------------------------------------------------------------------------------------------------
# Body parsers
# --------------------------------------------------------------------------------------------------------


def _decode(b: bytes) -> str:
    return b.decode("utf-8", "replace")


def _cstr(body: bytes, pos: int) -> tuple[str, int]:
    z = body.find(b"\x00", pos)
    if z < 0:
        raise ProtocolError("unterminated string in message")
    return _decode(body[pos:z]), z + 1


def parse_query(body: bytes) -> str:
    """'Q' Query: the SQL text. A truncated body yields the text so far."""
    z = body.find(b"\x00")
    return _decode(body if z < 0 else body[:z])


@dataclass(frozen=True)
class Parse:
    name: str
    query: str
    nparams: int | None


def parse_parse(body: bytes) -> Parse:
    """'P' Parse: statement name, query text, number of parameter type OIDs (None when truncated)."""
    name, pos = _cstr(body, 0)
    z = body.find(b"\x00", pos)
    if z < 0:  # truncated by the scanner's keep limit
        return Parse(name, _decode(body[pos:]), None)
    nparams = _I16.unpack_from(body, z + 1)[0] if len(body) >= z + 3 else None
    return Parse(name, _decode(body[pos:z]), nparams)


@dataclass(frozen=True)
class Bind:
    portal: str
    statement: str
    nparams: int | None
    # the result-column format codes (empty: all text; one: all columns; else one per column); None when
    # the body ends before them (truncated by the scanner's keep limit: large parameter values)
    result_formats: tuple[int, ...] | None = None


def parse_bind(body: bytes) -> Bind:
    portal, pos = _cstr(body, 0)
    stmt, pos = _cstr(body, pos)
    nparams: int | None = None
    n = len(body)
    if n >= pos + 2:
        (nfmt,) = _I16.unpack_from(body, pos)
        if nfmt < 0:
            raise ProtocolError("negative format count in Bind")
        pos += 2 + 2 * nfmt
        if n >= pos + 2:
            (nparams,) = _I16.unpack_from(body, pos)
    if nparams is None:
        return Bind(portal, stmt, None)
    # What follows is read leniently: a bad value here is the server's to refuse (it answers with an error)
    pos += 2
    for _ in range(nparams):
        if n < pos + 4:
            return Bind(portal, stmt, nparams)
        (vlen,) = _I32.unpack_from(body, pos)
        if vlen < -1:
            return Bind(portal, stmt, nparams)
        pos += 4 + max(vlen, 0)
    if n < pos + 2:
        return Bind(portal, stmt, nparams)
    (nres,) = _I16.unpack_from(body, pos)
    if nres < 0 or n < pos + 2 + 2 * nres:
        return Bind(portal, stmt, nparams)
    return Bind(portal, stmt, nparams, struct.unpack_from(f"!{nres}h", body, pos + 2))


def parse_describe(body: bytes) -> tuple[str, str]:
    """'D' Describe (frontend): ('S' or 'P', name)."""
    if not body or body[:1] not in (b"S", b"P"):
        raise ProtocolError("invalid Describe message")
    return chr(body[0]), _cstr(body, 1)[0]


def parse_execute(body: bytes) -> str:
    """'E' Execute (frontend): the portal name."""
    return _cstr(body, 0)[0]


def parse_close(body: bytes) -> tuple[str, str]:
    """'C' Close (frontend): ('S' or 'P', name)."""
    if not body:
        raise ProtocolError("empty Close message")
    return chr(body[0]), _cstr(body, 1)[0]


def parse_command_complete(body: bytes) -> str:
    return parse_query(body)


def rows_from_tag(tag: str | None) -> int | None:
    """Rows from a CommandComplete tag: 'SELECT 3' -> 3, 'INSERT 0 5' -> 5, 'CREATE TABLE' -> None."""
    if not tag:
        return None
    last = tag.rsplit(" ", 1)[-1]
    if last.isdigit() and " " in tag:
        return int(last)
    return None


def parse_error_fields(body: bytes) -> dict[str, str]:
    """ErrorResponse / NoticeResponse body -> {field code char: value} (e.g. 'C' sqlstate, 'M' message)."""
    fields: dict[str, str] = {}
    pos = 0
    n = len(body)
    while pos < n:
        code = body[pos]
        if code == 0:
            break
        z = body.find(b"\x00", pos + 1)
        if z < 0:  # truncated message: keep what we have
            fields[chr(code)] = _decode(body[pos + 1 :])
            break
        fields[chr(code)] = _decode(body[pos + 1 : z])
        pos = z + 1
    return fields


@dataclass(frozen=True)
class AuthRequest:
    code: int
    data: bytes  # md5: 4-byte salt; SASL: mechanism list / server data


def parse_auth(body: bytes) -> AuthRequest:
    if len(body) < 4:
        raise ProtocolError("short authentication message")
    (code,) = _I32.unpack_from(body, 0)
    return AuthRequest(code, body[4:])


def sasl_mechanisms(data: bytes) -> list[str]:
    return [_decode(m) for m in data.split(b"\x00") if m]


def parse_backend_key(body: bytes) -> tuple[int, int]:
    if len(body) != 8:
        raise ProtocolError("invalid BackendKeyData")
    pid, secret = _II.unpack(body)
    return pid, secret


def parse_parameter_status(body: bytes) -> tuple[str, str]:
    k, pos = _cstr(body, 0)
    v, _ = _cstr(body, pos)
    return k, v


# --------------------------------------------------------------------------------------------------------
# Serialisers
# --------------------------------------------------------------------------------------------------------


def auth_request(code: int, data: bytes = b"") -> bytes:
    return message(b"R", _I32.pack(code) + data)


def auth_ok() -> bytes:
    return auth_request(AUTH_OK)


def auth_sasl(mechanisms: Iterable[str]) -> bytes:
    return auth_request(AUTH_SASL, b"".join(m.encode() + b"\x00" for m in mechanisms) + b"\x00")


def auth_sasl_continue(data: bytes) -> bytes:
    return auth_request(AUTH_SASL_CONTINUE, data)


def auth_sasl_final(data: bytes) -> bytes:
    return auth_request(AUTH_SASL_FINAL, data)


def password_message(data: bytes) -> bytes:
    return message(b"p", data)


def sasl_initial_response(mechanism: str, data: bytes) -> bytes:
    return message(b"p", mechanism.encode() + b"\x00" + _I32.pack(len(data)) + data)


def sasl_response(data: bytes) -> bytes:
    return message(b"p", data)


def parse_sasl_initial_response(body: bytes) -> tuple[str, bytes]:
    mech, pos = _cstr(body, 0)
    if len(body) < pos + 4:
        raise ProtocolError("short SASLInitialResponse")
    (n,) = _I32.unpack_from(body, pos)
    data = body[pos + 4 :]
    if n != len(data):
        raise ProtocolError("SASLInitialResponse length mismatch")
    return mech, data


def backend_key_data(pid: int, secret: int) -> bytes:
    return message(b"K", _II.pack(pid, secret))


def parameter_status(name: str, value: str) -> bytes:
    return message(b"S", name.encode() + b"\x00" + value.encode() + b"\x00")


def ready_for_query(status: bytes = b"I") -> bytes:
    return message(b"Z", status)


def query(sql: str) -> bytes:
    return message(b"Q", sql.encode() + b"\x00")


def terminate() -> bytes:
    return message(b"X")


def command_complete(tag: str) -> bytes:
    return message(b"C", tag.encode() + b"\x00")


def error_response(sqlstate: str, msg: str, severity: str = "FATAL", **extra: str) -> bytes:
    """ErrorResponse with S/V (severity), C (sqlstate), M (message) and optional single-letter fields."""
    parts = [b"S" + severity.encode(), b"V" + severity.encode(), b"C" + sqlstate.encode(),
             b"M" + msg.replace("\x00", " ").encode()]
    parts += [k.encode()[:1] + v.encode() for k, v in extra.items()]
    return message(b"E", b"\x00".join(parts) + b"\x00\x00")
