"""``pcigate audit --format cef``: one event as a CEF line, escaped as the format requires."""

from __future__ import annotations

from datetime import UTC, datetime

from pcigate.audit_models import AuditEventInfo
from pcigate.commands.audit import to_cef


def test_cef_line_fields_and_escaping() -> None:
    e = AuditEventInfo(seq=7, at=datetime(2026, 11, 22, 1, 2, 3, 456000, tzinfo=UTC), actor="alice",
                       action="session.open", target="prod|db", outcome="denied", session_id="s1",
                       request_id="r=1", message="level 'admin'\nnot allowed a=b \\ end", hash="ab" * 32)
    line = to_cef(e, "0.1.0")
    assert "\n" not in line
    head, _, ext = line.partition("|6|")  # denied -> severity 6
    assert head == "CEF:0|pcigate|pcigate-broker|0.1.0|session.open|session.open"
    assert "rt=1795309323456" in ext
    assert "suser=alice" in ext
    assert "cs1Label=target cs1=prod|db" in ext  # a pipe needs no escape in the extension
    assert "cs3=r\\=1" in ext
    assert "msg=level 'admin'\\nnot allowed a\\=b \\\\ end" in ext
    assert "cn1Label=seq cn1=7" in ext


def test_cef_header_pipes_are_escaped() -> None:
    e = AuditEventInfo(seq=None, at=datetime(2026, 1, 1, tzinfo=UTC), action="a|b", outcome="success")
    assert to_cef(e, "1").startswith("CEF:0|pcigate|pcigate-broker|1|a\\|b|a\\|b|3|")
