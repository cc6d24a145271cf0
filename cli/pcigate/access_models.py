"""The access-request part of the broker API contract (``/v1/requests``), shared by the broker and the CLI.

A request asks for a request-only level of a target for a while, with a reason; approvers review it; once
approved it is a *grant*: sessions at that level may be opened until ``grant_ends_at``, and their credentials
never outlive it. States: ``pending`` → ``approved`` | ``denied`` | ``expired`` | ``cancelled``;
``approved`` → ``revoked`` (by an approver, an auditor or the requester; live sessions under it end).
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from pcigate.models import GrantRef as GrantRef  # the session's view of a grant; re-exported

RequestStatus = Literal["pending", "approved", "denied", "expired", "cancelled", "revoked"]
Decision = Literal["approve", "deny"]

REASON_MAX = 1000
COMMENT_MAX = 1000


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AccessRequestCreate(_Model):
    target: str = Field(min_length=1, max_length=128)
    level: str = Field(min_length=1, max_length=64)
    reason: str = Field(default="", max_length=REASON_MAX)
    duration_seconds: int | None = Field(default=None, gt=0)  # None: the level's max_duration


class ReviewInfo(_Model):
    reviewer: str
    decision: Decision
    comment: str | None = None
    at: datetime


class AccessRequestInfo(_Model):
    request_id: str
    requester: str
    requester_name: str | None = None
    target: str
    level: str
    reason: str
    duration_seconds: int
    status: RequestStatus
    created_at: datetime
    expires_at: datetime  # a pending request's deadline
    decided_at: datetime | None = None
    decided_by: str | None = None
    grant_starts_at: datetime | None = None
    grant_ends_at: datetime | None = None
    revoked_at: datetime | None = None
    revoked_by: str | None = None
    comment: str | None = None
    approvals_needed: str = ""  # e.g. "1 of dba-leads" or "one from each of dba-leads, security"
    reviews: list[ReviewInfo] = Field(default_factory=list)
    can_review: bool = False  # the caller may approve or deny it now


class ReviewCreate(_Model):
    comment: str | None = Field(default=None, max_length=COMMENT_MAX)


class RequestPage(_Model):
    items: list[AccessRequestInfo]


