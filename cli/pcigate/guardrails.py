"""Statement guardrails: classify SQL with the real PostgreSQL parser and judge it against policy rules.

Pure code, no I/O. The tunnel calls :meth:`Guardrails.check` for every simple-query string and every
extended-protocol ``Parse``; a denied verdict means the text must not be forwarded to the server.

Parsing uses ``pglast`` (libpg_query, PostgreSQL's own grammar and scanner), so comments, case, whitespace,
quoting, ``E''`` / ``U&""`` / dollar-quoted strings are handled exactly as the server handles them: no
regular expression ever looks at SQL text. The parse tree is taken as libpg_query's JSON (about 4x cheaper
than building pglast's Python node objects) and walked generically, so statements nested anywhere (CTEs,
``PREPARE``, ``EXPLAIN ANALYZE``, ``COPY (query)``, ``CREATE TABLE AS``) are seen.

Class semantics (see ``StatementClass`` in :mod:`pcigate.models`), decisions made here:

* A statement gets every class that applies; e.g. ``WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d``
  is ``{"read", "write", "delete_without_where"}``.
* ``DELETE`` / ``UPDATE`` *without* a WHERE clause are ``*_without_where``. Any WHERE clause counts, however
  trivial: ``DELETE FROM t WHERE true`` is only ``write`` (a parser cannot decide truth in general; a rule
  that must stop all deletes denies ``write`` on the relation). ``WHERE CURRENT OF cursor`` counts as a WHERE
  clause (it affects the one row under the cursor). ``UPDATE ... FROM`` without WHERE is without WHERE.
  ``MERGE`` is ``write`` only (it always has a join condition).
* ``EXPLAIN`` without ``ANALYZE`` is ``read`` whatever it explains (nothing runs). ``EXPLAIN ANALYZE`` runs
  the statement, so it gets the inner statement's classes plus ``read``. ``ANALYZE`` given as an option with
  a value that is not clearly false counts as ANALYZE (fail closed).
* ``SELECT ... INTO t`` and ``CREATE TABLE|MATERIALIZED VIEW ... AS`` are ``ddl`` + ``write``;
  ``REFRESH MATERIALIZED VIEW`` is ``write``. ``SELECT ... FOR UPDATE/SHARE`` is ``read``.
* ``COPY t FROM STDIN`` is ``write``; ``COPY t TO STDOUT`` / ``COPY (query) TO STDOUT`` is ``read`` (plus the
  query's classes: ``COPY (DELETE ... RETURNING *) TO STDOUT`` is a write). A file name adds ``copy_file``, a
  ``PROGRAM`` adds ``copy_program``.
* ``DROP TABLE|VIEW|MATERIALIZED VIEW|FOREIGN TABLE`` -> ``drop_table``; ``DROP SCHEMA`` -> ``drop_schema``;
  ``DROP DATABASE`` -> ``drop_database``; other DROPs -> ``drop_other``; ``DROP ROLE|USER`` -> ``drop_other``
  + ``role_admin``; ``DROP OWNED BY`` (drops every object the role owns) -> ``drop_other`` + ``drop_table``
  + ``drop_schema``. ``IF EXISTS``, ``CASCADE`` and several names change nothing.
* ``GRANT``/``REVOKE`` of privileges or of role membership (also inside ``ALTER DEFAULT PRIVILEGES``) ->
  ``grant`` / ``revoke``. ``CREATE/ALTER/DROP ROLE|USER``, ``REASSIGN OWNED``, ``ALTER ROLE ... RENAME``,
  ``SET [LOCAL] ROLE``, ``RESET ROLE``, ``SET SESSION AUTHORIZATION`` -> ``role_admin``; so is
  ``set_config('role' | 'session_authorization', ...)`` (or ``set_config`` with a non-literal name).
* ``DO`` -> ``do_block`` only (its body is opaque). ``CALL`` -> ``call``. ``PREPARE p AS <stmt>`` ->
  ``prepare`` + the inner classes. ``EXECUTE p`` -> ``execute`` + what ``p`` was prepared as, taken from the
  caller's per-connection map (or from a ``PREPARE`` earlier in the same string); an unknown name -> only
  ``execute``. ``DEALLOCATE``, ``DISCARD``, ``SET``/``RESET``, ``LISTEN``/``NOTIFY``, ``LOAD`` -> ``session``.
  ``BEGIN``/``COMMIT``/``ROLLBACK``/``SAVEPOINT`` and ``LOCK`` -> ``transaction``.
* ``VACUUM``, ``ANALYZE``, ``CLUSTER``, ``REINDEX``, ``CHECKPOINT`` and every other utility statement not
  named above (``CREATE``, ``ALTER``, ``COMMENT``, ``SECURITY LABEL`` ...) -> ``ddl`` (unknown kinds fail
  closed to ``ddl``). The bodies of ``CREATE FUNCTION ... BEGIN ATOMIC``, ``CREATE RULE`` and view queries are
  definitions, not executions: they add relations but no classes.
* Functions are not executed by a parser, so ``SELECT f()`` is ``read`` whatever ``f`` does; every called
  function name is listed in ``StatementInfo.functions``. Exception, because they give the same capability as
  ``COPY`` to/from a server file: ``lo_import``, ``lo_export``, ``pg_read_file``, ``pg_read_binary_file``,
  ``pg_ls_dir``, ``pg_stat_file`` and adminpack's ``pg_file_write|rename|unlink`` add ``copy_file``.
  ``pg_terminate_backend``, ``pg_cancel_backend``, ``dblink_exec``/``dblink`` (SQL text run elsewhere), and
  user functions doing writes are NOT classified beyond ``read`` (see :data:`NOTABLE_FUNCTIONS`).
* Text the parser refuses, text containing a NUL character (the server cannot receive one), and text that
  cannot be encoded as UTF-8 -> one statement ``{"unparseable"}``. An empty string or one with only comments
  or semicolons has no statements (the server answers EmptyQueryResponse): allowed.

Relations: every relation reference (``RangeVar``) as the parser normalised it (unquoted identifiers
lower-cased, quoted kept verbatim, ``U&""`` escapes decoded). ``StatementInfo.relations`` holds ``name`` and,
when written qualified, ``schema.name`` too; a schema-wide reference (``DROP SCHEMA s``, ``GRANT ... ON ALL
TABLES IN SCHEMA s``) appears as ``s.*``. Relations are recorded per class (``class_relations``): the target
of a write is under ``write``, tables read by its subqueries under ``read``, so "deny write on customers"
does not block ``INSERT INTO report SELECT * FROM customers``. CTE names referenced in FROM appear as
relations too (no scope analysis; that can only over-match).

Rule matching (:class:`Guardrails`): a rule matches a statement when the statement has a denied class and,
if the rule lists relations, that class touches one of them. A rule relation ``customers`` matches
``customers`` in any schema; ``public.customers`` matches ``public.customers`` and also an unqualified
``customers`` (the search_path is not known here, so fail closed), but not ``other.customers``. Classes that
have no relation (``drop_database``, ``alter_system``, ``role_admin``, ``do_block``, ``call``, ``execute``,
``transaction``, ``session``, ``unparseable``) ignore the rule's relation list: the rule applies to them
whenever it names them. An ``EXECUTE`` resolved from a classes-only map has unknown relations, so
relation-scoped rules match its classes regardless (fail closed).
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final, NamedTuple, cast, get_args

from pcigate.models import GuardrailRule, StatementClass

__all__ = [
    "NOTABLE_FUNCTIONS",
    "Guardrails",
    "RelRef",
    "StatementInfo",
    "Verdict",
    "classify",
    "parse_relation_name",
]

ALL_CLASSES: Final[frozenset[str]] = frozenset(get_args(StatementClass))

RelRef = tuple[str | None, str | None]
"""(schema or None, name or None); ``(s, None)`` stands for every relation of schema ``s``, ``(None, None)``
for any relation at all (``DROP OWNED BY``)."""

_RELATIONLESS: Final[frozenset[str]] = frozenset(
    {
        "drop_database", "alter_system", "role_admin", "do_block", "call", "execute", "transaction",
        "session", "unparseable",
    }
)

_FILE_FUNCTIONS: Final[frozenset[str]] = frozenset(
    {
        "lo_import", "lo_export", "pg_read_file", "pg_read_binary_file", "pg_ls_dir", "pg_stat_file",
        "pg_file_write", "pg_file_rename", "pg_file_unlink",
    }
)

NOTABLE_FUNCTIONS: Final[frozenset[str]] = frozenset(
    {
        "pg_terminate_backend", "pg_cancel_backend", "pg_reload_conf", "pg_rotate_logfile", "dblink",
        "dblink_exec", "pg_promote", "pg_switch_wal", "set_config", *_FILE_FUNCTIONS,
    }
)
"""Functions worth a look in the recording; only the file ones and ``set_config`` change the classes."""

_DROP_TABLE_TYPES: Final[frozenset[str]] = frozenset(
    {"OBJECT_TABLE", "OBJECT_VIEW", "OBJECT_MATVIEW", "OBJECT_FOREIGN_TABLE"}
)
_SESSION_STMTS: Final[frozenset[str]] = frozenset(
    {"DiscardStmt", "ListenStmt", "UnlistenStmt", "NotifyStmt", "LoadStmt", "DeallocateStmt"}
)
_READ_STMTS: Final[frozenset[str]] = frozenset({"VariableShowStmt", "ClosePortalStmt", "FetchStmt"})
_ROLE_STMTS: Final[frozenset[str]] = frozenset(
    {"CreateRoleStmt", "AlterRoleStmt", "AlterRoleSetStmt", "ReassignOwnedStmt"}
)
_DEFINITION_STMTS: Final[frozenset[str]] = frozenset({"CreateFunctionStmt", "RuleStmt", "ViewStmt"})
_LEAF_NODES: Final[frozenset[str]] = frozenset(  # nodes that never hold a statement, relation or call
    {"ColumnRef", "A_Const", "ParamRef", "A_Star", "String", "Integer", "Float", "Boolean", "BitString",
     "TypeName", "SQLValueFunction", "CurrentOfExpr", "SetToDefault", "RoleSpec", "AccessPriv"}
)
_FALSE_WORDS: Final[frozenset[str]] = frozenset({"false", "off", "no", "0", "f", "n"})
_NAMEDATALEN: Final = 63


@dataclass(frozen=True, slots=True)
class StatementInfo:
    """One statement of a query string, as classified. Treat as immutable (it may be shared by the cache)."""

    classes: frozenset[StatementClass]
    relations: frozenset[str] = frozenset()
    text: str = ""  # this statement's own text (without the separating semicolon)
    functions: frozenset[str] = frozenset()  # called function names (last name part)
    class_relations: Mapping[str, frozenset[RelRef]] = field(default_factory=dict)
    prepared_name: str | None = None  # PREPARE <name>
    execute_names: tuple[str, ...] = ()  # EXECUTE <name> (also inside EXPLAIN ANALYZE / CREATE TABLE AS)
    deallocate: str | None = None  # DEALLOCATE <name>; "*" for DEALLOCATE ALL
    relations_known: bool = True  # False: an EXECUTE resolved from classes only (fail closed on scoping)

    def as_prepared(self) -> StatementInfo:
        """What an ``EXECUTE`` of this ``PREPARE`` runs: the inner statement's classes (without ``prepare``).

        The tunnel can keep these per connection (name -> info) once the server accepted the PREPARE, and pass
        them as ``prepared`` to :meth:`Guardrails.check` (keeps relation scoping exact for EXECUTE).
        """
        classes = frozenset(c for c in self.classes if c != "prepare")
        rels = {c: r for c, r in self.class_relations.items() if c != "prepare"}
        return replace(self, classes=classes, class_relations=rels, prepared_name=None)


@dataclass(frozen=True, slots=True)
class Verdict:
    """The result of :meth:`Guardrails.check`. ``message`` is safe to send to the client (SQLSTATE 42501).

    ``rule`` is the denying rule's name; None when allowed, and also when denied because the text did not
    parse and no rule names ``unparseable`` (the fail-closed default). May be shared: do not mutate.
    """

    allowed: bool
    rule: str | None
    message: str
    statements: list[StatementInfo]


# ----------------------------------------------------------------------------------------------------
# classification


class _Acc:
    __slots__ = ("classes", "consts", "deallocate", "execute_names", "functions", "prepared_name", "rels")

    def __init__(self) -> None:
        self.consts = False  # a constant's value decided something (not cacheable by template)
        self.classes: set[str] = set()
        self.rels: dict[str, set[RelRef]] = {}
        self.functions: set[str] = set()
        self.prepared_name: str | None = None
        self.execute_names: list[str] = []
        self.deallocate: str | None = None

    def add(self, cls: str, refs: Iterable[RelRef] = ()) -> None:
        self.classes.add(cls)
        bucket = self.rels.get(cls)
        if bucket is None:
            bucket = self.rels[cls] = set()
        bucket.update(refs)

    def ref(self, cls: str, ref: RelRef) -> None:
        """Record a relation under a class without adding the class itself (inert walks)."""
        bucket = self.rels.get(cls)
        if bucket is None:
            bucket = self.rels[cls] = set()
        bucket.add(ref)


def _rangevar(d: Mapping[str, Any]) -> RelRef:
    schema = d.get("schemaname")
    return (schema if isinstance(schema, str) else None, str(d.get("relname", "")))


def _unwrap(node: Any, typ: str) -> Mapping[str, Any] | None:
    """A typed field holds a bare struct; a generic Node field holds ``{typ: struct}``; accept both."""
    if isinstance(node, dict):
        inner = node.get(typ)
        if isinstance(inner, dict) and len(node) == 1:
            return cast("Mapping[str, Any]", inner)
        return cast("Mapping[str, Any]", node)
    return None


def _strings(items: Any) -> list[str]:
    out: list[str] = []
    if isinstance(items, dict) and "List" in items:
        items = items["List"].get("items", [])
    if isinstance(items, list):
        for it in items:
            if isinstance(it, dict) and "String" in it:
                out.append(str(it["String"].get("sval", "")))
    return out


def _qualified(parts: list[str]) -> RelRef | None:
    if not parts:
        return None
    return (parts[-2] if len(parts) >= 2 else None, parts[-1])


def _defelem_true(arg: Any) -> bool:
    """An EXPLAIN option's value: absent means true; only clear false words/0 mean false."""
    if arg is None:
        return True
    if isinstance(arg, dict):
        for key in ("String", "Boolean", "Integer"):
            inner = arg.get(key)
            if isinstance(inner, dict):
                if key == "String":
                    return str(inner.get("sval", "")).lower() not in _FALSE_WORDS
                if key == "Boolean":
                    return bool(inner.get("boolval", False))
                return int(inner.get("ival", 0)) != 0
    return True


class _Walker:
    """Walks libpg_query JSON. ``mode``: the class generic relation references are filed under;
    ``inert``: definitions (EXPLAIN without ANALYZE, function bodies, rules, views): relations only."""

    __slots__ = ("acc",)

    def __init__(self, acc: _Acc) -> None:
        self.acc = acc

    def walk(self, obj: Any, mode: str, inert: bool) -> None:
        if type(obj) is list:
            for item in obj:
                t = type(item)
                if t is dict or t is list:
                    self.walk(item, mode, inert)
            return
        if type(obj) is not dict:
            return
        if len(obj) == 1:
            ((key, body),) = obj.items()
            if type(body) is dict and key[:1].isupper():
                if key not in _LEAF_NODES:
                    self.node(key, body, mode, inert)
                return
        if "relname" in obj:  # a RangeVar held by a typed field (no wrapper)
            self.acc.ref(mode, _rangevar(obj))
            return
        self.fields(obj, mode, inert)

    def _option_true(self, arg: Any) -> bool:
        if arg is not None:
            self.acc.consts = True
        return _defelem_true(arg)

    def fields(self, body: Mapping[str, Any], mode: str, inert: bool, skip: tuple[str, ...] = ()) -> None:
        for k, v in body.items():
            t = type(v)
            if (t is dict or t is list) and k not in skip:
                self.walk(v, mode, inert)

    def node(self, typ: str, body: Mapping[str, Any], mode: str, inert: bool) -> None:
        acc = self.acc
        if typ == "RangeVar":
            acc.ref(mode, _rangevar(body))
            return
        if typ == "FuncCall":
            self.funccall(body, mode, inert)
            return
        if inert or not typ.endswith("Stmt"):
            self.fields(body, mode, inert)
            return
        # ---- statements (top level or nested: CTE, PREPARE, EXPLAIN ANALYZE, COPY (query), CTAS) ----
        if typ == "SelectStmt":
            acc.add("read")
            into = body.get("intoClause")
            if isinstance(into, dict) and isinstance(into.get("rel"), dict):
                target = _rangevar(into["rel"])
                acc.add("ddl", [target])
                acc.add("write", [target])
            self.fields(body, "read", False, skip=("intoClause",))
        elif typ in ("InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt"):
            rel = _unwrap(body.get("relation"), "RangeVar")
            targets = [_rangevar(rel)] if rel is not None else []
            acc.add("write", targets)
            if typ == "DeleteStmt" and body.get("whereClause") is None:
                acc.add("delete_without_where", targets)
            elif typ == "UpdateStmt" and body.get("whereClause") is None:
                acc.add("update_without_where", targets)
            sel = body.get("selectStmt")
            values = sel.get("SelectStmt") if isinstance(sel, dict) else None
            if isinstance(values, dict) and "valuesLists" in values and "withClause" not in values:
                self.fields(values, "read", False)  # INSERT ... VALUES reads nothing: no `read` class
                self.fields(body, "read", False, skip=("relation", "selectStmt"))
            else:
                self.fields(body, "read", False, skip=("relation",))
        elif typ == "CreateTableAsStmt":
            into = body.get("into")
            targets = []
            if isinstance(into, dict) and isinstance(into.get("rel"), dict):
                targets = [_rangevar(into["rel"])]
            acc.add("ddl", targets)
            acc.add("write", targets)
            self.walk(body.get("query"), "read", False)
        elif typ == "RefreshMatViewStmt":
            rel = _unwrap(body.get("relation"), "RangeVar")
            acc.add("write", [_rangevar(rel)] if rel is not None else [])
        elif typ == "ExplainStmt":
            acc.add("read")
            analyze = False
            for opt in body.get("options") or []:
                de = opt.get("DefElem") if isinstance(opt, dict) else None
                if (isinstance(de, dict) and de.get("defname") == "analyze"
                        and self._option_true(de.get("arg"))):
                    analyze = True
            self.walk(body.get("query"), "read", not analyze)
        elif typ == "CopyStmt":
            rel = _unwrap(body.get("relation"), "RangeVar")
            targets = [_rangevar(rel)] if rel is not None else []
            is_from = bool(body.get("is_from"))
            acc.add("write" if is_from else "read", targets)
            if body.get("filename") is not None:
                acc.add("copy_program" if body.get("is_program") else "copy_file", targets)
            elif body.get("is_program"):
                acc.add("copy_program", targets)
            self.fields(body, "read", False, skip=("relation",))
        elif typ == "DoStmt":
            acc.add("do_block")
        elif typ == "CallStmt":
            acc.add("call")
            self.fields(body, "read", False)
        elif typ == "PrepareStmt":
            acc.add("prepare")
            name = body.get("name")
            acc.prepared_name = str(name) if name is not None else ""
            self.walk(body.get("query"), "read", False)
            acc.add("prepare", [r for refs in acc.rels.values() for r in refs])
        elif typ == "ExecuteStmt":
            acc.add("execute")
            acc.execute_names.append(str(body.get("name", "")))
            self.fields(body, "read", False)
        elif typ == "TransactionStmt":
            acc.add("transaction")
        elif typ == "LockStmt":
            acc.add("transaction")
            self.fields(body, "transaction", False)
        elif typ == "VariableSetStmt":
            name = str(body.get("name", "")).lower()
            acc.add("role_admin" if name in ("role", "session_authorization") else "session")
        elif typ in _SESSION_STMTS:
            acc.add("session")
            if typ == "DeallocateStmt":
                acc.deallocate = "*" if body.get("isall") else str(body.get("name", ""))
        elif typ in _READ_STMTS:
            acc.add("read")
        elif typ == "DeclareCursorStmt":
            acc.add("read")
            self.walk(body.get("query"), "read", False)
        elif typ == "GrantStmt":
            cls = "grant" if body.get("is_grant") else "revoke"
            refs: list[RelRef] = []
            schema_wide = body.get("targtype") == "ACL_TARGET_ALL_IN_SCHEMA"
            for obj in body.get("objects") or []:
                if isinstance(obj, dict) and "RangeVar" in obj:
                    refs.append(_rangevar(obj["RangeVar"]))
                elif isinstance(obj, dict) and "String" in obj:
                    sval = str(obj["String"].get("sval", ""))
                    is_schema = schema_wide or body.get("objtype") == "OBJECT_SCHEMA"
                    refs.append((sval, None) if is_schema else (None, sval))
            acc.add(cls, refs)
        elif typ == "GrantRoleStmt":
            acc.add("grant" if body.get("is_grant") else "revoke")
        elif typ == "AlterDefaultPrivilegesStmt":
            action = _unwrap(body.get("action"), "GrantStmt")
            if action is not None:
                self.node("GrantStmt", action, mode, False)
            else:
                acc.add("ddl")
        elif typ in _ROLE_STMTS:
            acc.add("role_admin")
        elif typ == "DropRoleStmt":
            acc.add("role_admin")
            acc.add("drop_other")
        elif typ == "DropOwnedStmt":  # may drop any relation or schema: matches every relation-scoped rule
            acc.add("drop_other", [(None, None)])
            acc.add("drop_table", [(None, None)])
            acc.add("drop_schema", [(None, None)])
        elif typ == "RenameStmt" and body.get("renameType") == "OBJECT_ROLE":
            acc.add("role_admin")
        elif typ == "AlterSystemStmt":
            acc.add("alter_system")
        elif typ == "DropdbStmt":
            acc.add("drop_database")
        elif typ == "DropStmt":
            self.drop(body)
        elif typ == "TruncateStmt":
            acc.add("truncate")
            self.fields(body, "truncate", False)
        elif typ in _DEFINITION_STMTS:
            acc.add("ddl")
            self.fields(body, "ddl", True)
        else:  # CREATE / ALTER / COMMENT / VACUUM / ... and any statement kind unknown to this code
            acc.add("ddl")
            self.fields(body, "ddl", False)

    def drop(self, body: Mapping[str, Any]) -> None:
        rtype = body.get("removeType")
        objects = body.get("objects") or []
        if rtype in _DROP_TABLE_TYPES:
            refs = [r for r in (_qualified(_strings(o)) for o in objects) if r is not None]
            self.acc.add("drop_table", refs)
        elif rtype == "OBJECT_SCHEMA":
            names = [n for o in objects for n in _strings([o])]
            self.acc.add("drop_schema", [(n, None) for n in names])
        else:
            self.acc.add("drop_other")

    def funccall(self, body: Mapping[str, Any], mode: str, inert: bool) -> None:
        names = _strings(body.get("funcname"))
        if names:
            fname = names[-1]
            self.acc.functions.add(fname)
            if not inert:
                if fname in _FILE_FUNCTIONS:
                    self.acc.add("copy_file")
                elif fname == "set_config":
                    self.acc.add("session")
                    args = body.get("args") or []
                    self.acc.consts = True
                    first = args[0].get("A_Const") if args and isinstance(args[0], dict) else None
                    setting = None
                    if isinstance(first, dict) and isinstance(first.get("sval"), dict):
                        setting = str(first["sval"].get("sval", "")).lower()
                    if setting is None or setting in ("role", "session_authorization"):
                        self.acc.add("role_admin")
        self.fields(body, mode, inert, skip=("funcname",))


def _unparseable(sql: str) -> tuple[StatementInfo, ...]:
    return (StatementInfo(classes=frozenset({"unparseable"}), text=sql[:1000]),)


def _rel_strings(rels: Mapping[str, frozenset[RelRef]]) -> frozenset[str]:
    out: set[str] = set()
    for refs in rels.values():
        for schema, name in refs:
            if name is None:
                out.add(f"{schema}.*" if schema is not None else "*")
                continue
            out.add(name)
            if schema is not None:
                out.add(f"{schema}.{name}")
    return frozenset(out)


def _classify(sql: str) -> tuple[StatementInfo, ...]:
    """Classify without resolving EXECUTE (the cacheable part)."""
    return _classify_full(sql)[0]


_Span = tuple[int, int]


def _classify_full(sql: str) -> tuple[tuple[StatementInfo, ...], bool, list[_Span]]:
    """:func:`_classify`; whether the value of a constant decided a class (EXPLAIN option values,
    ``set_config``'s setting name, or the text did not parse): such texts must not be cached by template;
    and each statement's ``text`` as a span of UTF-8 byte offsets into ``sql``."""
    if "\x00" in sql:
        return _unparseable(sql), True, []
    consts = False
    spans: list[_Span] = []
    from pglast.parser import parse_sql_json  # here: a session without rules never loads libpg_query

    try:
        raw = sql.encode("utf-8")
        tree = json.loads(parse_sql_json(sql))
        out: list[StatementInfo] = []
        for entry in tree.get("stmts") or []:
            acc = _Acc()
            _Walker(acc).walk(entry.get("stmt"), "read", False)
            consts = consts or acc.consts
            if not acc.classes:  # cannot happen for a parsed statement; fail closed if it ever does
                acc.add("ddl")
            start = int(entry.get("stmt_location", 0))
            length = int(entry.get("stmt_len", 0))
            chunk = raw[start : start + length] if length else raw[start:]
            rels = {c: frozenset(r) for c, r in acc.rels.items() if c in acc.classes and r}
            text = chunk.decode("utf-8", "replace")
            stripped = text.strip()
            lead = len(text) - len(text.lstrip())
            spans.append((start + lead, start + lead + len(stripped)))  # byte offsets when ASCII
            out.append(
                StatementInfo(
                    classes=cast("frozenset[StatementClass]", frozenset(acc.classes)),
                    relations=_rel_strings({c: frozenset(r) for c, r in acc.rels.items()}),
                    text=stripped,
                    functions=frozenset(acc.functions),
                    class_relations=rels,
                    prepared_name=acc.prepared_name,
                    execute_names=tuple(acc.execute_names),
                    deallocate=acc.deallocate,
                )
            )
        return tuple(out), consts, spans
    except Exception:  # ParseError, UnicodeEncodeError (lone surrogates), RecursionError on absurd nesting
        return _unparseable(sql), True, []


PreparedMap = Mapping[str, frozenset[StatementClass] | StatementInfo]


def _resolve(
    stmts: Sequence[StatementInfo], prepared: PreparedMap | None
) -> tuple[list[StatementInfo], bool]:
    """Give each EXECUTE the classes of what was prepared (caller's map, then PREPAREs earlier in the string).

    Returns the statements and whether any was changed.
    """
    local: dict[str, frozenset[StatementClass] | StatementInfo] | None = None
    out: list[StatementInfo] = []
    changed = False
    for st in stmts:
        if st.execute_names:
            classes: set[str] = set(st.classes)
            rels: dict[str, frozenset[RelRef]] = dict(st.class_relations)
            known = st.relations_known
            for name in st.execute_names:
                entry = local.get(name) if local is not None and name in local else None
                if entry is None and prepared is not None:
                    entry = prepared.get(name)
                if entry is None:
                    continue
                if isinstance(entry, StatementInfo):
                    classes.update(entry.classes)
                    for c, r in entry.class_relations.items():
                        rels[c] = rels.get(c, frozenset()) | r
                    known = known and entry.relations_known
                else:
                    classes.update(entry)
                    known = False
            if classes != st.classes or rels != st.class_relations or known != st.relations_known:
                st = replace(
                    st,
                    classes=cast("frozenset[StatementClass]", frozenset(classes)),
                    class_relations=rels,
                    relations=st.relations | _rel_strings(rels),
                    relations_known=known,
                )
                changed = True
        if st.prepared_name is not None:
            local = local if local is not None else {}
            local[st.prepared_name] = st.as_prepared()
        if st.deallocate is not None and (local is not None or prepared):
            local = local if local is not None else {}
            if st.deallocate == "*":
                local.clear()
                prepared = None
            else:
                local.pop(st.deallocate, None)
                if prepared is not None and st.deallocate in prepared:
                    prepared = {k: v for k, v in prepared.items() if k != st.deallocate}
        out.append(st)
    return out, changed


def classify(sql: str, prepared: PreparedMap | None = None) -> list[StatementInfo]:
    """Classify every statement of ``sql`` (uncached). ``prepared`` resolves ``EXECUTE name``."""
    stmts, _ = _resolve(_classify(sql), prepared)
    return stmts


# ----------------------------------------------------------------------------------------------------
# rules


def parse_relation_name(text: str) -> RelRef:
    """A rule's relation (``table`` or ``schema.table``) as PostgreSQL reads an identifier chain: unquoted
    parts lower-cased (ASCII), ``"Quoted"`` parts verbatim (``""`` is a quote), truncated to 63 bytes."""
    parts: list[str] = []
    i, n = 0, len(text)
    while i <= n:
        if i < n and text[i] == '"':
            j, buf = i + 1, []
            while j < n:
                if text[j] == '"':
                    if j + 1 < n and text[j + 1] == '"':
                        buf.append('"')
                        j += 2
                        continue
                    break
                buf.append(text[j])
                j += 1
            part = "".join(buf)
            i = j + 1
        else:
            j = text.find(".", i)
            j = n if j < 0 else j
            part = text[i:j].strip().translate(_ASCII_LOWER)
            i = j
        enc = part.encode("utf-8")
        if len(enc) > _NAMEDATALEN:
            part = enc[:_NAMEDATALEN].decode("utf-8", "ignore")
        parts.append(part)
        while i < n and text[i] == " ":
            i += 1
        if i < n and text[i] == ".":
            i += 1
            continue
        break
    if len(parts) == 1:
        return (None, parts[0])
    return (parts[-2], parts[-1])


_ASCII_LOWER: Final = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def _ref_matches(rule_ref: RelRef, ref: RelRef) -> bool:
    rschema, rname = rule_ref
    schema, name = ref
    if name is None:  # schema-wide reference: every relation of `schema` (of every schema if None)
        return schema is None or rschema is None or rschema == schema
    if rname != name:
        return False
    return rschema is None or schema is None or rschema == schema


@dataclass(frozen=True, slots=True)
class _Rule:
    name: str
    deny: frozenset[str]
    relations: tuple[RelRef, ...]
    message: str | None


def _default_message(rule: str, cls: str) -> str:
    return f"pcigate: statement blocked by guardrail rule '{rule}' ({cls.replace('_', ' ')})"


_FAIL_CLOSED_MESSAGE: Final = (
    "pcigate: statement blocked: it could not be parsed, and guardrails deny what they cannot check"
)
_ALLOW_ALL: Final = Verdict(allowed=True, rule=None, message="", statements=[])


class CacheInfo(NamedTuple):
    hits: int  # exact-text hits
    misses: int  # texts classified by the parser
    maxsize: int
    currsize: int  # exact-text entries
    template_hits: int = 0  # texts answered by a template (same statement, other integer constants)
    templates: int = 0


_DIGITS = b"0123456789"
_MAX_SLOT_DIGITS = 9  # any run of at most 9 digits is an int4 ICONST to the scanner, never an FCONST


class _Template:
    """A classified ASCII text whose integer constants may differ.

    ``fullmatch`` of ``regex`` holds exactly for the texts that are this one with each integer-constant token
    (as PostgreSQL's scanner found it: a run of 1-9 ASCII digits) replaced by another run of 1-9 digits, and
    every other character the same. The characters around each slot are the same, so the scanner produces the
    same token sequence, every slot still an ICONST; the parse trees differ only in those constants' values,
    which the classification of a template never depended on (``_classify_full``'s ``consts``). So the
    classes, relations, names and verdict carry over; only the statements' ``text`` is re-cut."""

    __slots__ = ("cuts", "regex", "slots", "stmts", "verdict")

    def __init__(self, regex: re.Pattern[str], slots: list[_Span], spans: list[_Span],
                 stmts: tuple[StatementInfo, ...], verdict: Verdict | None) -> None:
        self.regex = regex
        self.slots = slots  # (start, end) of each integer constant in the template's text
        # each statement's text in the template's text: (start, slots ending at or before it, end, same)
        self.cuts = [(a, sum(1 for _, e in slots if e <= a), b, sum(1 for _, e in slots if e <= b))
                     for a, b in spans]
        self.stmts = stmts
        self.verdict = verdict

    @classmethod
    def build(cls, sql: str, stmts: tuple[StatementInfo, ...], spans: list[_Span],
              verdict: Verdict | None) -> _Template | None:
        """A template for ``sql`` (ASCII, classified), or None when it has no integer constant to vary."""
        from pglast.parser import scan

        try:
            tokens = scan(sql)
        except Exception:  # the parser accepted it, so the scanner will; fail safe regardless
            return None
        slots = [(t.start, t.end + 1) for t in tokens if t.name == "ICONST"
                 and t.end + 1 - t.start <= _MAX_SLOT_DIGITS and sql[t.start : t.end + 1].isdigit()]
        if not slots:
            return None
        parts: list[str] = []
        pos = 0
        for a, b in slots:
            parts.append(re.escape(sql[pos:a]))
            parts.append(f"([0-9]{{1,{_MAX_SLOT_DIGITS}}})")
            pos = b
        parts.append(re.escape(sql[pos:]))
        return cls(re.compile("".join(parts)), slots, spans, stmts, verdict)

    def match(self, sql: str) -> tuple[tuple[StatementInfo, ...], Verdict | None] | None:
        """:meth:`apply` without re-cutting the statement texts (they stay the template's)."""
        if self.regex.fullmatch(sql) is None:
            return None
        return self.stmts, self.verdict

    def apply(self, sql: str) -> tuple[tuple[StatementInfo, ...], Verdict | None] | None:
        """The classification of ``sql`` if it is this template with other integer constants, else None."""
        m = self.regex.fullmatch(sql)
        if m is None:
            return None
        # shift[k]: how much later than in the template the text after the k-th slot starts
        shift = [0]
        acc = 0
        for i, (a, b) in enumerate(self.slots, 1):
            acc += (m.end(i) - m.start(i)) - (b - a)
            shift.append(acc)
        stmts = tuple([
            StatementInfo(st.classes, st.relations, sql[a + shift[ka] : b + shift[kb]], st.functions,
                          st.class_relations, st.prepared_name, st.execute_names, st.deallocate,
                          st.relations_known)
            for st, (a, ka, b, kb) in zip(self.stmts, self.cuts, strict=True)
        ])
        v = self.verdict
        if v is None:
            return stmts, None
        return stmts, Verdict(v.allowed, v.rule, v.message, list(stmts))


class Guardrails:
    """Judge query strings against guardrail rules, with bounded caches.

    Rules are checked in order, statements in order; the first match denies the whole string (nothing of it
    may be forwarded).

    Caching: an LRU keyed by the exact text, and an LRU of :class:`_Template` keyed by the text without its
    digits, so the stream of an application's statements that differ only in integer literals
    (``... WHERE aid = 4711``, pgbench's select-only load) is judged without the parser once a text of that
    shape has been classified twice. A template answers only a text it provably covers (see
    :class:`_Template`); anything else is classified. Thread-safe for concurrent ``check`` calls (one lock
    around the cache bookkeeping; classification runs outside it).
    """

    max_cached_len: int = 64 * 1024  # longer texts are classified every time (bounded memory)

    def __init__(self, rules: Sequence[GuardrailRule], cache_size: int = 4096) -> None:
        self._rules = tuple(
            _Rule(
                name=r.name,
                deny=frozenset(r.deny),
                relations=tuple(parse_relation_name(x) for x in r.relations),
                message=r.message,
            )
            for r in rules
        )
        if self._rules:
            import pglast.parser  # noqa: F401  # loaded now, not at the session's first statement

        self._size = max(cache_size, 0)
        self._exact: OrderedDict[str, tuple[tuple[StatementInfo, ...], Verdict | None]] = OrderedDict()
        # the text without its digits -> a template (None: seen once, no template built yet)
        self._templates: OrderedDict[bytes, _Template | None] = OrderedDict()
        self._lock = threading.Lock()
        self._hits = self._misses = self._template_hits = 0

    @property
    def enabled(self) -> bool:
        return bool(self._rules)

    def cache_info(self) -> CacheInfo:
        with self._lock:
            return CacheInfo(self._hits, self._misses, self._size, len(self._exact), self._template_hits,
                             sum(1 for t in self._templates.values() if t is not None))

    def check(self, sql: str, prepared: PreparedMap | None = None, *, texts: bool = True) -> Verdict:
        """Verdict for one query string (simple Query, or the text of an extended-protocol Parse).

        ``texts=False``: the caller reads only the statements' classes, relations and names (the tunnel), so a
        text answered by a template may come back with the template's own statement objects, whose ``text``
        is that of the earlier text of the same shape (its integer constants differ). Saves re-cutting them.
        """
        if not self._rules:
            return _ALLOW_ALL
        stmts, verdict = self._lookup(sql, texts)
        if verdict is not None:
            return verdict
        resolved, _ = _resolve(stmts, prepared)
        return self._judge(resolved)

    def _lookup(self, sql: str, texts: bool = True) -> tuple[tuple[StatementInfo, ...], Verdict | None]:
        if self._size == 0 or len(sql) > self.max_cached_len:
            self._misses += 1
            return self._classify_and_judge(sql)[:2]
        # Hits take no lock: OrderedDict's get/move_to_end are atomic under the GIL, and an entry evicted by
        # another thread in between only costs its recency. The counters are statistics, not invariants.
        exact = self._exact
        hit = exact.get(sql)
        if hit is not None:
            self._hits += 1
            with contextlib.suppress(KeyError):
                exact.move_to_end(sql)
            return hit
        key: bytes | None = None
        if sql.isascii():
            key = sql.encode().translate(None, _DIGITS)
            tpl = self._templates.get(key)
            if tpl is not None:
                found = tpl.apply(sql) if texts else tpl.match(sql)
                if found is not None:
                    self._template_hits += 1
                    with contextlib.suppress(KeyError):
                        self._templates.move_to_end(key)
                    return found
        stmts, verdict, consts, spans = self._classify_and_judge(sql)
        build = False
        with self._lock:
            self._misses += 1
            exact[sql] = (stmts, verdict)
            if len(exact) > self._size:
                exact.popitem(last=False)
            if key is not None and not consts:
                # a template is built the second time a shape is seen: one-off texts cost no scan
                build = key in self._templates and self._templates[key] is None
                if not build and key not in self._templates:
                    self._templates[key] = None
                    if len(self._templates) > self._size:
                        self._templates.popitem(last=False)
        if build:
            assert key is not None
            made = _Template.build(sql, stmts, spans, verdict)
            if made is not None:
                with self._lock:
                    self._templates[key] = made
        return stmts, verdict

    def _classify_and_judge(
        self, sql: str
    ) -> tuple[tuple[StatementInfo, ...], Verdict | None, bool, list[_Span]]:
        """The raw classification, the verdict when it does not depend on ``prepared``, and what
        :func:`_classify_full` says about constants and statement spans."""
        stmts, consts, spans = _classify_full(sql)
        if any(st.execute_names or st.deallocate is not None for st in stmts):
            return stmts, None, consts, spans
        return stmts, self._judge(list(stmts)), consts, spans

    def _judge(self, stmts: list[StatementInfo]) -> Verdict:
        for st in stmts:
            for rule in self._rules:
                cls = self._match(rule, st)
                if cls is not None:
                    return Verdict(False, rule.name, rule.message or _default_message(rule.name, cls), stmts)
            if "unparseable" in st.classes:
                return Verdict(False, None, _FAIL_CLOSED_MESSAGE, stmts)
        return Verdict(True, None, "", stmts)

    @staticmethod
    def _match(rule: _Rule, st: StatementInfo) -> str | None:
        for cls in sorted(rule.deny & st.classes):
            if not rule.relations or cls in _RELATIONLESS or not st.relations_known:
                return cls
            refs = st.class_relations.get(cls, frozenset())
            if any(_ref_matches(rr, ref) for rr in rule.relations for ref in refs):
                return cls
        return None
