"""pcigate.sqltaint: which computed result columns carry a rule column (PostgreSQL's parser, bytes in)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pcigate import sqltaint
from pcigate.sqltaint import ComputedColumns, Derived

RANK = {"cvv": 2, "track2": 2, "email": 1, "pan_hash": 1}


def judge() -> ComputedColumns:
    # cvv and track2 redact, email hashes; the table cards holds cvv and email
    return ComputedColumns(RANK, {"cards": ["cvv", "email"]}, lambda c: RANK.get(c, 0))


def positions(sql: str) -> list[tuple[str | None, ...] | None] | None:
    """Per statement its positions; None when no statement computes anything from a rule column."""
    got = judge().statements(sql.encode())
    if got is None or all(d.fallback is None and not any(d.positions or ()) for d in got):
        return None
    return [d.positions for d in got]


@pytest.mark.parametrize(("sql", "want"), [
    ("SELECT cvv || '' AS x FROM cards", [("cvv",)]),
    ("SELECT upper(c.cvv), id FROM cards c", [("cvv", None)]),
    ("SELECT max(cvv), count(*) FROM cards", [("cvv", None)]),
    ("SELECT cvv::int + 0 FROM cards", [("cvv",)]),
    ("SELECT CASE WHEN id > 1 THEN email END FROM cards", [("email",)]),
    ("SELECT coalesce(email, cvv) FROM cards", [("cvv",)]),  # the strictest of the two
    # whole rows of a table holding rule columns, by its name or alias
    ("SELECT c::text, c.id FROM cards c", [("cvv", None)]),
    ("SELECT row(c.*) FROM cards AS c", [("cvv",)]),
    ("SELECT to_json(cards) FROM cards", [("cvv",)]),
    # set operations, VALUES, sub-selects, CTEs and subqueries (their column aliases too)
    ("SELECT cvv AS x FROM cards UNION SELECT '1'", [("cvv",)]),
    ("SELECT '1', 2 UNION ALL SELECT email, 3 FROM cards", [("email", None)]),
    ("VALUES (1, (SELECT cvv FROM cards LIMIT 1))", [(None, "cvv")]),
    ("SELECT (SELECT max(cvv) FROM cards), 2", [("cvv", None)]),
    ("SELECT ARRAY(SELECT email FROM cards)", [("email",)]),
    ("WITH s(a) AS (SELECT cvv FROM cards) SELECT a || '', 1 FROM s", [("cvv", None)]),
    ("SELECT x || '' FROM (SELECT upper(cvv) AS x FROM cards) s", [("cvv",)]),
    ("SELECT b || '' FROM (SELECT id, cvv FROM cards) s(a, b)", [("cvv",)]),
    ("SELECT s::text FROM (SELECT cvv FROM cards) s", [("cvv",)]),
    # a star passes whole rows on; a function in FROM carries what its calls read
    ("SELECT s::text FROM (SELECT * FROM cards) s", [("cvv",)]),
    ("SELECT row(s.*), 1 FROM (SELECT * FROM cards c JOIN t USING (id)) AS s", [("cvv", None)]),
    ("SELECT x, g FROM cards, unnest(ARRAY[cvv]) AS u(x), generate_series(1, cvv::int) g", [("cvv", "cvv")]),
    ("SELECT n, l FROM cards, generate_series(1, 2) AS n, LATERAL (SELECT 1 AS l) l", None),
    # a query given as text: judged as every rule column (the strictest)
    ("SELECT 1, table_to_xml('cards', true, false, '')", [(None, "cvv")]),
    ("SELECT pg_catalog.query_to_xml('select email from cards', true, true, '')", [("cvv",)]),
    # RETURNING
    ("DELETE FROM cards WHERE id = 1 RETURNING upper(cvv), id", [("cvv", None)]),
    ("UPDATE cards SET id = id RETURNING email || ''", [("email",)]),
    # several statements: each its own
    ("SELECT 1; SELECT track2 || ''; SET x = 1", [(None,), ("track2",), ()]),
    # a name in a literal, a comment or a condition is not a value
    ("SELECT 'cvv' || '' FROM cards WHERE cvv = '001' -- cvv", None),
    ("SELECT count(*) FROM cards WHERE upper(cvv) = '001' GROUP BY email ORDER BY max(id)", None),
    ("SELECT id FROM cards JOIN t ON t.cvv = cards.cvv", None),
    ("EXPLAIN SELECT upper(cvv) FROM cards", None),  # a plan, not values
    ("INSERT INTO cards (cvv) VALUES ('1')", None),
    # a quoted or escaped identifier is the same column
    ('SELECT U&"\\0063vv" || \'\' FROM cards', [("cvv",)]),
    ('SELECT "cvv" || \'\' FROM cards', [("cvv",)]),
])
def test_computed_columns(sql: str, want: list[tuple[str | None, ...]] | None) -> None:
    assert positions(sql) == want


def test_prepare_and_declare_define_what_execute_and_fetch_use() -> None:
    j = judge()
    prep, exe = j.statements(b"PREPARE p(int) AS SELECT id, upper(cvv) FROM cards WHERE id = $1; "
                             b"EXECUTE p(1)") or ()
    assert (prep.defines, prep.positions) == ("s:p", ())  # PREPARE itself returns no rows
    assert prep.inner is not None
    assert prep.inner.positions == (None, "cvv")
    assert exe.uses == "s:p"
    (dec,) = j.statements(b"DECLARE cur CURSOR FOR SELECT max(email) FROM cards") or ()
    assert (dec.defines, dec.inner.positions if dec.inner else None) == ("c:cur", ("email",))
    # EXECUTE / FETCH name no rule column: parsed only while the connection holds such a name
    assert j.statements(b"FETCH 2 FROM cur") is None
    assert [d.uses for d in j.statements(b"FETCH 2 FROM cur", named=True) or ()] == ["c:cur"]
    assert j.statements(b"MOVE 1 IN cur", named=True) is None  # MOVE returns no rows
    # a PREPARE of clean text is still reported while names are held: it replaces the earlier one
    (again,) = j.statements(b"PREPARE p AS SELECT 1", named=True) or ()
    assert again.defines == "s:p"
    assert again.inner == Derived((None,), None, (False,), False)


def test_a_star_makes_positions_unknown_and_every_computed_column_judged() -> None:
    (d,) = judge().statements(b"SELECT * FROM (SELECT lower(cvv), 1 FROM cards) s") or ()
    assert d.positions is None
    assert [d.column(i, 2) for i in range(2)] == ["cvv", "cvv"]
    # no star, but the count differs from what the server describes: the same
    (d,) = judge().statements(b"SELECT upper(cvv), 1 FROM cards") or ()
    assert [d.column(i, 2) for i in range(2)] == ["cvv", None]
    assert [d.column(i, 3) for i in range(3)] == ["cvv", "cvv", "cvv"]


def test_json_of_whole_rows_is_left_to_the_member_rules() -> None:
    # to_jsonb(c) keeps the column names as member names (masked member by member); a JSON value built
    # from the column itself does not: json_build_object('x', cvv) is judged as cvv
    (d,) = judge().statements(b"SELECT to_jsonb(c), json_build_object('x', c.cvv) FROM cards c") or ()
    assert d.column(0, 2, json=True) is None
    assert d.column(0, 2, json=False) == "cvv"  # c::text has no member names
    assert d.column(1, 2, json=True) == "cvv"


@pytest.mark.parametrize("sql", [
    "SELEC upper(cvv)",  # the parser refuses it
    "SELECT upper(cvv) FROM cards WHERE " + " AND ".join(["true"] * 40_000),  # longer than MAX_SQL
    " UNION ALL ".join(["SELECT cvv FROM cards"] * 2_000),  # nesting deeper than the walk goes
    "WITH " + ", ".join([f"s{i}(a{i}) AS (SELECT a{i - 1} FROM s{i - 1})" for i in range(1, 30)]
                        + ["s0(a0) AS (SELECT cvv FROM cards)"]) + " SELECT a29 || '' FROM s29",
])
def test_what_cannot_be_read_is_judged_as_every_rule_column(sql: str) -> None:
    got = judge().statements(sql.encode())
    assert got is not None
    assert [(d.positions, d.fallback) for d in got] == [(None, "cvv")]


def test_text_naming_no_rule_column_is_not_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    j = judge()

    def boom(*_a: Any) -> None:
        raise AssertionError("parsed")

    monkeypatch.setattr(sqltaint, "derive", boom)
    assert j.statements(b"SELECT abalance FROM pgbench_accounts WHERE aid = 42") is None
    assert ComputedColumns((), {}, lambda c: 0).statements(b"SELECT cvv || ''") is None  # no rules


def test_the_cache_is_bounded_and_keeps_short_texts_only() -> None:
    j = judge()
    for i in range(sqltaint.CACHE_SIZE + 50):
        j.statements(f"SELECT upper(cvv) FROM cards WHERE id = {i}".encode())
    assert len(j._cache) == sqltaint.CACHE_SIZE
    long = ("SELECT upper(cvv) FROM cards WHERE " + " OR ".join(["id = 1"] * 2000)).encode()
    assert len(long) > sqltaint.CACHE_TEXT
    before = dict(j._cache)
    assert j.statements(long) is not None
    assert long not in j._cache
    assert len(j._cache) == len(before)


# -- property: any nesting of expressions around a rule column is traced; around others, nothing ------------

WRAPS = [
    "upper({})", "({} || 'x')", "({})::text", "coalesce({}, '')", "max({})", "substr({}, 1, 2)",
    "CASE WHEN id > 0 THEN {} ELSE 'n' END", "(SELECT {} FROM cards c2 LIMIT 1)", "ARRAY[{}]",
    "row({}, 1)", "{} COLLATE \"C\"", "json_build_object('k', {})", "format('%s', {})", "({})",
    "string_agg({}, ',')", "ARRAY(SELECT {} FROM cards c3)",
]
RULE_LEAVES = ["cvv", "c.cvv", "CVV", '"cvv"', "c.email", "track2"]
CLEAR_LEAVES = ["id", "c.id", "1", "'cvv'", "note", "$1", "c.note"]


def expr(leaves: list[str]) -> st.SearchStrategy[str]:
    return st.recursive(st.sampled_from(leaves),
                        lambda inner: st.builds(str.format, st.sampled_from(WRAPS), inner), max_leaves=6)


column = st.one_of(expr(RULE_LEAVES).map(lambda e: (e, True)), expr(CLEAR_LEAVES).map(lambda e: (e, False)))


@settings(max_examples=300, deadline=None)
@given(st.lists(column, min_size=1, max_size=5), st.booleans())
def test_nested_expressions_are_traced_position_by_position(cols: list[tuple[str, bool]],
                                                            union: bool) -> None:
    select = "SELECT " + ", ".join(e for e, _ in cols) + " FROM cards c"
    if union:  # a second arm of constants: the positions are the first arm's
        select += " UNION ALL SELECT " + ", ".join("NULL" for _ in cols)
    got = judge().statements(select.encode())
    want = tuple(bool(t) for _, t in cols)
    assert got is not None  # the FROM names cards
    (d,) = got
    assert d.positions is not None
    assert tuple(p is not None for p in d.positions) == want, select


def test_derived_without_positions_applies_its_fallback() -> None:
    d = Derived(None, "cvv")
    assert d.column(0, 1) == "cvv"
    assert Derived((None,), None).column(0, 1) is None


# -- views -------------------------------------------------------------------------------------------------


def views(*defs: tuple[int, str, tuple[str, ...], str]) -> sqltaint.ViewColumns:
    return sqltaint.trace_views([sqltaint.View(*d) for d in defs], RANK, {"cards": ["cvv", "email"]},
                                lambda c: RANK.get(c, 0))


def test_view_columns_made_from_rule_columns_over_views_too() -> None:
    got = views(
        (2, "v2", ("a", "b"), "SELECT v.code AS a, (v.loud || 1) AS b FROM v"),  # read before v: a 2nd pass
        (1, "v", ("code", "loud", "id", "j"),
         "SELECT c.cvv AS code, upper(c.email) AS loud, c.id, to_jsonb(c.*) AS j FROM cards c"),
        (3, "w", ("id", "n"), "SELECT cards.id, cards.note AS n FROM cards"),
    )
    assert got.columns == {
        1: (("cvv", False), ("email", False), (None, False), ("cvv", True)),  # j: whole rows only
        2: (("cvv", False), ("email", False)),
    }
    assert got.tables == {"v": frozenset({"cvv", "email"}), "v2": frozenset({"cvv", "email"})}
    assert got.aliases["code"] == frozenset({"cvv"})
    # what a statement of the session computes from a view column is judged too
    j = ComputedColumns(RANK, {"cards": ["cvv", "email"], **got.tables}, lambda c: RANK.get(c, 0),
                        got.aliases)
    (d,) = j.statements(b"SELECT upper(code), id, v::text FROM v") or ()
    assert d.positions == ("cvv", None, "cvv")


def test_a_chain_of_views_in_creation_order_is_traced_whatever_its_length() -> None:
    # each view renames its column; views come in creation order (the tunnel reads them by OID, and a view
    # can only name views that existed before it): one pass follows the whole chain
    def chain(order: range) -> list[tuple[int, str, tuple[str, ...], str]]:
        return [(i, f"v{i}", (f"x{i}",), f"SELECT v{i - 1}.x{i - 1} AS x{i} FROM v{i - 1}") for i in order]

    base = (0, "v0", ("x0",), "SELECT (cards.cvv || '') AS x0 FROM cards")
    assert set(views(base, *chain(range(1, 30))).columns) == set(range(30))
    # in the worst order (a view replaced to name newer ones), one more view per pass, 4 passes
    assert set(views(*chain(range(8, 0, -1)), base).columns) == {0, 1, 2, 3}


# -- relations filled during the session ---------------------------------------------------------------------


Want = tuple[tuple[str | None, ...] | None, str | None]


@pytest.mark.parametrize(("write", "read", "want"), [
    ("CREATE TEMP TABLE t AS SELECT id, cvv AS x FROM cards", "SELECT id, x FROM t", ((None, "cvv"), None)),
    ("SELECT email AS e INTO TEMP t FROM cards", "SELECT e || '' FROM t", (("email",), None)),
    ("CREATE TABLE t (q) AS SELECT upper(cvv) FROM cards", "SELECT q FROM t", (("cvv",), None)),
    ("INSERT INTO t (a, b) SELECT id, cvv FROM cards", "SELECT b, a FROM t", (("cvv", None), None)),
    ("UPDATE t SET a = c.cvv FROM cards c WHERE c.id = t.id", "SELECT a FROM t", (("cvv",), None)),
    ("CREATE VIEW t AS SELECT max(email) FROM cards", "SELECT max FROM t", (("email",), None)),
    # the columns are not known by name: every column read from t, and a * anywhere
    ("INSERT INTO t SELECT id, cvv FROM cards", "SELECT a, b FROM t", (None, "cvv")),
    ("CREATE TABLE t AS SELECT * FROM (SELECT cvv FROM cards) s", "SELECT z FROM t", (None, "cvv")),
])
def test_a_relation_filled_with_rule_columns_is_learnt(write: str, read: str, want: Want) -> None:
    j = judge()
    got = j.statements(write.encode())
    assert got is not None
    (w,) = got
    assert w.learns
    before = j.statements(read.encode())
    assert before is None or not before[0].session  # not yet
    j.learn(w.learns)
    (r,) = j.statements(read.encode()) or ()
    assert r.session
    positions, fallback = want
    assert r.positions == positions
    if fallback is not None:
        assert r.fallback == fallback


def test_writing_values_of_no_rule_column_teaches_nothing() -> None:
    j = judge()
    got = j.statements(b"CREATE TEMP TABLE t AS SELECT id, note FROM cards") or ()
    assert [d.learns for d in got] == [()]
    assert j.statements(b"INSERT INTO t SELECT 1, 'x'") is None


# -- functions and DO blocks -------------------------------------------------------------------------------


def test_functions_naming_a_rule_column_are_judged_when_called() -> None:
    j = ComputedColumns(RANK, {"cards": ["cvv", "email"]}, lambda c: RANK.get(c, 0), functions=["get_cvv"])
    (d,) = j.statements(b"SELECT id, get_cvv(id) FROM t") or ()
    assert (d.positions, d.notices) == ((None, "cvv"), True)
    create = b"CREATE FUNCTION s.mine() RETURNS text LANGUAGE sql AS $$ SELECT email FROM cards $$"
    (mk,) = j.statements(create) or ()
    assert mk.function == "mine"
    assert j.statements(b"SELECT s.mine()") is None  # not yet learnt
    j.learn_function("mine")
    (call,) = j.statements(b"SELECT s.mine()") or ()
    assert call.positions == ("cvv",)  # every rule column: the strictest
    (proc,) = j.statements(b"CALL mine()") or ()
    assert proc.notices
    # a body naming none: nothing to learn
    assert j.statements(b"CREATE FUNCTION g() RETURNS int LANGUAGE sql AS $$ SELECT 1 $$") is None
    assert j.mentions("BEGIN RETURN (SELECT CVV FROM x); END")
    assert not j.mentions("BEGIN RETURN 'cvvx'; END")


def test_do_blocks_naming_a_rule_column_have_their_notices_starred() -> None:
    j = judge()
    (d,) = j.statements(b"DO $$ BEGIN RAISE NOTICE '%', (SELECT cvv FROM cards LIMIT 1); END $$") or ()
    assert d.notices
    assert j.statements(b"DO $$ BEGIN RAISE NOTICE 'hello'; END $$") is None


# -- whatever the text, the judge answers (the tunnel calls it on every client statement) -------------------

SQL_WORDS = ["SELECT", "FROM", "WHERE", "cvv", "cards", "c", "t", "x", "*", ",", "(", ")", "AS", "UNION",
             "ALL", "VALUES", "WITH", "INSERT", "INTO", "UPDATE", "SET", "=", "||", "''", "1", "RETURNING",
             "CREATE", "TEMP", "TABLE", "VIEW", "FUNCTION", "DO", "$$", "PREPARE", "EXECUTE", "DECLARE",
             "CURSOR", "FOR", "FETCH", "LATERAL", "unnest", "ARRAY[", "]", ".", ";", "::text", "row",
             "table_to_xml", "U&\"\\0063vv\"", "JOIN", "ON", "CALL", "BEGIN", "END", "RAISE", "NOTICE"]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(SQL_WORDS), max_size=30), st.booleans())
def test_the_judge_answers_any_text(words: list[str], named: bool) -> None:
    j = judge()
    got = j.statements(" ".join(words).encode(), named=named)
    for d in got or ():
        for i in range(3):
            d.column(i, 3)
        if d.learns:
            j.learn(d.learns)
        if d.function:
            j.learn_function(d.function)
    j.statements(b"SELECT x, c, t FROM t, cards c")  # and still answers after learning


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_the_judge_answers_any_characters(text: str) -> None:
    judge().statements(("SELECT cvv " + text).encode("utf-8", "surrogatepass"))


def queries() -> st.SearchStrategy[str]:
    """SELECTs the parser accepts, nested in the ways the tracer follows."""
    def select(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
        source = st.one_of(st.sampled_from(["cards c", "t", "cards"]),
                           inner.map(lambda q: f"({q}) AS s"),
                           st.just("cards c, LATERAL unnest(ARRAY[c.cvv]) AS u(x)"))
        item = st.one_of(expr(RULE_LEAVES), expr(CLEAR_LEAVES), st.just("*"), st.just("c.*"),
                         inner.map(lambda q: f"({q} LIMIT 1)"))
        return st.builds(
            lambda items, src, arm, cte: (f"WITH w(a) AS ({cte}) " if cte else "")
            + f"SELECT {', '.join(items)} FROM {src}" + (f" UNION ALL {arm}" if arm else ""),
            st.lists(item, min_size=1, max_size=3), source, st.none() | inner, st.none() | inner)

    return st.recursive(st.sampled_from(["SELECT cvv FROM cards", "SELECT 1", "VALUES (1)"]), select,
                        max_leaves=6)


@settings(max_examples=300, deadline=None)
@given(queries(), st.sampled_from(["{}", "CREATE TEMP TABLE z AS {}", "INSERT INTO z {}",
                                   "PREPARE p AS {}", "DECLARE k CURSOR FOR {}", "EXPLAIN {}"]))
def test_the_judge_answers_nested_queries(query: str, wrap: str) -> None:
    j = judge()
    got = j.statements(wrap.format(query).encode())
    for d in got or ():
        assert d.positions is None or all(p is None or p in RANK for p in d.positions)
        if d.learns:
            j.learn(d.learns)
    j.statements(b"SELECT * FROM z")


def test_a_parse_tree_of_an_unknown_shape_is_judged_as_every_rule_column(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # a newer libpg_query may shape a node otherwise (a mock: the real parser cannot be made to do it)
    import pglast.parser

    monkeypatch.setattr(pglast.parser, "parse_sql_json",
                        lambda _sql: '{"stmts": [{"stmt": {"SelectStmt": {"targetList": 5}}}]}')
    got = judge().statements(b"SELECT upper(cvv)") or ()
    assert [(d.positions, d.fallback) for d in got] == [(None, "cvv")]


def test_text_naming_a_rule_column_anywhere_is_reported_as_mentioning_it() -> None:
    # a condition computes no result column, but a data exception there quotes the value (cvv::date)
    got = judge().statements(b"SELECT 1 FROM t WHERE cvv::date IS NULL")
    assert got is not None  # reported: the tunnel stars its data exceptions
    (d,) = got
    assert d.positions == (None,)
    assert judge().statements(b"SELECT 'abc'::int") is None


def test_pg_notify_of_a_rule_column_is_reported_anywhere_in_the_statement() -> None:
    j = judge()
    for sql in (b"SELECT pg_notify('ch', cvv) FROM cards",
                b"SELECT 1 FROM cards WHERE pg_notify('c', upper(cvv)) IS NULL",
                b"SELECT pg_catalog.pg_notify('ch', c::text) FROM cards c"):
        (d,) = j.statements(sql) or ()
        assert d.notifies, sql
    (d,) = j.statements(b"SELECT pg_notify('ch', note) FROM cards") or ()
    assert not d.notifies


def test_state_writers_given_a_rule_column_teach_what_reads_the_state_back() -> None:
    j = judge()
    assert j.statements(b"SHOW my.x") is None
    (w,) = j.statements(b"SELECT 1 FROM cards WHERE set_config('my.x', cvv, false) IS NULL") or ()
    assert w.stores == frozenset({"set_config"})
    (clean,) = j.statements(b"SELECT set_config('my.x', note, false) FROM cards") or ()
    assert clean.stores == frozenset()
    j.learn_state(w.stores)
    (show,) = j.statements(b"SHOW my.x") or ()
    assert (show.positions, show.fallback) == (None, "cvv")
    (read,) = j.statements(b"SELECT current_setting('my.x'), 1") or ()
    assert read.positions == ("cvv", None)
    (setting,) = j.statements(b"SELECT setting FROM pg_settings") or ()
    assert setting.session


def test_a_star_over_a_session_relation_is_judged() -> None:
    j = judge()
    (w,) = j.statements(b"CREATE TEMP TABLE t AS SELECT id, cvv AS x FROM cards") or ()
    j.learn(w.learns)
    (d,) = j.statements(b"SELECT * FROM t") or ()
    assert (d.positions, d.fallback, d.session) == (None, "cvv", True)


def test_statistics_views_value_columns_are_judged_from_the_start() -> None:
    (d,) = judge().statements(b"SELECT attname, most_common_vals FROM pg_catalog.pg_stats") or ()
    assert (d.positions, d.session) == ((None, "cvv"), True)
    (whole,) = judge().statements(b"SELECT starelid FROM pg_statistic") or ()
    assert whole.positions is None  # pg_statistic: every column
