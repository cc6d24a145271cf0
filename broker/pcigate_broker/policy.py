"""Who reaches what: pure functions over ``[[access]]`` rules and ``[targets.*]`` (no I/O).

Visibility rule (like Teleport): a target the caller reaches at no level does not exist for them — asking for
it
is ``404 unknown_target``, exactly as for a name that is not configured, so the API does not reveal the
inventory to people outside it. A target reached at some level but not the one asked is
``403 level_not_allowed`` with the allowed levels in the message.

A caller's default level on a target is the target's ``default_level`` when they hold it, otherwise their
first allowed level in the target's own order.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from pcigate.models import MAX_SESSION_SECONDS, DataPathPolicy, Identity, LevelInfo, MaskingPolicy, TargetInfo

from .errors import ApiError
from .settings import RequestPolicy, Settings, TargetSettings


@dataclass(frozen=True)
class Grant:
    target: str
    level: str
    vault_mount: str
    vault_role: str
    ttl_seconds: int


def _rule_matches(identity: Identity, group: str | None, subject: str | None) -> bool:
    if subject is not None:
        return identity.subject == subject
    return group is not None and group in identity.groups


def allowed_levels(settings: Settings, identity: Identity, target: str) -> list[str]:
    """Levels of ``target`` the identity reaches, in the target's configured order ([] if none/unknown)."""
    tgt = settings.targets.get(target)
    if tgt is None:
        return []
    granted: set[str] = set()
    for rule in settings.access:
        if rule.target not in ("*", target) or not _rule_matches(identity, rule.group, rule.subject):
            continue
        if "*" in rule.levels:
            granted.update(tgt.levels)
        else:
            granted.update(lvl for lvl in rule.levels if lvl in tgt.levels)
    return [lvl for lvl in tgt.levels if lvl in granted]


def canonical(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def policy_digest(pol: DataPathPolicy) -> str:
    """sha256 hex of the canonical JSON of the policy without its ``digest`` (defaults included, so two
    configurations that mean the same policy have the same digest)."""
    return hashlib.sha256(canonical(pol.model_dump(mode="json", exclude={"digest"}))).hexdigest()


def data_path_policy(settings: Settings, target: str, level: str) -> DataPathPolicy:
    """The policy the tunnel applies for a session on ``target`` at ``level`` (both must be configured).

    Inheritance: the level's ``masking`` table, when present, replaces the target's (absent: the target's,
    and absent on both: no masking); the level's ``guardrails`` are appended to the target's, so a level can
    add rules but never drop a target-wide one. Recording is always on.
    """
    tgt = settings.targets[target]
    lvl = tgt.levels[level]
    body = DataPathPolicy(
        record=True,
        # A terminal shows whatever a command prints: card numbers are masked there unless configured.
        masking=lvl.masking if lvl.masking is not None else tgt.masking if tgt.masking is not None
        else MaskingPolicy() if tgt.kind == "ssh" else None,
        guardrails=[*tgt.guardrails, *lvl.guardrails],
    )
    return body.model_copy(update={"digest": policy_digest(body)})


def default_level_for(tgt: TargetSettings, levels: list[str]) -> str:
    """The target's default level when the caller holds it, else their first level; a request-only level is
    never the default when a standing one is there (``connect`` without ``--level`` should just work)."""
    if tgt.default in levels and tgt.levels[tgt.default].request is None:
        return tgt.default
    standing = [lvl for lvl in levels if tgt.levels[lvl].request is None]
    return standing[0] if standing else (tgt.default if tgt.default in levels else levels[0])


def describe_approvals(pol: RequestPolicy | None) -> str | None:
    """Who must approve a request-only level, in words; None for a standing level."""
    if pol is None:
        return None
    if pol.one_per_group:
        return "one approval from each of " + ", ".join(pol.approver_groups)
    plural = "s" if pol.approvals > 1 else ""
    return f"{pol.approvals} approval{plural} from " + " or ".join(pol.approver_groups)


def visible_targets(
    settings: Settings, identity: Identity, *, include_policy: bool = False
) -> list[TargetInfo]:
    """Targets the caller reaches, with only their levels; ``include_policy`` fills each level's policy."""
    out: list[TargetInfo] = []
    for name, tgt in settings.targets.items():
        levels = allowed_levels(settings, identity, name)
        if not levels:
            continue
        out.append(
            TargetInfo(
                name=name,
                kind=tgt.kind,
                host=tgt.host,
                port=tgt.effective_port,
                database=tgt.database,
                description=tgt.description,
                levels=[
                    LevelInfo(
                        name=lvl,
                        max_ttl_seconds=tgt.levels[lvl].ttl_cap,
                        policy=data_path_policy(settings, name, lvl) if include_policy else None,
                        request_only=tgt.levels[lvl].request is not None,
                        approvals=describe_approvals(tgt.levels[lvl].request),
                    )
                    for lvl in levels
                ],
                default_level=default_level_for(tgt, levels),
            )
        )
    return out


def is_auditor(settings: Settings, identity: Identity) -> bool:
    return any(g in settings.auditors.groups for g in identity.groups)


def decide(
    settings: Settings, identity: Identity, target: str, level: str | None, ttl_seconds: int | None
) -> Grant:
    """The grant for one session request, or an :class:`ApiError`
    (404 unknown_target / 403 level_not_allowed)."""
    tgt = settings.targets.get(target)
    levels = allowed_levels(settings, identity, target)
    if tgt is None or not levels:
        raise ApiError(404, "unknown_target", f"unknown target {target!r}")
    chosen = level or default_level_for(tgt, levels)
    if chosen not in levels:
        raise ApiError(
            403,
            "level_not_allowed",
            f"level {chosen!r} is not allowed on {target}; allowed: {', '.join(levels)}",
        )
    lvl = tgt.levels[chosen]
    cap = min(lvl.ttl_cap, MAX_SESSION_SECONDS)
    ttl = cap if ttl_seconds is None else min(ttl_seconds, cap)
    return Grant(
        target=target, level=chosen, vault_mount=tgt.mount, vault_role=lvl.vault_role, ttl_seconds=ttl
    )
