"""SCRAM-SHA-256 (RFC 5802 / RFC 7677) client and server maths, and PostgreSQL's md5 password hash. No I/O.

PostgreSQL specifics: the user name inside the SCRAM exchange is ignored (libpq sends ``n=``), channel binding
is not used (``n,,`` / ``y,,``; we never offer ``SCRAM-SHA-256-PLUS``), and passwords are SASLprep'ed when
they are valid for it and used raw otherwise (what libpq and the server both do).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import stringprep
import unicodedata
from dataclasses import dataclass

from pcigate.errors import ProtocolError

MECHANISM = "SCRAM-SHA-256"
DEFAULT_ITERATIONS = 4096
NONCE_BYTES = 18


class ScramError(ProtocolError):
    """A SCRAM exchange failed (malformed message, wrong proof, wrong server signature)."""


def saslprep(s: str) -> str:
    """RFC 4013 SASLprep; on a prohibited or invalid string returns the input unchanged (as PostgreSQL)."""
    mapped = "".join(
        " " if stringprep.in_table_c12(c) else c for c in s if not stringprep.in_table_b1(c)
    )
    norm = unicodedata.normalize("NFKC", mapped)
    if not norm:
        return s
    prohibited = (
        stringprep.in_table_c12, stringprep.in_table_c21_c22, stringprep.in_table_c3, stringprep.in_table_c4,
        stringprep.in_table_c5, stringprep.in_table_c6, stringprep.in_table_c7, stringprep.in_table_c8,
        stringprep.in_table_c9, stringprep.in_table_a1,
    )
    for c in norm:
        if any(p(c) for p in prohibited):
            return s
    if any(stringprep.in_table_d1(c) for c in norm):
        if not (stringprep.in_table_d1(norm[0]) and stringprep.in_table_d1(norm[-1])):
            return s
        if any(stringprep.in_table_d2(c) for c in norm):
            return s
    return norm


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.digest(key, msg, "sha256")


def _h(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(len(a), "big")


def salted_password(password: str, salt: bytes, iterations: int) -> bytes:
    return hashlib.pbkdf2_hmac("sha256", saslprep(password).encode(), salt, iterations)


@dataclass(frozen=True)
class ScramKeys:
    """What a server stores (PostgreSQL's ``SCRAM-SHA-256$iter:salt$StoredKey:ServerKey``)."""

    salt: bytes
    iterations: int
    stored_key: bytes
    server_key: bytes

    @classmethod
    def from_password(cls, password: str, salt: bytes | None = None,
                      iterations: int = DEFAULT_ITERATIONS) -> ScramKeys:
        salt = secrets.token_bytes(16) if salt is None else salt
        sp = salted_password(password, salt, iterations)
        return cls(salt, iterations, _h(_hmac(sp, b"Client Key")), _hmac(sp, b"Server Key"))

    def verifier(self) -> str:
        b64 = base64.b64encode
        return (f"SCRAM-SHA-256${self.iterations}:{b64(self.salt).decode()}$"
                f"{b64(self.stored_key).decode()}:{b64(self.server_key).decode()}")


def _attrs(msg: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in msg.split(","):
        if len(part) < 2 or part[1] != "=":
            raise ScramError("malformed SCRAM message")
        out.setdefault(part[0], part[2:])
    return out


def _b64d(s: str) -> bytes:
    try:
        return base64.b64decode(s.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError) as e:
        raise ScramError("malformed base64 in SCRAM message") from e


def _valid_nonce(n: str) -> bool:
    return bool(n) and all(0x21 <= ord(c) <= 0x7E and c != "," for c in n)


class ScramClient:
    """Client side: ``first()`` → server-first → ``final(server_first)`` → server-final → ``verify(...)``.

    ``salted_cache`` (dict keyed by (salt, iterations)) lets a caller reuse the PBKDF2 result across
    connections for the same password (the tunnel logs in many times with one credential).
    """

    def __init__(self, username: str, password: str, *, nonce: str | None = None,
                 salted_cache: dict[tuple[bytes, int], bytes] | None = None) -> None:
        self._password = password
        self._user = username.replace("=", "=3D").replace(",", "=2C")
        self._nonce = nonce or base64.b64encode(secrets.token_bytes(NONCE_BYTES)).decode()
        self._cache = salted_cache
        self._first_bare = ""
        self._server_sig = b""
        self.done = False

    def first(self) -> bytes:
        self._first_bare = f"n={self._user},r={self._nonce}"
        return ("n,," + self._first_bare).encode()

    def final(self, server_first: bytes) -> bytes:
        try:
            sf = server_first.decode("ascii")
        except UnicodeDecodeError as e:
            raise ScramError("non-ASCII server-first-message") from e
        a = _attrs(sf)
        if "m" in a:
            raise ScramError("SCRAM extension not supported")
        nonce, salt_b64, it = a.get("r", ""), a.get("s", ""), a.get("i", "")
        if not nonce.startswith(self._nonce) or len(nonce) <= len(self._nonce) or not _valid_nonce(nonce):
            raise ScramError("server nonce does not extend the client nonce")
        if not it.isdigit() or not 0 < int(it) <= 10_000_000:
            raise ScramError("invalid SCRAM iteration count")
        salt = _b64d(salt_b64)
        iterations = int(it)
        key = (salt, iterations)
        sp = self._cache.get(key) if self._cache is not None else None
        if sp is None:
            sp = salted_password(self._password, salt, iterations)
            if self._cache is not None:
                self._cache[key] = sp
        client_key = _hmac(sp, b"Client Key")
        stored_key = _h(client_key)
        without_proof = f"c=biws,r={nonce}"
        auth_msg = f"{self._first_bare},{sf},{without_proof}".encode()
        sig = _hmac(stored_key, auth_msg)
        proof = _xor(client_key, sig)
        self._server_sig = _hmac(_hmac(sp, b"Server Key"), auth_msg)
        return f"{without_proof},p={base64.b64encode(proof).decode()}".encode()

    def verify(self, server_final: bytes) -> None:
        try:
            a = _attrs(server_final.decode("ascii"))
        except UnicodeDecodeError as e:
            raise ScramError("non-ASCII server-final-message") from e
        if "e" in a:
            raise ScramError(f"server refused SCRAM: {a['e'][:100]}")
        if not self._server_sig or not hmac.compare_digest(_b64d(a.get("v", "")), self._server_sig):
            raise ScramError("invalid SCRAM server signature")
        self.done = True


class ScramServer:
    """Server side against stored :class:`ScramKeys`: ``first(client_first)`` → server-first;
    ``final(client_final)`` → server-final (raises ScramError on a wrong proof; compares in constant time).
    The user name in the client-first-message is ignored."""

    def __init__(self, keys: ScramKeys, *, nonce: str | None = None) -> None:
        self._keys = keys
        self._snonce = nonce or base64.b64encode(secrets.token_bytes(NONCE_BYTES)).decode()
        self._nonce = ""
        self._gs2 = ""
        self._first_bare = ""
        self._server_first = ""
        self.authenticated = False

    def first(self, client_first: bytes) -> bytes:
        try:
            cf = client_first.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ScramError("invalid client-first-message") from e
        parts = cf.split(",", 2)
        if len(parts) != 3 or parts[0] not in ("n", "y") or parts[1] != "":
            raise ScramError("unsupported SCRAM channel binding or authzid")
        self._gs2 = parts[0] + ",,"
        self._first_bare = parts[2]
        a = _attrs(self._first_bare)
        if "m" in a:
            raise ScramError("SCRAM extension not supported")
        cnonce = a.get("r", "")
        if not _valid_nonce(cnonce):
            raise ScramError("invalid client nonce")
        self._nonce = cnonce + self._snonce
        k = self._keys
        self._server_first = f"r={self._nonce},s={base64.b64encode(k.salt).decode()},i={k.iterations}"
        return self._server_first.encode()

    def final(self, client_final: bytes) -> bytes:
        if not self._server_first:
            raise ScramError("SCRAM exchange out of order")
        try:
            cf = client_final.decode("ascii")
        except UnicodeDecodeError as e:
            raise ScramError("invalid client-final-message") from e
        idx = cf.rfind(",p=")
        if idx < 0:
            raise ScramError("client proof missing")
        without_proof = cf[:idx]
        a = _attrs(without_proof)
        if a.get("c", "") != base64.b64encode(self._gs2.encode()).decode():
            raise ScramError("SCRAM channel binding mismatch")
        if not hmac.compare_digest(a.get("r", "").encode(), self._nonce.encode()):
            raise ScramError("SCRAM nonce mismatch")
        proof = _b64d(cf[idx + 3 :])
        if len(proof) != 32:
            raise ScramError("invalid client proof")
        auth_msg = f"{self._first_bare},{self._server_first},{without_proof}".encode()
        sig = _hmac(self._keys.stored_key, auth_msg)
        client_key = _xor(proof, sig)
        if not hmac.compare_digest(_h(client_key), self._keys.stored_key):
            raise ScramError("password authentication failed")
        self.authenticated = True
        return f"v={base64.b64encode(_hmac(self._keys.server_key, auth_msg)).decode()}".encode()


def md5_password(user: str, password: str, salt: bytes) -> bytes:
    """PostgreSQL's md5 auth response: ``"md5" + md5(md5(password + user) + salt)``, NUL not included."""
    inner = hashlib.md5((password + user).encode(), usedforsecurity=False).hexdigest().encode()
    return b"md5" + hashlib.md5(inner + salt, usedforsecurity=False).hexdigest().encode()
