"""The test stack's OpenID Provider: npm ``oidc-provider`` (tests/stack/idp/server.mjs) run with node.

``start_idp()`` writes the provider's JSON config (fresh RS256 key generated here with joserfc, cookie keys,
clients, accounts), starts ``node server.mjs cfg.json`` on a free loopback port and waits for discovery.

Headless drivers (httpx, own cookie jar, no auto-redirect, posting the plain HTML forms of server.mjs):

* ``complete_auth_code(authorize_url, user, password)`` — what a person does in the browser the CLI opened;
* ``approve_device(user_code, user, password)`` — the device flow's verification page;
* ``workload_token(client_id, secret)`` — a CI/agent JWT from ``client_credentials``;
* ``mint(claims, key=..., alg=..., kid=...)`` — sign arbitrary claims (expired, wrong audience, forged...).

Clients:

* ``pcigate``: native public client (``token_endpoint_auth_method=none``, PKCE S256 enforced), redirect URI
  ``http://127.0.0.1/callback`` (any port: oidc-provider ignores the port of loopback redirect URIs of native
  clients, RFC 8252 §7.3), grants authorization_code, refresh_token, device_code. The ID token (aud
  ``pcigate``) carries ``groups``, ``email``, ``name``, ``preferred_username``.
* workload clients (``ci-bot``: groups ["dba"], ``ci-dev``: groups ["developers"]): confidential
  (client_secret_basic / client_secret_post), ``client_credentials`` only. Their access token is a JWT
  (``typ: at+jwt``) signed with the same issuer key: ``iss``, ``sub`` = client id, ``client_id``,
  ``aud`` = ``WORKLOAD_AUDIENCE`` (``urn:pcigate:broker``, goes into the broker's ``oidc.extra_audiences``),
  ``exp``, ``iat``, ``jti``, ``scope``, ``groups``, ``pcigate_workload: true``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import shutil
import subprocess
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
from joserfc import jwt
from joserfc.jwk import ECKey, OctKey, OKPKey, RSAKey

from tests.stack.ports import free_port, stop_process

IDP_DIR = Path(__file__).resolve().parent / "idp"
CLIENT_ID = "pcigate"
WORKLOAD_RESOURCE = "urn:pcigate:broker"
WORKLOAD_AUDIENCE = WORKLOAD_RESOURCE
REDIRECT_URI = "http://127.0.0.1/callback"
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
DEFAULT_SCOPES = ["openid", "profile", "email", "groups", "offline_access"]

Key = RSAKey | ECKey | OKPKey | OctKey


@dataclass(frozen=True)
class UserSpec:
    name: str
    email: str
    groups: list[str]


DEFAULT_USERS: dict[str, UserSpec] = {
    "alice": UserSpec("Alice Anders", "alice@example.test", ["dba"]),
    "bob": UserSpec("Bob Brown", "bob@example.test", ["developers"]),
    "carol": UserSpec("Carol Chen", "carol@example.test", ["dba", "approvers"]),
    "audrey": UserSpec("Audrey Auditor", "audrey@example.test", ["auditors"]),
}
DEFAULT_WORKLOADS: dict[str, list[str]] = {"ci-bot": ["dba"], "ci-dev": ["developers"]}


class IdpError(RuntimeError):
    """A headless flow did not go as a browser would expect (bad password, error page, unexpected page)."""


# ------------------------------------------------------------------------------------------------ HTML forms
@dataclass
class Form:
    id: str | None
    action: str
    method: str
    fields: dict[str, str]


class _FormParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.forms: list[Form] = []
        self.ids: set[str] = set()
        self.errors: list[str] = []
        self._in_form: Form | None = None
        self._error_depth = 0
        self._error_text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: (v or "") for k, v in attrs}
        if "id" in a:
            self.ids.add(a["id"])
        if "error" in a.get("class", "").split():
            self._error_depth = 1
            self._error_text = []
        elif self._error_depth:
            self._error_depth += 1
        if tag == "form":
            self._in_form = Form(a.get("id"), a.get("action", ""), a.get("method", "get").lower(), {})
            self.forms.append(self._in_form)
        elif tag == "input" and self._in_form is not None and a.get("name"):
            self._in_form.fields[a["name"]] = a.get("value", "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._in_form = None
        if self._error_depth:
            self._error_depth -= 1
            if self._error_depth == 0:
                self.errors.append(" ".join("".join(self._error_text).split()))

    def handle_data(self, data: str) -> None:
        if self._error_depth:
            self._error_text.append(data)


def parse_page(html: str) -> _FormParser:
    p = _FormParser()
    p.feed(html)
    p.close()
    return p


def pkce_pair() -> tuple[str, str]:
    """(code_verifier, S256 code_challenge)."""
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _origin(url: str) -> str:
    p = urllib.parse.urlsplit(url)
    return f"{p.scheme}://{p.netloc}"


def decode_unverified(token: str) -> dict[str, Any]:
    """The claims of a JWT without checking anything (for assertions in tests)."""
    payload = token.split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))))


def decode_header(token: str) -> dict[str, Any]:
    head = token.split(".")[0]
    return dict(json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4))))


# ------------------------------------------------------------------------------------------------------- Idp
@dataclass
class Idp:
    issuer: str
    port: int
    workdir: Path
    private_jwk: dict[str, Any] = field(repr=False)
    users: dict[str, str] = field(repr=False)  # name -> password
    user_specs: dict[str, UserSpec]
    workload_clients: dict[str, str] = field(repr=False)  # client id -> secret
    workload_groups: dict[str, list[str]]
    id_token_ttl: int
    client_id: str = CLIENT_ID
    workload_audience: str = WORKLOAD_AUDIENCE
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    _discovery: dict[str, Any] | None = field(default=None, repr=False)

    # ---- keys and discovery
    @property
    def kid(self) -> str:
        return str(self.private_jwk["kid"])

    @property
    def signing_key(self) -> RSAKey:
        return RSAKey.import_key(self.private_jwk)

    @property
    def public_jwks(self) -> dict[str, Any]:
        return {"keys": [self.signing_key.as_dict(private=False)]}

    @property
    def discovery(self) -> dict[str, Any]:
        if self._discovery is None:
            r = httpx.get(f"{self.issuer}/.well-known/openid-configuration", timeout=5)
            r.raise_for_status()
            self._discovery = dict(r.json())
        return self._discovery

    @property
    def token_endpoint(self) -> str:
        return str(self.discovery["token_endpoint"])

    @property
    def device_verification_url(self) -> str:
        return f"{self.issuer}/device"

    # ---- lifecycle
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        stop_process(self.proc)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    # ---- building requests like the CLI does
    def authorize_url(
        self,
        *,
        redirect_uri: str,
        code_challenge: str | None,
        state: str | None = None,
        nonce: str | None = None,
        scopes: list[str] | None = None,
        client_id: str | None = None,
        extra: dict[str, str] | None = None,
    ) -> str:
        params: dict[str, str] = {
            "response_type": "code",
            "client_id": client_id or self.client_id,
            "redirect_uri": redirect_uri,
            "scope": " ".join(scopes or DEFAULT_SCOPES),
            "state": state or secrets.token_urlsafe(12),
        }
        if nonce:
            params["nonce"] = nonce
        if code_challenge is not None:
            params["code_challenge"] = code_challenge
            params["code_challenge_method"] = "S256"
        params.update(extra or {})
        return f"{self.discovery['authorization_endpoint']}?{urllib.parse.urlencode(params)}"

    # ---- headless drivers
    def _browser(self) -> httpx.Client:
        return httpx.Client(follow_redirects=False, timeout=10,
                            headers={"User-Agent": "pcigate-tests/headless"})

    def _submit(self, browser: httpx.Client, base: str, form: Form, fields: dict[str, str]) -> httpx.Response:
        url = urllib.parse.urljoin(base, form.action or base)
        data = {**form.fields, **fields}
        if form.method == "post":
            return browser.post(url, data=data)
        return browser.get(url, params=data)

    def _answer(self, browser: httpx.Client, r: httpx.Response, user: str, password: str) -> httpx.Response:
        """Answer one HTML page of ours (login/consent) or raise."""
        page = parse_page(r.text)
        forms = {f.id: f for f in page.forms}
        if page.errors and "login" not in forms:
            raise IdpError(f"IdP error page: {'; '.join(page.errors)}")
        if "login" in forms:
            if page.errors and "login-error" in page.ids:
                raise IdpError(f"login refused for {user!r}: {'; '.join(page.errors)}")
            return self._submit(browser, str(r.url), forms["login"], {"username": user, "password": password})
        if "consent" in forms:
            return self._submit(browser, str(r.url), forms["consent"], {})
        raise IdpError(f"unexpected IdP page at {r.url}: {r.text[:300]!r}")

    def complete_auth_code(self, authorize_url: str, user: str, password: str | None = None, *,
                           deliver: bool = True, max_steps: int = 20) -> str:
        """Walk ``authorize_url`` through login + consent until the IdP redirects off the IdP (to the client's
        loopback ``redirect_uri``), then — unless ``deliver=False`` — GET that callback URL so the CLI's
        listener receives it. Returns the callback URL (``...?code=...&state=...`` or ``...?error=...``)."""
        password = self.users[user] if password is None else password
        issuer_origin = _origin(self.issuer)
        with self._browser() as browser:
            r = browser.get(authorize_url)
            for _ in range(max_steps):
                if r.is_redirect:
                    location = urllib.parse.urljoin(str(r.url), r.headers["location"])
                    if _origin(location) != issuer_origin:
                        if deliver:
                            deliver_callback(location)
                        return location
                    r = browser.get(location)
                    continue
                if r.status_code >= 400 and "html" not in r.headers.get("content-type", ""):
                    raise IdpError(f"IdP answered {r.status_code} at {r.url}: {r.text[:300]}")
                r = self._answer(browser, r, user, password)
            raise IdpError("too many steps in the authorization flow")

    def approve_device(self, user_code: str, user: str, password: str | None = None, *,
                       max_steps: int = 20) -> None:
        """Complete the device flow's verification page for ``user_code`` as ``user``."""
        password = self.users[user] if password is None else password
        issuer_origin = _origin(self.issuer)
        with self._browser() as browser:
            r = browser.get(self.device_verification_url)
            for _ in range(max_steps):
                if r.is_redirect:
                    location = urllib.parse.urljoin(str(r.url), r.headers["location"])
                    if _origin(location) != issuer_origin:
                        raise IdpError(f"device flow left the IdP: {location}")
                    r = browser.get(location)
                    continue
                page = parse_page(r.text)
                forms = {f.id: f for f in page.forms}
                if "device-success" in page.ids:
                    return
                if "op.deviceInputForm" in forms:
                    if page.errors:
                        raise IdpError(f"user code {user_code!r} refused: {'; '.join(page.errors)}")
                    r = self._submit(browser, str(r.url), forms["op.deviceInputForm"],
                                     {"user_code": user_code})
                    continue
                if "op.deviceConfirmForm" in forms:
                    r = self._submit(browser, str(r.url), forms["op.deviceConfirmForm"], {})
                    continue
                r = self._answer(browser, r, user, password)
            raise IdpError("too many steps in the device flow")

    # ---- token endpoint helpers
    def token_request(self, data: dict[str, str], auth: tuple[str, str] | None = None) -> httpx.Response:
        return httpx.post(self.token_endpoint, data=data, auth=auth, timeout=10)

    def login(self, user: str, password: str | None = None, *,
              scopes: list[str] | None = None) -> dict[str, Any]:
        """Authorization code + PKCE as the CLI does it, without a listener; returns the token response
        (``id_token``, ``access_token``, ``refresh_token``, ...)."""
        verifier, challenge = pkce_pair()
        redirect_uri = f"http://127.0.0.1:{free_port()}/callback"
        url = self.authorize_url(redirect_uri=redirect_uri, code_challenge=challenge, scopes=scopes)
        cb = self.complete_auth_code(url, user, password, deliver=False)
        q = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(cb).query))
        if "code" not in q:
            raise IdpError(f"no code in callback: {cb}")
        r = self.token_request({
            "grant_type": "authorization_code", "code": q["code"], "redirect_uri": redirect_uri,
            "code_verifier": verifier, "client_id": self.client_id,
        })
        if r.status_code != 200:
            raise IdpError(f"token exchange failed: {r.status_code} {r.text}")
        return dict(r.json())

    def id_token(self, user: str) -> str:
        """A fresh, real ID token for ``user`` (what the CLI sends to the broker as its bearer)."""
        return str(self.login(user)["id_token"])

    def workload_token(self, client_id: str = "ci-bot", secret: str | None = None) -> str:
        """A workload JWT via ``client_credentials`` (client_secret_basic)."""
        secret = self.workload_clients[client_id] if secret is None else secret
        r = self.token_request({"grant_type": "client_credentials"}, auth=(client_id, secret))
        if r.status_code != 200:
            raise IdpError(f"client_credentials failed: {r.status_code} {r.text}")
        return str(r.json()["access_token"])

    def mint(self, claims: dict[str, Any], *, key: Key | dict[str, Any] | bytes | str | None = None,
             alg: str = "RS256", kid: str | None = None, typ: str | None = "JWT",
             header: dict[str, Any] | None = None) -> str:
        """Sign arbitrary ``claims``: by default with the issuer's own key (so only the claims decide whether
        the broker accepts it: expired, wrong ``aud``/``iss``...), or with ``key`` (a joserfc key, a JWK dict,
        or bytes/str for HS*) for forged tokens. ``alg="none"`` yields an unsigned token."""
        hdr: dict[str, Any] = {"alg": alg}
        if typ:
            hdr["typ"] = typ
        if key is None and kid is None:
            kid = self.kid
        if kid is not None:
            hdr["kid"] = kid
        hdr.update(header or {})
        if alg == "none":
            body = _b64url(json.dumps(hdr).encode()) + "." + _b64url(json.dumps(claims).encode())
            return body + "."
        signing: Key
        if key is None:
            signing = self.signing_key
        elif isinstance(key, bytes | str):
            signing = OctKey.import_key(key if isinstance(key, bytes) else key.encode())
        elif isinstance(key, dict):
            signing = _import_jwk(key)
        else:
            signing = key
        return jwt.encode(hdr, claims, signing, algorithms=[alg])

    def claims_for(self, user: str, *, ttl: int = 300, **overrides: Any) -> dict[str, Any]:
        """ID-token-like claims for ``user`` (for ``mint``), overridable."""
        now = int(time.time())
        spec = self.user_specs[user]
        claims: dict[str, Any] = {
            "iss": self.issuer, "sub": user, "aud": self.client_id, "iat": now, "exp": now + ttl,
            "auth_time": now, "email": spec.email, "email_verified": True, "name": spec.name,
            "preferred_username": user, "groups": list(spec.groups),
        }
        claims.update(overrides)
        return claims


def _import_jwk(data: dict[str, Any]) -> Key:
    kty = data.get("kty")
    if kty == "RSA":
        return RSAKey.import_key(data)
    if kty == "EC":
        return ECKey.import_key(data)
    if kty == "OKP":
        return OKPKey.import_key(data)
    if kty == "oct":
        return OctKey.import_key(data)
    raise ValueError(f"unsupported JWK kty {kty!r}")


def new_rsa_key(kid: str | None = None) -> RSAKey:
    """A fresh RS256 signing key (e.g. for forged tokens)."""
    return RSAKey.generate_key(
        2048, parameters={"kid": kid or secrets.token_hex(8), "use": "sig", "alg": "RS256"}, private=True
    )


def deliver_callback(url: str, timeout: float = 10.0) -> None:
    """GET the loopback callback like a browser would; the CLI's listener answers (any status is fine)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            httpx.get(url, timeout=timeout, follow_redirects=False)
            return
        except httpx.ConnectError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


_npm_lock = threading.Lock()


def ensure_node_modules() -> None:
    """``npm ci`` in tests/stack/idp when node_modules is missing (fresh clone)."""
    with _npm_lock:
        if (IDP_DIR / "node_modules" / "oidc-provider" / "package.json").exists():
            return
        npm = shutil.which("npm")
        if npm is None:
            raise RuntimeError("npm not found: Node.js 20+ is needed for the test IdP")
        subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=IDP_DIR, check=True,
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=600)


def start_idp(
    workdir: Path,
    port: int | None = None,
    id_token_ttl: int = 300,
    *,
    access_token_ttl: int = 300,
    refresh_token_ttl: int = 86400,
    workload_ttl: int = 300,
    device_interval: int = 1,
    users: dict[str, UserSpec] | None = None,
    passwords: dict[str, str] | None = None,
    workloads: dict[str, list[str]] | None = None,
    timeout: float = 20.0,
) -> Idp:
    """Start the IdP in ``workdir`` (config ``idp.json``, log ``idp.log``). ~0.5 s."""
    ensure_node_modules()
    node = shutil.which("node")
    if node is None:
        raise RuntimeError("node not found: Node.js 20+ is needed for the test IdP")
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    issuer = f"http://127.0.0.1:{port}"
    users = dict(DEFAULT_USERS if users is None else users)
    pw = {name: (passwords or {}).get(name) or f"{name}-{secrets.token_urlsafe(9)}" for name in users}
    workloads = dict(DEFAULT_WORKLOADS if workloads is None else workloads)
    workload_secrets = {cid: secrets.token_urlsafe(24) for cid in workloads}
    key = new_rsa_key()
    private_jwk = key.as_dict(private=True)
    clients: list[dict[str, Any]] = [{
        "client_id": CLIENT_ID,
        "client_name": "pcigate CLI",
        "application_type": "native",
        "token_endpoint_auth_method": "none",
        "redirect_uris": [REDIRECT_URI],
        "response_types": ["code"],
        "grant_types": ["authorization_code", "refresh_token", DEVICE_GRANT],
    }]
    for cid, secret in workload_secrets.items():
        clients.append({
            "client_id": cid,
            "client_secret": secret,
            "client_name": f"workload {cid}",
            "token_endpoint_auth_method": "client_secret_basic",
            "redirect_uris": [],
            "response_types": [],
            "grant_types": ["client_credentials"],
        })
    cfg = {
        "issuer": issuer,
        "port": port,
        "jwks": {"keys": [private_jwk]},
        "cookie_keys": [secrets.token_urlsafe(32)],
        "ttl": {
            "id_token": id_token_ttl, "access_token": access_token_ttl, "refresh_token": refresh_token_ttl,
            "client_credentials": workload_ttl, "device_code": 600,
        },
        "clients": clients,
        "device_interval": device_interval,
        "accounts": {
            name: {"password": pw[name], "name": spec.name, "email": spec.email, "groups": spec.groups}
            for name, spec in users.items()
        },
        "workload": {
            "resource": WORKLOAD_RESOURCE, "audience": WORKLOAD_AUDIENCE, "ttl": workload_ttl,
            "clients": {cid: {"groups": groups} for cid, groups in workloads.items()},
        },
    }
    cfg_path = workdir / "idp.json"
    cfg_path.touch(mode=0o600)
    cfg_path.write_text(json.dumps(cfg, indent=2))
    log_path = workdir / "idp.log"
    log = open(log_path, "ab")  # noqa: SIM115 - handed to the child
    env = {**os.environ, "NODE_ENV": "production", "NODE_NO_WARNINGS": "1"}
    proc = subprocess.Popen([node, str(IDP_DIR / "server.mjs"), str(cfg_path)], cwd=IDP_DIR, stdout=log,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                            start_new_session=True)  # Ctrl-C goes to the test process, which stops us
    log.close()
    idp = Idp(issuer=issuer, port=port, workdir=workdir, private_jwk=private_jwk, users=pw, user_specs=users,
              workload_clients=workload_secrets, workload_groups=workloads, id_token_ttl=id_token_ttl,
              proc=proc, log_path=log_path)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"IdP exited with {proc.returncode}:\n{idp.log()[-2000:]}")
        try:
            r = httpx.get(f"{issuer}/.well-known/openid-configuration", timeout=1)
            if r.status_code == 200:
                idp._discovery = dict(r.json())
                return idp
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            idp.stop()
            raise RuntimeError(f"IdP not ready after {timeout}s:\n{idp.log()[-2000:]}")
        time.sleep(0.03)
