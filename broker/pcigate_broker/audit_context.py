"""Who and where a request comes from, for every audit event it writes (request-scoped, no I/O).

The edge middleware puts a fresh :class:`Caller` into a context variable for each HTTP request (with the
client's address); the identity dependency fills in the caller's groups and client kind once the token
is checked. FastAPI runs sync endpoints and dependencies in worker threads with a *copy* of the request's
context, so the value is a mutable object shared by those copies, not something each of them sets.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field


@dataclass
class Caller:
    source: str | None = None  # "ip:port" of the HTTP client
    subject: str | None = None
    groups: list[str] = field(default_factory=list)
    client_kind: str | None = None  # "human" | "workload"


current: ContextVar[Caller | None] = ContextVar("pcigate_caller", default=None)
