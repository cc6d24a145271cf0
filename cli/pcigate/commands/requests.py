"""Just-in-time access: ``pcigate request``, ``requests``, ``approve``, ``deny``, ``cancel``, ``revoke``."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Annotated

import typer

from pcigate.commands._common import JsonOpt, broker, output

if TYPE_CHECKING:
    from pcigate.access_models import AccessRequestInfo
    from pcigate.client import BrokerClient
    from pcigate.output import Output

WAIT_POLL_SECONDS = 1.0

_COLUMNS = [
    ("id", lambda r: r.request_id),
    ("requester", lambda r: r.requester),
    ("target", lambda r: r.target),
    ("level", lambda r: r.level),
    ("status", lambda r: r.status),
    ("for", lambda r: f"{r.duration_seconds // 60} min"),
    ("reason", lambda r: r.reason),
    ("created", lambda r: r.created_at),
    ("grant ends", lambda r: r.grant_ends_at),
    ("you may review", lambda r: "yes" if r.can_review else ""),
]


def _show(out: Output, info: AccessRequestInfo) -> None:
    if out.json_mode:
        out.json(info)
        return
    out.record(info)


def request(
    ctx: typer.Context,
    target: Annotated[str, typer.Argument(help="The target, e.g. prod-db.")],
    level: Annotated[str, typer.Option("--level", "-l", help="The request-only level to ask for.")],
    reason: Annotated[
        str, typer.Option("--reason", "-r", help="Why (often a ticket id, e.g. INC-4711).")
    ] = "",
    duration: Annotated[
        str | None,
        typer.Option("--for", help='How long the grant lasts ("30m", "2h"); default: the level\'s most.'),
    ] = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="Wait (with a spinner) until the request is decided.")
    ] = False,
    connect_after: Annotated[
        bool, typer.Option("--connect", help="With --wait: connect at the level once approved.")
    ] = False,
    timeout: Annotated[
        str | None, typer.Option("--timeout", help='With --wait: give up after this long ("10m").')
    ] = None,
    json_flag: JsonOpt = False,
) -> None:
    """Ask for time-boxed elevated access; another person approves it."""
    from pcigate.access_models import AccessRequestCreate
    from pcigate.config import parse_duration
    from pcigate.errors import AccessDenied, PendingApproval, UsageError

    if connect_after and not wait:
        raise UsageError("--connect needs --wait")
    seconds = parse_duration(duration) if duration is not None else None
    limit = parse_duration(timeout) if timeout is not None else None
    out = output(ctx, json_flag)
    with broker(ctx) as client:
        info = client.create_request(
            AccessRequestCreate(target=target, level=level, reason=reason, duration_seconds=seconds)
        )
        if not wait:
            _show(out, info)
            if not out.json_mode:
                out.info(f"request {info.request_id} is pending: needs {info.approvals_needed}; "
                         f"check with: pcigate requests --mine")
            return
        if not out.json_mode:
            out.info(f"request {info.request_id} is pending: needs {info.approvals_needed}")
        info = _wait(client, out, info, limit)
    if info.status != "approved":
        _show(out, info)
        if info.status == "pending":
            raise PendingApproval(f"request {info.request_id} is still pending",
                                  hint="pcigate requests --mine")
        raise AccessDenied(f"request {info.request_id} was {info.status}"
                           + (f": {info.comment}" if info.comment else ""))
    if not connect_after:
        _show(out, info)
        if not out.json_mode:
            out.info(f"approved until {info.grant_ends_at}: pcigate connect {target} --level {level}")
        return
    if not out.json_mode:
        out.info(f"approved until {info.grant_ends_at}; connecting")
    from pcigate.commands import connect

    ctx.invoke(connect.connect, ctx=ctx, target=target, level=level, json_flag=json_flag)


def _wait(
    client: BrokerClient, out: Output, info: AccessRequestInfo, limit: int | None
) -> AccessRequestInfo:
    deadline = None if limit is None else time.monotonic() + limit
    what = f"waiting for a decision on {info.request_id} (Ctrl-C stops waiting; the request stays)"
    with out.spinner(what):
        while info.status == "pending":
            if deadline is not None and time.monotonic() >= deadline:
                break
            time.sleep(WAIT_POLL_SECONDS)
            info = client.get_request(info.request_id)
    return info


def list_requests(
    ctx: typer.Context,
    pending: Annotated[bool, typer.Option("--pending", help="Only requests waiting for a decision.")] = False,
    mine: Annotated[bool, typer.Option("--mine", help="Only your own requests.")] = False,
    json_flag: JsonOpt = False,
) -> None:
    """List access requests: yours, those you may review, everything for auditors."""
    out = output(ctx, json_flag)
    with broker(ctx) as client:
        page = client.list_requests(pending=pending, mine=mine)
    out.table(page.items, _COLUMNS, title="access requests")


def approve(
    ctx: typer.Context,
    request_id: Annotated[str, typer.Argument(metavar="ID", help="The request id (pcigate requests).")],
    comment: Annotated[
        str | None, typer.Option("--comment", "-c", help="A note kept with the review.")
    ] = None,
    json_flag: JsonOpt = False,
) -> None:
    """Approve someone else's access request."""
    out = output(ctx, json_flag)
    with broker(ctx) as client:
        info = client.request_action(request_id, "approve", comment)
    _show(out, info)
    if not out.json_mode:
        if info.status == "approved":
            out.info(f"approved: {info.requester} holds {info.target}/{info.level} "
                     f"until {info.grant_ends_at}")
        else:
            out.info(f"approval recorded; still needs {info.approvals_needed}")


def deny(
    ctx: typer.Context,
    request_id: Annotated[str, typer.Argument(metavar="ID", help="The request id.")],
    reason: Annotated[str, typer.Option("--reason", "-r", help="Why (shown to the requester).")],
    json_flag: JsonOpt = False,
) -> None:
    """Deny an access request."""
    out = output(ctx, json_flag)
    with broker(ctx) as client:
        info = client.request_action(request_id, "deny", reason)
    _show(out, info)


def cancel(
    ctx: typer.Context,
    request_id: Annotated[str, typer.Argument(metavar="ID", help="Your pending request's id.")],
    json_flag: JsonOpt = False,
) -> None:
    """Withdraw your own pending request."""
    out = output(ctx, json_flag)
    with broker(ctx) as client:
        info = client.request_action(request_id, "cancel")
    _show(out, info)


def revoke(
    ctx: typer.Context,
    request_id: Annotated[str, typer.Argument(metavar="ID", help="The approved request (grant) id.")],
    reason: Annotated[str | None, typer.Option("--reason", "-r", help="Why (kept in the audit log).")] = None,
    json_flag: JsonOpt = False,
) -> None:
    """End a grant now; sessions running under it end too."""
    out = output(ctx, json_flag)
    with broker(ctx) as client:
        info = client.request_action(request_id, "revoke", reason)
    _show(out, info)
