"""``pcigate targets``."""

from __future__ import annotations

import typer

from pcigate.commands._common import JsonOpt, broker, output


def _ttl(seconds: int) -> str:
    if seconds % 3600 == 0:
        return f"{seconds // 3600}h"
    if seconds % 60 == 0:
        return f"{seconds // 60}m"
    return f"{seconds}s"


def targets(ctx: typer.Context, json_flag: JsonOpt = False) -> None:
    """List the targets you may connect to.

    With their access levels (* marks the default) and each level's maximum session length.
    """
    out = output(ctx, json_flag)
    with broker(ctx) as client:
        items = client.targets()
    out.table(
        items,
        [
            ("name", lambda t: t.name),
            ("kind", lambda t: t.kind),
            ("address", lambda t: f"{t.host}:{t.port}" + (f"/{t.database}" if t.database else "")),
            (
                "levels (max ttl)",
                lambda t: ", ".join(
                    f"{lv.name}{'*' if lv.name == t.default_level else ''} ({_ttl(lv.max_ttl_seconds)})"
                    for lv in t.levels
                ),
            ),
            ("description", lambda t: t.description),
        ],
        title="targets you may connect to",
    )
    if not out.json_mode and items:
        out.info("* default level")
