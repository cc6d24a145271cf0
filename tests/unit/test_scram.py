"""pcigate.wire.scram against RFC 7677 and PostgreSQL's own verifier format."""

from __future__ import annotations

import base64
import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pcigate.wire import scram

# RFC 7677 section 3
C_NONCE = "rOprNGfwEbeRWgbNEkqO"
S_NONCE = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
SALT = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
CLIENT_FIRST = b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
SERVER_FIRST = b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
CLIENT_FINAL = (b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
                b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
SERVER_FINAL = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="


def test_rfc7677_client() -> None:
    c = scram.ScramClient("user", "pencil", nonce=C_NONCE)
    assert c.first() == CLIENT_FIRST
    assert c.final(SERVER_FIRST) == CLIENT_FINAL
    c.verify(SERVER_FINAL)
    assert c.done


def test_rfc7677_server() -> None:
    keys = scram.ScramKeys.from_password("pencil", SALT, 4096)
    s = scram.ScramServer(keys, nonce=S_NONCE)
    assert s.first(CLIENT_FIRST) == SERVER_FIRST
    assert s.final(CLIENT_FINAL) == SERVER_FINAL
    assert s.authenticated


def test_client_rejects_bad_server_signature() -> None:
    c = scram.ScramClient("user", "pencil", nonce=C_NONCE)
    c.first()
    c.final(SERVER_FIRST)
    with pytest.raises(scram.ScramError):
        c.verify(b"v=" + base64.b64encode(b"x" * 32))
    with pytest.raises(scram.ScramError):
        c.verify(b"e=invalid-proof")


def test_client_rejects_foreign_nonce() -> None:
    c = scram.ScramClient("user", "pencil", nonce=C_NONCE)
    c.first()
    with pytest.raises(scram.ScramError):
        c.final(b"r=someoneelse,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096")


def test_server_rejects_wrong_password() -> None:
    keys = scram.ScramKeys.from_password("right", iterations=64)
    s = scram.ScramServer(keys)
    c = scram.ScramClient("ignored", "wrong")
    sf = s.first(c.first())
    with pytest.raises(scram.ScramError, match="password authentication failed"):
        s.final(c.final(sf))
    assert not s.authenticated


def test_salted_cache_reused() -> None:
    cache: dict[tuple[bytes, int], bytes] = {}
    keys = scram.ScramKeys.from_password("pw", iterations=64)
    for _ in range(3):
        s = scram.ScramServer(keys)
        c = scram.ScramClient("", "pw", salted_cache=cache)
        c.verify(s.final(c.final(s.first(c.first()))))
    assert len(cache) == 1


@settings(max_examples=30, deadline=None)
@given(st.text(min_size=1, max_size=30), st.text(max_size=10))
def test_roundtrip_any_password(password: str, user: str) -> None:
    keys = scram.ScramKeys.from_password(password, iterations=16)
    s = scram.ScramServer(keys)
    c = scram.ScramClient(user, password)
    c.verify(s.final(c.final(s.first(c.first()))))
    assert s.authenticated
    assert c.done


@given(st.binary(max_size=200))
def test_server_random_input_only_scram_error(data: bytes) -> None:
    s = scram.ScramServer(scram.ScramKeys.from_password("x", iterations=1))
    for step in (s.first, s.final):
        with contextlib.suppress(scram.ScramError):
            step(data)


def test_verifier_format_matches_postgres() -> None:
    keys = scram.ScramKeys.from_password("pencil", SALT, 4096)
    v = keys.verifier()
    assert v.startswith("SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$")


def test_saslprep() -> None:
    assert scram.saslprep("I\u00adX") == "IX"  # soft hyphen mapped to nothing
    assert scram.saslprep("\u2168") == "IX"  # NFKC
    assert scram.saslprep("a\u0007b") == "a\u0007b"  # prohibited -> raw


def test_md5() -> None:
    # PostgreSQL: md5(md5(password || user) || salt)
    import hashlib

    inner = hashlib.md5(b"secretalice").hexdigest()
    expect = b"md5" + hashlib.md5(inner.encode() + b"\x01\x02\x03\x04").hexdigest().encode()
    assert scram.md5_password("alice", "secret", b"\x01\x02\x03\x04") == expect
