"""Outgoing webhooks for access requests: never in the request's way.

``Notifier.emit(event, info)`` only puts the event on a bounded queue (a full queue drops the oldest and logs
it); one background thread delivers each event to every webhook configured for it, with retries and
exponential back-off (1 s, 2 s, 4 s … capped at 60 s, ``max_attempts`` in all; a 2xx answer is success,
4xx other than 408/429 is final). Bodies:

* ``generic``: ``{"event", "sent_at", "request": <AccessRequestInfo as JSON>}``;
* ``slack``: ``{"text": "<one line>"}`` (Slack incoming webhooks and compatible chat tools).

Each POST carries ``X-Pcigate-Event``, ``X-Pcigate-Delivery`` (unique per event), and, when the webhook has
a secret, ``X-Pcigate-Signature: t=<unix time>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>`` (the receiver
checks it with a constant-time comparison and refuses old timestamps, as with Stripe's scheme).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import queue
import secrets
import threading
import time
from dataclasses import dataclass

import httpx

from pcigate.access_models import AccessRequestInfo

from .settings import WebhookSettings

log = logging.getLogger(__name__)

QUEUE_MAX = 1000
BACKOFF_CAP = 60.0


def signature(secret: bytes, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret, str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify_signature(secret: bytes, header: str, body: bytes, *, now: float, tolerance: int = 300) -> bool:
    """What a receiver does (used by the tests): parse, check the age, compare in constant time."""
    try:
        parts = dict(p.split("=", 1) for p in header.split(","))
        ts = int(parts["t"])
        mac = parts["v1"]
    except (KeyError, ValueError):
        return False
    if abs(now - ts) > tolerance:
        return False
    expected = signature(secret, ts, body).split("v1=", 1)[1]
    return hmac.compare_digest(expected, mac)


def _describe(event: str, info: AccessRequestInfo) -> str:
    who = info.requester_name or info.requester
    base = f"{info.target}/{info.level} for {info.duration_seconds // 60} min by {who}"
    if event == "request.created":
        return (f"pcigate: access request {info.request_id}: {base}, reason: {info.reason or '(none)'}; "
                f"needs {info.approvals_needed}")
    extra = f" by {info.decided_by}" if info.decided_by and info.status in ("approved", "denied") else ""
    if info.status == "revoked":
        extra = f" by {info.revoked_by}"
    return f"pcigate: access request {info.request_id} ({base}) is {info.status}{extra}"


def body_for(hook: WebhookSettings, event: str, info: AccessRequestInfo, sent_at: float) -> bytes:
    if hook.format == "slack":
        doc: dict[str, object] = {"text": _describe(event, info)}
    else:
        doc = {"event": event, "sent_at": int(sent_at), "request": info.model_dump(mode="json")}
    return json.dumps(doc, separators=(",", ":")).encode()


@dataclass
class _Delivery:
    hook: WebhookSettings
    event: str
    delivery_id: str
    body: bytes
    attempt: int = 0
    due: float = 0.0


class Notifier:
    def __init__(self, hooks: list[WebhookSettings]) -> None:
        self.hooks = hooks
        self._q: queue.Queue[_Delivery | None] = queue.Queue(maxsize=QUEUE_MAX)
        self._stop = threading.Event()
        self._client = httpx.Client(follow_redirects=False)
        self.delivered = 0
        self.failed = 0
        self._thread = threading.Thread(target=self._run, name="pcigate-webhooks", daemon=True)
        self._thread.start()

    def emit(self, event: str, info: AccessRequestInfo) -> None:
        now = time.time()
        for hook in self.hooks:
            if event not in hook.events:
                continue
            d = _Delivery(hook, event, secrets.token_hex(8), body_for(hook, event, info, now), due=now)
            try:
                self._q.put_nowait(d)
            except queue.Full:
                log.error("webhook queue full: dropping %s for %s", event, hook.url)

    def _run(self) -> None:
        waiting: list[_Delivery] = []
        while not self._stop.is_set():
            timeout = max(0.0, min((d.due for d in waiting), default=time.time() + 0.5) - time.time())
            try:
                item = self._q.get(timeout=min(timeout, 0.5))
                if item is None:
                    break
                waiting.append(item)
            except queue.Empty:
                pass
            now = time.time()
            for d in [d for d in waiting if d.due <= now]:
                waiting.remove(d)
                if not self._send(d):
                    d.attempt += 1
                    if d.attempt >= d.hook.max_attempts:
                        self.failed += 1
                        log.error("webhook %s: giving up on %s after %d attempts",
                                  d.hook.url, d.event, d.attempt)
                        continue
                    d.due = time.time() + min(BACKOFF_CAP, 2.0 ** (d.attempt - 1))
                    waiting.append(d)

    def _send(self, d: _Delivery) -> bool:
        ts = int(time.time())
        headers = {"Content-Type": "application/json", "User-Agent": "pcigate-broker",
                   "X-Pcigate-Event": d.event, "X-Pcigate-Delivery": d.delivery_id}
        if d.hook.secret is not None:
            headers["X-Pcigate-Signature"] = signature(d.hook.secret.get_secret_value().encode(), ts, d.body)
        try:
            r = self._client.post(d.hook.url, content=d.body, headers=headers, timeout=d.hook.timeout_seconds)
        except httpx.HTTPError as exc:
            log.warning("webhook %s: %s (attempt %d)", d.hook.url, type(exc).__name__, d.attempt + 1)
            return False
        if 200 <= r.status_code < 300:
            self.delivered += 1
            return True
        if 400 <= r.status_code < 500 and r.status_code not in (408, 429):
            self.failed += 1
            log.error("webhook %s refused %s: HTTP %d (not retried)", d.hook.url, d.event, r.status_code)
            return True  # final: retrying cannot help
        log.warning("webhook %s: HTTP %d (attempt %d)", d.hook.url, r.status_code, d.attempt + 1)
        return False

    def close(self, timeout: float = 2.0) -> None:
        self._stop.set()
        with contextlib.suppress(queue.Full):
            self._q.put_nowait(None)
        self._thread.join(timeout)
        self._client.close()
