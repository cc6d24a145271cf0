"""JSON members named like a rule column (what ``row_to_json(c)`` or ``json_agg(t)`` make of a row's columns)
get that column's treatment; rows without such a name stay on the C walk, with the same result."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.stack.pgraw import datarow_body, datarow_fields, datarow_frame, mask_as_the_tunnel_does

from pcigate import masking
from pcigate.masking import _K_JSON, _K_JSONB_BIN, ColumnInfo, Masker
from pcigate.models import ColumnMaskRule, MaskingPolicy

KEY = b"k" * 32
MK = Masker(MaskingPolicy(sensitive_columns=["cvv"], columns=[
    ColumnMaskRule(column="email", action="hash"),
    ColumnMaskRule(table="public.people", column="holder", action="redact"),
]), KEY)


def test_members_named_like_rule_columns_are_judged_as_those_columns() -> None:
    doc = {"id": 7, "CVV": "123", "email": "ada@example.com", "holder": "Ada", "nested": [{"cvv": 456}],
           "pan": "4111111111111111", "none": None, "cvv_note": "not the column"}
    out = MK.mask_json_members(json.dumps(doc).encode(), _K_JSON)
    assert out is not None
    got = json.loads(out)
    assert got["CVV"] == "***"  # case-insensitive, as column names are
    assert got["nested"] == [{"cvv": "***"}]  # at any depth; a number's text length
    mac = masking.hmac.new(KEY, b"ada@example.com", masking.hashlib.sha256).hexdigest()[:16]
    assert got["email"] == "h:" + mac  # the same hash the email column's values get: joins still work
    assert got["holder"] == "***"  # a table-scoped rule applies: the member's table is unknown (fail closed)
    assert got["pan"] == "4111111111111111"  # left to the PAN scan, which runs after
    assert (got["id"], got["none"], got["cvv_note"]) == (7, None, "not the column")


def test_jsonb_binary_keeps_its_version_byte_and_plain_values_are_untouched() -> None:
    out = MK.mask_json_members(b'\x01{"cvv": "123"}', _K_JSONB_BIN)
    assert out == b'\x01{"cvv": "***"}'
    assert MK.mask_json_members(b'{"id": 1, "note": "cvv is fine here"}', _K_JSON) is None
    assert MK.mask_json_members(b'"cvv"', _K_JSON) is None  # a string, no member
    assert MK.mask_json_members(b'{"cvv": oops', _K_JSON) is None  # not JSON: the PAN scan alone


def test_too_deep_to_walk_is_redacted_whole() -> None:
    deep = b'{"cvv": 1, "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    out = MK.mask_json_members(deep, _K_JSON)
    assert out == b'"' + b"*" * (len(deep) - 2) + b'"'


def test_a_huge_value_naming_a_rule_column_is_redacted_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(masking, "JSON_WALK_MAX", 64)
    big = json.dumps({"note": "x" * 100, "cvv": "123"}).encode()
    assert MK.mask_json_members(big, _K_JSON) == b'"' + b"*" * (len(big) - 2) + b'"'
    assert MK.mask_json_members(json.dumps({"note": "x" * 100}).encode(), _K_JSON) is None  # names none


def test_a_datarow_with_a_json_column() -> None:
    plan = MK.row_plan([ColumnInfo("id", type_oid=23), ColumnInfo("doc", type_oid=114)])
    assert plan.actions == ("pan", "pan")
    assert plan.native == bytes([1, 1])  # the C walk may take rows without a rule name
    row = datarow_body(b"1", b'{"cvv": "123", "card": "4111111111111111"}')
    out = MK.mask_datarow(row, plan)
    assert out is not None
    assert datarow_fields(out)[1] == b'{"cvv": "***", "card": "411111******1111"}'
    plain = Masker(MaskingPolicy(sensitive_columns=[])).row_plan([ColumnInfo("doc", type_oid=114)])
    assert not plain.json_members  # no rule columns: no member to judge


ROWS = st.lists(st.tuples(
    st.sampled_from([b"1", b"4111111111111111", b"note cvv", b""]),
    st.dictionaries(st.sampled_from(["id", "cvv", "Email", "card", "brand"]),
                    st.one_of(st.integers(),
                              st.sampled_from(["4111111111111111", "x", "5555 5555 5555 4444"])),
                    max_size=4),
), min_size=1, max_size=40)


@settings(max_examples=200, deadline=None)
@given(ROWS, st.integers(1, 4096))
def test_the_c_walk_and_python_agree_row_for_row(
    rows: list[tuple[bytes, dict[str, object]]], window: int
) -> None:
    assert masking._cmask is not None, "the C module is built by the project's install (.ci/bootstrap)"
    plan = MK.row_plan([ColumnInfo("t", type_oid=25), ColumnInfo("doc", type_oid=3802, format=1)])
    bodies = [datarow_body(t, b"\x01" + json.dumps(d).encode()) for t, d in rows]
    buf = b"".join(datarow_frame(b) for b in bodies)
    expect = b"".join(datarow_frame(b if (new := MK.mask_datarow(b, plan)) is None else new) for b in bodies)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(masking._Cuts, "WINDOW", window)  # small windows: names across their ends
        assert mask_as_the_tunnel_does(Masker(MK.policy, KEY), buf, plan) == expect
