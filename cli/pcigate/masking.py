"""Inline masking of card data (PCI DSS 3.3/3.4): pure code, bytes in, bytes out. No I/O.

What is masked
--------------
* **PAN**: 13–19 ASCII digits, contiguous or grouped with single spaces or dashes (``4111 1111 1111 1111``,
  ``3782-822463-10005``, ``6221 2612 3456 7890 123``), Luhn-valid, anywhere inside a value (free text, JSON,
  CSV, XML). A *run* is a maximal sequence of digit groups joined by single separators; a candidate PAN is
  any window of consecutive groups of one run whose digits number 13–19. So ``qty 2 4111111111111111`` and
  ``4111111111111111 12 25`` still find the card, while a contiguous run of more than 19 digits is never a
  PAN and no PAN is looked for *inside* it (PCI practice: a 25-digit account number or hash is not a card,
  and every 25-digit run holds a Luhn-valid 16-digit substring with probability ~1 − 0.9¹⁰ ≈ 65 %).
  Policy ``pan="truncate"`` keeps the first 6 and last 4 digits and puts ``*`` over the digits in between
  (separators kept); ``pan="redact"`` puts ``*`` over every digit. Both keep the length, so a frame that
  only had PANs masked needs no new length.
* **Track data** (when ``track_data``): track 1 ``%B<PAN>^NAME^YYMM…?`` and track 2 ``;<PAN>=YYMM…?`` (the
  sentinels optional, PAN Luhn-valid): every byte of the track becomes ``*`` (same length).
* **Column rules**: ``sensitive_columns`` (any table, case-insensitive) and ``ColumnMaskRule(action=
  "redact")`` replace the whole value with ``*`` × its length; ``action="hash"`` replaces it with
  ``h:`` + the first 16 hex digits of HMAC-SHA256(per-deployment key, value) — deterministic, so joins and
  ``GROUP BY`` on the masked value still work, and useless without the key. A hash changes the length:
  :meth:`Masker.mask_datarow` rewrites the field lengths and :func:`frame` re-frames the message. In a
  json/jsonb value, a member named like a rule column (``row_to_json(c)``, ``json_agg(t)``: a row's
  columns become members) gets that column's treatment (:meth:`Masker.mask_json_members`). A column rule
  cannot see into any other expression (``cvv || ''``, ``row(cvv, id)``).

Speed
-----
The question asked of every value is "is there a run of ≥ 13 digits, separators ignored?", answered by one
``bytes.translate`` (digits → ``0``, every other byte → ``.``, spaces and dashes deleted) and one substring
search for thirteen ``0`` — both in C. Only values that pass it are walked with a regular expression and
Luhn-checked. :meth:`Masker.mask_datarow` asks it of the whole DataRow body first, so a row without a long
digit run costs one call and two C passes, and :meth:`Masker.has_candidate` lets the caller ask it of a
whole chunk of complete messages before framing them at all.

Limits (documented choices)
---------------------------
* ASCII digits only (every PostgreSQL client encoding is ASCII-compatible for digits); full-width digits
  and PANs spelled with other separators (``4111.1111…``, ``4111/1111…``) are not looked for.
* Masking a PAN stored as a JSON *number* or in a numeric column (text format) yields a value the client's
  type parser may refuse (``411111******1111`` is no number): the card is never shown, which is the point.
* Binary-format results (drivers such as asyncpg, psycopg's binary cursors, pgjdbc for int8): an int8,
  numeric or float8 value, or such an element of an int8[]/numeric[]/float8[] array, is read as the number
  it is and judged by its text form (what ``psql`` would show); one that text masking would change is sent
  as NULL, since no masked stand-in exists in those formats. float8out prints a 16-digit float8 as
  ``4.111111111111111e+15``: such a token whose 16-digit value passes Luhn is masked in its digits
  (``4.11111******1111e+15``) in float8/float8[]/json columns and in COPY rows, errors and notices, so a
  card stored as float8 is masked in text and NULL in binary. int2/int4/float4 are too short to hold a card
  number. The bytes of any other binary value (a record, bytea, hstore, a range) are scanned as text is, so
  text inside it is masked in place. Not read as
  numbers (their bytes pass as they are): a number inside a binary record (``row(pan::bigint)``: the
  record's fields are not matched to column rules either), and binary COPY (it carries no types, so its
  int8/numeric/float8 fields are not recognised as numbers).
* Masking is applied until nothing changes, so it is idempotent and no Luhn-valid 13–19 digit window is
  left in the output, even one formed by digits that the first pass left next to each other.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from types import ModuleType
from typing import Final, Literal, NamedTuple

from pcigate.models import MaskingPolicy

_cmask: ModuleType | None
try:
    from pcigate import _cmask
except ImportError:  # built by hatch_build.py at install time; without it the Python code below does it all
    _cmask = None

__all__ = [
    "BINARY_ARRAY_OIDS",
    "HASH_HEX_CHARS",
    "JSON_OIDS",
    "TEXT_LIKE_OIDS",
    "ColumnAction",
    "ColumnInfo",
    "Masker",
    "RowPlan",
    "frame",
    "has_candidate",
    "luhn_ok",
]

ColumnAction = Literal["pan", "redact", "hash", "skip"]
"""What happens to one result column: ``pan`` scan for PANs/track data; ``redact`` whole value to ``*``;
``hash`` keyed hash; ``skip`` pass through untouched (a binary-format field of a non-text type)."""

# Type OIDs (pg_type) whose binary send format is the text itself (jsonb: a 1-byte version, then the text).
OID_NAME: Final = 19
OID_TEXT: Final = 25
OID_JSON: Final = 114
OID_XML: Final = 142
OID_UNKNOWN: Final = 705
OID_BPCHAR: Final = 1042
OID_VARCHAR: Final = 1043
OID_JSONB: Final = 3802
TEXT_LIKE_OIDS: Final = frozenset(
    {OID_NAME, OID_TEXT, OID_JSON, OID_XML, OID_UNKNOWN, OID_BPCHAR, OID_VARCHAR, OID_JSONB}
)
JSON_OIDS: Final = frozenset({OID_JSON, OID_JSONB})
# Arrays of text-like types (name[], text[], json[], xml[], bpchar[], varchar[], jsonb[]): in binary format
# their elements are walked (each is int32 length + text), never scanned as one blob.
BINARY_ARRAY_OIDS: Final = frozenset({1003, 1009, 199, 143, 1014, 1015, 3807})
# Numbers wide enough to hold a PAN, in binary format: int8 (8 bytes, two's complement), numeric
# (base-10000 digits) and float8 (IEEE 754, up to 17 significant digits). Their binary values are read as the
# number they are and judged by their text form (int8out, numeric_out, float8out); int2/int4 (at most 10
# digits) and float4 (at most 9) cannot hold one. Arrays of them element by element.
OID_INT8: Final = 20
OID_FLOAT8: Final = 701
OID_NUMERIC: Final = 1700
BINARY_NUMBER_OIDS: Final = frozenset({OID_INT8, OID_NUMERIC, OID_FLOAT8})
BINARY_NUMBER_ARRAY_OIDS: Final = {1016: OID_INT8, 1231: OID_NUMERIC, 1022: OID_FLOAT8}

HASH_HEX_CHARS: Final = 16
# a json value naming a rule column is walked member by member up to this size; a larger one is redacted whole
JSON_WALK_MAX: Final = 16 * 1024 * 1024
MIN_PAN: Final = 13
MAX_PAN: Final = 19

# -- the pre-filter ------------------------------------------------------------------------------------------

_DIGITS = b"0123456789"
# digits -> "0", everything else -> "."; used with delete=_SEPS, so grouped PANs become contiguous runs.
_PRE = bytes(0x30 if 0x30 <= i <= 0x39 else 0x2E for i in range(256))
_SEPS = b" -"
_RUN13 = b"0" * MIN_PAN
# digits -> "0", spaces and dashes -> "-", everything else -> ".": one 1:1 translate per value tells whether
# it has a contiguous 13-digit run ("0" * 13) and whether any digits are joined by a separator ("0-0").
_CLS = bytes(0x30 if 0x30 <= i <= 0x39 else 0x2D if i in (0x20, 0x2D) else 0x2E for i in range(256))
# Luhn: a doubled digit d contributes 2d or 2d-9.
_DOUBLE = bytes.maketrans(_DIGITS, b"0246813579")
# every digit -> "*", everything else kept (redact the digits of a slice, keep its separators)
_STAR_DIGITS = bytes.maketrans(_DIGITS, b"*" * 10)

# A run: digit groups joined by single spaces/dashes (maximal).
_RUN = re.compile(rb"[0-9]+(?:[ -][0-9]+)*")
# Track 1 (format B) and track 2, start/end sentinels optional. The PAN is checked with Luhn afterwards.
_TRACK1 = re.compile(rb"%?B([0-9][0-9 ]{11,21}[0-9])\^[^^\x00\r\n]{1,26}\^[0-9]{4}[0-9A-Za-z]{0,60}\??")
_TRACK2 = re.compile(rb";?([0-9]{13,19})=[0-9]{4}[0-9]{0,40}\??")
# A 16-digit number in float8out's exponent notation (PostgreSQL prints a float8 from 1e15 on so: a card
# number stored as float8 shows as 4.111111111111111e+15): a digit, a point, up to 15 digits, e+15.
_EXP16_MARK = b"e+15"
_EXP16_MIN = len(b"4.1e+15")
_EXP16_OIDS: Final = frozenset({701, 1022, 114})  # float8, float8[], json (to_json of a float8)
_EXP16 = re.compile(rb"(?<![0-9.])([1-9])\.([0-9]{1,15})e\+15(?![0-9])")

_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")
_HDR = struct.Struct("!BI")


def has_candidate(data: bytes | bytearray) -> bool:
    """True when ``data`` holds ≥ 13 digits in a row once spaces and dashes are ignored.

    A superset test: every PAN and every track holds such a run, so ``False`` means nothing in ``data`` can be
    masked by pattern. Safe on any bytes (framing bytes of complete messages only add false positives), so
    the caller may ask it of a whole read chunk before framing it. (A card number in float8's exponent
    notation need not hold such a run: rows whose plan says ``exp16`` are walked anyway, and COPY rows are
    asked :meth:`Masker.has_exp16` too.)
    """
    return _RUN13 in data.translate(_PRE, _SEPS)


def luhn_ok(digits: bytes) -> bool:
    """Luhn check of an ASCII digit string (no separators)."""
    n = len(digits)
    if n < 2:
        return False
    total = sum(digits[n - 1 :: -2]) + sum(digits[n - 2 :: -2].translate(_DOUBLE)) - 0x30 * n
    return total % 10 == 0


def frame(mtype: bytes | int, body: bytes | bytearray) -> bytes:
    """A typed protocol message: type byte, int32 length (self-inclusive), body."""
    t = mtype if isinstance(mtype, int) else mtype[0]
    return _HDR.pack(t, len(body) + 4) + bytes(body)


# -- the scanner ---------------------------------------------------------------------------------------------


def _mask_window(out: bytearray, groups: Sequence[tuple[int, int]], head: int, tail: int) -> None:
    """Put ``*`` over the digits of ``groups`` except the first ``head`` and the last ``tail``."""
    total = 0
    for s, e in groups:
        total += e - s
    k = 0
    stop = total - tail
    for s, e in groups:
        glen = e - s
        lo = head - k if head > k else 0
        hi = stop - k if stop - k < glen else glen
        if lo < hi:
            out[s + lo : s + hi] = b"*" * (hi - lo)
        k += glen


def _scan_pans(src: bytes | bytearray, out: bytearray | None, head: int, tail: int) -> tuple[bytearray | None,
                                                                                            bool]:
    """Mask every Luhn-valid 13–19 digit window of ``src`` (into ``out``, created on the first hit).

    Returns ``(out, regroup)``; ``regroup`` is True when a masked window was part of a run of several groups,
    the only case where masking can leave a new candidate (digits of neighbouring groups now adjacent).
    """
    regroup = False
    for m in _RUN.finditer(src):
        s, e = m.span()
        n = e - s
        if n < MIN_PAN:
            continue
        run = src[s:e]
        if b" " not in run and b"-" not in run:  # contiguous: the common case
            if n <= MAX_PAN and luhn_ok(bytes(run)):
                if out is None:
                    out = bytearray(src)
                if e - tail > s + head:
                    out[s + head : e - tail] = b"*" * (n - head - tail)
            continue
        groups: list[tuple[int, int]] = []
        pos = s
        for g in re.split(rb"[ -]", bytes(run)):
            groups.append((pos, pos + len(g)))
            pos += len(g) + 1
        ng = len(groups)
        for i in range(ng):
            total = 0
            for j in range(i, ng):
                total += groups[j][1] - groups[j][0]
                if total > MAX_PAN:
                    break
                if total >= MIN_PAN:
                    digits = b"".join(src[a:b] for a, b in groups[i : j + 1])
                    if luhn_ok(digits):
                        if out is None:
                            out = bytearray(src)
                        _mask_window(out, groups[i : j + 1], head, tail)
                        regroup = True
    return out, regroup


class ColumnInfo(NamedTuple):
    """One result column as the tunnel knows it from RowDescription (table: resolved from its OID)."""

    name: str
    table: str | None = None  # "name" or "schema.name"; None: unknown (then any table-scoped rule applies)
    type_oid: int = 0
    format: int = 0  # 0 text, 1 binary


# internal per-column codes of a RowPlan (_PAN_NUMBER, _PAN_NUMBER_ARRAY: binary int8/numeric, see
# BINARY_NUMBER_OIDS; their kind says which)
# _PAN_JSON: a json/jsonb value whose members named like a rule column are judged as that column, then the
# PAN scan
_SKIP, _PAN, _PAN_ARRAY, _REDACT, _HASH, _PAN_NUMBER, _PAN_NUMBER_ARRAY, _PAN_JSON = 0, 1, 2, 3, 4, 5, 6, 7
# value kinds for redact/hash output; for the number codes, the number's type
_K_TEXT, _K_JSON, _K_JSONB_BIN, _K_OPAQUE, _K_INT8, _K_NUMERIC, _K_FLOAT8 = 0, 1, 2, 3, 4, 5, 6
_NUMBER_KIND: Final = {OID_INT8: _K_INT8, OID_NUMERIC: _K_NUMERIC, OID_FLOAT8: _K_FLOAT8}
# _cmask's redact op per kind (its ops: 0 skip, 1 PAN scan, 2 redact text, 3 redact JSON, 4 redact jsonb,
# 5 binary int8, 6 binary numeric)
_NATIVE_REDACT: Final = {_K_TEXT: 2, _K_JSON: 3, _K_JSONB_BIN: 4}
_NATIVE_NUMBER: Final = {_K_INT8: 5, _K_NUMERIC: 6}


@dataclass(frozen=True, slots=True)
class RowPlan:
    """What to do with each field of the rows of one result set; build it once per RowDescription with
    :meth:`Masker.row_plan` (or :meth:`RowPlan.of` from bare actions, all text format)."""

    codes: tuple[int, ...]
    kinds: tuple[int, ...]
    forced: bool  # some column is redacted/hashed whatever its content, or a binary number: walk every row
    scans: bool  # some column is scanned for PANs
    # some column may show a float in exponent notation (float8, float8[] or json as text: float8out writes
    # a 16-digit card as 4.111111111111111e+15): every row is walked, and the C walk leaves rows holding
    # e+15 to Python
    exp16: bool = False
    # per column, the op code of pcigate._cmask.mask_datarows; None when some column needs what only the
    # Python code does (hash, NULL for an opaque redacted value, binary arrays)
    native: bytes | None = field(init=False, compare=False)
    # some json column's members are judged by name (_PAN_JSON): the C walk (a PAN scan for that column)
    # may take only rows in which no such name appears
    json_members: bool = field(init=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "json_members", _PAN_JSON in self.codes)
        ops = bytearray()
        for code, kind in zip(self.codes, self.kinds, strict=True):
            if code in (_SKIP, _PAN):
                ops.append(code)
            elif code == _PAN_JSON:
                ops.append(_PAN)
            elif code == _REDACT and kind != _K_OPAQUE:
                ops.append(_NATIVE_REDACT[kind])
            elif code == _PAN_NUMBER and kind in _NATIVE_NUMBER:
                ops.append(_NATIVE_NUMBER[kind])
            else:
                object.__setattr__(self, "native", None)
                return
        object.__setattr__(self, "native", bytes(ops))

    @classmethod
    def of(cls, actions: Iterable[ColumnAction]) -> RowPlan:
        code = {"skip": _SKIP, "pan": _PAN, "redact": _REDACT, "hash": _HASH}
        codes = tuple(code[a] for a in actions)
        return cls(codes, (_K_TEXT,) * len(codes), any(c >= _REDACT for c in codes),
                   any(c in (_PAN, _PAN_ARRAY) for c in codes))

    @property
    def actions(self) -> tuple[ColumnAction, ...]:
        names: dict[int, ColumnAction] = {_SKIP: "skip", _PAN: "pan", _PAN_ARRAY: "pan", _REDACT: "redact",
                                          _HASH: "hash", _PAN_NUMBER: "pan", _PAN_NUMBER_ARRAY: "pan",
                                          _PAN_JSON: "pan"}
        return tuple(names[c] for c in self.codes)


_NULL_FIELD: Final = b"\xff\xff\xff\xff"  # int32 -1: a NULL field or array element
_NUMERIC_HEAD = struct.Struct("!hhHh")  # ndigits, weight, sign, dscale
_FLOAT8 = struct.Struct("!d")
_PAN_MIN_VALUE: Final = 10 ** (MIN_PAN - 1)  # the smallest number of MIN_PAN digits
_NUMERIC_POS, _NUMERIC_NEG = 0x0000, 0x4000
_NUMERIC_SPECIAL = frozenset({0xC000, 0xD000, 0xF000})  # NaN, +Infinity, -Infinity


def _array_header(v: bytes) -> tuple[int, int]:
    """A binary array value (``array_send``: int32 ndim, has-null flag, element type; per dimension int32
    size and lower bound; then the elements): (element count, offset of the first element). Raises
    ValueError for a malformed header."""
    ndim = _I32.unpack_from(v, 0)[0]
    if not 0 <= ndim <= 6 or len(v) < 12 + 8 * ndim:
        raise ValueError("malformed binary array")
    count = 1 if ndim else 0
    for d in range(ndim):
        count *= max(_I32.unpack_from(v, 12 + 8 * d)[0], 0)
    return count, 12 + 8 * ndim


def _numeric_parts(value: bytes) -> tuple[int, bool, int, tuple[int, ...]] | None:
    """A binary numeric's (weight, negative, dscale, base-10000 digits); None for NaN and the infinities.
    Raises ValueError for a malformed value."""
    if len(value) < 8:
        raise ValueError("malformed numeric")
    ndigits, weight, sign, dscale = _NUMERIC_HEAD.unpack_from(value)
    if sign in _NUMERIC_SPECIAL:
        return None
    if ndigits < 0 or len(value) != 8 + 2 * ndigits or sign not in (_NUMERIC_POS, _NUMERIC_NEG) or dscale < 0:
        raise ValueError("malformed numeric")
    digits = struct.unpack_from(f"!{ndigits}h", value, 8)
    if ndigits and (min(digits) < 0 or max(digits) > 9999):
        raise ValueError("malformed numeric")
    return weight, sign == _NUMERIC_NEG, dscale, digits


_SMALL_INT: Final = 2.0**53


def _float8_digits(f: float) -> tuple[str, int]:
    """The significant digits float8out prints for ``f`` (> 0, finite) and the decimal exponent of the first.

    PostgreSQL's Ryu (src/common/d2s.c, built without STRICTLY_SHORTEST) picks the shortest decimal strictly
    inside the interval of numbers that read back as ``f``, the closest of them to ``f`` (ties to even), and
    prints an integer below 2**53 with all its digits. Python's repr picks the same digits, except that it
    also accepts the interval's bounds (when ``f``'s mantissa is even): only there is more work needed."""
    if f < _SMALL_INT and f.is_integer():
        text = str(int(f))
        return text.rstrip("0"), len(text) - 1
    mantissa, _, exp = repr(f).partition("e")
    whole, _, frac = mantissa.partition(".")
    every = whole + frac
    significant = every.lstrip("0")
    first = len(whole) - (len(every) - len(significant)) - 1 + (int(exp) if exp else 0)
    digits = significant.rstrip("0")
    if not _on_a_bound(f, int(digits), first - len(digits) + 1):
        return digits, first
    # repr's digits lie on a bound, which Ryu does not accept: the shortest number strictly inside
    x = Fraction(f)
    lo, hi = _bounds(f)
    for length in range(len(digits), 18):
        for k in (first - length + 1, first - length + 2):
            scale = Fraction(10) ** k
            low, high = math.floor(lo / scale) + 1, math.ceil(hi / scale) - 1
            if low <= high:
                n = min(max(round(x / scale), low), high)
                text = str(n)
                return text.rstrip("0"), len(text) - 1 + k
    raise AssertionError(f"no decimal for {f!r}")  # pragma: no cover - 17 digits always suffice


def _on_a_bound(f: float, n: int, k: int) -> bool:
    """Whether ``n`` * 10**``k`` is exactly half-way between ``f`` (> 0) and a neighbouring double. Those
    midpoints are dyadic rationals (an odd number over a power of two): a decimal whose 5s do not cancel is
    none of them, and an integer is one only where doubles are 2 or more apart (from 2**53 on)."""
    if k < 0:
        if n % 5**-k:
            return False
        shown = Fraction(n, 10**-k)
    elif f < _SMALL_INT:
        return False
    else:
        shown = Fraction(n * 10**k)
    return shown in _bounds(f)


def _bounds(f: float) -> tuple[Fraction, Fraction]:
    """The midpoints between ``f`` (> 0, finite) and its neighbouring doubles (above the largest double: as
    far as the spacing below it, as Ryu takes it)."""
    x = Fraction(f)
    return (x + Fraction(math.nextafter(f, 0.0))) / 2, x + Fraction(math.ulp(f)) / 2


def float8_text(f: float) -> bytes | None:
    """The text PostgreSQL's float8out sends for ``f`` (PostgreSQL >= 12 with extra_float_digits >= 1, the
    default: the shortest digits that read back exactly, see :func:`_float8_digits`; plain notation for a
    decimal exponent from -4 to 14, else ``d.ddde+XX``); None for NaN and the infinities."""
    if not math.isfinite(f):
        return None
    if f == 0:
        return b"-0" if math.copysign(1.0, f) < 0 else b"0"
    digits, x = _float8_digits(abs(f))
    if -4 <= x < 15:
        if x >= 0:
            head, tail = digits[: x + 1].ljust(x + 1, "0"), digits[x + 1 :]
            text = head + ("." + tail if tail else "")
        else:
            text = "0." + "0" * (-x - 1) + digits
    else:
        text = digits[0] + ("." + digits[1:] if len(digits) > 1 else "") + ("e+" if x >= 0 else "e-")
        text += f"{abs(x):02d}"
    return (("-" if f < 0 else "") + text).encode()


def binary_number_text(value: bytes, kind: int) -> bytes | None:
    """The text PostgreSQL sends for a binary int8 (``kind`` _K_INT8: int8out), numeric (_K_NUMERIC:
    numeric_out) or float8 (_K_FLOAT8: float8out) value; None for NaN and the infinities. Raises ValueError
    for a malformed value."""
    if kind == _K_INT8:
        if len(value) != 8:
            raise ValueError("malformed int8")
        return str(int.from_bytes(value, "big", signed=True)).encode()
    if kind == _K_FLOAT8:
        if len(value) != 8:
            raise ValueError("malformed float8")
        return float8_text(_FLOAT8.unpack(value)[0])
    parts = _numeric_parts(value)
    if parts is None:
        return None
    weight, neg, dscale, digits = parts
    ndigits = len(digits)
    out = ["-"] if neg else []
    if weight < 0:
        out.append("0")
    else:
        for d in range(weight + 1):
            g = digits[d] if d < ndigits else 0
            out.append(f"{g:04d}" if d else str(g))
    if dscale > 0:
        frac = "".join(f"{digits[d] if 0 <= d < ndigits else 0:04d}"
                       for d in range(weight + 1, weight + 1 + (dscale + 3) // 4))
        out.append("." + frac[:dscale])
    return "".join(out).encode()


def _table_matches(rule_table: str | None, table: str | None) -> int:
    """0: no match; 1: the rule has no table; 2: the rule's table matches (or the table is unknown)."""
    if rule_table is None:
        return 1
    if table is None:
        return 2  # fail closed: an unknown table may be the rule's
    rt = rule_table.lower()
    t = table.lower()
    if rt == t:
        return 2
    r_name = rt.rsplit(".", 1)[-1]
    t_name = t.rsplit(".", 1)[-1]
    if "." in rt and "." in t:
        return 0  # both schema-qualified and different
    return 2 if r_name == t_name else 0


class _Cuts:
    """For one chunk ``buf``: the next offset at or after a position where a row that only the Python code
    masks may start (``e+15``; a rule column's name as a JSON string, in any case). Each search resumes
    where the last one ended, so walking a chunk costs one pass over it whatever the number of calls; the
    JSON names are looked for in lower-cased windows of :attr:`WINDOW` bytes (never a copy of a whole
    1 GiB row)."""

    WINDOW = 256 * 1024
    KEEP_MAX = 4 * 1024 * 1024
    __slots__ = ("_exp_at", "_json_at", "_json_clear", "_longest", "_names", "buf")

    def __init__(self, buf: bytes, names: re.Pattern[bytes], longest: int) -> None:
        self.buf = buf
        self._names = names
        self._longest = longest
        self._exp_at = -1  # the first e+15 at or after the last position asked (len(buf): none); -1 unknown
        self._json_at = -1  # the same for the JSON names
        self._json_clear = 0  # no JSON name starts before this offset (from the first position asked)

    def exp16(self, pos: int) -> int:
        if self._exp_at < pos:
            i = self.buf.find(_EXP16_MARK, pos)
            self._exp_at = len(self.buf) if i < 0 else i
        return self._exp_at

    def json(self, pos: int) -> int:
        if self._json_at >= pos:
            return self._json_at
        buf, n = self.buf, len(self.buf)
        start = max(pos, self._json_clear)
        while start < n:
            end = min(n, start + self.WINDOW)
            found = self._names.search(buf[start : end + self._longest - 1].lower())
            if found is not None and start + found.start() < end:
                self._json_at = start + found.start()
                self._json_clear = self._json_at
                return self._json_at
            start = self._json_clear = end
        self._json_at = n
        return n


class Masker:
    """Applies one :class:`~pcigate.models.MaskingPolicy`. Immutable after construction; cheap to share.

    ``hash_key`` is the per-deployment HMAC key; it is required when any rule asks for ``hash``.
    """

    __slots__ = ("_cut", "_head", "_json_longest", "_json_names", "_json_rules", "_key", "_rules",
                 "_sensitive", "_tail", "_track", "policy")

    def __init__(self, policy: MaskingPolicy, hash_key: bytes | None = None) -> None:
        self.policy = policy
        if policy.pan == "truncate":
            self._head, self._tail = 6, 4
        else:
            self._head, self._tail = 0, 0
        self._track = policy.track_data
        self._sensitive = frozenset(c.lower() for c in policy.sensitive_columns)
        rules: dict[str, list[tuple[str | None, Literal["redact", "hash"]]]] = {}
        for r in policy.columns:
            rules.setdefault(r.column.lower(), []).append((r.table, r.action))
        self._rules = rules
        if any(r.action == "hash" for r in policy.columns) and not hash_key:
            raise ValueError("a masking rule asks for hash but no hash key was given")
        self._key = hash_key or b""
        # JSON members named like a rule column (``row_to_json(c)``, ``json_agg(t)``: a row's columns become
        # its keys) are judged as that column of an unknown table (table-scoped rules apply: fail closed)
        self._json_rules: dict[str, Literal["redact", "hash"]] = {}
        for name in {*self._sensitive, *rules}:
            action = self.column_action(None, name)
            if action != "pan":
                self._json_rules[name] = action
        needles = [json.dumps(name).encode() for name in sorted(self._json_rules)]  # as JSON strings
        # one pass for all the names (a find per name costs twice as much on JSON, full of quotes)
        self._json_names = re.compile(b"|".join(re.escape(n) for n in needles) or b"(?!)")
        self._json_longest = max((len(n) for n in needles), default=1)
        self._cut: _Cuts | None = None

    # -- text ------------------------------------------------------------------------------------------------

    def scan(self, data: bytes | bytearray | memoryview) -> bytes | None:
        """Mask PANs and track data in a text value. Returns the masked copy (same length), or None when
        there is nothing to mask (the fast path: one translate and two substring searches, all in C)."""
        if isinstance(data, memoryview):
            data = data.tobytes()
        out = self._mask_value(data)
        return None if out is None else bytes(out)

    def _mask_value(self, v: bytes | bytearray, exp16: bool = True) -> bytearray | None:
        """Pre-filter, then mask. Values whose digits are never joined by a separator (the common case,
        e.g. a card column) are handled without a regular expression. With ``exp16`` (always, but for the
        fields of a row whose plan has no float or json column: the C walk does not look for them there
        either), a card number in exponent notation (``4.111111111111111e+15``) is masked in its digits
        first (:meth:`_mask_exp16`)."""
        if exp16 and _EXP16_MARK in v:
            exp = self._mask_exp16(v)
            if exp is not None:
                return self._mask_digits(exp) or exp
        return self._mask_digits(v)

    def _mask_exp16(self, v: bytes | bytearray) -> bytearray | None:
        """``d.ddd…e+15`` tokens whose 16-digit value passes Luhn, masked in the digits they show (first 6 and
        last 4 kept, or all starred: the policy's), same length; None when there is none."""
        out: bytearray | None = None
        for m in _EXP16.finditer(v):
            lead, decimals = m.group(1), m.group(2)
            if not luhn_ok(lead + decimals.ljust(15, b"0")):
                continue
            digits = lead + decimals
            keep_head, keep_tail = min(self._head, len(digits)), min(self._tail, len(digits))
            starred = bytearray(digits)
            end = len(digits) - keep_tail
            if end > keep_head:
                starred[keep_head:end] = b"*" * (end - keep_head)
            if out is None:
                out = bytearray(v)
            out[m.start(1)] = starred[0]
            out[m.start(2) : m.end(2)] = starred[1:]
        return out

    def _mask_digits(self, v: bytes | bytearray) -> bytearray | None:
        t = v.translate(_CLS)
        if b"0-0" in t:  # digit groups joined by separators: the general path
            if _RUN13 not in t.translate(None, b"-"):
                return None
            return self._mask(v)
        if _RUN13 not in t:
            return None
        if self._track and (b"^" in v or b"=" in v):
            return self._mask(v)
        out: bytearray | None = None
        head, tail = self._head, self._tail
        n = len(t)
        pos = 0
        while True:
            i = t.find(_RUN13, pos)
            if i < 0:
                return out
            j = t.find(b".", i)
            k = t.find(b"-", i)
            if j < 0:
                j = n
            if 0 <= k < j:
                j = k
            if j - i <= MAX_PAN and luhn_ok(bytes(v[i:j])):
                if out is None:
                    out = bytearray(v)
                out[i + head : j - tail] = b"*" * (j - i - head - tail)
            pos = j

    def _mask(self, src: bytes | bytearray) -> bytearray | None:
        """The slow path for a value that passed the pre-filter; masks until nothing changes."""
        out: bytearray | None = None
        if self._track and (b"^" in src or b"=" in src):
            spans: list[tuple[int, int]] = []
            for rx in (_TRACK1, _TRACK2):
                # overlapping matches too: a track's greedy tail can swallow the start of a track glued to it
                pos = 0
                while (m := rx.search(src, pos)) is not None:
                    digits = m.group(1).replace(b" ", b"")
                    if MIN_PAN <= len(digits) <= MAX_PAN and luhn_ok(digits):
                        spans.append(m.span())
                        pos = m.end(1)  # one starting inside this PAN ends where this one does
                    else:  # a shorter one starting inside it may be a valid card (the 16 of 17 digits)
                        pos = m.start() + 1
            if spans:
                out = bytearray(src)
                for s, e in spans:
                    out[s:e] = b"*" * (e - s)
        # scan a snapshot: reading the buffer being written would miss overlapping windows of one run
        out, regroup = _scan_pans(src if out is None else bytes(out), out, self._head, self._tail)
        while regroup and out is not None and _RUN13 in out.translate(_PRE, _SEPS):
            again, regroup = _scan_pans(out, None, self._head, self._tail)
            if again is None:
                break
            out = again
        return out

    def mask_text(self, s: str) -> str:
        """Mask a str (SQL text, error messages, terminal text). The same number of characters comes back: a
        character any byte of which was masked (track data holding a multi-byte name) becomes one ``*``."""
        b = s.encode("utf-8", "surrogatepass")
        out = self.scan(b)
        if out is None:
            return s
        if len(b) == len(s):
            return out.decode("ascii")
        res: list[str] = []
        i = 0
        for ch in s:
            n = len(ch.encode("utf-8", "surrogatepass"))
            res.append(ch if out[i : i + n] == b[i : i + n] else "*")
            i += n
        return "".join(res)

    # -- column rules ----------------------------------------------------------------------------------------

    def column_action(self, table: str | None, column: str) -> Literal["pan", "redact", "hash"]:
        """What to do with a result column named ``column`` of ``table`` (None: not known).

        ``sensitive_columns`` always redact. Of the ``columns`` rules that match, one naming the table beats
        one for any table; between equals ``redact`` beats ``hash`` (fail closed). Otherwise ``pan``.
        """
        col = column.lower()
        if col in self._sensitive:
            return "redact"
        best: tuple[int, int] | None = None
        for rtable, action in self._rules.get(col, ()):
            score = _table_matches(rtable, table)
            if score:
                cand = (score, 1 if action == "redact" else 0)
                if best is None or cand > best:
                    best = cand
        if best is None:
            return "pan"
        return "redact" if best[1] else "hash"

    def row_plan(self, columns: Sequence[ColumnInfo]) -> RowPlan:
        """The plan for one RowDescription. Binary-format fields of text-like types (:data:`TEXT_LIKE_OIDS`,
        and arrays of them element by element) are scanned as text; numbers that can hold a PAN
        (:data:`BINARY_NUMBER_OIDS`, and arrays of them) are judged by their text form, and one that would be
        masked becomes NULL; the bytes of any other binary value are scanned as text is (masked in place).
        A redacted or hashed binary field of a non-text type becomes NULL (no well-formed stand-in exists
        for it)."""
        codes: list[int] = []
        kinds: list[int] = []
        for c in columns:
            action = self.column_action(c.table, c.name)
            binary = c.format == 1
            if binary and c.type_oid == OID_JSONB:
                kind = _K_JSONB_BIN
            elif c.type_oid in JSON_OIDS:
                kind = _K_JSON
            elif binary and c.type_oid not in TEXT_LIKE_OIDS:
                kind = _K_OPAQUE
            else:
                kind = _K_TEXT
            if action == "redact":
                code = _REDACT
            elif action == "hash":
                code = _HASH
            elif kind in (_K_JSON, _K_JSONB_BIN) and self._json_rules:
                code = _PAN_JSON
            elif not binary or c.type_oid in TEXT_LIKE_OIDS:
                code = _PAN
            elif c.type_oid in BINARY_ARRAY_OIDS:
                code = _PAN_ARRAY
            elif c.type_oid in BINARY_NUMBER_OIDS:
                code, kind = _PAN_NUMBER, _NUMBER_KIND[c.type_oid]
            elif c.type_oid in BINARY_NUMBER_ARRAY_OIDS:
                code, kind = _PAN_NUMBER_ARRAY, _NUMBER_KIND[BINARY_NUMBER_ARRAY_OIDS[c.type_oid]]
            else:
                # any other binary value (a record, bytea, hstore, a range or array of other types): its
                # bytes are scanned as text is, so the text inside it (a record's text field, say) is masked
                # in place, same length; a number's bytes never hold 13 ASCII digits
                code = _PAN
            codes.append(code)
            kinds.append(kind)
        exp16 = any(c.type_oid in _EXP16_OIDS and (c.format == 0 or c.type_oid == OID_JSON) for c in columns)
        return RowPlan(tuple(codes), tuple(kinds), exp16 or any(c >= _REDACT for c in codes),
                       any(c in (_PAN, _PAN_ARRAY) for c in codes), exp16)

    def redact_value(self, value: bytes, kind: int = _K_TEXT) -> bytes | None:
        """``*`` × len (JSON: a JSON string of that length); None (SQL NULL) for an opaque binary value."""
        n = len(value)
        if kind == _K_OPAQUE:
            return None
        if kind == _K_JSON and n >= 2:
            return b'"' + b"*" * (n - 2) + b'"'
        if kind == _K_JSONB_BIN and n >= 3:
            return b'\x01"' + b"*" * (n - 3) + b'"'
        return b"*" * n

    def mask_json_members(self, value: bytes, kind: int) -> bytes | None:
        """A json (``kind`` _K_JSON) or binary jsonb (_K_JSONB_BIN) value whose members named like a rule
        column (case-insensitive, at any depth) get that column's treatment: redacted (a string of ``*`` as
        long as the member's text) or hashed (``h:`` + 16 hex digits of its text, as the column's own values
        hash). None when no member is named so. The value is re-serialized when one is: its whitespace (and
        a number's spelling, e.g. ``1.50``) may differ. Too deeply nested to walk, or larger than
        :data:`JSON_WALK_MAX` (parsing takes several times the value's size in memory): redacted whole."""
        head = value[:1] if kind == _K_JSONB_BIN else b""
        text = value[len(head) :]
        if self._json_names.search(text.lower()) is None:
            return None
        if len(text) > JSON_WALK_MAX:
            return self.redact_value(value, kind)
        try:
            doc = json.loads(text)
            if not self._judge_members(doc):
                return None
            return head + json.dumps(doc, ensure_ascii=False, separators=(", ", ": ")).encode()
        except RecursionError:
            return self.redact_value(value, kind)
        except ValueError:
            return None  # not JSON after all (a json column always holds JSON): the PAN scan still runs

    def _judge_members(self, node: object) -> bool:
        changed = False
        if isinstance(node, dict):
            for key, val in node.items():
                action = self._json_rules.get(key.lower())
                if action is not None and val is not None:
                    text = val if isinstance(val, str) else json.dumps(val, ensure_ascii=False)
                    if action == "redact":
                        node[key] = "*" * len(text)
                    else:
                        mac = hmac.new(self._key, text.encode(), hashlib.sha256).hexdigest()
                        node[key] = "h:" + mac[:HASH_HEX_CHARS]
                    changed = True
                elif isinstance(val, dict | list):
                    changed = self._judge_members(val) or changed
        elif isinstance(node, list):
            for item in node:
                if isinstance(item, dict | list):
                    changed = self._judge_members(item) or changed
        return changed

    def hash_value(self, value: bytes, kind: int = _K_TEXT) -> bytes | None:
        """``h:`` + 16 hex digits of HMAC-SHA256(key, value) (JSON: a JSON string); None: opaque binary."""
        if kind == _K_OPAQUE:
            return None
        if kind == _K_JSONB_BIN and value[:1] == b"\x01":
            value = value[1:]  # hash the text, so text and binary results join
        h = b"h:" + hmac.new(self._key, value, hashlib.sha256).hexdigest()[:HASH_HEX_CHARS].encode()
        if kind == _K_JSON:
            return b'"' + h + b'"'
        if kind == _K_JSONB_BIN:
            return b'\x01"' + h + b'"'
        return h

    # -- messages --------------------------------------------------------------------------------------------

    def has_candidate(self, data: bytes | bytearray) -> bool:
        """See :func:`has_candidate`."""
        return has_candidate(data)

    @staticmethod
    def has_exp16(data: bytes | bytearray) -> bool:
        """Whether ``data`` may hold a card number in float8's exponent notation (``e+15``)."""
        return _EXP16_MARK in data

    @property
    def native(self) -> bool:
        """Whether :meth:`mask_datarows` can run (the C module was built)."""
        return _cmask is not None

    def mask_datarows(self, buf: bytes, pos: int, plan: RowPlan) -> tuple[bytearray | None, int] | None:
        """Mask the run of complete DataRow messages of ``buf`` starting at ``pos``, in C.

        Returns ``(masked copy of buf[pos:stop] or None when unchanged, stop)``: ``stop`` is the offset of the
        first message not handled (not a DataRow, incomplete, or a row the C code leaves to
        :meth:`mask_datarow`: grouped digits or track data that may hold a PAN, or a malformed row). Returns
        None when the C module is missing or the plan needs Python (hash rules, binary arrays). Same result,
        byte for byte, as :meth:`mask_datarow` on each row (tests/unit/test_cmask.py).
        """
        if _cmask is None or plan.native is None:
            return None
        # Only the rows before the first that may name a rule column in a json member, or hold a number in
        # exponent notation that may be a card: those are Python's. Cut there, that row is incomplete, and
        # the C walk stops before it.
        cut = self._cuts(buf).exp16(pos) if plan.exp16 else len(buf)
        if plan.json_members:
            cut = min(cut, self._cuts(buf).json(pos))
        if cut < len(buf):
            buf = buf[:cut]
        return _cmask.mask_datarows(buf, pos, plan.native, self._head, self._tail, self._track)  # type: ignore[no-any-return]

    def _cuts(self, buf: bytes) -> _Cuts:
        """Where the rows the C walk must leave to Python start in ``buf`` (the tunnel's read chunk, which
        it walks from the front, a run of rows per call): found once per chunk, not once per call."""
        if self._cut is not None and self._cut.buf is buf:
            return self._cut
        cuts = _Cuts(buf, self._json_names, self._json_longest)
        # kept for the next call on the same chunk; a bigger buffer (a huge row being held) is not kept
        # alive by it, and holds few rows anyway
        self._cut = cuts if len(buf) <= _Cuts.KEEP_MAX else None
        return cuts

    def mask_datarow(self, body: bytes, plan: RowPlan) -> bytes | None:
        """Mask a DataRow message body (int16 count, then per field int32 length (−1: NULL) + bytes).

        Returns the new body (field lengths rewritten where a hash or NULL changed them; wrap it with
        :func:`frame` ``(b"D", body)``), or None when nothing changed. A body that does not parse, or whose
        field count differs from the plan, raises ValueError (the caller closes the connection: never pass
        an unparsed row on).
        """
        if not plan.forced and (not plan.scans or not has_candidate(body)):
            return None
        n = len(body)
        if n < 2:
            raise ValueError("short DataRow")
        (count,) = _I16.unpack_from(body, 0)
        codes = plan.codes
        if count != len(codes):
            raise ValueError(f"DataRow has {count} fields, the row description {len(codes)}")
        kinds = plan.kinds
        # (field start, old length, new value or None for NULL)
        edits: list[tuple[int, int, bytes | bytearray | None]] = []
        same_len = True
        pos = 2
        unpack = _I32.unpack_from
        for i in range(count):
            if pos + 4 > n:
                raise ValueError("truncated DataRow")
            (flen,) = unpack(body, pos)
            pos += 4
            if flen < 0:
                if flen != -1:
                    raise ValueError("invalid field length in DataRow")
                continue
            end = pos + flen
            if end > n:
                raise ValueError("truncated DataRow")
            code = codes[i]
            if code == _PAN:
                if flen >= MIN_PAN or (plan.exp16 and flen >= _EXP16_MIN and _EXP16_MARK in body[pos:end]):
                    m = self._mask_value(body[pos:end], plan.exp16)
                    if m is not None:
                        edits.append((pos, flen, m))
            elif code in (_REDACT, _HASH):
                v = body[pos:end]
                new: bytes | bytearray | None = (self.redact_value(v, kinds[i]) if code == _REDACT
                                                 else self.hash_value(v, kinds[i]))
                if new != v:
                    edits.append((pos, flen, new))
                    if new is None or len(new) != flen:
                        same_len = False
            elif code == _PAN_JSON:
                v = body[pos:end]
                j = self.mask_json_members(v, kinds[i])
                m = (self._mask_value(v if j is None else j, plan.exp16) if flen >= MIN_PAN or j is not None
                     else None)
                out_v = m if m is not None else j
                if out_v is not None:
                    edits.append((pos, flen, out_v))
                    if len(out_v) != flen:
                        same_len = False
            elif code == _PAN_ARRAY:
                v = body[pos:end]
                if _RUN13 in v.translate(_PRE, _SEPS):
                    arr = self._mask_binary_array(v)
                    if arr is not None:
                        edits.append((pos, flen, arr))
            elif code == _PAN_NUMBER:
                if self.number_is_pan(body[pos:end], kinds[i]):
                    edits.append((pos, flen, None))
                    same_len = False
            elif code == _PAN_NUMBER_ARRAY:
                narr = self._mask_number_array(body[pos:end], kinds[i])
                if narr is not None:
                    edits.append((pos, flen, narr))
                    same_len = False
            pos = end
        if pos != n:
            raise ValueError("trailing bytes in DataRow")
        if not edits:
            return None
        if same_len:
            out = bytearray(body)
            for p, ln, new in edits:
                if new is not None:  # same length: never None here
                    out[p : p + ln] = new
            return bytes(out)
        parts: list[bytes | bytearray] = []
        last = 0
        for p, ln, new in edits:
            parts.append(body[last : p - 4])
            if new is None:
                parts.append(_I32.pack(-1))
            else:
                parts.append(_I32.pack(len(new)))
                parts.append(new)
            last = p + ln
        parts.append(body[last:])
        return b"".join(parts)

    def _mask_binary_array(self, v: bytes) -> bytearray | None:
        """A binary array of a text-like type: header, then per element int32 length + text."""
        n = len(v)
        if n < 12:
            return None
        count, pos = _array_header(v)
        out: bytearray | None = None
        for _ in range(count):
            if pos + 4 > n:
                raise ValueError("malformed binary array")
            (ln,) = _I32.unpack_from(v, pos)
            pos += 4
            if ln < 0:
                continue
            if pos + ln > n:
                raise ValueError("malformed binary array")
            m = self.scan(v[pos : pos + ln])
            if m is not None:
                if out is None:
                    out = bytearray(v)
                out[pos : pos + ln] = m
            pos += ln
        return out

    def number_is_pan(self, value: bytes, kind: int) -> bool:
        """Whether a binary int8 (``kind`` _K_INT8), numeric (_K_NUMERIC) or float8 (_K_FLOAT8) value's text
        form would be masked (then the value goes out as NULL). Raises ValueError for a malformed value."""
        if kind == _K_FLOAT8:
            pass  # up to 17 digits, plain or in exponent notation (4.111111111111111e+15): its text decides
        elif kind == _K_INT8:
            if len(value) == 8 and abs(int.from_bytes(value, "big", signed=True)) < _PAN_MIN_VALUE:
                return False  # fewer than 13 digits
        else:
            parts = _numeric_parts(value)
            if parts is None:
                return False  # NaN, ±Infinity
            weight, _neg, dscale, _digits = parts
            if 4 * (weight + 1) < MIN_PAN and dscale < MIN_PAN:  # no run of 13 digits before or after a point
                return False
        text = binary_number_text(value, kind)
        return text is not None and len(text) >= MIN_PAN and self._mask_value(text) is not None

    def _mask_number_array(self, v: bytes, kind: int) -> bytes | None:
        """A binary array of int8, numeric or float8 (header: ndim, has-null flag, element type, per
        dimension size and lower bound; then per element int32 length (-1: NULL) + value): elements that are
        PANs become NULL. None when no element is."""
        n = len(v)
        if n < 12:
            raise ValueError("malformed binary array")
        count, head_end = _array_header(v)
        pos = head_end
        parts: list[bytes] = []
        last = head_end
        for _ in range(count):
            if pos + 4 > n:
                raise ValueError("malformed binary array")
            (ln,) = _I32.unpack_from(v, pos)
            if ln < 0:
                pos += 4
                continue
            if pos + 4 + ln > n:
                raise ValueError("malformed binary array")
            if self.number_is_pan(v[pos + 4 : pos + 4 + ln], kind):
                parts.append(v[last:pos])
                parts.append(_NULL_FIELD)
                last = pos + 4 + ln
            pos += 4 + ln
        if pos != n:
            raise ValueError("trailing bytes in binary array")
        if not parts:
            return None
        parts.append(v[last:])
        # the header's has-null flag (int32 at offset 4) must say so now
        return v[:4] + _I32.pack(1) + v[8:head_end] + b"".join(parts)

    def mask_copydatas(self, buf: bytes, pos: int) -> tuple[bytearray | None, int] | None:
        """:meth:`mask_datarows` for a run of CopyData messages of a text/CSV COPY OUT (each payload as
        :meth:`mask_copy_data` masks it); None when the C module is missing."""
        if _cmask is None:
            return None
        cut = self._cuts(buf).exp16(pos)  # a row with a number in exponent notation: Python's, as above
        return _cmask.mask_copydata(buf if cut == len(buf) else buf[:cut], pos, self._head, self._tail,  # type: ignore[no-any-return]
                                    self._track)

    def mask_copy_data(self, payload: bytes) -> bytes | None:
        """A CopyData payload of a text or CSV COPY (one or more rows): PANs and track data only (COPY has no
        column names). Same length; None when unchanged. Tabs, commas, quotes and newlines bound values.
        For binary COPY use :meth:`mask_copy_binary`."""
        return self.scan(payload)

    def mask_copy_binary(self, payload: bytes, plan: RowPlan) -> bytes | None:
        """A CopyData payload of a binary COPY: optional 19+ byte header (``PGCOPY\\n\\377\\r\\n\\0``, flags,
        extension), then tuples laid out like DataRow bodies, then the trailer (int16 −1). PostgreSQL sends
        one tuple per CopyData (the header with the first one). Raises ValueError on a payload that does not
        parse."""
        pos = 0
        head = b""
        if payload.startswith(b"PGCOPY\n\xff\r\n\x00"):
            if len(payload) < 19:
                raise ValueError("short binary COPY header")
            ext = _I32.unpack_from(payload, 15)[0]
            pos = 19 + ext
            head = payload[:pos]
        rest = payload[pos:]
        if rest == b"\xff\xff" or not rest:
            return None
        new = self.mask_datarow(rest, plan)
        return None if new is None else head + new

    def mask_error_fields(self, body: bytes) -> bytes | None:
        """An ErrorResponse/NoticeResponse body (code byte + C string per field, then a 0 byte): every
        field's text is scanned (field codes are letters and fields end with 0 bytes, so the whole body is
        scanned at once). Besides PANs: in a ``Key (col, …)=(val, …)`` detail naming a redacted or hashed
        column the values are starred, and a ``Failing row contains (…)`` detail (no column names) is starred
        whenever the policy has column rules. Same length; None when unchanged."""
        out: bytearray | None = None
        if self._sensitive or self._rules:
            for m in _KEY_DETAIL.finditer(body):
                names = m.group(1).decode("utf-8", "replace").split(",")
                cols = [c.strip().strip('"').lower() for c in names]
                if any(c in self._sensitive or c in self._rules for c in cols):
                    if out is None:
                        out = bytearray(body)
                    s, e = m.span(2)
                    out[s:e] = b"*" * (e - s)
            for m in _FAILING_ROW.finditer(body):
                if out is None:
                    out = bytearray(body)
                s, e = m.span(1)
                out[s:e] = b"*" * (e - s)
        src: bytes | bytearray = body if out is None else out
        if _RUN13 in src.translate(_PRE, _SEPS):
            masked = self._mask(src)
            if masked is not None:
                out = masked
        return None if out is None else bytes(out)


_KEY_DETAIL = re.compile(rb"Key \(([^)\x00]*)\)=\(([^\x00]*)\)")
_FAILING_ROW = re.compile(rb"Failing row contains \(([^\x00]*)\)")


def star_message_fields(body: bytes, codes: bytes = b"MDH") -> bytes:
    """An ErrorResponse/NoticeResponse body with the text of the fields ``codes`` (message, detail, hint)
    replaced by ``*`` of the same length: a statement that may print a rule column's values in one (``DO``
    with ``RAISE NOTICE``, a call of a function that reads one). Malformed bodies come back unchanged."""
    out = bytearray(body)
    pos = 0
    while pos < len(out) and out[pos]:
        end = out.find(b"\x00", pos + 1)
        if end < 0:
            return body
        if out[pos] in codes:
            out[pos + 1 : end] = b"*" * (end - pos - 1)
        pos = end + 1
    return bytes(out)

