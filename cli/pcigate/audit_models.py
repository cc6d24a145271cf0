"""The audit part of the broker API contract (``/v1/audit``), shared by the broker and the CLI."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AuditEventInfo(_Model):
    seq: int | None  # position in the hash chain (None: not sealed yet, for at most a reaper interval)
    at: datetime
    actor: str | None = None
    action: str
    target: str | None = None
    outcome: str
    detail: dict[str, Any] = Field(default_factory=dict)
    request_id: str | None = None
    session_id: str | None = None
    message: str | None = None
    hash: str | None = None
    actor_groups: list[str] | None = None  # the caller's groups when the actor is the caller
    client_kind: str | None = None  # "human" | "workload"
    source: str | None = None  # the HTTP client's address


class AuditPage(_Model):
    items: list[AuditEventInfo]
    next_cursor: str | None = None


class AuditVerification(_Model):
    """What ``POST /v1/audit/verify`` found. ``ok`` only when every check passed."""

    ok: bool
    events: int  # sealed events checked
    last_seq: int
    last_hash: str
    checkpoints: int  # signed checkpoints checked
    signed_through: int  # seq of the newest valid checkpoint (0: none)
    recordings: int  # stored recordings re-hashed against the digests in the chain
    key_id: str | None = None  # the checkpoint signing key (None: not configured, chain checked only)
    first_bad_seq: int | None = None  # the first event (or checkpoint) that failed
    error: str | None = None  # one line: what failed there
