"""pcigate._cmask (the C masking hot path) against the Python reference, byte for byte.

The C module is built by hatch_build.py when the project is installed; it must be present here, or the
tunnel would run at a fraction of its speed without anyone noticing.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from psycopg.types.numeric import DecimalBinaryDumper

from pcigate import masking
from pcigate.masking import ColumnInfo, Masker, RowPlan, frame
from pcigate.models import MaskingPolicy

PANS = ["4111111111111111", "5500005555555559", "378282246310005", "6011000990139424", "3530111333300000",
        "4222222222222", "6221261234567890129", "36227206271667"]


def datarow(fields: list[bytes | None]) -> bytes:
    body = struct.pack("!h", len(fields)) + b"".join(
        struct.pack("!i", -1) if f is None else struct.pack("!i", len(f)) + f for f in fields
    )
    return frame(b"D", body)


def row_walk(mk: Masker, buf: bytes, plan: RowPlan, native: bool) -> bytes:
    """What the tunnel does (``native``): C over runs of rows, Python for the rows C leaves, until a
    non-DataRow; or the Python reference alone over every row."""
    out: list[bytes] = []
    pos = 0
    end = len(buf)
    while pos + 5 <= end and buf[pos] == ord("D"):
        if native:
            got = mk.mask_datarows(buf, pos, plan)
            assert got is not None
            masked, stop = got
            assert pos <= stop <= end
            if masked is not None:
                assert len(masked) == stop - pos
            out.append(buf[pos:stop] if masked is None else bytes(masked))
            if stop > pos:
                pos = stop
                continue
        (n,) = struct.unpack_from("!I", buf, pos + 1)
        if n < 4 or pos + 1 + n > end:  # malformed or partial: left to the scanner
            break
        new = mk.mask_datarow(buf[pos + 5 : pos + 1 + n], plan)
        out.append(buf[pos : pos + 1 + n] if new is None else frame(b"D", new))
        pos += 1 + n
    out.append(buf[pos:])
    return b"".join(out)


def native_walk(mk: Masker, buf: bytes, plan: RowPlan) -> bytes:
    return row_walk(mk, buf, plan, True)


def python_walk(mk: Masker, buf: bytes, plan: RowPlan) -> bytes:
    return row_walk(mk, buf, plan, False)


Walk = Callable[[Masker, bytes, RowPlan], bytes]


def outcome(walk: Walk, mk: Masker, buf: bytes, plan: RowPlan) -> bytes | str:
    try:
        return walk(mk, buf, plan)
    except ValueError:
        return "ValueError"


def test_the_c_module_is_built() -> None:
    assert masking._cmask is not None, "pcigate._cmask is missing: reinstall (pip install -e .) with gcc"
    assert Masker(MaskingPolicy()).native


def test_contiguous_pans_masked_in_place_and_rows_without_cards_untouched() -> None:
    mk = Masker(MaskingPolicy())
    plan = mk.row_plan([ColumnInfo("id"), ColumnInfo("card"), ColumnInfo("cvv")])
    rows = [datarow([b"1", f"card {p} ok".encode(), b"123"]) for p in PANS]
    rows.append(datarow([b"2", b"no card 12345", None]))
    buf = b"".join(rows) + frame(b"C", b"SELECT 9\x00")
    got = mk.mask_datarows(buf, 0, plan)
    assert got is not None
    masked, stop = got
    assert stop == len(buf) - len(frame(b"C", b"SELECT 9\x00"))  # stops at CommandComplete
    assert masked is not None
    text = bytes(masked)
    assert b"411111******1111" in text
    assert not any(p.encode() in text for p in PANS)
    assert text.count(b"***") >= len(PANS)  # every cvv redacted
    assert native_walk(mk, buf, plan) == python_walk(mk, buf, plan)


def test_grouped_and_track_rows_are_left_to_python() -> None:
    mk = Masker(MaskingPolicy())
    plan = mk.row_plan([ColumnInfo("note")])
    plain = datarow([b"4111111111111111"])
    grouped = datarow([b"4111 1111 1111 1111"])
    track = datarow([b";4111111111111111=2512101?"])
    buf = plain + grouped + plain + track + plain
    got = mk.mask_datarows(buf, 0, plan)
    assert got is not None
    assert got[1] == len(plain)  # stops before the grouped row
    assert mk.mask_datarows(buf, len(plain), plan) == (None, len(plain))
    assert native_walk(mk, buf, plan) == python_walk(mk, buf, plan)
    assert b"1111 1111 1111" not in native_walk(mk, buf, plan)


def test_malformed_rows_stop_the_walk_before_them() -> None:
    mk = Masker(MaskingPolicy())
    plan = mk.row_plan([ColumnInfo("a"), ColumnInfo("b")])
    good = datarow([b"4111111111111111", b"x"])
    for bad in (datarow([b"x"]),  # field count differs from the plan
                frame(b"D", struct.pack("!hi", 2, 50) + b"short"),  # field runs past the message
                frame(b"D", struct.pack("!hii", 2, -2, -1)),  # invalid length
                frame(b"D", struct.pack("!hi", 2, -1) + b"\x00\x00")):  # trailing bytes
        buf = good + bad + good
        got = mk.mask_datarows(buf, 0, plan)
        assert got is not None
        assert got[1] == len(good)
        assert mk.mask_datarows(buf, len(good), plan) == (None, len(good))
        assert outcome(native_walk, mk, buf, plan) == outcome(python_walk, mk, buf, plan)
    with pytest.raises(ValueError, match="fields"):  # Python reads a malformed row that may hold a PAN
        native_walk(mk, good + datarow([b"4111111111111111"]), plan)


def test_partial_message_is_not_touched() -> None:
    mk = Masker(MaskingPolicy())
    plan = mk.row_plan([ColumnInfo("a")])
    row = datarow([b"4111111111111111"])
    buf = row + row[:-3]
    got = mk.mask_datarows(buf, 0, plan)
    assert got is not None
    assert got[1] == len(row)


def test_plans_the_c_code_does_not_cover_fall_back() -> None:
    pol = MaskingPolicy.model_validate({"columns": [{"column": "email", "action": "hash"}]})
    mk = Masker(pol, hash_key=b"k" * 32)
    plan = mk.row_plan([ColumnInfo("email")])
    assert plan.native is None
    assert mk.mask_datarows(datarow([b"a@b"]), 0, plan) is None
    opaque = Masker(MaskingPolicy()).row_plan([ColumnInfo("cvv", type_oid=23, format=1)])  # int4 binary
    assert opaque.native is None


# -- Hypothesis: any rows, any plan the C code takes, same bytes as the Python code --------------------------

PIECES = st.sampled_from(
    [*PANS, "4111 1111 1111 1111", "4111-1111-1111-1111", "3782 822463 10005", "12345678901234567890",
     "1234567890123", "%B4111111111111111^DOE/JOHN^2512101?", ";4111111111111111=2512101?", "=", "^", " ",
     "-", "--", "  ", "x", "é", '"', "{", "}", ",", "0", "7", "41111111", "11111111", "*", "\x00", "\x01"])
# binary int8 / numeric values, PANs among them (a column of those types reads them as numbers)
_NUMBER_DIGITS = st.one_of(st.sampled_from(PANS), st.integers(0, 10**19).map(str))
INT8 = st.one_of(_NUMBER_DIGITS.map(int), st.integers(-(2**63), 2**63 - 1)).filter(
    lambda x: -(2**63) <= x < 2**63).map(lambda x: struct.pack("!q", x))
NUMERIC = st.one_of(
    st.tuples(st.sampled_from(["", "-"]), _NUMBER_DIGITS, st.sampled_from(["", ".00", "E+4", "E-4"]))
    .map("".join),
    _NUMBER_DIGITS.map(lambda d: "0." + d),
    st.decimals(places=None, allow_nan=True, allow_infinity=True).filter(
        lambda d: not d.is_finite() or abs(d.adjusted()) < 100).map(str),
).map(lambda s: bytes(DecimalBinaryDumper(Decimal).dump(Decimal(s))))
VALUE = st.one_of(st.none(), st.lists(PIECES, max_size=8).map("".join).map(str.encode),
                  st.binary(max_size=40), INT8, NUMERIC)
COLUMN = st.tuples(st.sampled_from(["id", "card", "note", "cvv", "security_code", "pin"]),
                   st.sampled_from([25, 114, 3802, 1043, 23, 20, 1700]), st.sampled_from([0, 1]))


@settings(max_examples=500, deadline=None)
@given(cols=st.lists(COLUMN, min_size=1, max_size=5), data=st.data(),
       pan=st.sampled_from(["truncate", "redact"]), track=st.booleans(), tail=st.binary(max_size=12))
def test_c_and_python_agree(cols: list[tuple[str, int, int]], data: st.DataObject, pan: str, track: bool,
                            tail: bytes) -> None:
    mk = Masker(MaskingPolicy.model_validate({"pan": pan, "track_data": track}))
    plan = mk.row_plan([ColumnInfo(name, type_oid=oid, format=fmt) for name, oid, fmt in cols])
    if plan.native is None:  # an opaque (binary non-text) redacted column: not the C code's
        return
    rows = data.draw(st.lists(st.lists(VALUE, min_size=len(cols), max_size=len(cols)), max_size=6))
    buf = b"".join(datarow(r) for r in rows) + tail
    assert outcome(native_walk, mk, buf, plan) == outcome(python_walk, mk, buf, plan)


def copy_walk(mk: Masker, buf: bytes, native: bool) -> bytes:
    """A text COPY OUT stream: C over runs of CopyData (when ``native``), Python for the rest."""
    out: list[bytes] = []
    pos = 0
    end = len(buf)
    while pos + 5 <= end and buf[pos] == ord("d"):
        if native:
            got = mk.mask_copydatas(buf, pos)
            assert got is not None
            masked, stop = got
            out.append(buf[pos:stop] if masked is None else bytes(masked))
            if stop > pos:
                pos = stop
                continue
        (n,) = struct.unpack_from("!I", buf, pos + 1)
        if n < 4 or pos + 1 + n > end:  # malformed or partial: the tunnel passes it to the scanner as is
            break
        new = mk.mask_copy_data(buf[pos + 5 : pos + 1 + n])
        out.append(buf[pos : pos + 1 + n] if new is None else frame(b"d", new))
        pos += 1 + n
    out.append(buf[pos:])
    return b"".join(out)


def test_copy_rows_masked_in_c() -> None:
    mk = Masker(MaskingPolicy())
    lines = [frame(b"d", f"{i}\tholder\t{p}\t12/29\n".encode()) for i, p in enumerate(PANS)]
    buf = b"".join(lines) + frame(b"c", b"")
    got = mk.mask_copydatas(buf, 0)
    assert got is not None
    masked, stop = got
    assert stop == len(buf) - 5
    assert masked is not None
    assert not any(p.encode() in masked for p in PANS)
    assert copy_walk(mk, buf, True) == copy_walk(mk, buf, False)


@settings(max_examples=300, deadline=None)
@given(rows=st.lists(st.lists(PIECES, max_size=10).map("\t".join).map(lambda s: (s + "\n").encode()),
                     max_size=6),
       pan=st.sampled_from(["truncate", "redact"]), track=st.booleans(), tail=st.binary(max_size=12))
def test_copy_c_and_python_agree(rows: list[bytes], pan: str, track: bool, tail: bytes) -> None:
    mk = Masker(MaskingPolicy.model_validate({"pan": pan, "track_data": track}))
    buf = b"".join(frame(b"d", r) for r in rows) + tail
    assert copy_walk(mk, buf, True) == copy_walk(mk, buf, False)
