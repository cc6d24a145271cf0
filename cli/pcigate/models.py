"""Wire models of the broker API, shared by the CLI (client side) and the broker (server side).

This module is the API contract. Both sides import it; nothing here does I/O.
All timestamps are timezone-aware UTC datetimes. Durations are integer seconds.

Endpoints (all under ``/v1``, all need ``Authorization: Bearer <OIDC JWT>`` except ``/healthz``):

    GET  /healthz                              -> {"status": "ok"}
    GET  /v1/config/oidc                       -> OidcClientConfig  (unauthenticated)
    GET  /v1/whoami                            -> Identity
    GET  /v1/targets?include_policy=           -> list[TargetInfo]  (only targets the caller reaches; with
                                                  include_policy=true each level carries its DataPathPolicy)
    POST /v1/sessions          SessionCreate   -> SessionOpened  (201)
    POST /v1/sessions/{id}/heartbeat           -> SessionSummary
    POST /v1/sessions/{id}/end                 -> SessionSummary  (lease revoked now; idempotent)
    PUT  /v1/sessions/{id}/recording           -> RecordingReceipt (body streamed; X-Content-SHA256: hex;
                                                  same digest again -> 200, other digest -> 409)
    GET  /v1/sessions?user=&target=&since=&until=&limit=&cursor=
                                               -> SessionPage
    GET  /v1/sessions/{id}                     -> SessionSummary
    /v1/requests ...                           -> see pcigate.access_models (just-in-time access)
    GET  /v1/sessions/{id}/recording           -> the recording bytes, streamed (owner or auditor groups)

Errors: HTTP status + body ``{"error": {"code": <ErrorCode>, "message": <one line, no secrets>}}``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

ErrorCode = Literal[
    "unauthenticated",  # 401 no/garbled Authorization header
    "token_invalid",  # 401 signature/iss/aud/exp/nbf/alg check failed
    "forbidden",  # 403 caller may not do this (not in a group, not the owner)
    "level_not_allowed",  # 403 target reachable but not at this level
    "unknown_target",  # 404
    "not_found",  # 404 session or recording
    "session_closed",  # 409 heartbeat on an ended session
    "conflict",  # 409 a different recording already stored for the session
    "digest_mismatch",  # 422 uploaded bytes do not hash to X-Content-SHA256
    "recording_invalid",  # 422 the recording's own running digest chain or header is wrong
    "too_large",  # 413
    "validation_error",  # 422 request body/params invalid
    "vault_unavailable",  # 503 OpenBao/Vault unreachable or sealed
    "database_unavailable",  # 503
    "idp_unavailable",  # 503 the broker cannot reach the IdP to check tokens (cached keys still work)
    "grant_required",  # 403 the level is request-only and the caller holds no live grant for it
    "mfa_required",  # 403 the level needs a token that asserts MFA (amr/acr)
    "ssh_key_required",  # 422 an ssh target's session needs the client's ephemeral public key
    "internal",  # 500
]

ClientKind = Literal["human", "workload"]
TargetKind = Literal["postgres", "ssh"]
SessionStatus = Literal["active", "ended", "expired", "revoked"]

MAX_SESSION_SECONDS = 24 * 3600


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)


class ErrorDetail(_Model):
    code: ErrorCode
    message: str


class ErrorBody(_Model):
    error: ErrorDetail


class Identity(_Model):
    subject: str
    name: str | None = None
    email: str | None = None
    groups: list[str] = Field(default_factory=list)
    client_kind: ClientKind = "human"
    issuer: str
    expires_at: datetime
    amr: list[str] = Field(default_factory=list)  # authentication methods the IdP asserted (e.g. "mfa")
    acr: str | None = None


class LevelInfo(_Model):
    name: str
    max_ttl_seconds: int
    request_only: bool = False  # needs an approved access request (pcigate request) before connect
    approvals: str | None = None  # request-only level: who approves, e.g. "1 approval from dba-leads"
    policy: DataPathPolicy | None = None  # only with ``GET /v1/targets?include_policy=true``


class TargetInfo(_Model):
    name: str
    kind: TargetKind
    host: str
    port: int
    database: str | None = None
    description: str | None = None
    levels: list[LevelInfo]
    default_level: str


class SessionCreate(_Model):
    target: str = Field(min_length=1, max_length=128)
    level: str | None = Field(default=None, max_length=64)  # None: the target's default level
    ttl_seconds: int | None = Field(default=None, gt=0, le=MAX_SESSION_SECONDS)  # None: the level's cap
    client_hostname: str | None = Field(default=None, max_length=255)
    client_version: str | None = Field(default=None, max_length=64)
    # ssh targets: the CLI's ephemeral public key ("ssh-ed25519 AAAA..."), which the broker has signed
    public_key: str | None = Field(default=None, max_length=1024)
    kind: TargetKind | None = None  # set: the target must be of this kind (refused before any credential)
    port_forwarding: bool = False  # ssh: a port-forward session (-L), not a terminal


class DatabaseCredentials(_Model):
    """Dynamic credentials minted by OpenBao for this session only. Never logged, never written to disk."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    host: str
    port: int
    database: str
    username: str
    password: str = Field(repr=False)
    sslmode: Literal["disable", "prefer", "require", "verify-full"] = "prefer"


class SshCredentials(_Model):
    """A short-lived SSH user certificate for the CLI's ephemeral key, signed by the OpenBao SSH CA for this
    session, and how to reach and recognise the host. Nothing here is secret (the private key never leaves
    the CLI), but the certificate is only good with that key and only until ``valid_before``."""

    host: str
    port: int
    principal: str  # the login name (the first of the certificate's principals)
    principals: list[str]
    certificate: str  # "ssh-ed25519-cert-v01@openssh.com AAAA..."
    known_hosts: list[str]  # known_hosts lines for the host (its key, or "@cert-authority" for a host CA)
    serial: str  # the certificate's serial number (decimal)
    key_id: str
    valid_before: datetime


StatementClass = Literal[
    "read",  # SELECT / SHOW / EXPLAIN without ANALYZE of a write, and other statements that change nothing
    "write",  # INSERT / UPDATE / DELETE / MERGE (including data-modifying CTEs), COPY FROM
    "delete_without_where",  # DELETE with no WHERE clause (also inside a CTE)
    "update_without_where",  # UPDATE with no WHERE clause (also inside a CTE)
    "truncate",
    "drop_database",
    "drop_schema",
    "drop_table",  # DROP TABLE / VIEW / MATERIALIZED VIEW / FOREIGN TABLE
    "drop_other",  # any other DROP (index, function, role, ...)
    "ddl",  # CREATE / ALTER / COMMENT ... (schema changes other than the DROPs above)
    "alter_system",
    "grant",  # GRANT (privileges or role membership)
    "revoke",
    "role_admin",  # CREATE/ALTER/DROP ROLE|USER, SET ROLE, SET SESSION AUTHORIZATION
    "copy_program",  # COPY ... FROM/TO PROGRAM
    "copy_file",  # COPY ... FROM/TO a server-side file
    "do_block",  # DO $$ ... $$ (anonymous code: cannot be inspected)
    "call",  # CALL procedure
    "prepare",  # PREPARE (the prepared statement itself is classified too)
    "execute",  # EXECUTE of a prepared statement (classified as what was prepared)
    "transaction",  # BEGIN / COMMIT / ROLLBACK / SAVEPOINT
    "session",  # SET / RESET / DISCARD / LISTEN ...
    "unparseable",  # the parser refused the text: always denied while any guardrail rule is on
]


class ColumnMaskRule(_Model):
    """Redact or hash a named column. ``table`` is ``name`` or ``schema.name``; None matches any table."""

    column: str = Field(min_length=1, max_length=63)
    table: str | None = Field(default=None, max_length=130)
    action: Literal["redact", "hash"] = "redact"


class MaskingPolicy(_Model):
    """Inline masking of card data (PCI DSS 3.3/3.4) on screen and in the recording."""

    pan: Literal["truncate", "redact"] = "truncate"  # truncate: first 6 / last 4 kept, same length
    track_data: bool = True  # magnetic-stripe track 1/2 patterns fully redacted
    sensitive_columns: list[str] = Field(
        default_factory=lambda: ["cvv", "cvc", "cvv2", "cvc2", "cid", "security_code", "pin", "pin_block"]
    )  # columns (any table) whose values are fully redacted: CVV/CVC/CID, PIN blocks
    columns: list[ColumnMaskRule] = Field(default_factory=list)


class GuardrailRule(_Model):
    """Deny statements of the given classes (optionally only when they touch one of ``relations``)."""

    name: str = Field(min_length=1, max_length=64)
    deny: list[StatementClass] = Field(min_length=1)
    relations: list[str] = Field(default_factory=list)  # "table" or "schema.table"; empty: any relation
    message: str | None = Field(default=None, max_length=500)


class DataPathPolicy(_Model):
    """What the tunnel must apply; the CLI cannot loosen it (the broker decides it per target and level)."""

    record: bool = True
    masking: MaskingPolicy | None = None  # None: no masking
    guardrails: list[GuardrailRule] = Field(default_factory=list)
    digest: str = ""  # sha256 hex of the canonical JSON of the policy, stored in the recording header


class SessionOpened(_Model):
    session_id: str
    target: str
    level: str
    user: str
    started_at: datetime
    expires_at: datetime  # = started_at + min(asked, cap); the broker revokes at this time at the latest
    lease_id: str  # OpenBao lease id (not a secret: revoking needs a privileged token)
    heartbeat_seconds: int
    kind: TargetKind = "postgres"
    credentials: DatabaseCredentials | None = None  # postgres targets
    ssh: SshCredentials | None = None  # ssh targets
    policy: DataPathPolicy
    # base64url HMAC key for the policy's ``hash`` column rules (the same for every session on the target, so
    # hashed values join); only sent when the policy has such rules. A secret: never printed or stored.
    masking_key: str | None = Field(default=None, repr=False)


class GrantRef(_Model):
    """The grant a session ran under: which request, why, who approved it."""

    request_id: str
    reason: str
    approved_by: list[str]
    grant_ends_at: datetime | None = None


class SessionSummary(_Model):
    session_id: str
    user: str
    client_kind: ClientKind
    target: str
    level: str
    status: SessionStatus
    started_at: datetime
    expires_at: datetime
    ended_at: datetime | None = None
    end_reason: str | None = None  # "client", "expired", "heartbeat_lost", ...
    lease_id: str
    lease_revoked: bool
    recording_sha256: str | None = None
    recording_size: int | None = None
    client_hostname: str | None = None
    grant: GrantRef | None = None  # the access request a request-only level's session ran under
    # ssh sessions: the certificate the broker had OpenBao sign (sshd logs both with each login)
    cert_serial: str | None = None
    cert_key_id: str | None = None


class SessionPage(_Model):
    items: list[SessionSummary]
    next_cursor: str | None = None


class RecordingReceipt(_Model):
    session_id: str
    sha256: str
    size: int
    events: int
    already_stored: bool = False


class OidcClientConfig(_Model):
    """``GET /v1/config/oidc`` (unauthenticated): how a CLI signs in for this broker."""

    issuer: str
    client_id: str
    scopes: list[str]
    audience: str
