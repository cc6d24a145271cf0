"""pcigate.wire.pg: bytes in, bytes out."""

from __future__ import annotations

import contextlib
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pcigate.errors import ProtocolError
from pcigate.wire import pg

# -- startup packets ----------------------------------------------------------------------------------------


def test_startup_roundtrip() -> None:
    data = pg.startup_message({"user": "alice", "database": "prod", "application_name": "psql"})
    pkt, n = pg.parse_startup(data + b"extra") or (None, 0)
    assert n == len(data)
    assert pkt == pg.StartupMessage(pg.PROTOCOL_3_0, {"user": "alice", "database": "prod",
                                                      "application_name": "psql"})


def test_startup_needs_more() -> None:
    data = pg.startup_message({"user": "a"})
    for i in range(len(data)):
        assert pg.parse_startup(data[:i]) is None


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (pg.ssl_request(), pg.SSLRequest()),
        (pg.gssenc_request(), pg.GSSENCRequest()),
        (pg.cancel_request(1234, -5), pg.CancelRequest(1234, -5)),
    ],
)
def test_special_requests(data: bytes, expected: object) -> None:
    assert pg.parse_startup(data) == (expected, len(data))


@pytest.mark.parametrize(
    "data",
    [
        b"\x00\x00\x00\x03xxxx",  # length too small
        (pg.MAX_STARTUP + 1).to_bytes(4, "big") + b"\x00\x03\x00\x00",  # over the cap
        b"\x00\x00\x00\x08\x00\x02\x00\x00",  # protocol 2
        b"\x00\x00\x00\x0c\x00\x03\x00\x00user",  # not terminated
        b"\x00\x00\x00\x0e\x00\x03\x00\x00user\x00\x00",  # odd strings
        b"\x00\x00\x00\x0c\x04\xd2\x16\x2f\x00\x00\x00\x00",  # SSLRequest with wrong length
    ],
)
def test_startup_malformed(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        pg.parse_startup(data)


@given(st.binary(max_size=200))
def test_startup_random_never_crashes(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        pg.parse_startup(data)


# -- typed messages -----------------------------------------------------------------------------------------

BACKEND = [t for t in pg.BACKEND_TYPES]
message_st = st.tuples(st.sampled_from(BACKEND), st.binary(max_size=300))


def _stream(msgs: list[tuple[int, bytes]]) -> bytes:
    return b"".join(pg.message(t, b) for t, b in msgs)


def _feed_chunked(sc: pg.MessageScanner, data: bytes, cuts: list[int]) -> list[pg.Message]:
    out: list[pg.Message] = []
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    for a, b in itertools.pairwise(points):
        out += sc.feed(data[a:b])
    return out


@settings(max_examples=300)
@given(st.lists(message_st, max_size=40), st.lists(st.integers(min_value=0, max_value=20000), max_size=30),
       st.sets(st.sampled_from(BACKEND)))
def test_any_chunking_gives_same_messages(msgs: list[tuple[int, bytes]], cuts: list[int],
                                          wanted: set[int]) -> None:
    data = _stream(msgs)
    sc = pg.MessageScanner(wanted, pg.BACKEND_TYPES)
    got = _feed_chunked(sc, data, cuts)
    assert [(m.type, m.body) for m in got] == [(t, b) for t, b in msgs if t in wanted]
    assert sc.at_boundary
    assert sc.offset == len(data)
    assert sc.skipped == sum(1 for t, _ in msgs if t not in wanted)
    assert sc.copy_bytes == sum(len(b) for t, b in msgs if t == ord("d") and t not in wanted)


@given(st.lists(message_st, min_size=1, max_size=10), st.integers(min_value=1, max_value=50),
       st.lists(st.integers(min_value=0, max_value=5000), max_size=10))
def test_keep_limit_truncates_body(msgs: list[tuple[int, bytes]], keep: int, cuts: list[int]) -> None:
    data = _stream(msgs)
    sc = pg.MessageScanner(range(256), pg.BACKEND_TYPES, keep=keep)
    got = _feed_chunked(sc, data, cuts)
    assert [(m.type, m.body, m.length, m.truncated) for m in got] == [
        (t, b[:keep], len(b), len(b) > keep) for t, b in msgs
    ]


@given(st.binary(max_size=2000), st.lists(st.integers(min_value=0, max_value=3000), max_size=10))
def test_random_bytes_only_protocol_error(data: bytes, cuts: list[int]) -> None:
    sc = pg.MessageScanner(b"QPBE", pg.FRONTEND_TYPES, keep=64)
    with contextlib.suppress(ProtocolError):
        _feed_chunked(sc, data, cuts)


def test_length_caps() -> None:
    sc = pg.MessageScanner(b"", pg.BACKEND_TYPES)
    with pytest.raises(ProtocolError, match="length"):
        sc.feed(b"D" + (pg.MAX_MESSAGE + 1).to_bytes(4, "big"))
    sc = pg.MessageScanner(b"", pg.BACKEND_TYPES)
    with pytest.raises(ProtocolError, match="length"):
        sc.feed(b"D\x00\x00\x00\x03")
    sc = pg.MessageScanner(b"", pg.FRONTEND_TYPES)
    with pytest.raises(ProtocolError, match="type"):
        sc.feed(b"Z\x00\x00\x00\x05I")


def test_large_body_skipped_without_buffering() -> None:
    sc = pg.MessageScanner(b"C", pg.BACKEND_TYPES)
    body_len = 10_000_000
    assert sc.feed(b"D" + (body_len + 4).to_bytes(4, "big") + b"x" * 100) == []
    for _ in range(body_len // 1_000_000 - 1):
        assert sc.feed(b"y" * 1_000_000) == []
    tail = b"z" * (1_000_000 - 100) + pg.command_complete("SELECT 1")
    assert [m.body for m in sc.feed(tail)] == [b"SELECT 1\x00"]


# -- bodies -------------------------------------------------------------------------------------------------


def test_parse_bind_execute_bodies() -> None:
    body = b"s1\x00select $1, $2\x00\x00\x02\x00\x00\x00\x17\x00\x00\x00\x19"
    p = pg.split_messages(pg.message(b"P", body))
    assert pg.parse_parse(p[0].body) == pg.Parse("s1", "select $1, $2", 2)
    bind = b"portal\x00s1\x00" + b"\x00\x01\x00\x00" + b"\x00\x02"
    bind += b"\x00\x00\x00\x011" + b"\xff\xff\xff\xff"
    assert pg.parse_bind(bind + b"\x00\x00") == pg.Bind("portal", "s1", 2, ())
    assert pg.parse_bind(bind + b"\x00\x01\x00\x01") == pg.Bind("portal", "s1", 2, (1,))
    assert pg.parse_bind(bind + b"\x00\x02\x00\x01\x00\x00") == pg.Bind("portal", "s1", 2, (1, 0))
    # cut short (the scanner keeps the head of a large Bind): the result formats are not known
    assert pg.parse_bind(bind[:-3]) == pg.Bind("portal", "s1", 2, None)
    assert pg.parse_bind(bind + b"\x00\x02\x00\x01") == pg.Bind("portal", "s1", 2, None)
    assert pg.parse_bind(b"p\x00s\x00\x00\x00\x00\x00") == pg.Bind("p", "s", 0, None)
    assert pg.parse_describe(b"Ss1\x00") == ("S", "s1")
    assert pg.parse_describe(b"P\x00") == ("P", "")
    with pytest.raises(ProtocolError):
        pg.parse_describe(b"X\x00")
    assert pg.parse_execute(b"portal\x00\x00\x00\x00\x00") == "portal"
    assert pg.parse_close(b"Ss1\x00") == ("S", "s1")
    assert pg.parse_parse(b"\x00select very lo") == pg.Parse("", "select very lo", None)  # truncated


@pytest.mark.parametrize(
    ("tag", "rows"),
    [("SELECT 3", 3), ("INSERT 0 5", 5), ("UPDATE 0", 0), ("COPY 2000000", 2000000), ("CREATE TABLE", None),
     ("BEGIN", None), ("", None), (None, None), ("FETCH 7", 7)],
)
def test_rows_from_tag(tag: str | None, rows: int | None) -> None:
    assert pg.rows_from_tag(tag) == rows


def test_error_response_roundtrip() -> None:
    msg = pg.error_response("08P01", "bad\x00bytes", severity="FATAL")
    (m,) = pg.split_messages(msg)
    assert m.tchar == "E"
    f = pg.parse_error_fields(m.body)
    assert f["C"] == "08P01"
    assert f["S"] == "FATAL"
    assert f["M"] == "bad bytes"


def test_auth_messages() -> None:
    (m,) = pg.split_messages(pg.auth_sasl(["SCRAM-SHA-256"]))
    a = pg.parse_auth(m.body)
    assert a.code == pg.AUTH_SASL
    assert pg.sasl_mechanisms(a.data) == ["SCRAM-SHA-256"]
    (m,) = pg.split_messages(pg.sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=abc"))
    assert pg.parse_sasl_initial_response(m.body) == ("SCRAM-SHA-256", b"n,,n=,r=abc")
    (m,) = pg.split_messages(pg.backend_key_data(42, -7))
    assert pg.parse_backend_key(m.body) == (42, -7)
    (m,) = pg.split_messages(pg.parameter_status("server_version", "15.2"))
    assert pg.parse_parameter_status(m.body) == ("server_version", "15.2")
    with pytest.raises(ProtocolError):
        pg.parse_auth(b"\x00")


copy_heavy_st = st.tuples(st.sampled_from([ord("d")] * 6 + [ord("C"), ord("Z"), ord("D"), ord("c")]),
                          st.binary(max_size=40))


@settings(max_examples=300)
@given(st.lists(copy_heavy_st, max_size=80), st.lists(st.integers(min_value=0, max_value=5000), max_size=30))
def test_copy_runs_counted_and_marked_under_any_chunking(msgs: list[tuple[int, bytes]],
                                                          cuts: list[int]) -> None:
    data = _stream(msgs)
    sc = pg.MessageScanner(b"CZ", pg.BACKEND_TYPES)
    got = _feed_chunked(sc, data, cuts)
    expect = []
    copied = 0
    for t, b in msgs:
        if t in b"CZ":
            expect.append((t, b, copied))
        elif t == ord("d"):
            copied += len(b)
    assert [(m.type, m.body, m.mark) for m in got] == expect
    assert sc.copy_bytes == copied
    assert sc.skipped == sum(1 for t, _ in msgs if t not in b"CZ")
    assert sc.at_boundary
