"""Background reaper: every ``reaper_interval_seconds`` end sessions past ``expires_at`` (``expired``) or
silent
for longer than ``heartbeat_grace_seconds`` (``heartbeat_lost``), revoke their leases, and retry revocations
OpenBao could not do earlier. Each pass runs in a worker thread; several replicas may run it at once.
"""

from __future__ import annotations

import asyncio
import logging
import time

import anyio.to_thread
from sqlalchemy.orm.exc import StaleDataError

from . import audit
from .access import expire_due
from .sessions import reap_once
from .state import Broker

log = logging.getLogger(__name__)


def reap_pass(broker: Broker) -> int:
    caps = [lvl.ttl_cap for t in broker.settings.targets.values() for lvl in t.levels.values()]
    broker.vault.maintain_token(max(caps, default=0))
    with broker.sessions() as db:
        expire_due(broker, db)
        ended = reap_once(broker, db)
        cfg = broker.settings.audit
        audit.seal(db, key=broker.audit_key, checkpoint_seconds=cfg.checkpoint_seconds)
        last = broker.extra.get("retention_checked_at")
        now = time.monotonic()
        if not isinstance(last, float) or now - last >= cfg.retention_check_seconds:
            broker.extra["retention_checked_at"] = now
            done = audit.apply_retention(db, key=broker.audit_key, retention_seconds=cfg.retention,
                                         recording_path=broker.recordings.path_for)
            if done.cut_seq:
                log.info("retention: %d events up to %d, %d recordings, %d sessions deleted",
                         done.events, done.cut_seq, done.recordings, done.sessions)
        return ended


async def run_reaper(broker: Broker) -> None:
    interval = broker.settings.sessions.reaper_interval_seconds
    while True:
        try:
            n = await anyio.to_thread.run_sync(reap_pass, broker)
            if n:
                log.info("reaper ended %d session(s)", n)
        except asyncio.CancelledError:
            raise
        except StaleDataError:
            # rows changed under the sealer by something other than a broker (a replica takes the sealer's
            # lock first): an operator's hand, or tampering, which POST /v1/audit/verify locates
            log.warning("reaper: audit events were changed or deleted outside the broker while being sealed; "
                        "retrying next interval (POST /v1/audit/verify checks the chain)")
        except Exception:
            log.exception("reaper pass failed; retrying next interval")
        await asyncio.sleep(interval)


async def run_forwarder(broker: Broker) -> None:
    """Forward the sealed audit chain to every ``[[audit.forward]]`` SIEM (pcigate_broker.siem)."""
    from .siem import forward_all

    cfg = broker.settings.audit
    state: dict[str, float] = {}
    while True:
        try:
            await anyio.to_thread.run_sync(forward_all, broker.sessions, cfg.forward, state)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("audit forwarding pass failed; retrying next interval")
        await asyncio.sleep(cfg.forward_interval_seconds)
