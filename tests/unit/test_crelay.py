"""pcigate._crelay (the tunnel's C relay thread) over socket pairs: it forwards every byte unchanged, and its
framing hands out exactly the messages pcigate.wire.pg.MessageScanner does (Hypothesis, chunked at random),
with the same protocol errors; a malformed chunk is not forwarded; close() sends the final bytes and ends
both sockets."""

from __future__ import annotations

import contextlib
import itertools
import socket
import struct
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pcigate.errors import ProtocolError
from pcigate.tunnel import pg as tunnel_pg
from pcigate.wire import pg

KEEP = 16  # small, so that truncation is exercised
CLIENT_WANTED = b"QPBESCXcf"
SERVER_WANTED = b"CEIsZGHW"


def test_the_module_is_built_and_plain_connections_use_it() -> None:
    assert tunnel_pg._CRelay is not None, "pcigate._crelay is missing: reinstall (pip install -e .) with gcc"


class Pair:
    """A Relay with one connection between two socket pairs: ``client`` and ``server`` are the far ends."""

    def __init__(self, from_client: bytes = b"", from_server: bytes = b"") -> None:
        assert tunnel_pg._CRelay is not None
        self.relay = tunnel_pg._CRelay(pg.Message, pg.FRONTEND_TYPES, CLIENT_WANTED, KEEP,
                                       pg.BACKEND_TYPES, SERVER_WANTED, KEEP, pg.MAX_MESSAGE)
        self.client, c_in = socket.socketpair()
        self.server, s_in = socket.socketpair()
        for s in (c_in, s_in):
            s.setblocking(False)
        self.id = self.relay.add(c_in.detach(), s_in.detach(), from_client, from_server)
        self.events: list[tuple[int, int, float, Any]] = []
        for s in (self.client, self.server):
            s.settimeout(5)

    def recv_exactly(self, s: socket.socket, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = s.recv(n - len(out))
            assert chunk, "closed early"
            out += chunk
        return out

    def collect(self, until: Any, timeout: float = 5) -> list[tuple[int, int, float, Any]]:
        deadline = time.monotonic() + timeout
        while not until(self.events):
            assert time.monotonic() < deadline, self.events
            self.events += self.relay.drain()
            time.sleep(0.002)
        return self.events

    def messages(self, kind: int) -> list[pg.Message]:
        return [m for _, k, _, run in self.events if k == kind for m in run]

    def close(self) -> None:
        self.relay.shutdown()
        self.client.close()
        self.server.close()


@pytest.fixture
def pair() -> Iterator[Pair]:
    p = Pair()
    yield p
    p.close()


# client bodies that the tunnel's parsers accept start like these (see the malformed-body test for the rest)
VALID_START = {ord("P"): b"\x00", ord("E"): b"\x00", ord("B"): b"\x00\x00\x00\x00", ord("C"): b"S\x00"}


def frames(types: bytes) -> st.SearchStrategy[bytes]:
    msg = st.tuples(st.sampled_from(types), st.binary(max_size=40))
    return st.lists(msg, max_size=12).map(
        lambda ms: b"".join(pg.message(bytes([t]), VALID_START.get(t, b"") + b) for t, b in ms))


def cut(data: bytes, points: list[int]) -> list[bytes]:
    cuts = sorted({p % (len(data) + 1) for p in points} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(cuts) if b > a]


def expected(data_chunks: list[bytes], wanted: bytes, allowed: bytes) -> list[pg.Message]:
    sc = pg.MessageScanner(wanted, allowed, keep=KEEP)
    return [m for c in data_chunks for m in sc.feed(c)]


@settings(max_examples=40, deadline=None)
@given(up=frames(pg.FRONTEND_TYPES), down=frames(pg.BACKEND_TYPES),
       up_cuts=st.lists(st.integers(0, 10_000), max_size=6),
       down_cuts=st.lists(st.integers(0, 10_000), max_size=6))
def test_forwards_every_byte_and_frames_as_the_python_scanner(up: bytes, down: bytes, up_cuts: list[int],
                                                              down_cuts: list[int]) -> None:
    p = Pair()
    try:
        up_chunks, down_chunks = cut(up, up_cuts), cut(down, down_cuts)
        for c in up_chunks:
            p.client.sendall(c)
            time.sleep(0.001)  # separate reads, so the chunking is the relay's too (not required to match)
        for c in down_chunks:
            p.server.sendall(c)
            time.sleep(0.001)
        assert p.recv_exactly(p.server, len(up)) == up
        assert p.recv_exactly(p.client, len(down)) == down
        want_up = expected(up_chunks, CLIENT_WANTED, pg.FRONTEND_TYPES)
        want_down = expected(down_chunks, SERVER_WANTED, pg.BACKEND_TYPES)
        p.collect(lambda _ev: len(p.messages(0)) == len(want_up) and len(p.messages(1)) == len(want_down))
        assert p.messages(0) == want_up
        assert p.messages(1) == want_down
        assert all(k in (0, 1) for _, k, _, _ in p.events)
        assert p.relay.close(p.id, b"", b"") == (len(up), len(down))
    finally:
        p.close()


def test_copy_marks_count_copydata_payload(pair: Pair) -> None:
    stream = (pg.message(b"d", b"x" * 100) + pg.message(b"d", b"y" * 50) + pg.message(b"c")
              + pg.message(b"Q", b"select 1\x00"))
    pair.client.sendall(stream)
    assert pair.recv_exactly(pair.server, len(stream)) == stream
    pair.collect(lambda _ev: len(pair.messages(0)) == 2)
    done, query = pair.messages(0)
    assert (done.type, done.mark, query.type, query.mark) == (ord("c"), 150, ord("Q"), 150)


def test_timestamps_are_perf_counter_readings(pair: Pair) -> None:
    t0 = time.perf_counter()
    pair.client.sendall(pg.query("select 1"))
    pair.recv_exactly(pair.server, len(pg.query("select 1")))
    pair.collect(lambda ev: ev)
    t = pair.events[0][2]
    assert t0 <= t <= time.perf_counter()


@pytest.mark.parametrize(("bad", "error"), [
    (b"\xff\x00\x00\x00\x08garbage!", "unexpected message type 0xff"),
    (b"\x00\x00\x00\x00\x04", "unexpected message type 0x00"),
    (b"Q" + struct.pack("!I", (1 << 30) + 1), f"invalid message length {(1 << 30) + 1}"),
    (b"Q\x00\x00\x00\x03", "invalid message length 3"),
])
def test_malformed_client_bytes_stop_the_connection_unforwarded(pair: Pair, bad: bytes, error: str) -> None:
    good = pg.query("select 1")
    pair.client.sendall(good)
    assert pair.recv_exactly(pair.server, len(good)) == good
    time.sleep(0.01)
    pair.client.sendall(pg.query("select 2") + bad)  # one chunk: none of it may reach the server
    pair.collect(lambda ev: any(k == 3 for _, k, _, _ in ev))
    (stop,) = [e for e in pair.events if e[1] == 3]
    assert stop[3] == (0, error)
    assert [m.body for m in pair.messages(0)] == [b"select 1\x00"]  # not the malformed chunk's Query
    pair.server.settimeout(0.2)
    with pytest.raises(TimeoutError):
        pair.server.recv(100)
    # stopped: nothing more is relayed; close() sends the final bytes and ends both sides
    up, down = pair.relay.close(pair.id, pg.error_response("08P01", "bad"), pg.terminate())
    assert (up, down) == (len(good), 0)
    pair.client.settimeout(5)
    got = pair.recv_exactly(pair.client, len(pg.error_response("08P01", "bad")))
    assert got == pg.error_response("08P01", "bad")
    assert pair.client.recv(100) == b""
    assert pair.server.recv(100) == pg.terminate()
    assert pair.server.recv(100) == b""


def python_verdict(t: bytes, body: bytes) -> str | None:
    """What the tunnel's own parsers say of a client message body (None: accepted)."""
    parse = {b"P": pg.parse_parse, b"B": pg.parse_bind, b"E": pg.parse_execute, b"C": pg.parse_close,
             b"Q": pg.parse_query, b"S": len, b"X": len}[t]
    try:
        parse(body)
    except ProtocolError as e:
        return str(e)
    return None


@settings(max_examples=150, deadline=None)
@given(t=st.sampled_from([b"P", b"B", b"E", b"C", b"Q", b"S", b"X"]),
       body=st.one_of(st.binary(max_size=KEEP + 4),
                      st.lists(st.sampled_from([b"\x00", b"a", b"\xff", b"\x80\x00", b"\x00\x01"]),
                               max_size=8).map(b"".join)))
def test_malformed_bodies_are_refused_as_the_tunnels_parsers_refuse_them(t: bytes, body: bytes) -> None:
    """A message body the tunnel's parsers refuse fails the connection before any of it is forwarded (its
    words as the error); any other body is forwarded."""
    kept = body[:KEEP]  # the parsers read what the scanner keeps
    verdict = python_verdict(t, kept)
    p = Pair()
    try:
        msg = pg.message(t, body)
        p.client.sendall(msg)
        if verdict is None:
            assert p.recv_exactly(p.server, len(msg)) == msg
            p.collect(lambda _ev: p.messages(0))
            assert [(m.type, m.body) for m in p.messages(0)] == [(t[0], kept)]
        else:
            p.collect(lambda ev: ev)
            assert [(k, payload) for _, k, _, payload in p.events] == [(3, (0, verdict))]
            p.server.settimeout(0.05)
            with pytest.raises(TimeoutError):
                p.server.recv(100)
    finally:
        p.close()


def test_malformed_server_bytes(pair: Pair) -> None:
    pair.server.sendall(b"Q\x00\x00\x00\x04")  # a frontend type from the server
    pair.collect(lambda ev: ev)
    assert [(k, payload) for _, k, _, payload in pair.events] == [(3, (1, "unexpected message type 0x51"))]


@pytest.mark.parametrize("side", [0, 1])
def test_an_end_of_either_side_is_reported(pair: Pair, side: int) -> None:
    (pair.client if side == 0 else pair.server).shutdown(socket.SHUT_WR)
    pair.collect(lambda ev: ev)
    assert [(k, payload) for _, k, _, payload in pair.events] == [(2, (side, ""))]


def test_bytes_read_before_the_hand_over_go_first() -> None:
    p = Pair(from_client=pg.query("select 1"), from_server=pg.message(b"Z", b"I"))
    try:
        assert p.recv_exactly(p.server, len(pg.query("select 1"))) == pg.query("select 1")
        assert p.recv_exactly(p.client, 6) == pg.message(b"Z", b"I")
        p.collect(lambda ev: len(ev) == 2)
        assert [k for _, k, _, _ in p.events] == [1, 0]  # the server's first, as the asyncio relay
    finally:
        p.close()


def _send_until_blocked(s: socket.socket, data: bytes) -> int:
    s.setblocking(False)
    view = memoryview(data)
    sent = 0
    try:
        while sent < len(view):
            sent += s.send(view[sent:sent + 65536])
    except BlockingIOError:
        pass
    return sent


def _read_to_end(s: socket.socket) -> bytes:
    s.settimeout(5)
    out = b""
    while chunk := s.recv(1 << 16):
        out += chunk
    return out


def test_a_slow_reader_paces_the_writer(pair: Pair) -> None:
    """The server side does not read: the relay holds at most one read of the client's bytes, so the
    client's own send buffer fills up instead of the relay's memory."""
    sent = _send_until_blocked(pair.client, pg.message(b"d", b"z" * 60_000) * 400)  # 24 MB of CopyData
    assert sent < 8 * 1024 * 1024  # socket buffers plus one read held by the relay
    pair.server.settimeout(5)
    got = 0
    while got < sent:
        got += len(pair.server.recv(1 << 20))
    assert got == sent


def test_a_side_that_hangs_up_while_the_other_reads_slowly_loses_nothing(pair: Pair) -> None:
    """The server sends more than the client takes at once, then hangs up (a socket pair's close raises
    EPOLLHUP at once): what it sent, to its last byte (typically a FATAL error), still reaches the client,
    and then the end is reported."""
    rows = pg.message(b"D", b"x" * 1000) * 3000 + pg.error_response("57P01", "terminating connection")
    sent = _send_until_blocked(pair.server, rows)
    pair.server.close()
    time.sleep(0.1)
    got = b""
    pair.client.settimeout(5)
    while len(got) < sent:
        chunk = pair.client.recv(1 << 16)
        assert chunk
        got += chunk
    assert got == rows[:sent]
    pair.collect(lambda ev: any(k == 2 for _, k, _, _ in ev))
    assert [(k, payload) for _, k, _, payload in pair.events if k >= 2] == [(2, (1, ""))]


def test_close_delivers_the_last_bytes_to_a_slow_reader() -> None:
    """close() while the client has not read what the relay holds: that, then the final ErrorResponse, reach
    it in full before its end (and the Terminate reaches the server)."""
    p = Pair()
    try:
        data = pg.message(b"D", b"y" * 3_000_000)
        sent = _send_until_blocked(p.server, data)
        time.sleep(0.1)
        final = pg.error_response("08P01", "pcigate: bye")
        up, down = p.relay.close(p.id, final, pg.terminate())
        assert up == 0
        assert 0 < down <= sent
        got = _read_to_end(p.client)
        assert got == data[:down] + final
        p.server.settimeout(5)
        assert p.server.recv(100) == pg.terminate()
    finally:
        p.close()


def test_close_gives_a_reader_that_never_reads_two_seconds() -> None:
    p = Pair()
    try:
        _send_until_blocked(p.server, pg.message(b"D", b"z" * 3_000_000))
        time.sleep(0.1)
        p.relay.close(p.id, pg.error_response("08P01", "bye"), b"")
        time.sleep(2.5)  # the grace period passes: the relay lets go of both sockets
        p.server.settimeout(5)
        with contextlib.suppress(ConnectionResetError):  # (reset: the relay's end held unread bytes)
            assert p.server.recv(100) == b""  # not a timeout
        p.client.settimeout(5)
        with contextlib.suppress(ConnectionResetError):
            while p.client.recv(1 << 16):  # what it holds, then the end: never a hang
                pass
    finally:
        p.close()
