"""Binary int8, numeric and float8 result values (what drivers such as psycopg's binary cursors, asyncpg or
pgjdbc ask for): read as the number they are, and sent as NULL when their text form would be masked. Other
binary values (a record, bytea): their bytes scanned as text is."""

from __future__ import annotations

import math
import struct
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from psycopg.types.numeric import DecimalBinaryDumper
from tests.stack.pgraw import datarow_body, datarow_fields, datarow_frame, mask_as_the_tunnel_does

from pcigate.masking import (
    _K_FLOAT8,
    _K_INT8,
    _K_NUMERIC,
    ColumnInfo,
    Masker,
    binary_number_text,
    float8_text,
)
from pcigate.models import MaskingPolicy

PAN = 4111111111111111
NOT_PAN = 4111111111111112  # fails Luhn
_dump = DecimalBinaryDumper(Decimal).dump


def numeric(x: str) -> bytes:
    return bytes(_dump(Decimal(x)))


def int8(x: int) -> bytes:
    return struct.pack("!q", x)


def float8(x: float) -> bytes:
    return struct.pack("!d", x)


def int8_array(values: list[int | None]) -> bytes:
    head = struct.pack("!iiIii", 1, int(None in values), 20, len(values), 1)
    return head + b"".join(struct.pack("!i", -1) if v is None else struct.pack("!i", 8) + int8(v)
                           for v in values)


MK = Masker(MaskingPolicy())
COLS = [ColumnInfo("id", type_oid=20, format=1), ColumnInfo("amount", type_oid=1700, format=1),
        ColumnInfo("ids", type_oid=1016, format=1)]


@settings(max_examples=300, deadline=None)
@given(st.decimals(allow_nan=True, allow_infinity=True, places=None).filter(
    lambda d: not d.is_finite() or abs(d.adjusted()) < 200))
def test_numeric_text_is_what_postgres_prints(d: Decimal) -> None:
    """numeric_out's text, as Decimal prints the same value in fixed point (NaN and infinities: none)."""
    text = binary_number_text(bytes(_dump(d)), _K_NUMERIC)
    if not d.is_finite():
        assert text is None
    else:
        assert text is not None
        expect = format(d, "f")
        assert text.decode() == (expect[1:] if d.is_zero() and expect.startswith("-") else expect)


@given(st.integers(-(2**63), 2**63 - 1))
def test_int8_text(x: int) -> None:
    assert binary_number_text(int8(x), _K_INT8) == str(x).encode()


def test_row_plan_reads_binary_numbers_only() -> None:
    plan = MK.row_plan(COLS)
    assert plan.forced  # no digit pattern shows in such bytes: every row is looked at
    assert plan.native is None  # an int8[] column: Python's
    assert MK.row_plan(COLS[:2]).native == bytes([5, 6])  # int8 and numeric: the C walk's ops
    text = MK.row_plan([ColumnInfo("id", type_oid=20, format=0)])
    assert text.native == bytes([1])  # text format: the digit scan, as ever
    small = MK.row_plan([ColumnInfo("n", type_oid=23, format=1)])  # int4: its 4 bytes are scanned, in vain
    assert small.native == bytes([1])
    assert MK.row_plan([ColumnInfo("f", type_oid=701, format=1)]).native is None  # float8: Python's
    assert plan.actions == ("pan", "pan", "pan")


@pytest.mark.parametrize(("value", "kind", "is_pan"), [
    (int8(PAN), _K_INT8, True),
    (int8(-PAN), _K_INT8, True),
    (int8(NOT_PAN), _K_INT8, False),
    (int8(1234), _K_INT8, False),
    (int8(-(2**63)), _K_INT8, False),
    (numeric(str(PAN)), _K_NUMERIC, True),
    (numeric(f"{PAN}.00"), _K_NUMERIC, True),
    (numeric(f"-{PAN}"), _K_NUMERIC, True),
    (numeric(f"0.{PAN}"), _K_NUMERIC, True),  # the digits after the point are a run of their own
    (numeric(f"{PAN}E+4"), _K_NUMERIC, False),  # 4111111111111111 0000: 20 digits, no card
    (numeric(f"{PAN}E-4"), _K_NUMERIC, False),  # 411111111111.1111: the point splits it, as in text
    (numeric("NaN"), _K_NUMERIC, False),
    (numeric("-Infinity"), _K_NUMERIC, False),
    (numeric("12.5"), _K_NUMERIC, False),
    (float8(378282246310005.0), _K_FLOAT8, True),  # 15 digits print plain: "378282246310005"
    (float8(-4222222222222.0), _K_FLOAT8, True),
    (float8(4222222222222.25), _K_FLOAT8, True),  # "4222222222222.25": the run before the point
    (float8(0.4222222222222), _K_FLOAT8, True),  # "0.4222222222222": the run after it
    (float8(4111111111111112.0), _K_FLOAT8, False),  # "4.111111111111112e+15"; fails Luhn anyway
    (float8(6200000000000000005.0), _K_FLOAT8, False),  # beyond 2**53: no longer the card's digits
    (float8(378282246310006.0), _K_FLOAT8, False),  # fails Luhn
    (float8(1e300), _K_FLOAT8, False),
    (float8(math.nan), _K_FLOAT8, False),
    (float8(-math.inf), _K_FLOAT8, False),
])
def test_number_is_pan_as_its_text_would_be_masked(value: bytes, kind: int, is_pan: bool) -> None:
    assert MK.number_is_pan(value, kind) is is_pan
    text = binary_number_text(value, kind)
    assert (text is not None and MK.scan(text) is not None) is is_pan


@pytest.mark.parametrize(("text", "masked"), [
    (b"4.111111111111111e+15", b"4.11111******1111e+15"),  # float8out of 4111111111111111
    (b"-4.111111111111111e+15", b"-4.11111******1111e+15"),
    (b"{4.111111111111111e+15,7}", b"{4.11111******1111e+15,7}"),  # a float8[] in text
    (b'{"amount": 6.011111111111117e+15}', b'{"amount": 6.01111******1117e+15}'),  # to_json(float8)
    (b"4.1111111111114e+15", b"4.11111****1114e+15"),  # 4111111111111400: the digits it shows
    (b"4.111111111111112e+15", None),  # fails Luhn
    (b"4.5e+15", None),  # 4500000000000000 fails Luhn
    (b"14.111111111111111e+15", None),  # not float8out's notation (one digit before the point)
    (b"4.111111111111111e+16", None),  # 17 digits: beyond 2**53, no card stored exactly
])
def test_a_card_number_in_exponent_notation_is_masked_in_its_digits(
    text: bytes, masked: bytes | None
) -> None:
    """psql shows a 16-digit float8 as 4.111111111111111e+15: the digits of a card in plain sight, which no
    13-digit run catches. Such a token whose 16-digit value passes Luhn is masked in the digits it shows
    (same length), in any text; the binary float8 is NULL, as its text form is masked."""
    assert MK.scan(text) == masked
    assert Masker(MaskingPolicy(pan="redact")).scan(b"4.111111111111111e+15") == b"*.***************e+15"
    assert MK.number_is_pan(float8(4111111111111111.0), _K_FLOAT8)
    assert MK.has_exp16(b"x 4.5e+15 y")  # COPY chunks are asked this too (no 13-digit run here)
    plan = MK.row_plan([ColumnInfo("f", type_oid=701)])
    assert plan.exp16
    assert plan.forced  # every row walked: a chunk of such floats need not hold a 13-digit run
    assert not MK.row_plan([ColumnInfo("t", type_oid=25)]).exp16  # a text column: as the C walk, no rule
    row = datarow_body(b"4.111111111111111e+15")
    assert MK.mask_datarow(row, MK.row_plan([ColumnInfo("t", type_oid=25)])) is None


def test_datarow_sends_a_pan_number_as_null_and_keeps_the_rest() -> None:
    plan = MK.row_plan(COLS)
    row = datarow_body(int8(PAN), numeric(f"-{PAN}.50"), int8_array([7, PAN, None, NOT_PAN]))
    new = MK.mask_datarow(row, plan)
    assert new is not None
    got = datarow_fields(new)
    assert got[:2] == [None, None]
    assert got[2] == int8_array([7, None, None, NOT_PAN])  # the element only, the has-null flag set
    clean = datarow_body(int8(NOT_PAN), numeric("12.50"), int8_array([1, 2]))
    assert MK.mask_datarow(clean, plan) is None
    assert MK.mask_datarow(datarow_body(None, None, int8_array([])), plan) is None


@pytest.mark.parametrize("bad", [
    b"\x00" * 7,  # int8 of 7 bytes
    b"\x00\x01\x00\x00\x00\x00\x00\x00",  # numeric: one digit announced, none there
    b"\x00\x01\x00\x00\x00\x00\x00\x00\x27\x10",  # a base-10000 digit of 10000
    b"\x00\x00\x00\x00\x12\x34\x00\x00",  # an unknown sign
])
def test_malformed_numbers_raise(bad: bytes) -> None:
    plan = MK.row_plan([ColumnInfo("n", type_oid=20 if len(bad) == 7 else 1700, format=1)])
    with pytest.raises(ValueError):
        MK.mask_datarow(datarow_body(bad), plan)
    row = datarow_body(bad)
    message = b"D" + struct.pack("!I", 4 + len(row)) + row
    assert MK.mask_datarows(message, 0, plan) == (None, 0)  # the C walk leaves it to that Python path


def test_malformed_number_array_raises() -> None:
    plan = MK.row_plan([ColumnInfo("ids", type_oid=1016, format=1)])
    whole = int8_array([PAN])
    for cut in (4, 11, len(whole) - 1):
        with pytest.raises(ValueError):
            MK.mask_datarow(datarow_body(whole[:cut]), plan)


@pytest.mark.parametrize(("f", "text"), [
    (0.0, "0"), (-0.0, "-0"), (1.0, "1"), (-2.5, "-2.5"), (1500.0, "1500"), (0.1, "0.1"), (1e-4, "0.0001"),
    (1.5e-5, "1.5e-05"), (123456789012345.6, "123456789012345.6"), (999999999999999.0, "999999999999999"),
    (1e15, "1e+15"), (4111111111111111.0, "4.111111111111111e+15"), (1.7976931348623157e308,
    "1.7976931348623157e+308"), (5e-324, "5e-324"), (2.0**53, "9.007199254740992e+15"),
])
def test_float8_text_is_float8out(f: float, text: str) -> None:
    """Examples checked against PostgreSQL 15's float8out (the real one is compared in
    tests/integration/test_tunnel_masking.py)."""
    assert float8_text(f) == text.encode()
    assert binary_number_text(float8(f), _K_FLOAT8) == text.encode()


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_float8_text_reads_back_exactly(f: float) -> None:
    text = float8_text(f)
    assert text is not None
    assert float(text) == f
    assert math.copysign(1.0, float(text)) == math.copysign(1.0, f)
    assert (b"e" in text) == (f != 0 and not 1e-4 <= abs(f) < 1e15)  # float8out's plain range
    assert not text.endswith(b".0")


def test_binary_values_of_other_types_are_scanned_in_place() -> None:
    """A binary record (``row(id, pan)``: int32 count, then per field its type OID, length and bytes) holds
    its text fields as they are: masked there, same length, so the record stays well-formed."""
    pan = str(PAN).encode()
    record = struct.pack("!iIiiIi", 2, 23, 4, 7, 25, len(pan)) + pan
    plan = MK.row_plan([ColumnInfo("r", type_oid=2249, format=1), ColumnInfo("f", type_oid=701, format=1)])
    out = MK.mask_datarow(datarow_body(record, float8(378282246310005.0)), plan)
    assert out is not None
    r, f = datarow_fields(out)
    assert r == record.replace(pan, b"411111******1111")
    assert f is None


@settings(max_examples=150, deadline=None)
@given(st.lists(st.one_of(st.integers(10**15, 2**53 - 1),
                          st.sampled_from([4111111111111111, 6011111111111117])), min_size=1, max_size=60))
def test_exponent_notation_rows_leave_the_c_walk_and_agree_with_python(values: list[int]) -> None:
    """Rows holding ``e+15`` go to Python (the C walk does not know the notation); the tunnel's loop gives
    what Python gives row by row, and no card shows in either spelling."""
    plan = MK.row_plan([ColumnInfo("id", type_oid=23), ColumnInfo("f", type_oid=701)])
    bodies = [datarow_body(str(i).encode(), float8_text(float(v))) for i, v in enumerate(values)]
    buf = b"".join(datarow_frame(b) for b in bodies)
    expect = b"".join(datarow_frame(b if (new := MK.mask_datarow(b, plan)) is None else new) for b in bodies)
    got = mask_as_the_tunnel_does(MK, buf, plan)
    assert got == expect
    assert b"4.111111111111111e+15" not in got
    assert b"6.011111111111117e+15" not in got


def test_copy_rows_in_exponent_notation_are_masked() -> None:
    """COPY (SELECT pan::float8 ...) TO STDOUT: the C walk over CopyData stops before the row, for Python."""
    rows = [b"1\t2.5e+14\n", b"2\t4.111111111111111e+15\n", b"3\t12\n"]
    buf = b"".join(b"d" + struct.pack("!i", len(r) + 4) + r for r in rows)
    got = MK.mask_copydatas(buf, 0)
    assert got is not None
    _masked, stop = got
    assert stop == len(rows[0]) + 5  # the second row is Python's
    assert MK.mask_copy_data(rows[1]) == b"2\t4.11111******1111e+15\n"
