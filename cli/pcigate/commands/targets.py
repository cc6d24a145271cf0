"""``pcigate targets``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from pcigate.commands._common import JsonOpt, broker, output
from pcigate.config import format_duration

if TYPE_CHECKING:
    from rich.tree import Tree

    from pcigate.models import DataPathPolicy, MaskingPolicy, TargetInfo

ShowPolicyOpt = Annotated[
    bool,
    typer.Option(
        "--show-policy",
        help="Also show, per target and level, the data-path policy the tunnel will apply "
        "(masking, column rules, guardrails).",
    ),
]


def _address(t: TargetInfo) -> str:
    return f"{t.host}:{t.port}" + (f"/{t.database}" if t.database else "")


def _masking_node(parent: Tree, masking: MaskingPolicy | None) -> None:
    from rich.text import Text

    if masking is None:
        parent.add(Text("masking: off (values shown as stored)", style="yellow"))
        return
    pan = "PAN truncated (first 6 / last 4 kept)" if masking.pan == "truncate" else "PAN fully redacted"
    track = "track 1/2 data redacted" if masking.track_data else "track data not redacted"
    node = parent.add(Text(f"masking: {pan}; {track}"))
    node.add(
        Text("sensitive columns (any table, redacted): " + (", ".join(masking.sensitive_columns) or "none"))
    )
    if masking.columns:
        rules = node.add(Text("column rules"))
        for rule in masking.columns:
            where = f"{rule.table}.{rule.column}" if rule.table else f"{rule.column} (any table)"
            rules.add(Text(f"{where}: {rule.action}"))
    else:
        node.add(Text("column rules: none"))


def _guardrails_node(parent: Tree, pol: DataPathPolicy) -> None:
    from rich.text import Text

    if not pol.guardrails:
        parent.add(Text("guardrails: none (every statement passes)", style="yellow"))
        return
    node = parent.add(Text("guardrails (statements that do not parse are denied too)"))
    for rule in pol.guardrails:
        on = ", ".join(rule.relations) if rule.relations else "any relation"
        item = node.add(Text(f"{rule.name}: deny {', '.join(rule.deny)} (on {on})"))
        if rule.message:
            item.add(Text(f"message: {rule.message}"))


def _policy_tree(items: list[TargetInfo]) -> Tree:
    from rich.text import Text
    from rich.tree import Tree

    root = Tree(Text("data-path policy per target and level", style="bold"), hide_root=False)
    for t in items:
        label = Text(t.name, style="bold")
        label.append(f"  {t.kind} {_address(t)}", style="")
        if t.description:
            label.append(f"  {t.description}", style="dim")
        tnode = root.add(label)
        for lv in t.levels:
            pol = lv.policy
            assert pol is not None  # checked by _targets_with_policy
            lnode = tnode.add(
                Text(
                    f"level {lv.name}{' (default)' if lv.name == t.default_level else ''}"
                    f"{' (on request: ' + (lv.approvals or '') + ')' if lv.request_only else ''}"
                    f", max {format_duration(lv.max_ttl_seconds)}, policy {pol.digest[:12]}",
                    style="bold",
                )
            )
            lnode.add(Text("recording: " + ("on" if pol.record else "off")))
            _masking_node(lnode, pol.masking)
            _guardrails_node(lnode, pol)
    return root


def targets(ctx: typer.Context, json_flag: JsonOpt = False, show_policy: ShowPolicyOpt = False) -> None:
    """List the targets you may connect to.

    With their access levels (* marks the default) and each level's maximum session length; with
    --show-policy, what each level's sessions get (masking, guardrails), decided by the broker.
    """
    out = output(ctx, json_flag)
    with broker(ctx) as client:
        items = client.targets(include_policy=show_policy)
    if show_policy and not out.json_mode:
        if not items:
            out.info("no targets you may connect to")
            return
        out.render(_policy_tree(items))
        return
    out.table(
        items,
        [
            ("name", lambda t: t.name),
            ("kind", lambda t: t.kind),
            ("address", _address),
            (
                "levels (max ttl)",
                lambda t: ", ".join(
                    f"{lv.name}{'*' if lv.name == t.default_level else ''}{'+' if lv.request_only else ''}"
                    f" ({format_duration(lv.max_ttl_seconds)})"
                    for lv in t.levels
                ),
            ),
            ("description", lambda t: t.description),
        ],
        title="targets you may connect to",
    )
    if not out.json_mode and items:
        out.info("* default level")
        if any(lv.request_only for t in items for lv in t.levels):
            out.info("+ on request only: pcigate request TARGET --level LEVEL --reason ... "
                     "(another person approves)")
