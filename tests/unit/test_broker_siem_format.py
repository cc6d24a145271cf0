"""RFC 5424 / RFC 6587 framing of forwarded audit events (pure)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from pcigate.audit_models import AuditEventInfo
from pcigate_broker.siem import syslog_message


def test_octet_counted_rfc5424_with_structured_data() -> None:
    e = AuditEventInfo(seq=42, at=datetime(2026, 11, 22, 1, 2, 3, 4000, tzinfo=UTC), actor='eve"]\\',
                       action="session.open", target="prod-db", outcome="denied", message="no\nway")
    framed = syslog_message(e, "broker-1")
    n, _, msg = framed.partition(b" ")
    assert int(n) == len(msg)
    text = msg.decode()
    assert "\n" not in text  # the JSON body escapes the newline
    assert text.startswith("<84>1 2026-11-22T01:02:03.004000Z broker-1 pcigate-broker - session.open ")
    end = text.index('"] {')  # the SD element's end (escaped quotes and brackets inside do not match)
    sd = text[text.index("[pcigate@32473 ") : end + 2]
    assert 'seq="42"' in sd
    assert 'actor="eve\\"\\]\\\\"' in sd  # ", ] and \ escaped as RFC 5424 requires
    assert 'target="prod-db"' in sd
    body = json.loads(text[end + 3 :])
    assert body["seq"] == 42
    assert body["message"] == "no\nway"
