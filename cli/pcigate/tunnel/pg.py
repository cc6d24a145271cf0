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
   mark, reading from the other side pauses.

Recording choices: a simple-protocol Query string is one ``stmt`` event even when it holds several
statements: ``rows`` is the sum over its CommandCompletes (null if none carried a count), ``tag`` is the last
tag, ``ms`` runs from the Query to its ReadyForQuery, and an ErrorResponse sets ``sqlstate``/``error``. In the
extended protocol one ``stmt`` is recorded per Execute (SQL from the Parse of the bound statement,
``params`` from the Bind), timed from the Execute to its CommandComplete/ErrorResponse; Executes skipped by
the server after an error are not recorded; an error in a batch without Execute (e.g. a failing Parse) is
recorded with the batch's last Parse text. A ``copy`` event follows the CommandComplete of a COPY, and a
``cancel`` event marks a forwarded CancelRequest.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import ssl
import struct
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, cast

from pcigate.errors import AccessDenied, DatabaseUnavailable, PortInUse, ProtocolError, UsageError
from pcigate.models import DatabaseCredentials, DataPathPolicy
from pcigate.net import is_loopback
from pcigate.recording import SQL_CAP, RecordingWriter
from pcigate.wire import pg
from pcigate.wire.scram import MECHANISM, ScramClient, ScramError, ScramKeys, ScramServer

CONNECT_TIMEOUT = 10.0
HANDSHAKE_TIMEOUT = 10.0  # from accept() to a verified local SCRAM proof
SETUP_MESSAGE_CAP = 1 << 20  # messages during the upstream login are small
ERROR_TEXT_CAP = 4096
MAX_ERRORS_KEPT = 200
WRITE_HIGH_WATER = 256 * 1024

_CLIENT_WANTED = b"QPBESCX"
_SERVER_WANTED = b"CEIsZGHW"
_HDR = struct.Struct("!BI")
_Q, _P, _B, _E, _S, _C, _X = (ord(c) for c in "QPBESCX")
_I, _s, _Z, _G, _H, _W = (ord(c) for c in "IsZGHW")
_CMD, _ERR = ord("C"), ord("E")  # server CommandComplete / ErrorResponse
# Startup parameters a client may not pass through.
_DROPPED_PARAMS = frozenset({"user", "database", "replication"})


@dataclass
class TunnelStats:
    connections: int = 0
    statements: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    errors: int = 0


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
    __slots__ = ("copy", "copy_dir", "error", "params", "proto", "rows", "sql", "sqlstate", "t0", "tag",
                 "truncated")

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


class _Sync:
    __slots__ = ("parse_sql",)

    def __init__(self, parse_sql: tuple[str, bool] | None) -> None:
        self.parse_sql = parse_sql


def _sql_text(body: bytes, truncated: bool, text: str) -> tuple[str, bool]:
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
        self.cscan = pg.MessageScanner(_CLIENT_WANTED, pg.FRONTEND_TYPES, keep=SQL_CAP * 4 + 1024)
        self.sscan = pg.MessageScanner(_SERVER_WANTED, pg.BACKEND_TYPES, keep=8192)
        self.pending: deque[_Stmt | _Sync] = deque()
        self.statements: dict[str, tuple[str, bool]] = {}
        self.portals: dict[str, tuple[str, bool, int | None]] = {}
        self.batch_parse: tuple[str, bool] | None = None
        self.terminated = False
        self.disconn_reason: str | None = None
        self.peer = ""
        self._client_paused = False
        self._server_paused = False
        self.rec = tunnel.recorder

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
            self.fail(f"protocol_error: {e}", "08P01", f"invalid message from the client: {e}")

    def connection_lost(self, exc: Exception | None) -> None:
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
            self.rec.event("conn", c=self.n, peer=self.peer, app=self.params.get("application_name"))
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
        self.phase = "relay"
        up.conn = self
        rest = up.take_buffer()
        leftover = bytes(self._buf)
        self._buf.clear()
        if up.lost:
            self.server_lost(up.lost_exc)
            return
        if rest:
            self.from_server(rest)
        if leftover:
            self.from_client(leftover)
        if self.phase == "relay":
            self.transport.resume_reading()

    # ---- relay --------------------------------------------------------------------------------------------

    def from_client(self, data: bytes) -> None:
        try:
            msgs = self.cscan.feed(data)
            if msgs:
                self._client_msgs(msgs)  # a framed message with a malformed body is as bad as bad framing
        except ProtocolError as e:
            self.fail(f"protocol_error: {e}", "08P01", f"invalid message from the client: {e}")
            return
        up = self.up
        assert up is not None
        assert up.transport is not None
        up.transport.write(data)
        self.tunnel.stats.bytes_up += len(data)

    def from_server(self, data: bytes) -> None:
        try:
            msgs = self.sscan.feed(data)
        except ProtocolError as e:
            self._server_malformed(e)
            return
        assert self.transport is not None
        self.transport.write(data)
        self.tunnel.stats.bytes_down += len(data)
        if msgs:
            try:
                self._server_msgs(msgs)
            except ProtocolError as e:
                self._server_malformed(e)

    def _server_malformed(self, e: ProtocolError) -> None:
        self.tunnel._error(f"connection {self.n}: malformed data from the database: {e}")
        self.fail(f"protocol_error: server: {e}", "08P01", f"pcigate: malformed data from the database: {e}")

    def _client_msgs(self, msgs: list[pg.Message]) -> None:
        now = time.perf_counter()
        pending = self.pending
        for m in msgs:
            t = m.type
            if t == _Q:
                sql, trunc = _sql_text(m.body, m.truncated, pg.parse_query(m.body))
                pending.append(_Stmt(sql, trunc or m.truncated, "simple", 0, now))
            elif t == _P:
                p = pg.parse_parse(m.body)
                entry = _sql_text(m.body, m.truncated, p.query)
                entry = (entry[0], entry[1] or m.truncated)
                self.statements[p.name] = entry
                self.batch_parse = entry
            elif t == _B:
                b = pg.parse_bind(m.body)
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

    def _server_msgs(self, msgs: list[pg.Message]) -> None:
        pending = self.pending
        now = 0.0
        for m in msgs:
            t = m.type
            head = pending[0] if pending else None
            if t == _Z:
                while pending:
                    item = pending.popleft()
                    if isinstance(item, _Sync):
                        break
                    if item.proto == "simple":
                        now = now or time.perf_counter()
                        self._record(item, now)
                        break
                continue
            if not isinstance(head, _Stmt):
                if t == _ERR and isinstance(head, _Sync) and head.parse_sql is not None:
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

    def _set_error(self, st: _Stmt, body: bytes) -> None:
        f = pg.parse_error_fields(body)
        st.sqlstate = f.get("C")
        st.error = f.get("M", "")[:ERROR_TEXT_CAP]

    def _record(self, st: _Stmt, now: float) -> None:
        self.tunnel.stats.statements += 1
        rec = self.rec
        if rec is not None:
            rec.stmt(self.n, st.sql, st.truncated, st.proto, st.params, round((now - st.t0) * 1000.0, 3),
                     st.rows, st.tag, st.sqlstate, st.error)

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
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(pg.error_response(sqlstate, message))
        self.close(reason)

    def close(self, reason: str) -> None:
        if self.phase == "closed":
            return
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
        if self.n and self.rec is not None:
            with contextlib.suppress(Exception):
                self.rec.event("disconn", c=self.n, reason=reason)


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
                 policy: DataPathPolicy | None = None) -> None:
        if not local_secret:
            raise UsageError("the tunnel needs a non-empty local secret")
        self.upstream = upstream
        self.recorder = recorder
        self.listen_host = listen_host
        self.listen_port = listen_port
        self.policy = policy
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
        if pol is not None and (pol.masking or pol.guardrails):
            raise AccessDenied("the session policy asks for masking or guardrails, which this pcigate "
                               "version does not apply; refusing to open the tunnel")
        host = "127.0.0.1" if self.listen_host == "localhost" else self.listen_host
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_server(lambda: _Conn(self), host, self.listen_port,
                                                    reuse_address=True, backlog=512)
        except OSError as e:
            raise PortInUse(f"cannot listen on {host}:{self.listen_port}: {e.strerror or e}",
                            hint="choose another port with --port, or 0 for any") from None
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
        login.upstream.write(pg.terminate())
        login.upstream.close()

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
        for conn in list(self._conns):
            conn.close("shutdown")
        self._conns.clear()
        for t in list(self._tasks):
            t.cancel()
        if self._server is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await self._server.wait_closed()
            self._server = None
        await asyncio.sleep(0)  # let transports run their connection_lost callbacks
