"""Micro-benchmark of the masking core (pcigate.masking), in process, no database.

    .venv/bin/python tests/benchmarks/bench_masking.py [--rows 200000] [--repeat 3] [--no-write]

Measures µs per row (best of ``--repeat``) for DataRow bodies without any card number, with a contiguous PAN
in every row, with a grouped PAN in every row, with a CVV column (every row walked), and for COPY text
lines; the whole-chunk pre-check; the pre-filter itself (translate + find vs ``re``); a naive baseline
(per-field walk, ``re`` + Luhn on every field); and the false-positive rates on realistic non-card data
(the corpus of tests/unit/test_masking.py). Results go to stdout and into docs/performance.md between
``<!-- bench_masking:begin -->`` and ``<!-- bench_masking:end -->`` (appended when the markers are absent).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import re
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # tests.stack, which tests/unit/test_masking.py imports
sys.path.insert(0, str(ROOT / "cli"))
sys.path.insert(0, str(ROOT / "tests" / "unit"))

from test_masking import false_positive_rates, non_card_corpus  # noqa: E402

from pcigate.masking import ColumnInfo, Masker, RowPlan, has_candidate, luhn_ok  # noqa: E402
from pcigate.models import MaskingPolicy  # noqa: E402

BEGIN = "<!-- bench_masking:begin -->"
END = "<!-- bench_masking:end -->"
DOC = ROOT / "docs" / "performance.md"


def datarow(*fields: bytes | None) -> bytes:
    b = struct.pack("!h", len(fields))
    for f in fields:
        b += struct.pack("!i", -1) if f is None else struct.pack("!i", len(f)) + f
    return b


def luhn_pan(r: random.Random, prefix: str = "4", n: int = 16) -> str:
    body = prefix + "".join(r.choice("0123456789") for _ in range(n - 1 - len(prefix)))
    for c in "0123456789":
        if luhn_ok((body + c).encode()):
            return body + c
    raise AssertionError


def make_rows(n: int, kind: str, seed: int = 1) -> list[bytes]:
    """Rows shaped like a payments table: id, name, email, created_at, amount, (pan), note."""
    r = random.Random(seed)
    rows = []
    for i in range(n):
        base = [str(100000 + i).encode(), f"Customer {r.randint(1, 99999)}".encode(),
                f"user{r.randint(1, 10**6)}@example.com".encode(),
                f"2026-0{r.randint(1, 9)}-1{r.randint(0, 9)} 12:{r.randint(10, 59)}:00+00".encode(),
                f"{r.randint(1, 99999)}.{r.randint(10, 99)}".encode()]
        if kind == "none":
            base.append(b"ok")
        elif kind == "contiguous":
            base.append(luhn_pan(r).encode())
        elif kind == "grouped":
            p = luhn_pan(r)
            base.append(f"{p[:4]} {p[4:8]} {p[8:12]} {p[12:]}".encode())
        elif kind == "cvv":
            base.append(str(r.randint(100, 999)).encode())
        rows.append(datarow(*base))
    return rows


def copy_lines(n: int, card: bool, seed: int = 2) -> list[bytes]:
    r = random.Random(seed)
    out = []
    for i in range(n):
        pan = luhn_pan(r) if card else "\\N"
        out.append(f"{100000 + i}\tCustomer {r.randint(1, 99999)}\tuser{i}@example.com\t{pan}\t"
                   f"{r.randint(1, 99999)}.{r.randint(10, 99)}\n".encode())
    return out


def best(fn: Callable[[], object], repeat: int) -> float:
    t = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        t.append(time.perf_counter() - t0)
    return min(t)


# -- a naive baseline: what the STACK reference relay did (per field, re + Luhn on every field) -----------

_NAIVE = re.compile(rb"(?<![0-9])[0-9](?:[ -]?[0-9]){12,18}(?![0-9])")


def _luhn_loop(digits: bytes) -> bool:
    total = 0
    for i, c in enumerate(reversed(digits)):
        d = c - 48
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def naive_row(body: bytes) -> bytes | None:
    (count,) = struct.unpack_from("!h", body, 0)
    pos = 2
    out = None
    for _ in range(count):
        (ln,) = struct.unpack_from("!i", body, pos)
        pos += 4
        if ln < 0:
            continue
        v = body[pos : pos + ln]
        for m in _NAIVE.finditer(v):
            digits = m.group(0).replace(b" ", b"").replace(b"-", b"")
            if _luhn_loop(digits):
                if out is None:
                    out = bytearray(body)
                s = pos + m.start()
                out[s + 6 : pos + m.end() - 4] = b"*" * (m.end() - m.start() - 10)
        pos += ln
    return None if out is None else bytes(out)


_RE_PRE = re.compile(rb"[0-9](?:[ -]?[0-9]){12}")
_PRE = bytes(0x30 if 0x30 <= i <= 0x39 else 0x2E for i in range(256))


def _chunk_messages(framed: bytes, size: int) -> list[bytes]:
    """Cut framed messages into chunks of about ``size`` bytes, at message boundaries."""
    out: list[bytes] = []
    start = pos = 0
    while pos < len(framed):
        (n,) = struct.unpack_from("!I", framed, pos + 1)
        pos += 1 + n
        if pos - start >= size:
            out.append(framed[start:pos])
            start = pos
    if start < pos:
        out.append(framed[start:pos])
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()
    n, rep = a.rows, a.repeat

    masker = Masker(MaskingPolicy(), b"bench-key")
    cols = [ColumnInfo(c, "payments") for c in ("id", "name", "email", "created_at", "amount", "pan")]
    plan = masker.row_plan(cols)
    plan_cvv = masker.row_plan([*cols[:5], ColumnInfo("cvv", "payments")])
    mask_row = masker.mask_datarow

    res: dict[str, dict[str, float]] = {}

    def per_row(label: str, rows: list[bytes], fn: Callable[[list[bytes]], object]) -> None:
        sec = best(lambda: fn(rows), rep)
        res[label] = {"us_per_row": sec / len(rows) * 1e6,
                      "mb_s": sum(len(x) for x in rows) / sec / 1e6}

    sets = {k: make_rows(n, k) for k in ("none", "contiguous", "grouped", "cvv")}
    # sanity: every card row is masked, no no-card row is touched
    assert all(mask_row(x, plan) is None for x in sets["none"][:1000])
    assert all(mask_row(x, plan) is not None for x in sets["contiguous"][:1000])
    assert all(mask_row(x, plan) is not None for x in sets["grouped"][:1000])

    per_row("DataRow, no card number (mask_datarow)", sets["none"],
            lambda rs: [mask_row(x, plan) for x in rs])
    per_row("DataRow, contiguous PAN in every row", sets["contiguous"],
            lambda rs: [mask_row(x, plan) for x in rs])
    per_row("DataRow, grouped PAN (4-4-4-4) in every row", sets["grouped"],
            lambda rs: [mask_row(x, plan) for x in rs])
    per_row("DataRow, CVV column redacted (every row walked)", sets["cvv"],
            lambda rs: [mask_row(x, plan_cvv) for x in rs])
    per_row("loop overhead only (empty list comprehension)", sets["none"], lambda rs: [x for x in rs])

    # whole chunk pre-check: 64 KiB of framed DataRows without card numbers, one has_candidate per chunk
    wire = b"".join(struct.pack("!BI", 0x44, len(x) + 4) + x for x in sets["none"])
    chunks = [wire[i : i + 65536] for i in range(0, len(wire), 65536)]
    sec = best(lambda: [has_candidate(c) for c in chunks], rep)
    res["chunk pre-check, no card (has_candidate per 64 KiB)"] = {
        "us_per_row": sec / n * 1e6, "mb_s": len(wire) / sec / 1e6}
    hits = sum(has_candidate(c) for c in chunks)

    # the C hot path (pcigate._cmask) as the tunnel drives it: 64 KiB chunks of framed DataRows, one call per
    # run of rows (the Python reference above handles the rows it leaves, e.g. grouped PANs)
    def c_walk(label: str, rows: list[bytes], row_plan: RowPlan) -> None:
        """The rows framed, in 64 KiB chunks, one mask_datarows call per chunk (every row taken in C)."""
        framed = b"".join(struct.pack("!BI", 0x44, len(x) + 4) + x for x in rows)
        c_chunks = _chunk_messages(framed, 65536)

        def run_c() -> None:
            for c in c_chunks:
                got = masker.mask_datarows(c, 0, row_plan)
                assert got is not None
                assert got[1] == len(c)

        sec = best(run_c, rep)
        res[label] = {"us_per_row": sec / len(rows) * 1e6, "mb_s": len(framed) / sec / 1e6}

    if masker.native:
        for label, key in (("contiguous PAN in every row", "contiguous"), ("no card number", "none")):
            c_walk(f"C: DataRow runs in 64 KiB chunks, {label}", sets[key], plan)

    # a jsonb column (binary) under the default column rules: members named like one (cvv, pin, ...) are
    # judged in Python; rows that name none stay on the C walk after a search for the names
    jcols = [ColumnInfo("id", "payments"), ColumnInfo("doc", "payments", type_oid=3802, format=1)]
    jplan = masker.row_plan(jcols)
    jrows = [datarow(str(i).encode(), b"\x01" + json.dumps(
        {"qty": i % 7, "brand": "visa", "note": f"order {i} shipped", "amount": i * 3}).encode())
        for i in range(n)]
    per_row("DataRow with a jsonb column under column rules (Python walk)", jrows,
            lambda rs: [mask_row(x, jplan) for x in rs])
    if masker.native:
        c_walk("C: jsonb rows naming no rule column, 64 KiB chunks (names searched first)", jrows, jplan)

    per_row("naive baseline: per-field re + Luhn, no card", sets["none"],
            lambda rs: [naive_row(x) for x in rs])
    per_row("naive baseline: per-field re + Luhn, PAN every row", sets["contiguous"],
            lambda rs: [naive_row(x) for x in rs])

    lines_none = copy_lines(n, False)
    lines_card = copy_lines(n, True)
    mcd = masker.mask_copy_data
    per_row("CopyData line, no card (mask_copy_data)", lines_none, lambda rs: [mcd(x) for x in rs])
    per_row("CopyData line, PAN in every line", lines_card, lambda rs: [mcd(x) for x in rs])

    # pre-filter alone: translate+find vs re.search, per row body
    pre: dict[str, float] = {}
    for label, rows in (("no card", sets["none"]), ("PAN every row", sets["contiguous"])):
        t_tr = best(lambda rows=rows: [b"0000000000000" in x.translate(_PRE, b" -") for x in rows], rep)
        t_re = best(lambda rows=rows: [_RE_PRE.search(x) for x in rows], rep)
        pre[f"translate+find, {label}"] = t_tr / n * 1e6
        pre[f"re.search, {label}"] = t_re / n * 1e6
    long_text = [(b"lorem ipsum 2026-01-01 order 123456 qty 7 " * 25) for _ in range(n // 10)]
    t_tr = best(lambda: [b"0000000000000" in x.translate(_PRE, b" -") for x in long_text], rep)
    t_re = best(lambda: [_RE_PRE.search(x) for x in long_text], rep)
    pre["translate+find, 1 KiB text with short numbers"] = t_tr / len(long_text) * 1e6
    pre["re.search, 1 KiB text with short numbers"] = t_re / len(long_text) * 1e6

    fp = false_positive_rates(masker, non_card_corpus())

    for k, v in res.items():
        print(f"{k:60s} {v['us_per_row']:7.3f} µs/row {v['mb_s']:8.1f} MB/s")
    for k, v in pre.items():
        print(f"pre-filter {k:50s} {v:7.3f} µs")
    print("false positives:", json.dumps(fp))
    print(f"chunks with a candidate (no-card data): {hits}/{len(chunks)}")

    if a.no_write:
        return
    today = dt.date.today().isoformat()
    lines = [
        BEGIN,
        "## Masking core",
        "",
        f"Measured {today} by `tests/benchmarks/bench_masking.py --rows {n} --repeat {rep}` (in process, no "
        f"database; Python {platform.python_version()}, {os.cpu_count()} cores, shared machine: ±15 % "
        "noise); best of the repeats. Rows are DataRow bodies of a 6-column payments table (id, name, email, "
        "timestamp, amount, card/cvv/note, ~90 bytes); 2,000,000 rows × the µs/row below is the CPU "
        "the tunnel spends masking a 2M-row result.",
        "",
        "| case | µs/row | MB/s |",
        "|---|---|---|",
    ]
    lines += [f"| {k} | {v['us_per_row']:.3f} | {v['mb_s']:.0f} |" for k, v in res.items()]
    lines += [
        "",
        "The jsonb rows (id, a 4-member jsonb object, binary) are judged under the default column rules: a "
        "member named like a rule column (cvv, pin, ...) gets that column's treatment, in Python; the C walk "
        "takes the rows before the first that may name one, after one regular-expression search for the "
        "names per 64 KiB (most of its cost against the plain C walk).",
        "",
        f"Whole-chunk pre-check on no-card data: {hits} of {len(chunks)} 64 KiB chunks had a candidate (the "
        "timestamps and ids of these rows never form a 13-digit run), so such chunks need no framing for "
        "masking.",
        "",
        "Pre-filter alone (\"≥ 13 digits in a row, spaces/dashes ignored\"), µs per value:",
        "",
        "| pre-filter | µs |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v:.3f} |" for k, v in pre.items()]
    lines += [
        "",
        "False-positive rate on realistic non-card data (2,000 values per kind, fixed seed; a value counts "
        "when anything in it was masked):",
        "",
        "| kind | rate |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v * 100:.1f} % |" for k, v in fp.items()]
    lines += [
        "",
        "Why these rates: a uniformly random digit string passes Luhn with probability exactly 1/10, so any "
        "detector defined as \"13–19 digits, Luhn-valid\" masks ~10 % of long random ids, of 13-digit "
        "millisecond timestamps and of ISBN-13s; IBANs are long digit strings (grouped by 4 when printed), "
        "so several 13–19 digit windows each get a 1-in-10 chance. Phone numbers, order ids, UUIDs, amounts "
        "and ISO timestamps rarely hold 13 digits joined by single separators. No IIN/BIN or `+`-prefix "
        "exception is made: each would let `SELECT '+' || pan` (or a PAN with an unusual prefix) through; a "
        "false positive costs a partly starred id on screen, never a card in clear.",
        END,
    ]
    section = "\n".join(lines)
    text = DOC.read_text() if DOC.exists() else "# Performance\n"
    if BEGIN in text and END in text:
        pre_, rest = text.split(BEGIN, 1)
        _, post = rest.split(END, 1)
        text = pre_ + section + post
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    DOC.write_text(text)
    print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
