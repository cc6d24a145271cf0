"""``broker.toml``: the broker's whole configuration, validated with pydantic v2 (docs/configuration.md).

``load_settings(path)`` reads the TOML file (tomllib), validates it and resolves secrets (the OpenBao token
from
``vault.token_file`` or ``PCIGATE_BROKER_VAULT_TOKEN``; the AppRole secret id from ``vault.secret_id_file`` or
``PCIGATE_BROKER_VAULT_SECRET_ID``). Every problem is reported as one line naming the key, collected in a
:class:`ConfigError`. Secrets are held in ``SecretStr`` and never appear in ``repr`` or error messages.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from pcigate.models import MAX_SESSION_SECONDS, GuardrailRule, MaskingPolicy
from pcigate.net import is_loopback

TOKEN_ENV = "PCIGATE_BROKER_VAULT_TOKEN"
MASKING_KEY_ENV = "PCIGATE_BROKER_MASKING_KEY"
MIN_MASKING_KEY_BYTES = 32
SECRET_ID_ENV = "PCIGATE_BROKER_VAULT_SECRET_ID"

_DURATION = re.compile(r"^\s*(\d+)\s*([smhd]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class ConfigError(Exception):
    """The configuration is invalid. ``problems`` holds one line per problem, each naming the key."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def parse_duration(value: object) -> int:
    """``"90s"``, ``"30m"``, ``"8h"``, ``"1d"`` or integer seconds → seconds."""
    if isinstance(value, bool):
        raise PydanticCustomError("duration", 'expected a duration like "30m"')
    if isinstance(value, int):
        if value < 0:
            raise PydanticCustomError("duration", "a duration cannot be negative")
        return value
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            return int(m.group(1)) * _UNITS[m.group(2)]
    raise PydanticCustomError("duration", 'expected a duration like "30m"')


Duration = Annotated[int, BeforeValidator(parse_duration)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerSettings(_Section):
    listen: str = "127.0.0.1:8600"
    public_url: str | None = None
    max_recording_bytes: int = Field(default=1 << 30, gt=0)
    # Additions to the documented schema: TLS for a non-loopback listener.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None

    @property
    def host(self) -> str:
        return self.listen.rsplit(":", 1)[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rsplit(":", 1)[1])

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        host, sep, port = v.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise PydanticCustomError("listen", 'expected "host:port", e.g. "127.0.0.1:8600"')
        return v

    @model_validator(mode="after")
    def _loopback_or_tls(self) -> ServerSettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise PydanticCustomError("tls", "tls_cert_file and tls_key_file go together")
        if self.tls_cert_file is None and not is_loopback(self.host):
            raise PydanticCustomError(
                "listen", "refusing a non-loopback listen address without tls_cert_file/tls_key_file"
            )
        return self


class OidcSettings(_Section):
    issuer: str
    audience: str
    client_id: str | None = None
    extra_audiences: list[str] = Field(default_factory=list)
    groups_claim: str = "groups"
    algorithms: list[str] = Field(default_factory=lambda: ["RS256", "ES256", "EdDSA"])
    scopes: list[str] = Field(
        default_factory=lambda: ["openid", "profile", "email", "groups", "offline_access"]
    )
    workload_claim: str = "pcigate_workload"
    leeway_seconds: int = Field(default=30, ge=0, le=300)
    jwks_cache_seconds: int = Field(default=300, ge=0)
    # Additions: an unknown kid refetches the JWKS at most once per this many seconds; IdP HTTP timeout.
    jwks_min_refetch_seconds: int = Field(default=10, ge=0)
    http_timeout_seconds: float = Field(default=5.0, gt=0)

    @property
    def effective_client_id(self) -> str:
        return self.client_id or self.audience

    @property
    def audiences(self) -> list[str]:
        return [self.audience, *self.extra_audiences]

    @field_validator("issuer")
    @classmethod
    def _issuer(cls, v: str) -> str:
        if not v.startswith(("https://", "http://")):
            raise PydanticCustomError("issuer", "expected an http(s) URL")
        return v

    @field_validator("algorithms")
    @classmethod
    def _algorithms(cls, v: list[str]) -> list[str]:
        if not v:
            raise PydanticCustomError("algorithms", "at least one algorithm is required")
        for alg in v:
            if alg.lower() == "none" or alg.upper().startswith("HS"):
                raise PydanticCustomError(
                    "algorithms", "{alg} is never accepted (no 'none', no HMAC algorithms)", {"alg": alg}
                )
            if alg not in ALLOWED_ASYMMETRIC:
                raise PydanticCustomError(
                    "algorithms",
                    "unsupported algorithm {alg}; choose from {known}",
                    {"alg": alg, "known": ", ".join(sorted(ALLOWED_ASYMMETRIC))},
                )
        return v


ALLOWED_ASYMMETRIC = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA", "Ed25519"}
)


class VaultSettings(_Section):
    address: str = "http://127.0.0.1:8200"
    auth: Literal["token", "approle"] = "token"
    token_file: Path | None = None
    role_id: str | None = None
    secret_id_file: Path | None = None
    approle_mount: str = "approle"  # addition
    timeout_seconds: float = Field(default=5, gt=0)
    # Resolved at load time (not TOML keys; the loader fills them from the file / environment).
    token: SecretStr | None = Field(default=None, exclude=True)
    secret_id: SecretStr | None = Field(default=None, exclude=True)


class StorageSettings(_Section):
    database_url: str = "sqlite:///var/lib/pcigate/broker.db"
    recordings_dir: Path = Path("/var/lib/pcigate/recordings")

    @field_validator("database_url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v.startswith(("sqlite:", "postgresql")):
            raise PydanticCustomError("database_url", "expected sqlite:///PATH or postgresql+psycopg://...")
        return v


class SessionSettings(_Section):
    heartbeat_seconds: Duration = 30
    heartbeat_grace_seconds: Duration = 120
    reaper_interval_seconds: Duration = 10

    @model_validator(mode="after")
    def _grace(self) -> SessionSettings:
        if self.heartbeat_seconds <= 0:
            raise PydanticCustomError("duration", "heartbeat_seconds must be positive")
        if self.heartbeat_grace_seconds <= self.heartbeat_seconds:
            raise PydanticCustomError("duration", "heartbeat_grace_seconds must exceed heartbeat_seconds")
        if self.reaper_interval_seconds <= 0:
            raise PydanticCustomError("duration", "reaper_interval_seconds must be positive")
        return self


class AuditorSettings(_Section):
    groups: list[str] = Field(default_factory=list)


class WebhookSettings(_Section):
    """An outgoing webhook for access requests (created, approved, denied, expired, cancelled, revoked)."""

    url: str
    format: Literal["slack", "generic"] = "generic"
    secret_file: Path | None = None  # HMAC-SHA256 key for the X-Pcigate-Signature header
    events: list[str] = Field(default_factory=lambda: ["request.created", "request.decided"])
    timeout_seconds: float = Field(default=5.0, gt=0, le=60)
    max_attempts: int = Field(default=6, ge=1, le=20)
    secret: SecretStr | None = Field(default=None, exclude=True)  # resolved from secret_file at load time

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v.startswith(("https://", "http://")):
            raise PydanticCustomError("url", "expected an http(s) URL")
        return v


class SiemSettings(_Section):
    """Continuous forwarding of the sealed audit log to a SIEM, at least once, from a persistent cursor."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")  # the cursor's key: keep it when editing the rest
    kind: Literal["https", "syslog"]
    url: str | None = None  # https: the endpoint that takes NDJSON POSTs
    secret_file: Path | None = None  # https: HMAC-SHA256 key for X-Pcigate-Signature (as the webhooks)
    host: str | None = None  # syslog: RFC 5424 over TCP, octet-counted (RFC 6587)
    port: int = Field(default=6514, gt=0, lt=65536)
    tls: bool = True  # syslog over TLS (RFC 5425); false only for a loopback collector
    ca_file: Path | None = None  # syslog TLS: trust this CA instead of the system's
    batch: int = Field(default=500, ge=1, le=10000)
    timeout_seconds: float = Field(default=10.0, gt=0, le=120)
    secret: SecretStr | None = Field(default=None, exclude=True)

    @model_validator(mode="after")
    def _target(self) -> SiemSettings:
        if self.kind == "https":
            if not self.url or not self.url.startswith(("https://", "http://")):
                raise PydanticCustomError("siem", "kind = \"https\" needs url = \"https://...\"")
            if self.url.startswith("http://") and not is_loopback(self.url.split("/")[2].rsplit(":", 1)[0]):
                raise PydanticCustomError("siem", "plain http:// only to a loopback collector")
        elif not self.host:
            raise PydanticCustomError("siem", "kind = \"syslog\" needs host")
        elif not self.tls and not is_loopback(self.host):
            raise PydanticCustomError("siem", "syslog without TLS only to a loopback collector")
        return self


class AuditSettings(_Section):
    """The tamper-evident audit log (docs/configuration.md, "Audit log")."""

    forward: list[SiemSettings] = Field(default_factory=list)
    forward_interval_seconds: Duration = 5

    signing_key_file: Path | None = None  # ed25519 private key (PEM, PKCS#8) that signs the checkpoints
    checkpoint_seconds: Duration = 300  # a signed checkpoint at most this often (when there are new events)
    # PCI DSS 10.5.1: keep audit history at least 12 months. Events and recordings older than this are
    # deleted by the retention job, which leaves a signed checkpoint at the cut (needs signing_key_file).
    retention: Duration = 365 * 86400
    allow_short_retention: bool = False  # the only way to set a retention under 365 days
    retention_check_seconds: Duration = 3600  # how often the reaper looks for something past retention

    @model_validator(mode="after")
    def _retention(self) -> AuditSettings:
        if self.retention < 365 * 86400 and not self.allow_short_retention:
            raise PydanticCustomError(
                "retention", "retention under 365 days needs allow_short_retention = true (PCI DSS 10.5.1)")
        if self.retention <= 0 or self.retention_check_seconds <= 0:
            raise PydanticCustomError("retention", "retention and retention_check_seconds must be positive")
        return self


class MaskingKeySettings(_Section):
    """The deployment's secret for keyed-hash column rules (``action = "hash"``): at least 32 bytes, from
    ``key_file`` or ``PCIGATE_BROKER_MASKING_KEY``. Each target gets its own key derived from it."""

    key_file: Path | None = None
    key: SecretStr | None = Field(default=None, exclude=True)  # resolved at load time


class NotificationSettings(_Section):
    webhooks: list[WebhookSettings] = Field(default_factory=list)


def _unique_rule_names(rules: list[GuardrailRule], where: str) -> None:
    seen: set[str] = set()
    for rule in rules:
        if rule.name in seen:
            raise PydanticCustomError(
                "guardrails",
                "duplicate guardrail rule name {name}{where}",
                {"name": repr(rule.name), "where": where},
            )
        seen.add(rule.name)


class RequestPolicy(_Section):
    """Makes a level request-only (just-in-time): using it needs a grant, approved by someone else.

    Who may *request* the level is who the ``[[access]]`` rules give it to; this table says who approves and
    how. ``approvals`` of the members of ``approver_groups`` (distinct people, never the requester) approve a
    request; with ``one_per_group`` there must be one approval from each group instead. One denial by an
    approver ends it.
    """

    approver_groups: list[str] = Field(min_length=1)
    approvals: int = Field(default=1, ge=1, le=10)
    one_per_group: bool = False
    reason_required: bool = True
    reason_pattern: str | None = None  # a regular expression the whole reason must match, e.g. "^INC-[0-9]+$"
    max_duration: Duration = 3600
    pending_ttl: Duration = 3600  # how long a request waits for its decision before it expires
    require_mfa: bool = False  # the requester's token must assert MFA (amr "mfa"/"otp"/"hwk"/... or an acr)
    mfa_amr: list[str] = Field(default_factory=lambda: ["mfa", "otp", "hwk", "swk", "sms", "fpt", "face"])
    mfa_acr: list[str] = Field(default_factory=list)  # acr values that also count as MFA

    @field_validator("reason_pattern")
    @classmethod
    def _pattern(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as exc:
                raise PydanticCustomError(
                    "pattern", "not a regular expression: {err}", {"err": str(exc)}
                ) from None
        return v

    @model_validator(mode="after")
    def _durations(self) -> RequestPolicy:
        if not 0 < self.max_duration <= MAX_SESSION_SECONDS:
            raise PydanticCustomError(
                "duration", "max_duration must be between 1s and {max}s", {"max": MAX_SESSION_SECONDS}
            )
        if self.pending_ttl <= 0:
            raise PydanticCustomError("duration", "pending_ttl must be positive")
        return self


class LevelSettings(_Section):
    vault_role: str
    ttl_cap: Duration
    # ssh targets: the principals (login names) the level's certificates carry; the first is the login user
    principals: list[str] = Field(default_factory=list)
    # ssh targets: may sessions at this level forward ports (`pcigate connect -L`)? What crosses a forward is
    # not recorded, so it is off unless allowed.
    port_forwarding: bool = False
    request: RequestPolicy | None = None  # present: the level is request-only
    # Data-path policy of the level (docs/configuration.md): ``masking`` replaces the target's masking table,
    # ``guardrails`` are appended to the target's rules (a level can add rules, never drop a target-wide one).
    masking: MaskingPolicy | None = None
    guardrails: list[GuardrailRule] = Field(default_factory=list)

    @field_validator("ttl_cap")
    @classmethod
    def _cap(cls, v: int) -> int:
        if not 0 < v <= MAX_SESSION_SECONDS:
            raise PydanticCustomError(
                "duration", "ttl_cap must be between 1s and {max}s", {"max": MAX_SESSION_SECONDS}
            )
        return v


_SSH_KEY = re.compile(r"^(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(256|384|521)|sk-ssh-ed25519@openssh\.com) "
                      r"[A-Za-z0-9+/]+={0,3}( \S.*)?$")
_PRINCIPAL = re.compile(r"^[a-z_][a-z0-9_.-]{0,31}$")


class TargetSettings(_Section):
    kind: Literal["postgres", "ssh"] = "postgres"
    host: str
    port: int | None = Field(default=None, gt=0, lt=65536)  # default: 5432 (postgres), 22 (ssh)
    database: str | None = None  # postgres: required
    sslmode: Literal["disable", "prefer", "require", "verify-full"] = "prefer"
    description: str | None = None
    default_level: str | None = None
    vault_mount: str | None = None  # default: "database" (postgres), "ssh" (ssh)
    # ssh: how the CLI recognises the host (StrictHostKeyChecking stays on): its public key, or the CA that
    # signs its host certificates. One of them is required.
    host_key: str | None = None
    host_ca: str | None = None
    # Target-wide data-path policy, inherited by every level (see LevelSettings).
    masking: MaskingPolicy | None = None
    guardrails: list[GuardrailRule] = Field(default_factory=list)
    levels: dict[str, LevelSettings]

    @model_validator(mode="after")
    def _levels(self) -> TargetSettings:
        if not self.levels:
            raise PydanticCustomError("levels", "a target needs at least one level")
        for name in self.levels:
            if not _NAME.match(name):
                raise PydanticCustomError("levels", "bad level name {name}", {"name": repr(name)})
        if self.default_level is not None and self.default_level not in self.levels:
            raise PydanticCustomError(
                "default_level",
                "default_level {lvl} is not one of the target's levels",
                {"lvl": repr(self.default_level)},
            )
        if self.kind == "postgres":
            if not self.database:
                raise PydanticCustomError("database", 'a postgres target needs database = "..."')
        else:
            self._ssh_checks()
        _unique_rule_names(self.guardrails, "")
        for name, level in self.levels.items():
            _unique_rule_names(
                [*self.guardrails, *level.guardrails], f" (level {name!r} with the target's rules)"
            )
        return self

    def _ssh_checks(self) -> None:
        if (self.host_key is None) == (self.host_ca is None):
            raise PydanticCustomError(
                "host_key", "an ssh target needs exactly one of host_key (the host's public key) or host_ca")
        for key in (self.host_key, self.host_ca):
            if key is not None and not _SSH_KEY.match(key.strip()):
                raise PydanticCustomError("host_key", 'expected an OpenSSH public key, "ssh-ed25519 AAAA..."')
        if self.guardrails or any(lvl.guardrails for lvl in self.levels.values()):
            raise PydanticCustomError("guardrails", "guardrails are SQL rules: not for ssh targets")
        for name, level in self.levels.items():
            if not level.principals:
                raise PydanticCustomError(
                    "principals", "level {name} of an ssh target needs principals", {"name": repr(name)})
            for p in level.principals:
                if not _PRINCIPAL.match(p) or p == "root":
                    raise PydanticCustomError(
                        "principals", "bad principal {p} (a login name, not root)", {"p": repr(p)})

    @property
    def default(self) -> str:
        return self.default_level or next(iter(self.levels))

    @property
    def effective_port(self) -> int:
        return self.port or (22 if self.kind == "ssh" else 5432)

    @property
    def mount(self) -> str:
        return self.vault_mount or ("ssh" if self.kind == "ssh" else "database")

    def known_hosts(self) -> list[str]:
        """known_hosts lines naming the host as ssh looks it up (``[host]:port`` off port 22)."""
        port = self.effective_port
        pattern = self.host if port == 22 else f"[{self.host}]:{port}"
        if self.host_ca is not None:
            return [f"@cert-authority {pattern} {self.host_ca.strip()}"]
        return [f"{pattern} {(self.host_key or '').strip()}"]


class AccessRule(_Section):
    """Any matching rule grants. ``group`` or ``subject`` (addition: a token's ``sub``, e.g. a workload)."""

    group: str | None = None
    subject: str | None = None
    target: str
    levels: list[str] = Field(min_length=1)

    @model_validator(mode="after")
    def _who(self) -> AccessRule:
        if (self.group is None) == (self.subject is None):
            raise PydanticCustomError("access", "set exactly one of group or subject")
        return self


class Settings(_Section):
    server: ServerSettings = Field(default_factory=ServerSettings)
    oidc: OidcSettings
    vault: VaultSettings = Field(default_factory=VaultSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    sessions: SessionSettings = Field(default_factory=SessionSettings)
    auditors: AuditorSettings = Field(default_factory=AuditorSettings)
    notifications: NotificationSettings = Field(default_factory=NotificationSettings)
    masking: MaskingKeySettings = Field(default_factory=MaskingKeySettings)
    audit: AuditSettings = Field(default_factory=AuditSettings)
    targets: dict[str, TargetSettings] = Field(default_factory=dict)
    access: list[AccessRule] = Field(default_factory=list)

    @model_validator(mode="after")
    def _cross(self) -> Settings:
        problems: list[str] = []
        for name in self.targets:
            if not _NAME.match(name):
                problems.append(f"targets.{name}: bad target name")
        for i, rule in enumerate(self.access):
            if rule.target != "*" and rule.target not in self.targets:
                problems.append(f"access.{i}.target: unknown target {rule.target!r}")
                continue
            known = (
                set().union(*(t.levels for t in self.targets.values()))
                if rule.target == "*"
                else set(self.targets[rule.target].levels)
            )
            for lvl in rule.levels:
                if lvl != "*" and lvl not in known:
                    problems.append(f"access.{i}.levels: unknown level {lvl!r}")
        if problems:
            raise ConfigError(problems)
        return self


def _format_errors(err: ValidationError) -> list[str]:
    out = []
    for e in err.errors(include_input=False, include_url=False):
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        msg = msg.removeprefix("Value error, ")
        out.append(f"{loc}: {msg}")
    return out


def _read_secret(path: Path, key: str, problems: list[str]) -> SecretStr | None:
    try:
        value = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        problems.append(f"{key}: cannot read {path}: {exc.strerror or type(exc).__name__}")
        return None
    if not value:
        problems.append(f"{key}: {path} is empty")
        return None
    return SecretStr(value)


def _resolve(path: Path | None, base: Path) -> Path | None:
    if path is None or path.is_absolute():
        return path
    return base / path


def settings_from_dict(
    data: dict[str, Any], *, base_dir: Path | None = None, environ: dict[str, str] | None = None
) -> Settings:
    """Validate a parsed config; relative paths are resolved against ``base_dir``; secrets are loaded."""
    env = os.environ if environ is None else environ
    base = base_dir or Path.cwd()
    try:
        settings = Settings.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err)) from None
    except ConfigError:
        raise
    problems: list[str] = []
    vault = settings.vault
    token_file = _resolve(vault.token_file, base)
    secret_id_file = _resolve(vault.secret_id_file, base)
    token: SecretStr | None = None
    secret_id: SecretStr | None = None
    if vault.auth == "token":
        if token_file is not None:
            token = _read_secret(token_file, "vault.token_file", problems)
        elif env.get(TOKEN_ENV):
            token = SecretStr(env[TOKEN_ENV].strip())
        else:
            problems.append(f"vault.token_file: no OpenBao token: set token_file or {TOKEN_ENV}")
    else:
        if not vault.role_id:
            problems.append('vault.role_id: required when auth = "approle"')
        if secret_id_file is not None:
            secret_id = _read_secret(secret_id_file, "vault.secret_id_file", problems)
        elif env.get(SECRET_ID_ENV):
            secret_id = SecretStr(env[SECRET_ID_ENV].strip())
        else:
            problems.append(
                f"vault.secret_id_file: no AppRole secret id: set secret_id_file or {SECRET_ID_ENV}"
            )
    siems: list[SiemSettings] = []
    for i, siem in enumerate(settings.audit.forward):
        sfile = _resolve(siem.secret_file, base)
        ssecret = (_read_secret(sfile, f"audit.forward.{i}.secret_file", problems)
                   if sfile is not None else None)
        siems.append(siem.model_copy(update={"secret_file": sfile, "secret": ssecret,
                                             "ca_file": _resolve(siem.ca_file, base)}))
    masking_key_file = _resolve(settings.masking.key_file, base)
    masking_key: SecretStr | None = None
    if masking_key_file is not None:
        masking_key = _read_secret(masking_key_file, "masking.key_file", problems)
    elif env.get(MASKING_KEY_ENV):
        masking_key = SecretStr(env[MASKING_KEY_ENV].strip())
    if masking_key is not None and len(masking_key.get_secret_value().encode()) < MIN_MASKING_KEY_BYTES:
        problems.append(f"masking.key_file: the masking key must be at least {MIN_MASKING_KEY_BYTES} bytes")
    if masking_key is None:
        for tname, tgt in settings.targets.items():
            for lname, lvl in tgt.levels.items():
                mask = lvl.masking if lvl.masking is not None else tgt.masking
                if mask is not None and any(r.action == "hash" for r in mask.columns):
                    problems.append(f"targets.{tname}.levels.{lname}: a hash column rule needs a masking "
                                    f"key: set masking.key_file or {MASKING_KEY_ENV}")
    hooks: list[WebhookSettings] = []
    for i, hook in enumerate(settings.notifications.webhooks):
        secret_file = _resolve(hook.secret_file, base)
        secret = _read_secret(secret_file, f"notifications.webhooks.{i}.secret_file", problems) \
            if secret_file is not None else None
        hooks.append(hook.model_copy(update={"secret_file": secret_file, "secret": secret}))
    if problems:
        raise ConfigError(problems)
    recordings_dir = _resolve(settings.storage.recordings_dir, base)
    assert recordings_dir is not None
    return settings.model_copy(
        update={
            "vault": vault.model_copy(
                update={
                    "token": token,
                    "secret_id": secret_id,
                    "token_file": token_file,
                    "secret_id_file": secret_id_file,
                }
            ),
            "storage": settings.storage.model_copy(update={"recordings_dir": recordings_dir}),
            "notifications": settings.notifications.model_copy(update={"webhooks": hooks}),
            "masking": settings.masking.model_copy(update={"key_file": masking_key_file, "key": masking_key}),
            "audit": settings.audit.model_copy(
                update={"signing_key_file": _resolve(settings.audit.signing_key_file, base),
                        "forward": siems}),
        }
    )


def load_settings(path: Path | str, *, environ: dict[str, str] | None = None) -> Settings:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or type(exc).__name__}"]) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{path}: not valid TOML: {exc}"]) from None
    return settings_from_dict(data, base_dir=path.resolve().parent, environ=environ)
