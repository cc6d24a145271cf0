"""The local PostgreSQL tunnel: a thin asyncio adapter over :mod:`pcigate.wire`.

One :class:`PgTunnel` listens on loopback. Per client connection it

1. answers ``SSLRequest``/``GSSENCRequest`` with ``N`` and maps ``CancelRequest`` to the upstream key;
2. is the SCRAM-SHA-256 *server* for the one-time ``local_secret`` (the client's user name is ignored; the
   database must be the session's own); only once the client's SCRAM proof has verified does it open and
   authenticate the upstream connection (SCRAM-SHA-256 / md5 / cleartext, TLS per ``sslmode``), so a local
   process without the secret never causes an upstream login. An unauthenticated connection is closed after
   ``HANDSHAKE_TIMEOUT`` seconds;
3. replays the upstream's ParameterStatus/ReadyForQuery with its own (pid, secret) BackendKeyData;
4. relays bytes both ways with one write per read, walking only message headers (bodies of DataRow/CopyData
   are never copied) and reading the few messages that make a statement record: client Q/P/B/E/S/C/X, server
   C/E/I/s/Z/G/H/W. Flow control is the transports' own: when one side's write buffer is over its high-water
   mark, reading from the other side pauses. A *plain* connection (no guardrails, no masking, no TLS
   upstream) is relayed instead by the tunnel's C thread (``pcigate._crelay``, see :meth:`_Conn._hand_over`):
   it frames both directions by the same rules and hands those messages, stamped with when they were read,
   to the same recording code in batches (:meth:`PgTunnel._relay_pump`).

Recording choices: a simple-protocol Query string is one ``stmt`` event even when it holds several
statements: ``rows`` is the sum over its CommandCompletes (null if none carried a count), ``tag`` is the last
tag, ``ms`` runs from the Query to its ReadyForQuery, and an ErrorResponse sets ``sqlstate``/``error``. In the
extended protocol one ``stmt`` is recorded per Execute (SQL from the Parse of the bound statement,
``params`` from the Bind), timed from the Execute to its CommandComplete/ErrorResponse; Executes skipped by
the server after an error are not recorded; an error in a batch without Execute (e.g. a failing Parse) is
recorded with the batch's last Parse text. A ``copy`` event follows the CommandComplete of a COPY, and a
``cancel`` event marks a forwarded CancelRequest.

Guardrails (``policy.guardrails``; one :class:`~pcigate.guardrails.Guardrails` per tunnel, its cache shared by
the connections): without rules the relay above is unchanged. With rules every Query and Parse text is judged
before any byte of it is forwarded; a denied one never reaches the server, the client gets ErrorResponse
42501 (the rule's message) and a ReadyForQuery, and a ``stmt`` event with ``blocked`` (the rule's name, or
``"unparseable"``) is recorded. See "guardrails" in :class:`_Conn` for the extended-protocol details.
Masking (``policy.masking``; one :class:`~pcigate.masking.Masker` per tunnel): without it the relay above is
unchanged. With it, server bytes are framed into complete messages before anything is passed on (a partial
message is held until the rest arrives) and each chunk is rewritten, then written once:
* RowDescription (``T``) gives the plan for the DataRows (``D``) that follow (column name, type OID, format).
  A column the server traces to a table column found by :meth:`PgTunnel.check_upstream` in the catalog (every
  column named by a masking rule, at session start) is judged as that table's column under its own name, so
  aliases do not hide it and table-scoped rules tell tables apart; any other column (computed, or from a
  table created later) is judged by the name it is sent under with its table unknown, where a table-scoped
  rule applies (fail closed); a DataRow is masked with :meth:`~pcigate.masking.Masker.mask_datarow` and
  re-framed when its length changes. The plan ends with CommandComplete / EmptyQuery / ErrorResponse /
  ReadyForQuery / PortalSuspended. The rows of an extended-protocol Execute get the plan of the columns the
  server gave for their portal (Describe P) or statement (Describe S, perhaps in an earlier exchange, as
  asyncpg and pgjdbc do), in the result formats their Bind asked for (``_mq``: which answer belongs to which
  forwarded message: every Parse/Bind/Close/Describe/Execute/Query/Sync until its answer, so that errors that
  skip to the Sync and Syncs ignored during COPY IN keep the two sides matched; capped at ``_MQ_CAP``; a
  CopyDone that follows the server's error is dropped; a client message other than copy data during COPY IN
  fails the connection, as the server never answers it). A Describe P also describes the portal's statement
  (pgjdbc later binds it without a Describe). Statements and portals are told apart by their raw names;
  portals are forgotten when a transaction ends. Fail closed (the connection, before any row of it):
  text-format rows whose portal and statement were never described, under column rules (the default CVV/PIN
  list); binary rows never described; rows of a statement described only by Describe S whose Bind was too
  large for the client scanner to keep whole (~257 KiB of parameters: its result formats are unread) when a
  column's binary format matters; rows of a statement described before SQL that may have replaced it (a
  statement starting ``PREPARE``, ``DEALLOCATE`` or ``DISCARD``, or ``EXECUTE``-ing one in a ``DO`` block)
  until it is described again. Without column rules, undescribed text rows are masked by pattern. A statement
  replaced through SQL otherwise (a function that prepares it) would still be read by its old description:
  pattern masking protects against showing card data by accident, not against a user crafting protocol
  messages.
* COPY OUT (``H`` … ``d`` … ``c``): text/CSV payloads by pattern; binary payloads tuple by tuple, every field
  by pattern (COPY has no column names, so column rules cannot apply to COPY data).
* ErrorResponse / NoticeResponse: :meth:`~pcigate.masking.Masker.mask_error_fields` (so the recording's
  ``error`` is masked too). NotificationResponse payloads and FunctionCallResponse values: by pattern. SQL
  texts (and the client's application name) are masked before they are recorded.
A chunk with no digit run that could be a PAN (:meth:`~pcigate.masking.Masker.has_candidate`) and no
redacted column in play has only its headers walked. Column rules with ``action="hash"`` use the target's key
that the broker sends with the session (``masking_key``); ``start()`` refuses such a policy without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import ssl
import struct
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from pcigate.errors import AccessDenied, DatabaseUnavailable, PortInUse, ProtocolError, UsageError
from pcigate.guardrails import Guardrails, StatementInfo
from pcigate.masking import (
    BINARY_ARRAY_OIDS,
    BINARY_NUMBER_ARRAY_OIDS,
    BINARY_NUMBER_OIDS,
    ColumnInfo,
    Masker,
    RowPlan,
    star_message_fields,
)
from pcigate.models import DatabaseCredentials, DataPathPolicy
from pcigate.net import is_loopback
from pcigate.recording import SQL_CAP, RecordingWriter
from pcigate.wire import pg
from pcigate.wire.scram import MECHANISM, ScramClient, ScramError, ScramKeys, ScramServer

if TYPE_CHECKING:  # imported where column rules need them (a session without any never loads them)
    from pcigate.sqltaint import ComputedColumns, Derived, View

try:  # the relay thread of plain connections (built with the package; without it they take the asyncio path)
    from pcigate._crelay import Relay as _CRelay
except ImportError:  # pragma: no cover - a source tree without the build hook's output
    _CRelay = None  # type: ignore[assignment,misc]

CONNECT_TIMEOUT = 10.0
HANDSHAKE_TIMEOUT = 10.0  # from accept() to a verified local SCRAM proof
SETUP_MESSAGE_CAP = 1 << 20  # messages during the upstream login are small
ERROR_TEXT_CAP = 4096
MAX_ERRORS_KEPT = 200
WRITE_HIGH_WATER = 256 * 1024

_CLIENT_WANTED = b"QPBESCX"
_CLIENT_KEEP = SQL_CAP * 4 + 1024  # bytes of a client message's body the scanners keep (a Query's SQL)
_SERVER_KEEP = 8192
# the C relay also hands out CopyDone/CopyFail: their marks count the client's CopyData (_relay_event)
_RELAY_CLIENT_WANTED = _CLIENT_WANTED + b"cf"
# "python": plain connections take the asyncio relay too (diagnostics, A/B benchmarks)
RELAY_ENV = "PCIGATE_TUNNEL_RELAY"
_SERVER_WANTED = b"CEIsZGHW"
_HDR = struct.Struct("!BI")
_Q, _P, _B, _E, _S, _C, _X = (ord(c) for c in "QPBESCX")
_I, _s, _Z, _G, _H, _W = (ord(c) for c in "IsZGHW")
_CMD, _ERR = ord("C"), ord("E")  # server CommandComplete / ErrorResponse
_PS, _COPY_DATA = ord("S"), ord("d")  # server ParameterStatus; CopyData (either side)
_BATCH_TYPES = frozenset(b"PBDEC")  # extended-protocol messages that open a batch (ended by Sync)
_SYNC_MSG = pg.message(b"S")
# server message types the masking layer looks at
_T, _D, _N, _c = (ord(c) for c in "TDNc")
_NO_DATA, _F = ord("n"), ord("F")  # server NoData; client FunctionCall
_COPY_IN, _COPY_FAIL = ord("G"), ord("f")  # server CopyInResponse; client CopyFail (CopyDone: _c)
_H_FLUSH = ord("H")  # client Flush (server: CopyOutResponse, _H)
_NOTIFY, _FN_RESULT = ord("A"), ord("V")  # server NotificationResponse, FunctionCallResponse
_DONE_123 = frozenset(b"123")  # server ParseComplete, BindComplete, CloseComplete
# masking: the forwarded client messages still to be answered (_Conn._mq), in order: Query or FunctionCall
# and Sync (answered by ReadyForQuery; the entry holds its sequence number), Parse/Bind/Close (1/2/3),
# Describe S/P (ParameterDescription, then RowDescription or NoData), Execute (its last answer: C/s/I/E),
# and a CopyDone/CopyFail sent before the server's CopyInResponse was seen
_MQ_Q, _MQ_SYNC, _MQ_DS, _MQ_DP, _MQ_E, _MQ_X, _MQ_COPYEND = range(7)
# unanswered messages per connection: above _MQ_HIGH the client is not read until the server's answers
# bring it below _MQ_LOW (asyncpg's executemany pipelines every row's Bind and Execute before one Sync:
# 400,000 rows left ~490,000 unanswered); _MQ_CAP guards against a bug (past it the connection fails)
_MQ_HIGH, _MQ_LOW = 100_000, 50_000
_MQ_CAP = 2_000_000
_MQ_X_ENTRY = (_MQ_X, None)  # shared: Parse/Bind/Close entries cost one deque slot
# SQL that may replace a prepared statement behind the protocol's back (PREPARE after DEALLOCATE, DISCARD
# ALL; also inside a DO block): the statements' descriptions are then forgotten, so their rows fail closed
# until described again instead of being read by a stale description
_SQL_PREPARE = re.compile(rb"(?i)(?:^|;|\bexecute\s+')\s*(?:prepare|deallocate|discard)\s")
# column types whose binary format masking must know (a Bind whose result formats were not read fails
# closed when its rows have one): numbers that can hold a PAN, arrays of them and of text-like types
_FORMAT_SENSITIVE = BINARY_NUMBER_OIDS | BINARY_NUMBER_ARRAY_OIDS.keys() | BINARY_ARRAY_OIDS
_EMPTY_Q = ord("I")
_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")
_FIELD_TAIL = struct.Struct("!ihihih")  # table oid, attnum, type oid, typlen, typmod, format
# PostgreSQL client_encoding names -> Python codecs (what the guardrails decode a query with). An encoding not
# listed here makes every statement unparseable (denied): the tunnel must read exactly what the server reads.
_CODECS = {
    "UTF8": "utf-8", "UNICODE": "utf-8", "SQLASCII": "latin-1", "LATIN1": "iso8859-1", "LATIN2": "iso8859-2",
    "LATIN3": "iso8859-3", "LATIN4": "iso8859-4", "LATIN5": "iso8859-9", "LATIN6": "iso8859-10",
    "LATIN7": "iso8859-13", "LATIN8": "iso8859-14", "LATIN9": "iso8859-15", "LATIN10": "iso8859-16",
    "ISO88595": "iso8859-5", "ISO88596": "iso8859-6", "ISO88597": "iso8859-7", "ISO88598": "iso8859-8",
    "WIN866": "cp866", "WIN874": "cp874", "WIN1250": "cp1250", "WIN1251": "cp1251", "WIN1252": "cp1252",
    "WIN1253": "cp1253", "WIN1254": "cp1254", "WIN1255": "cp1255", "WIN1256": "cp1256", "WIN1257": "cp1257",
    "WIN1258": "cp1258", "KOI8R": "koi8-r", "KOI8U": "koi8-u", "EUCJP": "euc-jp", "EUCKR": "euc-kr",
    "EUCCN": "gb2312", "SJIS": "shift_jis", "BIG5": "big5", "GBK": "gbk", "UHC": "cp949",
    "GB18030": "gb18030", "JOHAB": "johab", "EUCJIS2004": "euc_jis_2004", "SHIFTJIS2004": "shift_jis_2004",
}


def _codec(pg_name: str) -> str | None:
    return _CODECS.get("".join(ch for ch in pg_name.upper() if ch.isalnum()))


def _affects_prepared(st: StatementInfo) -> bool:
    """Whether this statement's CommandComplete may change the prepared-statement map."""
    return st.prepared_name is not None or st.deallocate is not None or "session" in st.classes
# Startup parameters a client may not pass through.
_DROPPED_PARAMS = frozenset({"user", "database", "replication"})


@dataclass
class TunnelStats:
    connections: int = 0
    statements: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    errors: int = 0
    blocked: int = 0  # statements denied by a guardrail (also counted in ``statements``)


class _UpstreamError(Exception):
    """A failure opening the upstream connection: the SQLSTATE for the client and a one-line message."""

    def __init__(self, sqlstate: str, message: str) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.message = message


def _one_line(text: str, cap: int = 300) -> str:
    return " ".join(text.split())[:cap]


# --------------------------------------------------------------------------------------------------------
# Upstream side
# --------------------------------------------------------------------------------------------------------


class _Upstream(asyncio.Protocol):
    """The tunnel's connection to the real server. Buffered reads during login, then relay mode."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.conn: _Conn | None = None
        self._buf = bytearray()
        self._waiter: asyncio.Future[None] | None = None
        self.lost = False
        self.lost_exc: BaseException | None = None
        self.tls = False

    # asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass it

    def data_received(self, data: bytes) -> None:
        conn = self.conn
        if conn is not None:
            conn.from_server(data)
            return
        self._buf += data
        self._wake()

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.lost_exc = exc
        if self.conn is not None:
            self.conn.server_lost(exc)
        self._wake()

    def pause_writing(self) -> None:
        if self.conn is not None:
            self.conn.pause_client()

    def resume_writing(self) -> None:
        if self.conn is not None:
            self.conn.resume_client()

    # login-phase reads
    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def _more(self) -> None:
        if self.lost:
            raise _UpstreamError("08006", "the database closed the connection during login")
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    async def read_exact(self, n: int) -> bytes:
        while len(self._buf) < n:
            await self._more()
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    async def read_message(self) -> tuple[int, bytes]:
        while True:
            if len(self._buf) >= 5:
                t, n = _HDR.unpack_from(self._buf, 0)
                if t not in pg.BACKEND_TYPES or n < 4 or n > SETUP_MESSAGE_CAP:
                    raise _UpstreamError("08P01", "the database sent a malformed message during login")
                if len(self._buf) >= n + 1:
                    body = bytes(self._buf[5 : n + 1])
                    del self._buf[: n + 1]
                    return t, body
            await self._more()

    def take_buffer(self) -> bytes:
        out = bytes(self._buf)
        self._buf.clear()
        return out

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


@dataclass
class _Login:
    upstream: _Upstream
    greeting: bytes  # ParameterStatus / NoticeResponse / NegotiateProtocolVersion messages, in order
    ready: bytes  # the ReadyForQuery message
    key: tuple[int, int] | None  # upstream BackendKeyData


def _ssl_context(sslmode: str) -> ssl.SSLContext:
    if sslmode == "verify-full":
        return ssl.create_default_context()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # prefer/require: encryption without verification, as libpq does
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


async def _open_upstream(creds: DatabaseCredentials, params: dict[str, str],
                         salted_cache: dict[tuple[bytes, int], bytes]) -> _Login:
    """Connect, (TLS), start up and authenticate. Raises _UpstreamError with a one-line message."""
    loop = asyncio.get_running_loop()
    where = f"{creds.host}:{creds.port}"
    proto = _Upstream()
    try:
        transport, _ = await loop.create_connection(lambda: proto, creds.host, creds.port)
    except ConnectionRefusedError:
        raise _UpstreamError("08006", f"cannot reach the database at {where}: connection refused") from None
    except OSError as e:
        reason = _one_line(e.strerror or str(e) or type(e).__name__)
        raise _UpstreamError("08006", f"cannot reach the database at {where}: {reason}") from None
    try:
        if creds.sslmode != "disable":
            proto.write(pg.ssl_request())
            early_data = f"the database at {where} sent data before the TLS handshake"
            answer = await proto.read_exact(1)
            if answer == b"S":
                if proto._buf:  # bytes after 'S' came in plaintext: never trust them (CVE-2021-23222)
                    raise _UpstreamError("08P01", early_data)
                try:
                    new = await loop.start_tls(transport, proto, _ssl_context(creds.sslmode),
                                               server_hostname=creds.host)
                except (ssl.SSLError, OSError) as e:
                    raise _UpstreamError(
                        "08006", f"TLS handshake with the database at {where} failed: {_one_line(str(e))}"
                    ) from None
                if proto._buf:  # defensive: nothing may arrive in plaintext before the upgrade completes
                    raise _UpstreamError("08P01", early_data)
                proto.transport = cast(asyncio.Transport, new)
                proto.tls = True
            elif answer == b"N":
                if creds.sslmode in ("require", "verify-full"):
                    raise _UpstreamError(
                        "08006", f"the database at {where} does not accept TLS (sslmode={creds.sslmode})"
                    )
            else:
                raise _UpstreamError("08P01", f"the database at {where} answered the SSLRequest oddly")
        startup = {"user": creds.username, "database": creds.database}  # the session grants this one only
        startup.update((k, v) for k, v in params.items() if k not in _DROPPED_PARAMS)
        proto.write(pg.startup_message(startup))
        return await _authenticate(proto, creds, salted_cache, where)
    except BaseException:
        proto.close()
        raise


async def _authenticate(proto: _Upstream, creds: DatabaseCredentials,
                        salted_cache: dict[tuple[bytes, int], bytes], where: str) -> _Login:
    scram: ScramClient | None = None
    greeting: list[bytes] = []
    key: tuple[int, int] | None = None
    authed = False
    while True:
        t, body = await proto.read_message()
        if t == ord("E"):
            f = pg.parse_error_fields(body)
            code = f.get("C", "08006")
            msg = _one_line(f.get("M", "error"))
            if code == "28P01" or code.startswith("28"):
                raise _UpstreamError(code, f"the database at {where} refused the login for "
                                           f"{creds.username!r}: {msg}")
            raise _UpstreamError(code, f"the database at {where} refused the connection: {msg}")
        if t == ord("R") and not authed:
            a = pg.parse_auth(body)
            if a.code == pg.AUTH_OK:
                authed = True
                if scram is not None and not scram.done:
                    raise _UpstreamError("08006", f"the database at {where} skipped the SCRAM server proof")
            elif a.code == pg.AUTH_SASL:
                if MECHANISM not in pg.sasl_mechanisms(a.data):
                    raise _UpstreamError("08006", f"the database at {where} offers no SCRAM-SHA-256")
                scram = ScramClient(creds.username, creds.password, salted_cache=salted_cache)
                proto.write(pg.sasl_initial_response(MECHANISM, scram.first()))
            elif a.code == pg.AUTH_SASL_CONTINUE and scram is not None:
                try:
                    proto.write(pg.sasl_response(scram.final(a.data)))
                except ScramError as e:
                    raise _UpstreamError("08006", f"SCRAM with the database at {where} failed: {e}") from None
            elif a.code == pg.AUTH_SASL_FINAL and scram is not None:
                try:
                    scram.verify(a.data)
                except ScramError as e:
                    raise _UpstreamError("08006", f"SCRAM with the database at {where} failed: {e}") from None
            elif a.code == pg.AUTH_MD5 and len(a.data) == 4:
                from pcigate.wire.scram import md5_password

                proto.write(pg.password_message(md5_password(creds.username, creds.password, a.data) + b"\0"))
            elif a.code == pg.AUTH_CLEARTEXT:
                # Only a verified server may see the password: with sslmode prefer/require the certificate
                # is not checked, so an active attacker could ask for it in cleartext.
                if not ((proto.tls and creds.sslmode == "verify-full") or is_loopback(creds.host)):
                    raise _UpstreamError("28000", f"the database at {where} asks for a cleartext password, "
                                                  "which pcigate sends only over TLS with "
                                                  f"sslmode=verify-full (sslmode={creds.sslmode}); refused")
                proto.write(pg.password_message(creds.password.encode() + b"\0"))
            else:
                raise _UpstreamError("08006", f"the database at {where} asks for an unsupported "
                                              f"authentication method ({a.code})")
        elif t == ord("K") and authed:
            key = pg.parse_backend_key(body)
        elif t == ord("Z") and authed:
            return _Login(proto, b"".join(greeting), pg.message(t, body), key)
        elif (t in b"SNv" and authed) or t == ord("N"):
            greeting.append(pg.message(t, body))
        else:
            raise _UpstreamError("08P01", f"the database at {where} sent an unexpected message during login")


async def _send_cancel(host: str, port: int, key: tuple[int, int]) -> None:
    loop = asyncio.get_running_loop()
    proto = _Upstream()
    transport, _ = await loop.create_connection(lambda: proto, host, port)
    try:
        transport.write(pg.cancel_request(*key))
        with contextlib.suppress(_UpstreamError):
            async with asyncio.timeout(5):
                while not proto.lost:
                    await proto._more()
    finally:
        transport.close()


# --------------------------------------------------------------------------------------------------------
# Client side
# --------------------------------------------------------------------------------------------------------


class _Stmt:
    __slots__ = ("copy", "copy_dir", "error", "info", "ncc", "params", "proto", "rows", "sql", "sqlstate",
                 "t0", "tag", "truncated")

    def __init__(self, sql: str, truncated: bool, proto: str, params: int | None, t0: float) -> None:
        self.sql = sql
        self.truncated = truncated
        self.proto = proto
        self.params = params
        self.t0 = t0
        self.rows: int | None = None
        self.tag: str | None = None
        self.sqlstate: str | None = None
        self.error: str | None = None
        self.copy = -1  # copy_bytes mark at CopyIn/OutResponse
        self.copy_dir = ""
        # guardrails only: the classified statements whose CommandComplete changes the prepared-statement map
        # (PREPARE / DEALLOCATE / DISCARD ALL), and how many CommandCompletes this Query has had
        self.info: tuple[StatementInfo | None, ...] | None = None
        self.ncc = 0


class _Sync:
    __slots__ = ("parse_sql", "swallow")

    def __init__(self, parse_sql: tuple[str, bool] | None, swallow: bool = False) -> None:
        self.parse_sql = parse_sql
        self.swallow = swallow  # a Sync the tunnel sent itself: its ReadyForQuery is not the client's


class _StmtDesc:
    """Masking: a prepared statement's result columns, once the server has described it (Describe S), and
    which of its computed columns carry a rule column (:mod:`pcigate.sqltaint`; None: none)."""

    __slots__ = ("cols", "derived")

    def __init__(self, derived: Derived | None = None) -> None:
        self.cols: list[ColumnInfo] | None = None
        self.derived = derived


class _PortalDesc:
    """Masking: a bound portal: its statement, the result formats its Bind asked for (one byte each, 1:
    binary; None: not read, a Bind too large for the scanner to keep whole), its columns once described
    (Describe P), and the sequence number of the next Sync or Query after its Bind (``_Conn._m_seq``)."""

    __slots__ = ("cols", "formats", "seq", "stmt")

    def __init__(self, stmt: _StmtDesc | None, formats: bytes | None, seq: int) -> None:
        self.stmt = stmt
        self.formats = formats
        self.seq = seq
        self.cols: list[ColumnInfo] | None = None


def _cname(body: bytes, pos: int = 0) -> tuple[bytes, int]:
    """A NUL-terminated name in a message body, as raw bytes (two names that decode alike stay apart), and
    the offset after it."""
    z = body.find(b"\x00", pos)
    if z < 0:
        raise ProtocolError("unterminated name")
    return body[pos:z], z + 1


class _Synth:
    """A response the tunnel makes up for a blocked message, sent when all earlier responses have been."""

    __slots__ = ("blocked", "data", "ready", "st")

    def __init__(self, data: bytes, ready: bool, st: _Stmt | None = None, blocked: str | None = None) -> None:
        self.data = data
        self.ready = ready  # followed by ReadyForQuery with the last transaction status the server reported
        self.st = st
        self.blocked = blocked


def _sql_text(body: bytes, truncated: bool, text: str, masker: Masker | None = None) -> tuple[str, bool]:
    if masker is not None:  # before the cap: a cut must not leave a PAN's head unmasked
        text = masker.mask_text(text)
    if len(text) > SQL_CAP:
        return text[:SQL_CAP], True
    return text, truncated


class _Conn(asyncio.Protocol):
    """One local client connection and, once logged in, its upstream connection."""

    def __init__(self, tunnel: PgTunnel) -> None:
        self.tunnel = tunnel
        self.n = 0
        self.transport: asyncio.Transport | None = None
        self.up: _Upstream | None = None
        self.phase = "startup"  # startup → sasl1 → sasl2 → wait → relay → closed
        self._buf = bytearray()
        self._scram: ScramServer | None = None
        self._login_task: asyncio.Task[None] | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self.params: dict[str, str] = {}
        self.local_key = (0, 0)
        self.cscan = pg.MessageScanner(_CLIENT_WANTED, pg.FRONTEND_TYPES, keep=_CLIENT_KEEP)
        self.sscan = pg.MessageScanner(_SERVER_WANTED, pg.BACKEND_TYPES, keep=_SERVER_KEEP)
        self.pending: deque[_Stmt | _Sync | _Synth] = deque()
        self.statements: dict[str, tuple[str, bool]] = {}
        self.portals: dict[str, tuple[str, bool, int | None]] = {}
        self.batch_parse: tuple[str, bool] | None = None
        self.terminated = False
        self.disconn_reason: str | None = None
        self.peer = ""
        self._client_paused = False
        self._server_paused = False
        self.rec = tunnel.recorder
        self._stmt_sink = tunnel.recorder.stmt_sink if tunnel.recorder is not None else None
        # guardrails (None: no rules, and the relay path is exactly the unguarded one)
        g = tunnel.guard
        self.guard: Guardrails | None = g if g.enabled else None
        if self.guard is not None:
            self.sscan = pg.MessageScanner(_SERVER_WANTED + b"S", pg.BACKEND_TYPES, keep=_SERVER_KEEP)
        self._cbuf = bytearray()  # client bytes not yet judged / forwarded
        self._cskip = 0  # bytes of a streamed CopyData still to pass
        self._hold = False  # a made-up response waits for the server: judge nothing more until it is sent
        self._discard = False  # after a denied Parse: drop client messages up to and including Sync
        self._in_batch = False  # extended-protocol messages forwarded since the last Sync
        self._codec: str | None = "utf-8"
        self.txn_status = b"I"
        self.prepared: dict[str, StatementInfo] = {}  # name -> what EXECUTE name runs (server-side names)
        self._g_stmts: dict[str, StatementInfo | None] = {}  # protocol-level statement -> its classification
        self._g_portals: dict[str, StatementInfo | None] = {}
        self._swallow = 0  # tunnel-sent Syncs not yet answered
        self._sw_rem = 0  # swallow mode: bytes of the current server message still to pass
        self._sw_hdr = b""  # swallow mode: a partial header already passed to the client
        self._sw_buf = b""  # swallow mode: held bytes (a partial message that may be the ReadyForQuery)
        # masking (None: no masking, and the server->client relay path is exactly the unmasked one)
        self.masker: Masker | None = tunnel.masker
        self._mbuf = b""  # server bytes of a partial message, held until complete
        self._masked = False  # card data was masked since the last recorded statement (a "masked" event)
        self._plan: RowPlan | None = None  # the plan of the current result set (from its RowDescription)
        self._copy_out = 0  # 0: no COPY OUT; 1: text/CSV; 2: binary
        self._copy_plan: RowPlan | None = None
        # Rows of an extended-protocol Execute come without a RowDescription: their columns are the ones the
        # server gave for the portal or its statement (Describe P / S, maybe in an earlier exchange), in the
        # formats the Bind asked for. _mq holds, in the client's order, the forwarded messages whose answers
        # say which (see _mask_server); _m_stmts / _m_portals what was described.
        self._mq: deque[tuple[int, Any]] | None = None
        self._m_stmts: dict[bytes, _StmtDesc] = {}
        self._m_portals: dict[bytes, _PortalDesc] = {}
        self._m_seq = 0  # Syncs, Queries and FunctionCalls forwarded (each answered by one ReadyForQuery)
        # per Query (its _m_seq) whose statements compute columns from rule columns: their Derived, and how
        # many of its statements have completed (the one a RowDescription belongs to)
        self._m_derived: dict[int, list[Any]] = {}
        # statements PREPAREd and cursors DECLAREd in SQL whose columns carry rule columns ("s:name",
        # "c:name"; sqltaint.Derived.defines)
        self._m_named: dict[str, Derived] = {}
        self._m_copyin = False  # the server is in COPY IN: it ignores Syncs until CopyDone/CopyFail
        self._mq_paused = False  # client reading paused: too many messages unanswered (_MQ_HIGH)
        # the C relay thread (a plain connection, see _hand_over): its id there, and what to send the client
        # when the tunnel ends the connection (an ErrorResponse)
        self._rid: int | None = None
        self._final = b""
        if self.masker is not None:  # without masking, from_server is the plain relay (no extra call)
            self.from_server = self._from_server_masked  # type: ignore[method-assign]
            self._mq = deque()
            self.cscan = pg.MessageScanner(_CLIENT_WANTED + b"DFHcf", pg.FRONTEND_TYPES, keep=_CLIENT_KEEP)

    # ---- asyncio callbacks (client transport) -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass it
        self.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.tunnel._conns.add(self)
        self._deadline = asyncio.get_running_loop().call_later(self.tunnel._handshake_timeout,
                                                               self._handshake_expired)

    def _handshake_expired(self) -> None:
        self._deadline = None
        if self.phase in ("startup", "sasl1", "sasl2"):
            self.tunnel._error(f"connection from {self.peer}: authentication timeout")
            self.fail("auth_timeout", "08006", "authentication timeout")

    def data_received(self, data: bytes) -> None:
        if self.phase == "relay":
            self.from_client(data)
            return
        if self.phase == "closed":
            return
        self._buf += data
        try:
            self._handshake()
        except ProtocolError as e:
            self._client_malformed(e)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._rid is not None:
            return  # the transport let go of a socket the C relay now serves
        if self.phase == "closed":
            self.tunnel._conns.discard(self)
            return
        self.close("client")
        self.tunnel._conns.discard(self)

    def pause_writing(self) -> None:  # the client reads slower than the server sends
        if self.up is not None and self.up.transport is not None and not self._server_paused:
            self._server_paused = True
            self.up.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.up is not None and self.up.transport is not None and self._server_paused:
            self._server_paused = False
            self.up.transport.resume_reading()

    def pause_client(self) -> None:  # the server reads slower than the client sends
        if self.transport is not None and not self._client_paused:
            self._client_paused = True
            self.transport.pause_reading()

    def resume_client(self) -> None:
        if self.transport is not None and self._client_paused:
            self._client_paused = False
            if not self._hold and not self._mq_paused:
                self.transport.resume_reading()

    # ---- startup and local authentication --------------------------------------------------------------

    def _handshake(self) -> None:
        assert self.transport is not None
        while self._buf and self.phase in ("startup", "sasl1", "sasl2"):
            if self.phase == "startup":
                got = pg.parse_startup(self._buf)
                if got is None:
                    return
                pkt, used = got
                del self._buf[:used]
                if isinstance(pkt, pg.SSLRequest | pg.GSSENCRequest):
                    self.transport.write(b"N")
                    continue
                if isinstance(pkt, pg.CancelRequest):
                    self.phase = "closed"
                    self.tunnel._forward_cancel(pkt)
                    self.transport.close()
                    return
                assert isinstance(pkt, pg.StartupMessage)
                if pkt.params.get("replication"):
                    self.fail("protocol_error: replication", "08P01", "replication connections are not "
                              "supported through the pcigate tunnel")
                    return
                self.params = pkt.params
                # Nothing upstream and nothing recorded until the client has proven the secret.
                self._scram = ScramServer(self.tunnel._keys)
                self.transport.write(pg.auth_sasl([MECHANISM]))
                self.phase = "sasl1"
                continue
            # SASL messages: typed 'p'
            if len(self._buf) < 5:
                return
            t, n = _HDR.unpack_from(self._buf, 0)
            if t != ord("p") or n < 4 or n > pg.MAX_STARTUP:
                raise ProtocolError("expected a SASL response")
            if len(self._buf) < n + 1:
                return
            body = bytes(self._buf[5 : n + 1])
            del self._buf[: n + 1]
            assert self._scram is not None
            try:
                if self.phase == "sasl1":
                    mech, data = pg.parse_sasl_initial_response(body)
                    if mech != MECHANISM:
                        raise ScramError(f"unsupported SASL mechanism {mech[:40]!r}")
                    self.transport.write(pg.auth_sasl_continue(self._scram.first(data)))
                    self.phase = "sasl2"
                else:
                    final = self._scram.final(body)  # raises ScramError unless the proof verifies
                    self._authenticated(final)
                    return
            except ScramError as e:
                self.tunnel._error(f"connection from {self.peer}: local authentication failed ({e})")
                self.fail("auth_failed", "28P01",
                          "password authentication failed: wrong or expired pcigate tunnel secret")
                return

    def _authenticated(self, sasl_final: bytes) -> None:
        """The client's SCRAM proof verified: record the connection, check the database, log in upstream."""
        assert self.transport is not None
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self.transport.write(pg.auth_sasl_final(sasl_final))
        self.tunnel.stats.connections += 1
        self.n = self.tunnel._next_conn()
        if self.rec is not None:
            app = self.params.get("application_name")
            if app is not None and self.masker is not None:
                app = self.masker.mask_text(app)
            self.rec.event("conn", c=self.n, peer=self.peer, app=app)
        granted = self.tunnel.upstream.database
        asked = self.params.get("database")
        if asked and asked != granted:
            self.tunnel._error(f"connection {self.n}: the client asked for database "
                               f"{_one_line(asked, 80)!r}; this session is for {granted!r}")
            self.fail("wrong_database", "42501", f"pcigate: this session is for database {granted}")
            return
        self.phase = "wait"
        self.transport.pause_reading()
        self._login_task = asyncio.get_running_loop().create_task(self._finish_login())
        self._login_task.add_done_callback(_consume)

    async def _finish_login(self) -> None:
        assert self.transport is not None
        target = self.tunnel.upstream
        try:
            # One coroutine from connect to relay: a cancellation anywhere closes the upstream (in
            # _open_upstream), and once it returns nothing awaits before the upstream is owned by self.
            async with asyncio.timeout(CONNECT_TIMEOUT):
                login = await _open_upstream(target, self.params, self.tunnel._salted_cache())
        except TimeoutError:
            msg = f"the database at {target.host}:{target.port} did not answer within {CONNECT_TIMEOUT:g}s"
            self.tunnel._error(f"connection {self.n}: {msg}")
            self.fail("server", "08006", f"pcigate: {msg}")
            return
        except _UpstreamError as e:
            self.tunnel._error(f"connection {self.n}: {e.message}")
            self.fail("server", e.sqlstate, f"pcigate: {e.message}")
            return
        except asyncio.CancelledError:
            return
        except Exception as e:  # any other failure must reach the client as a clean error
            self.tunnel._error(f"connection {self.n}: upstream login failed: {type(e).__name__}")
            self.fail("server", "08006", "pcigate: upstream login failed")
            return
        if self.phase == "closed":
            login.upstream.close()
            return
        up = login.upstream
        self.up = up
        assert up.transport is not None
        up.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        pid = secrets.randbelow(2**31 - 2) + 1
        secret = secrets.randbits(32) - 2**31
        self.local_key = (pid, secret)
        if login.key is not None:
            self.tunnel._cancel_keys[self.local_key] = login.key
        self.transport.write(pg.auth_ok() + login.greeting + pg.backend_key_data(pid, secret) + login.ready)
        if self.guard is not None:
            self.txn_status = login.ready[5:6] or b"I"
            enc = self.params.get("client_encoding")
            for gm in pg.split_messages(login.greeting):
                if gm.type == _PS:
                    name, value = pg.parse_parameter_status(gm.body)
                    if name == "client_encoding":
                        enc = value
            if enc is not None:
                self._codec = _codec(enc)
        self.phase = "relay"
        up.conn = self
        rest = up.take_buffer()
        leftover = bytes(self._buf)
        self._buf.clear()
        if up.lost:
            self.server_lost(up.lost_exc)
            return
        if self._hand_over(rest, leftover):
            return
        if rest:
            self.from_server(rest)
        if leftover:
            self.from_client(leftover)
        if self.phase == "relay":
            self.transport.resume_reading()

    def _hand_over(self, rest: bytes, leftover: bytes) -> bool:
        """Give a plain connection (no guardrails, no masking, no TLS upstream) to the tunnel's C relay
        thread: its two sockets leave the event loop, and what the relay reads is handed back in batches to
        the same recording logic (_relay_event). False (the asyncio relay serves it) when the connection does
        not qualify or the relay is unavailable."""
        up, t = self.up, self.transport
        if (self.guard is not None or self.masker is not None or up is None or up.tls or up.transport is None
                or t is None or not self.tunnel.c_relay):
            return False
        if t.get_write_buffer_size() or up.transport.get_write_buffer_size():
            return False  # the greeting did not fit the socket's buffer (rare): it stays with the transport
        csock, ssock = t.get_extra_info("socket"), up.transport.get_extra_info("socket")
        relay = self.tunnel._relay_thread()
        if relay is None or csock is None or ssock is None:
            return False
        cfd = os.dup(csock.fileno())  # not inherited (psql is a child of this process)
        try:
            sfd = os.dup(ssock.fileno())
        except OSError:
            os.close(cfd)
            return False
        try:
            rid = relay.add(cfd, sfd, leftover, rest)
        except Exception as e:  # the sockets stay with the transports, and the asyncio relay serves them
            os.close(cfd)
            os.close(sfd)
            self.tunnel._error(f"connection {self.n}: the C relay refused it ({e}); the asyncio relay has it")
            return False
        self._rid = rid
        self.tunnel._relay_conns[rid] = self
        up.conn = None
        t.abort()  # closes the loop's descriptors only: the relay holds its own
        up.transport.abort()
        return True

    def _relay_event(self, kind: int, t: float, payload: Any) -> None:
        """One batch from the C relay (see pcigate._crelay.Relay.drain): messages of one read, in order."""
        if kind == 1:
            try:
                self._server_msgs(payload, t)
            except ProtocolError as e:
                self._server_malformed(e)
        elif kind == 0:
            # the client's CopyData bytes so far, as _server_msgs reads them at a COPY's end: a COPY IN is
            # ended by the client's CopyDone/CopyFail (handed out by the relay with that count) before the
            # server's CommandComplete, and the client sends no CopyData before the server's CopyInResponse
            self.cscan.copy_bytes = payload[-1].mark
            try:
                self._client_msgs(payload, t)
            except ProtocolError as e:
                self._client_malformed(e)
        elif kind == 3:
            side, msg = payload
            if side == 0:
                self._client_malformed(ProtocolError(msg))
            else:
                self._server_malformed(ProtocolError(msg))
        else:
            side, reason = payload
            if side == 0:
                self.close("client")
            else:
                self.server_lost(ConnectionError(reason) if reason else None)

    # ---- relay --------------------------------------------------------------------------------------------

    def from_client(self, data: bytes) -> None:
        if self.guard is not None:
            self._cbuf += data
            self._judge_client()
            return
        try:
            msgs = self.cscan.feed(data)
            if msgs:
                self._client_msgs(msgs)  # a framed message with a malformed body is as bad as bad framing
        except ProtocolError as e:
            self._client_malformed(e)
            return
        up = self.up
        assert up is not None
        assert up.transport is not None
        up.transport.write(data)
        self.tunnel.stats.bytes_up += len(data)

    def _from_server_masked(self, data: bytes) -> None:
        """``from_server`` of a connection with masking (bound per instance, see ``__init__``)."""
        mk = self.masker
        assert mk is not None
        runs: list[tuple[int, int]] = []
        masked = self._mask_server(data, mk, runs)
        if self._mq_paused and len(self._mq or ()) < _MQ_LOW:
            self._mq_paused = False
            if self.transport is not None and not self._client_paused and not self._hold \
                    and self.phase == "relay":
                self.transport.resume_reading()
        if not masked:
            return
        if not runs or self._swallow or not self.sscan.at_boundary:
            self._relay_server(masked)
            return
        # The C walk already framed and checked the DataRow runs: the scanner reads only what lies between
        # (as _relay_server: everything is scanned before anything is written).
        view = memoryview(masked)
        msgs: list[pg.Message] = []
        pos = 0
        try:
            for start, length in runs:
                if start > pos:
                    msgs += self.sscan.feed(view[pos:start])
                self.sscan.walked(length)
                pos = start + length
            if pos < len(masked):
                msgs += self.sscan.feed(view[pos:])
        except (ProtocolError, ValueError) as e:
            self._server_malformed(ProtocolError(str(e)))
            return
        self._pass_on(masked, msgs)

    def _relay_server(self, data: bytes) -> None:
        if self._swallow:
            self._from_server_swallow(data)
            return
        try:
            msgs = self.sscan.feed(data)
        except ProtocolError as e:
            self._server_malformed(e)
            return
        self._pass_on(data, msgs)

    def _pass_on(self, data: bytes, msgs: list[pg.Message]) -> None:
        """Write scanned server bytes to the client, then record what their wanted messages say."""
        assert self.transport is not None
        self.transport.write(data)
        self.tunnel.stats.bytes_down += len(data)
        if msgs:
            try:
                self._server_msgs(msgs)
            except ProtocolError as e:
                self._server_malformed(e)

    from_server = _relay_server  # the relay path without masking: exactly the unmasked one

    # ---- masking (server -> client) ----------------------------------------------------------------------

    def _mask_server(self, data: bytes, mk: Masker,
                     runs: list[tuple[int, int]] | None = None) -> bytes | None:
        """Frame ``data`` (after any held partial message), mask the complete messages, hold the partial
        rest. Returns the bytes to pass on (empty: nothing complete yet; None: the connection failed).
        ``runs`` receives (offset, length) in the returned bytes of the DataRow runs the C code walked."""
        if self._mbuf:
            buf = self._mbuf + data
            self._mbuf = b""
        else:
            buf = bytes(data)
        end = len(buf)
        cand = mk.has_candidate(buf)  # a superset test on the whole chunk: framing bytes only add hits
        copy_cand: bool | None = None  # for COPY rows, also a float in exponent notation (no column types)
        plan = self._plan
        work = cand or (plan is not None and plan.forced)
        unpack = _HDR.unpack_from
        parts: list[bytes | bytearray] = []
        seg = pos = 0
        python_row = -1  # the offset of a DataRow the C code left to Python
        shift = 0  # how much later in the returned bytes than in buf (re-framed rows changed lengths)
        try:
            while pos + 5 <= end:
                t, n = unpack(buf, pos)
                nxt = pos + 1 + n
                if n < 4 or n > pg.MAX_MESSAGE:
                    pos = end  # malformed: passed on as is, the scanner fails the connection before writing
                    break
                if nxt > end:
                    break
                if t == _D:
                    if plan is None:  # rows of an Execute (described earlier, or not at all)
                        plan = self._plan = self._execute_plan(buf[pos + 5 : nxt])
                        if plan is None:
                            return None
                        work = cand or plan.forced
                    if work:
                        body = buf[pos + 5 : nxt]
                        if pos != python_row:
                            # the run of DataRows from here in C, when built and the plan allows
                            got = mk.mask_datarows(buf, pos, plan)
                            if got is not None:
                                masked, stop = got
                                if masked is not None:
                                    parts.append(buf[seg:pos])
                                    parts.append(masked)
                                    seg = stop
                                if stop > pos:
                                    if runs is not None:
                                        runs.append((pos + shift, stop - pos))
                                    pos = stop
                                    continue
                                python_row = pos  # grouped digits, track data or malformed: Python's
                        new = mk.mask_datarow(body, plan)
                        if new is not None:
                            parts.append(buf[seg:pos])
                            parts.append(_HDR.pack(_D, len(new) + 4) + new)
                            seg = nxt
                            shift += len(new) + 5 - (nxt - pos)
                elif t == _COPY_DATA:
                    if copy_cand is None:
                        copy_cand = cand or mk.has_exp16(buf)
                    if copy_cand and self._copy_out == 1 and pos != python_row:
                        got = mk.mask_copydatas(buf, pos)  # the run of text COPY rows from here, in C
                        if got is not None:
                            masked, stop = got
                            if masked is not None:
                                parts.append(buf[seg:pos])
                                parts.append(masked)
                                seg = stop
                            if stop > pos:
                                pos = stop
                                continue
                            python_row = pos
                    if copy_cand and self._copy_out:
                        body = buf[pos + 5 : nxt]
                        if self._copy_out == 2 and self._copy_plan is not None:
                            new = mk.mask_copy_binary(body, self._copy_plan)
                        else:
                            new = mk.mask_copy_data(body)
                        if new is not None:
                            parts.append(buf[seg:pos])
                            parts.append(_HDR.pack(t, len(new) + 4) + new)
                            seg = nxt
                            shift += len(new) + 5 - (nxt - pos)
                elif t == _T:
                    mq = self._mq_live()
                    derived = self._row_derived(mq)
                    cols = _row_description(buf[pos + 5 : nxt], self.tunnel.origins, self.tunnel.row_types,
                                            derived)
                    if mq and mq[0][0] in (_MQ_DS, _MQ_DP):  # describes a statement or portal for later
                        kind, desc = mq.popleft()
                        if desc is not None:
                            desc.cols = cols
                            if kind == _MQ_DP and desc.stmt is not None:
                                # the portal's statement has these columns too: a later Bind of it that
                                # is not described (pgjdbc) is read by them, in its own formats
                                desc.stmt.cols = cols
                    else:  # a simple Query's result set: its rows follow
                        plan = self._plan = mk.row_plan(cols)
                        work = cand or plan.forced
                elif t == _NO_DATA:
                    mq = self._mq_live()
                    if mq and mq[0][0] in (_MQ_DS, _MQ_DP):
                        desc = mq.popleft()[1]
                        if desc is not None:
                            desc.cols = []
                elif t in _DONE_123:
                    mq = self._mq_live()
                    if mq and mq[0][0] == _MQ_X:
                        mq.popleft()
                elif t == _COPY_IN:
                    self._copy_in_started()
                elif t in (_NOTIFY, _FN_RESULT):  # a NOTIFY payload, a FunctionCall's result: by pattern
                    new = mk.scan(buf[pos + 9 : nxt]) if nxt - pos > 9 else None
                    if t == _NOTIFY and self.tunnel.star_notify:  # payloads may carry rule columns now
                        new = _star_payload(new if new is not None else buf[pos + 9 : nxt])
                    if new is not None:  # same length
                        parts.append(buf[seg : pos + 9])
                        parts.append(new)
                        seg = nxt
                elif t in (_ERR, _N):
                    new = mk.mask_error_fields(buf[pos + 5 : nxt])
                    if self.tunnel.computed is not None:
                        said = self._row_derived(self._mq_live())
                        # a DO block or function naming a rule column may print its values; a data
                        # exception of a statement naming one (every statement the judge reports does)
                        # quotes the value (cvv::date: "001")
                        body = buf[pos + 5 : nxt]
                        if said is not None and (said.notices or (t == _ERR and _data_exception(body))):
                            new = star_message_fields(new if new is not None else body)
                    if new is not None:
                        parts.append(buf[seg:pos])
                        parts.append(_HDR.pack(t, len(new) + 4) + new)
                        seg = nxt
                        shift += len(new) + 5 - (nxt - pos)
                    if t == _ERR:
                        plan = self._plan = None
                        work = cand
                        self._copy_out = 0
                        self._m_copyin = False  # an error ends COPY IN
                        mq = self._mq_live()
                        # an extended-protocol message failed: the server skips everything up to the next
                        # Sync, a Query in between included (a Query's own error skips nothing)
                        if mq and mq[0][0] != _MQ_Q:
                            while mq and mq[0][0] != _MQ_SYNC:
                                mq.popleft()
                elif t in (_CMD, _Z, _EMPTY_Q, _s):
                    plan = self._plan = None
                    work = cand
                    self._copy_out = 0
                    mq = self._mq_live()
                    if mq:
                        if t in (_CMD, _EMPTY_Q) and mq[0][0] == _MQ_Q and self._m_derived:
                            q = self._m_derived.get(mq[0][1])
                            if q is not None:
                                q[1] += 1  # the Query's next statement
                        if t == _Z:  # ends a Query, FunctionCall or Sync (and what went unanswered before it)
                            self._ready(buf[pos + 5 : nxt])
                        elif mq[0][0] == _MQ_E:  # an Execute's last answer
                            mq.popleft()
                elif t == _H:
                    if mk.policy.sensitive_columns or mk.policy.columns:
                        # COPY output carries no column names: a cvv column could not be told apart, so
                        # with column rules COPY OUT is refused (fail closed) instead of leaking it.
                        msg = ("pcigate: COPY TO STDOUT is refused under this session's column masking "
                               "rules (COPY output has no column names); use SELECT instead")
                        self.tunnel._error(f"connection {self.n}: {msg}")
                        self.fail("masking: copy refused", "42501", msg)
                        return None
                    body = buf[pos + 5 : nxt]
                    if len(body) < 3:
                        raise ValueError("short CopyOutResponse")
                    ncols = _I16.unpack_from(body, 1)[0]
                    if body[0] == 1:
                        self._copy_out = 2
                        self._copy_plan = RowPlan.of(["pan"] * ncols)  # no column names in COPY
                    else:
                        self._copy_out = 1
                        self._copy_plan = None
                elif t == _c:
                    self._copy_out = 0
                pos = nxt
        except (ValueError, struct.error, UnicodeDecodeError) as e:
            self._server_malformed(ProtocolError(f"cannot mask a message: {e}"))
            return None
        if pos < end:
            self._mbuf = buf[pos:]
        if not parts:
            return buf if pos == end else buf[:pos]
        self._masked = True
        parts.append(buf[seg:pos])
        return b"".join(parts)

    def _mq_live(self) -> deque[tuple[int, Any]] | None:
        """``_mq`` without stale CopyDone/CopyFail markers at its head: a marker is only meaningful behind the
        message that starts a COPY (until its CopyInResponse); at the head, that COPY was answered without
        one (it failed before starting, or the client's CopyDone followed the server's error)."""
        mq = self._mq
        while mq and mq[0][0] == _MQ_COPYEND:
            mq.popleft()
        return mq

    def _ready(self, status: bytes) -> None:
        """A ReadyForQuery: it answers the oldest unanswered Sync/Query/FunctionCall; entries before that
        one went unanswered (skipped after an error). Idle (no transaction): the portals bound before it are
        gone at the server, so their descriptions go too."""
        mq = self._mq_live()
        assert mq is not None
        while mq:
            kind, seq = mq.popleft()
            if kind == _MQ_Q and self._m_derived:
                self._m_derived.pop(seq, None)
            if kind in (_MQ_Q, _MQ_SYNC):
                if status == b"I" and self._m_portals:
                    self._m_portals = {k: v for k, v in self._m_portals.items() if v.seq > seq}
                return

    def _copy_in_started(self) -> None:
        """CopyInResponse: until CopyDone/CopyFail the server ignores Sync, so Syncs the client sent after the
        message that started the COPY (libpq's PQexecParams sends one at once) get no answer of their own."""
        mq = self._mq_live()
        assert mq is not None
        if not mq:
            self._m_copyin = True
            return
        head = mq.popleft()
        rest: list[tuple[int, Any]] = []
        ended = False
        while mq:
            e = mq.popleft()
            if e[0] == _MQ_COPYEND:
                ended = True
                break
            if e[0] != _MQ_SYNC:
                rest.append(e)
        rest.extend(mq)
        mq.clear()
        mq.append(head)
        mq.extend(rest)
        self._m_copyin = not ended

    def _row_derived(self, mq: deque[tuple[int, Any]] | None) -> Derived | None:
        """The statement a RowDescription describes: which of its computed columns carry rule columns."""
        if not mq:
            return None
        kind, desc = mq[0]
        if kind == _MQ_DS:
            return desc.derived if desc is not None else None
        if kind in (_MQ_DP, _MQ_E):  # a portal: its statement's
            return desc.stmt.derived if desc is not None and desc.stmt is not None else None
        if kind == _MQ_Q and self._m_derived:
            q = self._m_derived.get(desc)
            if q is not None and q[1] < len(q[0]):
                return cast("Derived", q[0][q[1]])
        return None

    def _execute_plan(self, body: bytes) -> RowPlan | None:
        """The plan for rows that arrived without a RowDescription in their exchange: an Execute's, whose
        portal or statement the server described (Describe P / S, perhaps long before), in the result formats
        its Bind asked for; else :meth:`_rowless_plan`. None: the connection failed."""
        mq = self._mq_live()
        portal = mq[0][1] if mq and mq[0][0] == _MQ_E else None
        if portal is not None:
            cols = portal.cols
            if cols is None and portal.stmt is not None:
                cols = portal.stmt.cols
                if portal.formats is None and any(c.type_oid in _FORMAT_SENSITIVE for c in cols):
                    # a statement's description has no formats, and this Bind's were not read
                    return self._undescribed(
                        "pcigate: cannot tell the result formats of a Bind larger than the tunnel reads "
                        "whole, so the masking policy cannot be applied to its rows; describe the portal "
                        "(libpq does) to use this session")
            if cols is not None:
                fmts = portal.formats
                if fmts is not None:  # None: a Bind too large to keep whole; the described formats stand
                    if len(fmts) <= 1:
                        fmts = bytes([fmts[0] if fmts else 0]) * len(cols)
                    elif len(fmts) != len(cols):
                        raise ValueError("result formats do not match the row description")
                    cols = [c._replace(format=f) for c, f in zip(cols, fmts, strict=True)]
                mk = self.masker
                assert mk is not None
                return mk.row_plan(cols)
            if portal.formats is None or any(portal.formats):
                return self._undescribed(
                    "pcigate: result rows in binary format arrived without a row description, so masking "
                    "cannot read them; describe the portal (libpq does) to use this session")
        return self._rowless_plan(body)

    def _undescribed(self, msg: str) -> RowPlan | None:
        """Fail the connection: rows the masking policy cannot be applied to. None (no plan)."""
        self.tunnel._error(f"connection {self.n}: {msg}")
        self.fail("protocol_error: masking: undescribed rows", "0A000", msg)
        return None

    def _rowless_plan(self, body: bytes) -> RowPlan | None:
        """A DataRow arrived without a RowDescription in this exchange (an extended-protocol Execute whose
        statement was described earlier). Without column rules: scan every field by pattern. With them the
        columns cannot be told, so fail the connection (fail closed). None: failed."""
        mk = self.masker
        assert mk is not None
        pol = mk.policy
        if pol.sensitive_columns or pol.columns:
            return self._undescribed(
                "pcigate: result rows arrived without a row description, so the masking policy's column "
                "rules cannot be applied; describe the portal (libpq does) to use this session")
        if len(body) < 2:
            raise ValueError("short DataRow")
        return RowPlan.of(["pan"] * max(_I16.unpack_from(body, 0)[0], 0))

    def _client_malformed(self, e: ProtocolError) -> None:
        self.fail(f"protocol_error: {e}", "08P01", f"invalid message from the client: {e}")

    def _server_malformed(self, e: ProtocolError) -> None:
        self.tunnel._error(f"connection {self.n}: malformed data from the database: {e}")
        self.fail(f"protocol_error: server: {e}", "08P01", f"pcigate: malformed data from the database: {e}")

    def _client_msgs(self, msgs: list[pg.Message], now: float = 0.0) -> None:
        now = now or time.perf_counter()
        pending = self.pending
        track = self._mq is not None  # masking's bookkeeping
        for m in msgs:
            t = m.type
            bound = self._mask_track(m) if track else None  # a Bind it parsed
            if t == _Q:
                sql, trunc = _sql_text(m.body, m.truncated, pg.parse_query(m.body), self.masker)
                pending.append(_Stmt(sql, trunc or m.truncated, "simple", 0, now))
            elif t == _P:
                p = pg.parse_parse(m.body)
                entry = _sql_text(m.body, m.truncated, p.query, self.masker)
                entry = (entry[0], entry[1] or m.truncated)
                self.statements[p.name] = entry
                self.batch_parse = entry
            elif t == _B:
                b = bound or pg.parse_bind(m.body)
                sql, trunc = self.statements.get(b.statement, ("", False))
                self.portals[b.portal] = (sql, trunc, b.nparams)
            elif t == _E:
                sql, trunc, nparams = self.portals.get(pg.parse_execute(m.body), ("", False, None))
                pending.append(_Stmt(sql, trunc, "extended", nparams, now))
            elif t == _S:
                pending.append(_Sync(self.batch_parse))
                self.batch_parse = None
            elif t == _C:
                kind, name = pg.parse_close(m.body)
                if kind == "S":
                    self.statements.pop(name, None)
                else:
                    self.portals.pop(name, None)
            elif t == _X:
                self.terminated = True

    def _mask_track(self, m: pg.Message) -> pg.Bind | None:
        """Masking's bookkeeping of one forwarded client message: what the server will answer, in order
        (``_mq``), and the prepared statements and portals (by their raw names). See :meth:`_mask_server`.
        Returns the parsed Bind when ``m`` is one (the recording reads it too)."""
        mq = self._mq
        assert mq is not None
        t, body = m.type, m.body
        if self._m_copyin and t not in (_S, _H_FLUSH, _c, _COPY_FAIL):
            # the server takes it as a protocol violation that ends the COPY, and never answers it
            raise ProtocolError(f"message {chr(t)!r} during COPY FROM STDIN")
        bind = None
        if t == _E:
            mq.append((_MQ_E, self._m_portals.get(_cname(body)[0])))
        elif t == _B:
            portal, pos = _cname(body)
            stmt, _ = _cname(body, pos)
            bind = pg.parse_bind(body)
            fmts = bind.result_formats
            self._m_portals[portal] = _PortalDesc(self._m_stmts.get(stmt),
                                                  None if fmts is None else bytes(f != 0 for f in fmts),
                                                  self._m_seq)
            mq.append(_MQ_X_ENTRY)
        elif t == _S:
            if not self._m_copyin:  # during COPY IN the server ignores it
                self._mq_sync()
        elif t == _P:
            name, pos = _cname(body)
            if _SQL_PREPARE.search(body[pos:]):
                self._forget_statements()
            self._m_stmts[name] = _StmtDesc(self._derived(body[pos : body.find(b"\x00", pos)]))
            mq.append(_MQ_X_ENTRY)
        elif t == _D:
            kind, _ = pg.parse_describe(body)
            name = _cname(body, 1)[0]
            if kind == "S":
                mq.append((_MQ_DS, self._m_stmts.get(name)))
            else:
                mq.append((_MQ_DP, self._m_portals.get(name)))
        elif t in (_Q, _F):
            if t == _Q and _SQL_PREPARE.search(body):
                self._forget_statements()
            cc = self.tunnel.computed
            got = cc.statements(body[:-1], bool(self._m_named)) if t == _Q and cc is not None else None
            if got is not None and cc is not None:
                self._m_derived[self._m_seq] = [self._follow_names(cc, got), 0]
            mq.append((_MQ_Q, self._m_seq))  # answered by its own ReadyForQuery
            self._m_seq += 1
        elif t == _C:
            kind, _ = pg.parse_close(body)
            name = _cname(body, 1)[0]
            (self._m_stmts if kind == "S" else self._m_portals).pop(name, None)
            mq.append(_MQ_X_ENTRY)
        elif t in (_c, _COPY_FAIL):
            if self._m_copyin:
                self._m_copyin = False
            else:  # before the CopyInResponse reached us: the Syncs up to here are the ignored ones
                mq.append((_MQ_COPYEND, None))
        if len(mq) > _MQ_HIGH and not self._mq_paused:
            self._mq_paused = True
            if self.transport is not None:
                self.transport.pause_reading()
        if len(mq) > _MQ_CAP:
            raise ProtocolError(f"more than {_MQ_CAP} messages sent without reading the answers")
        return bind

    def _derived(self, sql: bytes) -> Derived | None:
        """A Parse's statement: its computed columns that carry rule columns (one statement per Parse)."""
        cc = self.tunnel.computed
        got = cc.statements(sql, bool(self._m_named)) if cc is not None else None
        return self._follow_names(cc, got)[0] if cc is not None and got else None

    def _follow_names(self, cc: ComputedColumns, got: tuple[Derived, ...]) -> tuple[Derived, ...]:
        """Remember what PREPARE / DECLARE define; an EXECUTE / FETCH takes the columns of what it names; a
        statement writing rule columns' values into a relation teaches the session's judge (every
        connection's) that relation."""
        out: list[Derived] = []
        for d in got:
            if d.learns:
                cc.learn(d.learns)
            if d.function is not None:
                cc.learn_function(d.function)
            if d.notifies:  # pg_notify('ch', cvv): whoever listens gets it later, on any connection
                self.tunnel.star_notify = True
            if d.stores:  # set_config('x', cvv), setval(..., cvv)
                cc.learn_state(d.stores)
            if d.defines is not None:
                inner = d.inner
                self._m_named.pop(d.defines, None)
                if inner is not None and (inner.fallback is not None or any(inner.positions or ())):
                    if len(self._m_named) >= _NAMED_CAP:
                        self._m_named.pop(next(iter(self._m_named)))
                    self._m_named[d.defines] = inner
            elif d.uses is not None:
                d = self._m_named.get(d.uses, d)
            out.append(d)
        return tuple(out)

    def _forget_statements(self) -> None:
        for st in self._m_stmts.values():
            st.cols = None

    def _mq_sync(self) -> None:
        assert self._mq is not None
        self._mq.append((_MQ_SYNC, self._m_seq))
        self._m_seq += 1

    def _server_msgs(self, msgs: list[pg.Message], now: float = 0.0) -> None:
        """``now``: when the messages were read, if known (the C relay's clock reading)."""
        pending = self.pending
        for m in msgs:
            t = m.type
            head = pending[0] if pending else None
            if t == _Z:
                while pending:
                    item = pending.popleft()
                    if isinstance(item, _Sync):
                        break
                    if isinstance(item, _Synth):  # not expected here: synthesized items are sent eagerly
                        continue
                    if item.proto == "simple":
                        now = now or time.perf_counter()
                        self._record(item, now)
                        break
                if self.guard is not None:
                    self.txn_status = m.body[:1] or b"I"
                    if pending and isinstance(pending[0], _Synth):
                        self._send_synth()
                continue
            if not isinstance(head, _Stmt):
                if t == _PS:
                    self._parameter_status(m.body)
                elif t == _ERR and isinstance(head, _Sync) and head.parse_sql is not None:
                    # an error in a batch without Execute (a Parse that fails)
                    st = _Stmt(head.parse_sql[0], head.parse_sql[1], "extended", None, time.perf_counter())
                    self._set_error(st, m.body)
                    self._record(st, time.perf_counter())
                    head.parse_sql = None
                elif t == _ERR and head is None:
                    f = pg.parse_error_fields(m.body)
                    if f.get("S") in ("FATAL", "PANIC"):
                        self.disconn_reason = "server"
                        self.tunnel._error(f"connection {self.n}: the database ended the session: "
                                           f"{_one_line(f.get('M', ''))}")
                continue
            if t == _CMD or t in (_I, _s):
                tag = pg.parse_command_complete(m.body) if t == _CMD else None
                rows = pg.rows_from_tag(tag)
                if head.info is not None and tag is not None:
                    self._prepared_effect(head, tag)
                if head.copy >= 0:
                    scan = self.cscan if head.copy_dir == "in" else self.sscan
                    nbytes = scan.copy_bytes - head.copy if head.copy_dir == "in" else m.mark - head.copy
                    if self.rec is not None:
                        self.rec.event("copy", c=self.n, direction=head.copy_dir, bytes=nbytes, rows=rows)
                    head.copy = -1
                if head.proto == "simple":
                    if rows is not None:
                        head.rows = (head.rows or 0) + rows
                    head.tag = tag
                else:
                    head.rows = rows
                    head.tag = tag
                    pending.popleft()
                    now = now or time.perf_counter()
                    self._record(head, now)
            elif t == _ERR:
                self._set_error(head, m.body)
                if head.proto != "simple":
                    pending.popleft()
                    now = now or time.perf_counter()
                    self._record(head, now)
                    while pending and isinstance(pending[0], _Stmt):  # skipped until Sync
                        pending.popleft()
            elif t in (_G, _W):
                head.copy = self.cscan.copy_bytes
                head.copy_dir = "in"
            elif t == _H:
                head.copy = m.mark
                head.copy_dir = "out"
            elif t == _PS:  # wanted only with guardrails
                self._parameter_status(m.body)

    def _set_error(self, st: _Stmt, body: bytes) -> None:
        f = pg.parse_error_fields(body)
        st.sqlstate = f.get("C")
        st.error = f.get("M", "")[:ERROR_TEXT_CAP]

    def _record(self, st: _Stmt, now: float) -> None:
        """``now``: time.perf_counter() when the statement completed (``st.t0``: when it was sent)."""
        self.tunnel.stats.statements += 1
        rec = self.rec
        if rec is not None:
            sink = self._stmt_sink
            if sink is not None:  # the writer computes t and ms from the raw clock readings
                sink((now, st.t0, self.n, st.sql, st.truncated, st.proto, st.params, st.rows, st.tag,
                      st.sqlstate, st.error))
            else:
                rec.stmt(self.n, st.sql, st.truncated, st.proto, st.params,
                         round((now - st.t0) * 1000.0, 3), st.rows, st.tag, st.sqlstate, st.error)
            if self._masked:  # the statement's results (or its error text) had card data masked
                self._masked = False
                rec.event("masked", c=self.n)

    # ---- guardrails ---------------------------------------------------------------------------------------
    #
    # With rules, client bytes go through _judge_client instead of straight upstream: every message but
    # CopyData is held until complete, each Query / Parse text is judged before any byte of it is forwarded,
    # and the forwarded bytes then take the ordinary recording path (_forward).
    #
    # A denied message is never forwarded; the tunnel answers for the server, and the client must see a
    # well-formed stream, in order:
    # * Query: ErrorResponse 42501 + ReadyForQuery (the last transaction status the server reported).
    # * Parse: ErrorResponse 42501; every later client message up to and including the next Sync is
    #   dropped (as the server skips to Sync after an error) and that Sync is answered with ReadyForQuery.
    #   If extended-protocol messages of the same batch were already forwarded (pipelining, or a batch
    #   split over reads), the tunnel ends that batch with a Sync of its own and does not pass on the
    #   server's ReadyForQuery for it (_from_server_swallow); the client sees the prefix's responses, then the
    #   ErrorResponse, then one ReadyForQuery for its Sync. Deviation from a server-side error: outside an
    #   explicit transaction block the prefix commits (the server would have rolled it back).
    # * Made-up responses queue in `pending` behind the responses still owed by the server (_Synth); until
    #   one is sent, nothing more of the client's input is judged or forwarded (reading paused), so no
    #   server response to a later message can overtake it.

    def _judge_client(self) -> None:
        guard = self.guard
        if guard is None or self.phase != "relay" or self._hold:
            return
        buf = self._cbuf
        total = len(buf)
        pos = seg = 0
        pieces: list[bytes] = []
        infos: list[tuple[StatementInfo | None, ...] | None] = []
        try:
            while pos < total and not self._hold and self.phase == "relay":
                if self._cskip:  # the rest of a CopyData message, streamed
                    take = min(self._cskip, total - pos)
                    pos += take
                    self._cskip -= take
                    continue
                if total - pos < 5:
                    break
                t, n = _HDR.unpack_from(buf, pos)
                if n < 4 or n > pg.MAX_MESSAGE or t not in pg.FRONTEND_TYPES:
                    pos = total  # bad framing: the scanner (in _forward) fails the connection
                    break
                end = pos + 1 + n
                if t == _COPY_DATA and not self._discard:
                    if end > total:
                        self._cskip = end - total
                        pos = total
                        break
                    pos = end
                    continue
                if end > total:
                    break  # held until complete
                if self._discard:
                    if t != _X:
                        pieces.append(bytes(buf[seg:pos]))
                        seg = end
                        if t == _S:
                            self._discard = False
                            self._queue_synth(_Synth(b"", ready=True))
                    pos = end
                    continue
                if t in (_Q, _P):
                    body = bytes(buf[pos + 5 : end])
                    name = ""
                    nparams: int | None = 0
                    if t == _Q:
                        z = body.find(b"\x00")
                        raw = body if z < 0 else body[:z]
                    else:
                        p = pg.parse_parse(body)
                        name, nparams = p.name, p.nparams
                        z = body.find(b"\x00")
                        z2 = body.find(b"\x00", z + 1)
                        raw = body[z + 1 : z2 if z2 >= 0 else len(body)]
                    verdict = self._check(guard, raw)
                    if not verdict.allowed:
                        pieces.append(bytes(buf[seg:pos]))
                        seg = pos = end
                        if not self._forward(b"".join(pieces), infos):
                            return
                        pieces = []
                        infos = []
                        self._block(t, raw, verdict.message, verdict.rule or "unparseable", nparams)
                        continue
                    if t == _Q:
                        sts = verdict.statements
                        infos.append(tuple(sts) if any(_affects_prepared(x) for x in sts) else None)
                    else:
                        st = verdict.statements[0] if len(verdict.statements) == 1 else None
                        self._g_stmts[name] = st if st is not None and _affects_prepared(st) else None
                        if name and st is not None:  # protocol-level names share SQL PREPARE's namespace
                            self.prepared[name] = st
                        self._in_batch = True
                elif t == _B:
                    z1 = buf.find(b"\x00", pos + 5, end)
                    z2 = buf.find(b"\x00", z1 + 1, end) if z1 >= 0 else -1
                    if z2 < 0:
                        raise ProtocolError("unterminated string in message")
                    sinfo = self._g_stmts.get(buf[z1 + 1 : z2].decode("utf-8", "replace")) if self._g_stmts \
                        else None
                    portal = buf[pos + 5 : z1].decode("utf-8", "replace")
                    if sinfo is not None:
                        self._g_portals[portal] = sinfo
                    elif self._g_portals:
                        self._g_portals.pop(portal, None)
                    self._in_batch = True
                elif t == _E:
                    if self._g_portals:
                        pinfo = self._g_portals.get(pg.parse_execute(bytes(buf[pos + 5 : end])))
                        infos.append((pinfo,) if pinfo is not None else None)
                    else:
                        infos.append(None)
                    self._in_batch = True
                elif t == _C:
                    kind, cname = pg.parse_close(bytes(buf[pos + 5 : end]))
                    if kind == "S":
                        self._g_stmts.pop(cname, None)
                        self.prepared.pop(cname, None)
                    else:
                        self._g_portals.pop(cname, None)
                    self._in_batch = True
                elif t == _S:
                    self._in_batch = False
                elif t in _BATCH_TYPES:
                    self._in_batch = True
                pos = end
        except ProtocolError as e:
            self._client_malformed(e)
            return
        if pieces:
            pieces.append(bytes(buf[seg:pos]))
            data = b"".join(pieces)
        else:
            data = bytes(buf[seg:pos])
        del buf[:pos]
        self._forward(data, infos)

    def _check(self, guard: Guardrails, raw: bytes) -> Any:
        """The verdict for one query text as the server will read it (client_encoding)."""
        codec = self._codec
        try:
            text = raw.decode(codec) if codec is not None else None
        except (UnicodeDecodeError, LookupError):
            text = None
        if text is None:
            # Not readable as the server reads it: give the core a text it classifies as unparseable, so the
            # fail-closed verdict (or a rule naming "unparseable") applies.
            text = "\x00"
        return guard.check(text, self.prepared, texts=False)  # the tunnel reads classes and names only

    def _forward(self, data: bytes, infos: list[tuple[StatementInfo | None, ...] | None]) -> bool:
        """Send judged client bytes upstream through the ordinary recording path. False if the connection
        failed."""
        if not data:
            return True
        pending = self.pending
        before = len(pending)
        try:
            msgs = self.cscan.feed(data)
            if msgs:
                self._client_msgs(msgs)
        except ProtocolError as e:
            self._client_malformed(e)
            return False
        if any(infos):  # one per forwarded Query / Execute, in the order _client_msgs queued their _Stmt
            it = iter(infos)
            for i in range(before, len(pending)):
                item = pending[i]
                if isinstance(item, _Stmt):
                    item.info = next(it, None)
        up = self.up
        assert up is not None
        assert up.transport is not None
        up.transport.write(data)
        self.tunnel.stats.bytes_up += len(data)
        return True

    def _block(self, t: int, raw: bytes, message: str, rule: str, nparams: int | None) -> None:
        codec = self._codec or "utf-8"
        try:
            text = raw.decode(codec, "replace")
        except LookupError:
            text = raw.decode("utf-8", "replace")
        sql, trunc = _sql_text(raw, False, text, self.masker)
        simple = t == _Q
        st = _Stmt(sql, trunc, "simple" if simple else "extended", 0 if simple else nparams,
                   time.perf_counter())
        st.sqlstate = "42501"
        st.error = message[:ERROR_TEXT_CAP]
        if self._in_batch:
            # Part of this batch already reached the server: end it with our own Sync (see above).
            if self._swallow == 0:
                # Swallow mode starts mid-stream: continue where the scanner is in the current message.
                sc = self.sscan
                self._sw_rem = sc._skip or (sc._bneed if sc._btype >= 0 else 0)
                self._sw_hdr = sc._hdr
                self._sw_buf = b""
            self._swallow += 1
            up = self.up
            assert up is not None
            assert up.transport is not None
            up.transport.write(_SYNC_MSG)
            if self._mq is not None:
                self._mq_sync()
            self.pending.append(_Sync(self.batch_parse, swallow=True))
            self.batch_parse = None
            self._in_batch = False
        err = pg.error_response("42501", message, severity="ERROR")
        self._queue_synth(_Synth(err, ready=simple, st=st, blocked=rule))
        if not simple:
            self._discard = True

    def _queue_synth(self, s: _Synth) -> None:
        self.pending.append(s)
        self._send_synth()

    def _send_synth(self) -> None:
        """Send the made-up responses now at the head of `pending`; hold client input while one waits."""
        pending = self.pending
        tr = self.transport
        while pending and isinstance(pending[0], _Synth):
            s = cast(_Synth, pending.popleft())
            data = s.data + pg.ready_for_query(self.txn_status) if s.ready else s.data
            if data and tr is not None and not tr.is_closing():
                tr.write(data)
                self.tunnel.stats.bytes_down += len(data)
            if s.st is not None:
                self._record_blocked(s.st, s.blocked)
        waiting = any(isinstance(x, _Synth) for x in pending)
        if waiting and not self._hold:
            self._hold = True
            if tr is not None and not self._client_paused:
                tr.pause_reading()
        elif not waiting and self._hold:
            self._hold = False
            if tr is not None and not self._client_paused and not self._mq_paused and self.phase == "relay":
                tr.resume_reading()
            asyncio.get_running_loop().call_soon(self._judge_client)

    def _record_blocked(self, st: _Stmt, rule: str | None) -> None:
        stats = self.tunnel.stats
        stats.statements += 1
        stats.blocked += 1
        rec = self.rec
        if rec is None:
            return
        fields: dict[str, object] = {"c": self.n, "sql": st.sql}
        if st.truncated:
            fields["sql_truncated"] = True
        fields.update(proto=st.proto, params=st.params, ms=round((time.perf_counter() - st.t0) * 1000.0, 3),
                      rows=None, tag=None, sqlstate=st.sqlstate, error=st.error, blocked=rule)
        rec.event("stmt", **fields)

    def _prepared_effect(self, head: _Stmt, tag: str) -> None:
        """A CommandComplete confirmed a statement: keep the prepared-statement map as the server has it."""
        infos = head.info
        assert infos is not None
        if head.proto == "simple":
            i = head.ncc
            head.ncc += 1
        else:
            i = 0
        st = infos[i] if i < len(infos) else None
        if tag == "PREPARE":
            if st is not None and st.prepared_name:
                self.prepared[st.prepared_name] = st.as_prepared()
        elif tag in ("DEALLOCATE ALL", "DISCARD ALL"):  # also drops protocol-level named statements
            self.prepared.clear()
            unnamed = self._g_stmts.get("")
            self._g_stmts.clear()
            self._g_stmts[""] = unnamed
        elif tag == "DEALLOCATE" and st is not None and st.deallocate:
            self.prepared.pop(st.deallocate, None)
            self._g_stmts.pop(st.deallocate, None)

    def _parameter_status(self, body: bytes) -> None:
        name, value = pg.parse_parameter_status(body)
        if name == "client_encoding":
            self._codec = _codec(value)

    def _next_z_swallowed(self) -> bool:
        for item in self.pending:
            if isinstance(item, _Sync):
                return item.swallow
            if isinstance(item, _Stmt) and item.proto == "simple":
                return False
        return False

    def _server_piece(self, data: bytes, write: bool) -> bool:
        if not data:
            return True
        try:
            msgs = self.sscan.feed(data)
        except ProtocolError as e:
            self._server_malformed(e)
            return False
        if write:
            assert self.transport is not None
            self.transport.write(data)
            self.tunnel.stats.bytes_down += len(data)
        if msgs:
            try:
                self._server_msgs(msgs)
            except ProtocolError as e:
                self._server_malformed(e)
                return False
        return self.phase != "closed"

    def _from_server_swallow(self, data: bytes) -> None:
        """Server bytes while a tunnel-sent Sync is unanswered: walk message boundaries so that its
        ReadyForQuery (6 bytes) is fed to the scanner but not written to the client."""
        buf = self._sw_buf + data if self._sw_buf else bytes(data)
        self._sw_buf = b""
        end = len(buf)
        pos = start = 0
        while pos < end:
            if self._sw_rem:
                take = min(self._sw_rem, end - pos)
                pos += take
                self._sw_rem -= take
                continue
            if self._sw_hdr:  # a header begun before swallow mode (already passed on)
                need = 5 - len(self._sw_hdr)
                hdr = self._sw_hdr + buf[pos : pos + need]
                if len(hdr) < 5:
                    self._sw_hdr = hdr
                    pos = end
                    break
                self._sw_hdr = b""
                pos += need
                self._sw_rem = max(_HDR.unpack(hdr)[1] - 4, 0)
                continue
            if end - pos < 6 and (end - pos < 5 or buf[pos] == _Z):
                break  # held: a partial header, or a ReadyForQuery that may be ours
            t, n = _HDR.unpack_from(buf, pos)
            if t == _Z and n == 5:
                if not self._server_piece(buf[start:pos], True):
                    return
                start = pos
                if self._next_z_swallowed():
                    if not self._server_piece(buf[pos : pos + 6], False):
                        return
                    pos = start = pos + 6
                    self._swallow -= 1
                    if not self._swallow:
                        if pos < end:
                            self._relay_server(buf[pos:])
                        return
                    continue
                pos += 6
                continue
            if n < 4:
                pos = end  # malformed: the scanner fails the connection
                break
            self._sw_rem = 1 + n
        if pos < end:
            self._sw_buf = buf[pos:]
        self._server_piece(buf[start:pos], True)

    # ---- ending -------------------------------------------------------------------------------------------

    def server_lost(self, exc: BaseException | None) -> None:
        if self.phase == "closed":
            return
        if not self.terminated and self.disconn_reason is None:
            self.disconn_reason = "server"
            if exc is not None:
                self.tunnel._error(f"connection {self.n}: the database connection was lost: "
                                   f"{_one_line(str(exc) or type(exc).__name__)}")
        self.close(self.disconn_reason or "client")

    def fail(self, reason: str, sqlstate: str, message: str) -> None:
        """Tell the client why (ErrorResponse) and close this connection only."""
        if self.phase == "closed":
            return
        if reason.startswith("protocol_error"):
            self.tunnel._error(f"connection {self.n or '?'}: {reason}")
        if self._rid is not None:
            self._final = pg.error_response(sqlstate, message)  # the relay sends it before closing
        elif self.transport is not None and not self.transport.is_closing():
            self.transport.write(pg.error_response(sqlstate, message))
        self.close(reason)

    def close(self, reason: str) -> None:
        if self.phase == "closed":
            return
        # (a C-relayed connection: its events queued before this point were read already when the relay
        # reported its end, or PgTunnel.close() pumped them; any left follow a failure and are dropped)
        self.phase = "closed"
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if self._login_task is not None and not self._login_task.done():
            # _open_upstream closes a half-open upstream on cancellation; a finished login is handed to
            # self.up synchronously, so no authenticated upstream is left behind.
            self._login_task.cancel()
        if self.up is not None:
            self.up.conn = None
            if not self.up.lost and self.up.transport is not None and not self.up.transport.is_closing():
                if not self.terminated:
                    self.up.transport.write(pg.terminate())
                self.up.transport.close()
        self.tunnel._cancel_keys.pop(self.local_key, None)
        if self.transport is not None:
            self.transport.close()
        if self._rid is not None:
            relay = self.tunnel._relay
            if relay is not None:
                up, down = relay.close(self._rid, self._final, b"" if self.terminated else pg.terminate())
                self.tunnel.stats.bytes_up += up
                self.tunnel.stats.bytes_down += down
            self.tunnel._relay_conns.pop(self._rid, None)
            self.tunnel._conns.discard(self)
        if self.n and self.rec is not None:
            with contextlib.suppress(Exception):
                self.rec.event("disconn", c=self.n, reason=reason)


# (table oid, attnum) -> ("schema.table", column name); a view's column computed from a rule column (see
# sqltaint.trace_views) -> (None, that rule column): judged as it with the table unknown (fail closed)
Origins = dict[tuple[int, int], tuple[str | None, str]]
# the row type of a table (and the array of it) that has a column named by a masking rule -> that column, as
# in Origins: a whole-row value (``SELECT c FROM cards c``) holds the column, so it is judged as the column
RowTypes = dict[int, tuple[str | None, str]]
_JSON_TYPES = frozenset((114, 199, 3802, 3807))  # json, json[], jsonb, jsonb[]
_NAMED_CAP = 1024  # SQL-level prepared statements and cursors remembered per connection
_RULE_RANK = {"redact": 2, "hash": 1}  # the strictest of several rule columns: redact, then hash


def _star_payload(tail: bytes) -> bytes:
    """A NotificationResponse after its process id (channel, NUL, payload, NUL): the payload starred."""
    z = tail.find(b"\x00")
    if z < 0 or not tail.endswith(b"\x00"):
        return tail
    return tail[: z + 1] + b"*" * (len(tail) - z - 2) + b"\x00"


def _data_exception(body: bytes) -> bool:
    """An ErrorResponse body whose SQLSTATE is of class 22 (data exception: the messages quote values)."""
    return pg.parse_error_fields(body).get("C", "").startswith("22")


def _row_description(body: bytes, origins: Origins | None = None,
                     row_types: RowTypes | None = None, derived: Derived | None = None) -> list[ColumnInfo]:
    """The columns of a RowDescription body. A column that the server traces to a table column (its table
    OID and attribute number) found in ``origins`` takes that table and *that* column's name, so an alias
    (``SELECT cvv AS c``) does not hide it from a column rule; a column whose type is the row type of such a
    table (or an array of it) is judged as that table column too, since the whole row holds it; any other
    column keeps the name it is sent under and an unknown table (``table`` None: table-scoped rules apply to
    it, fail closed). A computed column (no table OID) that ``derived`` says is computed from rule columns is
    judged as the strictest of them (:mod:`pcigate.sqltaint`); so is any column without an origin of a
    statement that reads a relation this session filled with rule columns' values (``derived.session``)."""
    (count,) = _I16.unpack_from(body, 0)
    pos = 2
    cols: list[ColumnInfo] = []
    for i in range(count):
        z = body.index(b"\x00", pos)
        name = body[pos:z].decode("utf-8", "replace")
        toid, att, typ, _tlen, _tmod, fmt = _FIELD_TAIL.unpack_from(body, z + 1)
        origin = origins.get((toid & 0xFFFFFFFF, att)) if origins and toid else None
        if origin is None and row_types:
            origin = row_types.get(typ & 0xFFFFFFFF)
        rule = None
        if origin is None and derived is not None and (not toid or derived.session):
            rule = derived.column(i, count, json=(typ & 0xFFFFFFFF) in _JSON_TYPES)
        if origin is not None:
            cols.append(ColumnInfo(origin[1], origin[0], typ & 0xFFFFFFFF, fmt))
        elif rule is not None:
            cols.append(ColumnInfo(rule, None, typ & 0xFFFFFFFF, fmt))
        else:
            cols.append(ColumnInfo(name, None, typ & 0xFFFFFFFF, fmt))
        pos = z + 1 + _FIELD_TAIL.size
    if pos != len(body):
        raise ValueError("trailing bytes in RowDescription")
    return cols


def catalog_query(columns: set[str]) -> str:
    """Every table column (of any relation kind) whose name is one of ``columns`` (case-insensitive).

    The names come from the broker's policy, not the user; still, a name holding a quote, a backslash or a
    NUL is left out (it cannot break out of the literal whatever ``standard_conforming_strings`` says), and
    such a column is then judged by name in any table (fail closed)."""
    safe = sorted(c.lower() for c in columns if not any(ch in c for ch in "'\\\x00"))
    names = ", ".join(f"'{c}'" for c in safe) or "NULL"
    return ("SELECT a.attrelid::oid::text, a.attnum::text, n.nspname, c.relname, a.attname, "  # noqa: S608
            "c.reltype::oid::text, coalesce(t.typarray, 0)::oid::text "
            "FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_class c ON c.oid = a.attrelid "
            "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
            "LEFT JOIN pg_catalog.pg_type t ON t.oid = c.reltype "
            f"WHERE a.attnum > 0 AND NOT a.attisdropped AND lower(a.attname) IN ({names})")


# Views and materialized views, with their column names and definitions (pg_get_viewdef spells out a *).
VIEWS_QUERY = (
    "SELECT c.oid::text, c.reltype::oid::text, coalesce(t.typarray, 0)::oid::text, lower(c.relname), "
    "(SELECT json_agg(a.attname ORDER BY a.attnum) FROM pg_catalog.pg_attribute a "
    " WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped)::text, "
    "pg_catalog.pg_get_viewdef(c.oid) "
    "FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
    "LEFT JOIN pg_catalog.pg_type t ON t.oid = c.reltype "
    "WHERE c.relkind IN ('v', 'm') AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
    "ORDER BY c.oid"  # creation order: a view names only views made before it (CREATE OR REPLACE aside)
)


# Functions and procedures in SQL, PL/pgSQL, ... (not internal or C): their names and definitions.
FUNCTIONS_QUERY = (
    "SELECT lower(p.proname), pg_catalog.pg_get_functiondef(p.oid) "
    "FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace "
    "JOIN pg_catalog.pg_language l ON l.oid = p.prolang "
    "WHERE p.prokind IN ('f', 'p') AND l.lanname NOT IN ('internal', 'c') "
    "AND n.nspname NOT IN ('pg_catalog', 'information_schema') ORDER BY p.oid"
)


async def _read_functions(proto: _Upstream, cap: int = 10_000) -> list[tuple[str, str]]:
    """(name, definition) of the rows of :data:`FUNCTIONS_QUERY` (at most ``cap``)."""
    rows = await _read_rows(proto, FUNCTIONS_QUERY, cap, "the functions")
    return [(f[0], f[1]) for f in rows if len(f) == 2 and f[0] is not None and f[1] is not None]


async def _read_views(proto: _Upstream, cap: int = 10_000) -> list[View]:
    """The rows of :data:`VIEWS_QUERY` (at most ``cap`` views; more are left out, and named in no error)."""
    import json

    from pcigate.sqltaint import View

    views: list[View] = []
    for f in await _read_rows(proto, VIEWS_QUERY, cap, "the views"):
        if len(f) != 6 or None in f:
            continue
        try:
            names = json.loads(f[4] or "[]")
        except ValueError:
            continue
        views.append(View((int(f[0] or 0), int(f[1] or 0), int(f[2] or 0)), f[3] or "",
                          tuple(str(n) for n in names), f[5] or ""))
    return views


async def _read_rows(proto: _Upstream, sql: str, cap: int, what: str) -> list[list[str | None]]:
    """The text rows of one simple query on a connection of the tunnel's own (at most ``cap``; ``what``
    it reads, for the error)."""
    proto.write(pg.query(sql))
    rows: list[list[str | None]] = []
    error: str | None = None
    while True:
        t, body = await proto.read_message()
        if t == _D and len(rows) < cap:
            fields: list[str | None] = []
            pos = 2
            for _ in range(_I16.unpack_from(body, 0)[0]):
                (n,) = _I32.unpack_from(body, pos)
                pos += 4
                fields.append(body[pos : pos + n].decode("utf-8", "replace") if n >= 0 else None)
                pos += max(n, 0)
            rows.append(fields)
        elif t == _ERR:
            error = pg.parse_error_fields(body).get("M", "error")
        elif t == _Z:
            break
    if error is not None:
        raise _UpstreamError("42000", f"cannot read {what}: {error}")
    return rows


async def _read_catalog(proto: _Upstream, sql: str,
                        cap: int = 100_000) -> tuple[Origins, dict[int, list[tuple[str | None, str]]]]:
    """The rows of :func:`catalog_query`: the columns' origins, and per row type the columns it holds."""
    out: Origins = {}
    row_types: dict[int, list[tuple[str | None, str]]] = {}
    for f in await _read_rows(proto, sql, cap, "the table catalog"):
        if len(f) == 7:
            origin = (f"{f[2]}.{f[3]}", f[4] or "")
            out[(int(f[0] or 0), int(f[1] or 0))] = origin
            for typ in (int(f[5] or 0), int(f[6] or 0)):
                if typ:
                    row_types.setdefault(typ, []).append(origin)
    return out, row_types


def _consume(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()  # mark retrieved; the owner handles it


# --------------------------------------------------------------------------------------------------------
# The tunnel
# --------------------------------------------------------------------------------------------------------


class PgTunnel:
    """A loopback PostgreSQL listener that injects ``upstream`` credentials and records statements."""

    def __init__(self, upstream: DatabaseCredentials, local_secret: str, recorder: RecordingWriter | None,
                 *, listen_host: str = "127.0.0.1", listen_port: int = 0,
                 policy: DataPathPolicy | None = None, masking_key: bytes | None = None) -> None:
        if not local_secret:
            raise UsageError("the tunnel needs a non-empty local secret")
        self.upstream = upstream
        self.recorder = recorder
        self.listen_host = listen_host
        self.listen_port = listen_port
        self.policy = policy
        self._masking_key = masking_key
        # (table oid, attnum) -> (schema.table, column) of the columns named by masking rules, read from the
        # catalog by check_upstream(): lets rules follow a column through aliases and tell tables apart
        self.origins: Origins = {}
        self.row_types: RowTypes = {}
        self.computed: ComputedColumns | None = None  # with column rules: computed columns that carry them
        self.star_notify = False  # a statement sent a NOTIFY payload computed from a rule column
        self._row_holders: dict[int, list[tuple[str | None, str]]] = {}  # per row type, its rule columns
        self._views: list[View] = []  # views and materialized views, read by check_upstream
        self._functions: list[tuple[str, str]] = []  # functions' names and definitions, likewise
        self.stats = TunnelStats()
        self.errors: list[str] = []
        self._keys = ScramKeys.from_password(local_secret)
        # PBKDF2 results per (password, salt, iterations): repeated upstream logins skip the 4096 rounds
        self._salted: dict[str, dict[tuple[bytes, int], bytes]] = {}
        self._handshake_timeout = HANDSHAKE_TIMEOUT  # seconds from accept() to a verified SCRAM proof
        self._server: asyncio.AbstractServer | None = None
        self._conns: set[_Conn] = set()
        self._cancel_keys: dict[tuple[int, int], tuple[int, int]] = {}
        self._n = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0
        # one per tunnel, shared by its connections (and so is its classification cache); set again by start()
        self.guard = Guardrails(policy.guardrails if policy is not None else [])
        self.masker: Masker | None = None  # set by start() when the policy asks for masking
        # the C relay thread of plain connections (_Conn._hand_over), started with the first of them
        self.c_relay = _CRelay is not None and os.environ.get(RELAY_ENV, "") != "python"
        self._relay: _CRelay | None = None
        self._relay_conns: dict[int, _Conn] = {}
        self._relay_q: deque[tuple[int, int, float, Any]] = deque()

    def _relay_thread(self) -> _CRelay | None:
        if self._relay is None and self.c_relay:
            try:
                relay = _CRelay(pg.Message, pg.FRONTEND_TYPES, _RELAY_CLIENT_WANTED, _CLIENT_KEEP,
                                pg.BACKEND_TYPES, _SERVER_WANTED, _SERVER_KEEP, pg.MAX_MESSAGE)
                asyncio.get_running_loop().add_reader(relay.fileno(), self._relay_pump)
            except (OSError, RuntimeError) as e:
                self.c_relay = False
                self._error(f"the C relay did not start ({e}); connections take the asyncio relay")
                return None
            self._relay = relay
        return self._relay

    def _relay_pump(self) -> None:
        """Hand what the C relay read to its connections, in order. Re-entrant (a connection that closes
        pumps first): events wait in one queue and are taken from its head."""
        relay = self._relay
        if relay is None:
            return
        q = self._relay_q
        q.extend(relay.drain())
        conns = self._relay_conns
        while q:
            rid, kind, t, payload = q.popleft()
            conn = conns.get(rid)
            if conn is None or conn.phase == "closed":
                continue
            try:
                conn._relay_event(kind, t, payload)
            except Exception as e:  # a bug costs that connection, not the events of the others
                self._error(f"connection {conn.n}: internal error: {type(e).__name__}: {_one_line(str(e))}")
                conn.close("internal_error")

    def _salted_cache(self) -> dict[tuple[bytes, int], bytes]:
        return self._salted.setdefault(self.upstream.password, {})

    def _next_conn(self) -> int:
        self._n += 1
        return self._n

    def _error(self, msg: str) -> None:
        self.stats.errors += 1
        if len(self.errors) < MAX_ERRORS_KEPT:
            self.errors.append(_one_line(msg, 500))

    async def start(self) -> int:
        if not is_loopback(self.listen_host):
            raise UsageError(f"the tunnel listens on loopback only, not {self.listen_host!r}")
        pol = self.policy
        self.masker = None
        if pol is not None and pol.masking is not None:
            if any(r.action == "hash" for r in pol.masking.columns) and not self._masking_key:
                raise AccessDenied("the session's policy hashes columns but the broker sent no masking key; "
                                   "refusing to open the tunnel")
            self.masker = Masker(pol.masking, hash_key=self._masking_key)
            self.row_types = self._strongest(self.masker)
            self.computed = self._computed(self.masker)  # (and what views carry, into the two maps above)
        self.guard = Guardrails(pol.guardrails if pol is not None else [])
        host = "127.0.0.1" if self.listen_host == "localhost" else self.listen_host
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_server(lambda: _Conn(self), host, self.listen_port,
                                                    reuse_address=True, backlog=512)
        except OSError as e:
            raise PortInUse.binding(host, self.listen_port, e) from None
        sock = self._server.sockets[0]
        self.port = int(sock.getsockname()[1])
        return self.port

    async def check_upstream(self, timeout: float = CONNECT_TIMEOUT) -> None:
        """Open and authenticate one upstream connection, then close it. Raises DatabaseUnavailable."""
        c = self.upstream
        try:
            async with asyncio.timeout(timeout):
                login = await _open_upstream(c, {}, self._salted_cache())
        except TimeoutError:
            raise DatabaseUnavailable(f"the database at {c.host}:{c.port} did not answer within "
                                      f"{timeout:g}s") from None
        except _UpstreamError as e:
            raise DatabaseUnavailable(e.message) from None
        try:
            names = self._rule_columns()
            if names:
                async with asyncio.timeout(timeout):
                    self.origins, self._row_holders = await _read_catalog(login.upstream,
                                                                          catalog_query(names))
                    self._views = await _read_views(login.upstream)
                    self._functions = await _read_functions(login.upstream)
        except (TimeoutError, _UpstreamError, ConnectionError) as e:
            # Not fatal: without origins, table-scoped rules apply by column name to every table (fail closed)
            self._error(f"column origins not resolved ({e}); column rules apply by name to any table, "
                        "and no view's columns or function's calls are traced")
        finally:
            login.upstream.write(pg.terminate())
            login.upstream.close()

    def _strongest(self, masker: Masker) -> RowTypes:
        """Per row type read by check_upstream, the column it holds whose rule is the strictest (redact,
        then hash): the whole row is judged as that column."""
        return {typ: max(cols, key=lambda c: _RULE_RANK.get(masker.column_action(c[0], c[1]), 0))
                for typ, cols in self._row_holders.items()}

    def _computed(self, masker: Masker) -> ComputedColumns | None:
        """With column rules: the judge of computed columns, knowing which tables (by name) hold which rule
        columns, for whole-row references (``c::text``)."""
        names = self._rule_columns()
        if not names:
            return None
        from pcigate.sqltaint import ComputedColumns, trace_views

        tables: dict[str, set[str]] = {}
        for table, column in self.origins.values():
            if table is not None:
                tables.setdefault(table.rsplit(".", 1)[-1], set()).add(column)
        def rank(column: str) -> int:
            return _RULE_RANK.get(masker.column_action(None, column), 0)

        # A view reports its own OID and attribute numbers: its columns computed from rule columns are
        # judged as them, and so is a value of its row type.
        views = trace_views(self._views, names, tables, rank)
        for (oid, row_type, array_type), found in views.columns.items():
            for attnum, (rule, rows_only) in enumerate(found, start=1):
                if rule is not None and not rows_only:  # a json of whole rows: its members are judged
                    self.origins[(oid, attnum)] = (None, rule)
            strictest = max(sorted(r for r, _ in found if r is not None), key=rank)
            for typ in (row_type, array_type):
                if typ:
                    self.row_types[typ] = (None, strictest)
        judge = ComputedColumns(names, {**tables, **views.tables}, rank, views.aliases)
        # a function whose definition names a rule column (or a table or view holding one) reads it itself:
        # a call of it is judged as every rule column (SELECT get_cvv(1))
        for name, definition in self._functions:
            if judge.mentions(definition):
                judge.learn_function(name)
        return judge

    def _rule_columns(self) -> set[str]:
        pol = self.policy.masking if self.policy is not None else None
        if pol is None:
            return set()
        return {c.lower() for c in pol.sensitive_columns} | {r.column.lower() for r in pol.columns}

    def _forward_cancel(self, req: pg.CancelRequest) -> None:
        key = self._cancel_keys.get((req.pid, req.secret))
        if key is None:
            return  # unknown key: ignored, as PostgreSQL does
        conn = next((c for c in self._conns if c.local_key == (req.pid, req.secret)), None)
        if conn is not None and self.recorder is not None and conn.n:
            with contextlib.suppress(Exception):
                self.recorder.event("cancel", c=conn.n)

        async def send() -> None:
            try:
                await _send_cancel(self.upstream.host, self.upstream.port, key)
            except OSError as e:
                self._error(f"cancel request could not reach the database: {_one_line(str(e))}")

        task = asyncio.get_running_loop().create_task(send())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self._relay_pump()
        for conn in list(self._conns):
            conn.close("client" if conn.terminated else "shutdown")  # a sent Terminate was the client's end
        self._conns.clear()
        relay, self._relay = self._relay, None
        if relay is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(relay.fileno())
            relay.shutdown()
        for t in list(self._tasks):
            t.cancel()
        if self._server is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await self._server.wait_closed()
            self._server = None
        await asyncio.sleep(0)  # let transports run their connection_lost callbacks
