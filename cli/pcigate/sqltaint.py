"""Which computed result columns of a statement carry a column that a masking rule names (pure code, no I/O).

A column rule follows a result column to its table column by the table OID and attribute number PostgreSQL
sends in RowDescription; aliases, subqueries, CTEs and RETURNING keep them. A *computed* column (an
expression, an aggregate, a set operation's output, a VALUES list) arrives with neither, under a name of its
own: ``SELECT cvv || '' AS x``, ``SELECT upper(cvv)``, ``SELECT max(cvv)``, ``SELECT c::text FROM cards c``
or ``SELECT cvv AS x FROM cards UNION SELECT '1'`` showed the CVV in clear.

This module reads the statement with PostgreSQL's own parser (libpg_query through pglast, as
:mod:`pcigate.guardrails` does) and tells, for each statement of a query string and each output position, the
rule columns its value is computed from. The tunnel then judges such a column as that rule column (the
strictest, when it draws on several), so it is masked like the column itself.

How a value is traced, deliberately by name and across the whole statement (fail closed: it may mask a
computed column that only shares a name, never the other way round):

* a column reference whose name is a rule column (``cvv``, ``c.cvv``);
* a whole-row reference (``c``, ``c.*``, ``cards``) to a table that holds rule columns, by its name or alias;
* an output name that a select list anywhere in the statement computes from a rule column (a subquery's or
  a CTE's column, their column aliases included), and a subquery or CTE alias as a whole row of those;
* a scalar, ``ARRAY`` or other sub-select inside an expression: its select list.

Only select lists (and RETURNING, VALUES) produce values: a rule column in a WHERE, GROUP BY, ORDER BY or
JOIN condition marks nothing (``SELECT count(*) FROM cards WHERE cvv = '1'`` is left alone).

Where the output positions cannot be read off the statement (a ``*`` in its select list), every computed
column of the result is judged by the rule columns any of the statement's select lists draws on. Text the
parser refuses is judged the same way, with every rule column (the server will most likely refuse it too).

``PREPARE name AS ...`` and ``DECLARE name CURSOR FOR ...`` report their query's columns (``Derived.defines``,
``inner``), ``EXECUTE name`` and ``FETCH ... name`` the name they use: the tunnel keeps them per connection.

A call of a function that runs a query given as text (:data:`OPAQUE_FUNCTIONS`) or whose definition names a
rule column (the tunnel reads them at session start, and ``Derived.function`` reports one created during
the session) is judged as every rule column; a ``DO`` block naming one, or such a call, sets
``Derived.notices``. Views are traced by :func:`trace_views`; relations filled during the session with rule
columns' values are reported by ``Derived.learns``. A rule column spelled with ``U&""`` escapes is found:
text holding ``U&`` is always parsed, and the parser decodes the escape.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

MAX_SQL = 256 * 1024  # longer text is not parsed: judged as if it drew on every rule column
MAX_ROUNDS = 8  # of name flow between select lists; a statement needing more is judged the same way
CACHE_SIZE = 1024  # query texts remembered, each at most CACHE_TEXT bytes (at most 8 MiB in all)
CACHE_TEXT = 8192
_EMPTY: frozenset[str] = frozenset()
_NAMED = re.compile(rb"execute|fetch|prepare|declare")
# The catalog's statistics hold sample values of every analysed column, rule columns included
# (``SELECT most_common_vals FROM pg_stats WHERE attname = 'cvv'`` gave the most frequent CVVs): their value
# columns are judged as every rule column from the session's start (pg_statistic, superuser-only, whole).
STATISTICS: dict[str, tuple[str, ...]] = {
    "pg_stats": ("most_common_vals", "histogram_bounds", "most_common_elems"),
    "pg_stats_ext": ("most_common_vals",),
    "pg_stats_ext_exprs": ("most_common_vals", "histogram_bounds", "most_common_elems"),
    "pg_statistic": (),
    "pg_statistic_ext_data": (),
}
# Functions that keep a value in server state a later statement can read back, with what reads it back:
# (functions whose result is then judged as every rule column, relations whose columns are then judged).
# Given a rule column's value (set_config('my.x', cvv, false)), they teach the session's judge those.
# SHOW reads what set_config keeps (``"show"``).
STATE_WRITERS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "set_config": (frozenset({"current_setting", "show"}), frozenset({"pg_settings"})),
    "setval": (frozenset({"currval", "lastval", "nextval"}), frozenset()),
    "pg_advisory_lock": (frozenset(), frozenset({"pg_locks"})),
    "pg_advisory_xact_lock": (frozenset(), frozenset({"pg_locks"})),
    "pg_try_advisory_lock": (frozenset(), frozenset({"pg_locks"})),
    "pg_try_advisory_xact_lock": (frozenset(), frozenset({"pg_locks"})),
    "pg_advisory_lock_shared": (frozenset(), frozenset({"pg_locks"})),
    "pg_advisory_xact_lock_shared": (frozenset(), frozenset({"pg_locks"})),
    "lo_from_bytea": (frozenset({"lo_get", "loread"}), frozenset({"pg_largeobject"})),
    "lo_put": (frozenset({"lo_get", "loread"}), frozenset({"pg_largeobject"})),
    "lowrite": (frozenset({"lo_get", "loread"}), frozenset({"pg_largeobject"})),
}
# Functions that run a query given as text (or read a table named in text) and return its values: what they
# read cannot be told, so a value computed by one is judged as every rule column (``table_to_xml('cards',
# ...)`` printed <cvv>001</cvv>). Looked for by their last name part, lower case.
OPAQUE_FUNCTIONS = frozenset({
    "query_to_xml", "query_to_xml_and_xmlschema", "table_to_xml", "table_to_xml_and_xmlschema",
    "cursor_to_xml", "schema_to_xml", "schema_to_xml_and_xmlschema", "database_to_xml",
    "database_to_xml_and_xmlschema", "dblink", "dblink_fetch", "dblink_get_result",
})
# an identifier as PostgreSQL's scanner reads one (letters of any script, digits, _ and $), in lower-cased
# text; a quoted one ("CVV") is found by its letters too
_TOKEN = re.compile(rb"[a-z_\x80-\xff][a-z0-9_$\x80-\xff]*")


@dataclass(frozen=True, slots=True)
class Derived:
    """One statement's computed columns: per output position the rule column to judge it as (None: none), or
    ``positions`` None when the positions are unknown and ``fallback`` applies to every computed column."""

    positions: tuple[str | None, ...] | None
    fallback: str | None
    # per position (and for the fallback): computed only from whole rows (``to_jsonb(c)``), whose JSON keeps
    # the column names as member names: a json value of such a column is masked member by member instead
    rows_only: tuple[bool, ...] = ()
    fallback_rows_only: bool = False
    # SQL-level names: a ``PREPARE name AS ...`` / ``DECLARE name CURSOR FOR ...`` defines ("s:name" /
    # "c:name") with ``inner`` its query's columns; an ``EXECUTE name`` / ``FETCH ... name`` uses one, whose
    # columns the caller looks up among the ones its connection defined
    defines: str | None = None
    inner: Derived | None = None
    uses: str | None = None
    # the statement writes values computed from rule columns into a relation (CREATE TABLE AS, SELECT INTO,
    # CREATE VIEW, INSERT ... SELECT, UPDATE ... SET): (relation, its column or None if not known, rule)
    learns: tuple[tuple[str, str | None, str], ...] = ()
    # the statement reads such a relation: its columns arrive with that relation's OID, which no origin
    # knows, so the caller judges those too (not only the computed ones)
    session: bool = False
    # CREATE FUNCTION / PROCEDURE whose body names a rule column (or a table holding one): its name, which a
    # call is then judged by as every rule column
    function: str | None = None
    # the statement may print rule columns' values in a notice or error (a DO block naming one, a call of
    # such a function): the caller stars their message, detail and hint
    notices: bool = False
    # it keeps a rule column's value in server state through these STATE_WRITERS (ComputedColumns.learn_state)
    # or pg_notify
    stores: frozenset[str] = _EMPTY

    @property
    def notifies(self) -> bool:
        """It sends a NOTIFY payload computed from a rule column (``pg_notify('ch', cvv)``): the listener gets
        it later, on any connection, so the caller stars notification payloads from then on."""
        return "pg_notify" in self.stores

    def column(self, index: int, count: int, json: bool = False) -> str | None:
        """The rule column the computed result column ``index`` of ``count`` is to be judged as, if any;
        ``json``: the column is json or jsonb."""
        if self.positions is not None and len(self.positions) == count:
            name, rows = self.positions[index], index < len(self.rows_only) and self.rows_only[index]
        else:
            name, rows = self.fallback, self.fallback_rows_only
        return None if rows and json else name


def _grow(names: dict[str, frozenset[str]], key: str, rules: Iterable[str]) -> bool:
    """Add ``rules`` to what ``key`` carries; whether that added any."""
    held = names.get(key, _EMPTY)
    more = held.union(rules)
    if len(more) == len(held):
        return False
    names[key] = more
    return True


def _strings(items: Any) -> list[str]:
    return [i["String"]["sval"] for i in items or () if isinstance(i, dict) and "String" in i]


def _has_star(ref: Mapping[str, Any]) -> bool:
    return any(isinstance(f, dict) and "A_Star" in f for f in ref.get("fields", ()))


class _Select:
    """A select list somewhere in the statement: its value expressions, the names its outputs go by, and the
    alias its rows go by (a subquery's or a CTE's)."""

    __slots__ = ("alias", "exprs", "names", "star_from")

    def __init__(self, exprs: list[Any], names: list[str | None], alias: str | None,
                 star_from: tuple[str, ...] = ()) -> None:
        self.exprs = exprs
        self.names = names
        self.alias = alias
        # with a * in the list and an alias: the names of what its FROM reads (the rows it passes on whole)
        self.star_from = star_from


def _nodes(tree: Any) -> Iterator[dict[str, Any]]:
    """Every object of a parse tree, at any depth."""
    stack = [tree]
    while stack:
        obj = stack.pop()
        if isinstance(obj, list):
            stack.extend(obj)
        elif isinstance(obj, dict):
            yield obj
            stack.extend(obj.values())


def _from_names(node: Any) -> tuple[str, ...]:
    """Every relation name and alias a FROM clause reads, at any depth (joins, subqueries)."""
    return tuple(obj[key].lower() for obj in _nodes(node) for key in ("relname", "aliasname")
                 if isinstance(obj.get(key), str))


def _target_list(items: Any) -> tuple[list[Any], list[str | None], bool]:
    exprs: list[Any] = []
    names: list[str | None] = []
    star = False
    for item in items or ():
        rt = item.get("ResTarget") if isinstance(item, dict) else None
        if rt is None:
            continue
        val = rt.get("val")
        ref = val.get("ColumnRef") if isinstance(val, dict) else None
        if ref is not None and _has_star(ref):
            star = True
        name = rt.get("name")
        if name is None and ref is not None:
            parts = _strings(ref.get("fields"))
            name = parts[-1] if parts and not _has_star(ref) else None
        exprs.append(val)
        names.append(name.lower() if isinstance(name, str) else None)
    return exprs, names, star


class _Statement:
    def __init__(self, idents: Mapping[str, frozenset[str]], tables: Mapping[str, frozenset[str]],
                 session: Mapping[str, frozenset[str]], opaque: frozenset[str],
                 functions: frozenset[str]) -> None:
        self.idents: dict[str, frozenset[str]] = dict(idents)
        self.rows: dict[str, frozenset[str]] = {**tables, **session}
        self.every = frozenset().union(*idents.values())
        self._session = session
        self._opaque = opaque
        self.functions = functions  # a call of one is judged as every rule column
        self.calls_opaque = False  # calls one of them
        # the rule columns the relations written this session with their values hold, of those it reads
        self.session_rules: frozenset[str] = _EMPTY
        self.opaque_rules: frozenset[str] = _EMPTY  # ... one whose columns are not known: all of them
        self.selects: list[_Select] = []
        # calls of pg_notify and STATE_WRITERS anywhere in the statement (found by collect): (name, call)
        self.writer_calls: list[tuple[str, Mapping[str, Any]]] = []

    # -- collecting the select lists and aliases
    def collect(self, node: Any, alias: str | None = None, colnames: list[str] | None = None) -> None:
        """Every select list, RETURNING and VALUES list under ``node``; table aliases of rule tables; calls
        that keep a value in server state."""
        stack: list[tuple[Any, str | None, list[str] | None]] = [(node, alias, colnames)]
        while stack:
            obj, al, cols = stack.pop()
            if isinstance(obj, list):
                stack.extend((x, None, None) for x in obj)
                continue
            if not isinstance(obj, dict):
                continue
            for key, val in obj.items():
                if key in ("SelectStmt", "larg", "rarg") and isinstance(val, dict):
                    self._select(val, al, cols)
                    stack.append((val, None, None))
                elif key == "RangeSubselect" and isinstance(val, dict):
                    a = val.get("alias") or {}
                    stack.append((val.get("subquery"), a.get("aliasname"), _strings(a.get("colnames"))))
                elif key == "CommonTableExpr" and isinstance(val, dict):
                    names = _strings(val.get("aliascolnames"))
                    stack.append((val.get("ctequery"), val.get("ctename"), names))
                elif key in ("RangeVar", "relation") and isinstance(val, dict):
                    self._rangevar(val)
                    stack.append((val, None, None))
                elif key in ("returningClause", "returningList"):
                    exprs = val.get("exprs") if isinstance(val, dict) else val
                    e, n, _ = _target_list(exprs)
                    self.selects.append(_Select(e, n, None))
                    stack.append((val, None, None))
                elif key == "RangeFunction" and isinstance(val, dict):
                    # unnest(ARRAY[cvv]) AS u(x): its columns (or, without a column list, its alias, which
                    # names a scalar function's column) and its rows carry what the function calls read
                    a = val.get("alias") or {}
                    names = [c.lower() for c in _strings(a.get("colnames"))]
                    raw = a.get("aliasname")
                    alias = raw.lower() if isinstance(raw, str) else None
                    outs: list[str | None] = list(names) or [alias]
                    self.selects.append(_Select([val.get("functions")] * len(outs), outs, alias))
                    stack.append((val, None, None))
                else:
                    if key == "FuncCall" and isinstance(val, dict):
                        fname = _strings(val.get("funcname"))
                        name = fname[-1].lower() if fname else ""
                        if name == "pg_notify" or name in STATE_WRITERS:
                            self.writer_calls.append((name, val))
                    stack.append((val, None, None))

    def _select(self, sel: Mapping[str, Any], alias: str | None, colnames: list[str] | None) -> None:
        owner = alias.lower() if isinstance(alias, str) else None
        aliases = [c.lower() for c in colnames or ()]
        if sel.get("targetList"):
            exprs, names, star = _target_list(sel["targetList"])
            names = [aliases[i] if i < len(aliases) else n for i, n in enumerate(names)]
            star_from = _from_names(sel.get("fromClause")) if star and owner is not None else ()
            self.selects.append(_Select(exprs, names, owner, star_from))
        for row in sel.get("valuesLists") or ():
            items = row.get("List", {}).get("items", []) if isinstance(row, dict) else []
            names2: list[str | None] = [aliases[i] if i < len(aliases) else None for i in range(len(items))]
            self.selects.append(_Select(list(items), names2, owner))
        if owner is not None and sel.get("op", "SETOP_NONE") != "SETOP_NONE":
            # a set operation's arms are collected on their own; the alias names their union
            for arm in ("larg", "rarg"):
                if isinstance(sel.get(arm), dict):
                    self._select(sel[arm], alias, colnames)

    def _rangevar(self, rv: Mapping[str, Any]) -> None:
        rel = rv.get("relname")
        if isinstance(rel, str) and rel.lower() in self._session:
            self.session_rules |= self._session[rel.lower()]
            if rel.lower() in self._opaque:
                self.opaque_rules |= self._session[rel.lower()]
        alias = (rv.get("alias") or {}).get("aliasname")
        if isinstance(rel, str) and isinstance(alias, str):
            _grow(self.rows, alias.lower(), self.rows.get(rel.lower(), _EMPTY))

    # -- tracing
    def refs(self, expr: Any) -> frozenset[str]:
        """The rule columns ``expr`` computes from."""
        return self._judge(expr)[0]

    def _judge(self, expr: Any) -> tuple[frozenset[str], frozenset[str]]:
        """What ``expr`` computes from, all told and without whole-row references (one walk)."""
        out: set[str] = set()
        direct: set[str] = set()
        stack = [expr]
        while stack:
            obj = stack.pop()
            if isinstance(obj, list):
                stack.extend(obj)
                continue
            if not isinstance(obj, dict):
                continue
            ref = obj.get("ColumnRef")
            if isinstance(ref, dict):
                parts = [p.lower() for p in _strings(ref.get("fields"))]
                if _has_star(ref):
                    if parts:
                        out |= self.rows.get(parts[-1], _EMPTY)
                elif parts:
                    direct |= self.idents.get(parts[-1], _EMPTY)
                    if len(parts) == 1:
                        out |= self.rows.get(parts[0], _EMPTY)
                continue
            call = obj.get("FuncCall")
            if isinstance(call, dict):
                fname = _strings(call.get("funcname"))
                if fname and fname[-1].lower() in self.functions:
                    direct |= self.every
                    self.calls_opaque = True
            sub = obj.get("SubLink")
            if isinstance(sub, dict):
                stack.extend(self._outputs(sub.get("subselect")))
                if "testexpr" in sub:
                    stack.append(sub["testexpr"])
                continue
            stack.extend(obj.values())
        return frozenset(out | direct), frozenset(direct)

    def _outputs(self, node: Any) -> Iterator[Any]:
        """The value expressions of a sub-select's select lists (all arms of a set operation)."""
        sel = node.get("SelectStmt") if isinstance(node, dict) else None
        todo = [sel] if isinstance(sel, dict) else []
        while todo:
            s = todo.pop()
            yield from s.get("valuesLists") or ()
            yield from s.get("targetList") or ()
            todo.extend(s[arm] for arm in ("larg", "rarg") if isinstance(s.get(arm), dict))

    def settle(self) -> bool:
        """Let names carry what they are computed from, until nothing changes (a name computed from another
        subquery's name, ...). False: still changing after :data:`MAX_ROUNDS` rounds (not settled)."""
        for _ in range(MAX_ROUNDS):
            changed = False
            for sel in self.selects:
                if sel.star_from and sel.alias is not None:  # (SELECT * FROM cards) s: s's rows are cards'
                    held = frozenset().union(*(self.rows.get(n, _EMPTY) for n in sel.star_from))
                    changed |= _grow(self.rows, sel.alias, held)
                for expr, name in zip(sel.exprs, sel.names, strict=True):
                    got = self.refs(expr)
                    if got and name is not None:
                        changed |= _grow(self.idents, name, got)
                    if got and sel.alias is not None:
                        changed |= _grow(self.rows, sel.alias, got)
            if not changed:
                return True
        return False

    # -- the result's positions
    def positions(self, stmt: Mapping[str, Any]) -> list[tuple[frozenset[str], frozenset[str]]] | bool | None:
        """Per output position the rule columns it computes from; None: a result whose positions are unknown;
        False: no result rows of its own (a utility statement, ``EXPLAIN``, DML without RETURNING)."""
        for key in ("InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt"):
            body = stmt.get(key)
            if isinstance(body, dict):
                ret = body.get("returningClause")
                exprs = ret.get("exprs") if isinstance(ret, dict) else body.get("returningList")
                if not exprs:
                    return False
                e, _, star = _target_list(exprs)
                return None if star else [self._judge(x) for x in e]
        sel = stmt.get("SelectStmt")
        if not isinstance(sel, dict) or sel.get("intoClause"):
            return False
        return self._sel_positions(sel)

    def writes(self, stmt: Mapping[str, Any]) -> tuple[str, list[tuple[str | None, frozenset[str]]]] | None:
        """The relation the statement writes values into and, per written column (its name, None if not
        known), the rule columns the value computes from."""
        rel: Any = None
        names: list[Any] = []
        values: list[frozenset[str]] | None = None
        ctas = stmt.get("CreateTableAsStmt")
        sel: Any = stmt.get("SelectStmt")
        view = stmt.get("ViewStmt")
        ins = stmt.get("InsertStmt")
        upd = stmt.get("UpdateStmt")
        if isinstance(ctas, dict) or (isinstance(sel, dict) and sel.get("intoClause")):
            into = ctas.get("into", {}) if isinstance(ctas, dict) else sel["intoClause"]
            query = ctas.get("query", {}).get("SelectStmt") if isinstance(ctas, dict) else sel
            rel, names = (into.get("rel") or {}).get("relname"), _strings(into.get("colNames"))
        elif isinstance(view, dict):
            query = (view.get("query") or {}).get("SelectStmt")
            rel, names = (view.get("view") or {}).get("relname"), _strings(view.get("aliases"))
        elif isinstance(ins, dict):
            query = (ins.get("selectStmt") or {}).get("SelectStmt")
            rel = (ins.get("relation") or {}).get("relname")
            names = [(c.get("ResTarget") or {}).get("name") for c in ins.get("cols") or ()]
        elif isinstance(upd, dict):
            rel, query = (upd.get("relation") or {}).get("relname"), None
            targets = [(t.get("ResTarget") or {}) for t in upd.get("targetList") or ()]
            names = [t.get("name") for t in targets]
            values = [self.refs(t.get("val")) for t in targets]
        else:
            return None
        if not isinstance(rel, str):
            return None
        if values is None:
            pos = self._sel_positions(query) if isinstance(query, dict) else None
            values = [a for a, _ in pos] if pos is not None else None
            if not names and isinstance(query, dict) and not ins:
                names = _output_names(query)
        if values is None:  # a * : which column holds what is not known
            return rel.lower(), [(None, self.every)]
        named = [n.lower() if isinstance(n, str) else None for n in names]
        return rel.lower(), [(named[i] if i < len(named) else None, v) for i, v in enumerate(values)]

    def stores(self) -> frozenset[str]:
        """The calls anywhere in the statement (a condition included) of ``pg_notify`` and of
        :data:`STATE_WRITERS` whose arguments compute from a rule column: their names."""
        return frozenset(name for name, call in self.writer_calls if self.refs(call.get("args")))

    def _sel_positions(self, sel: Mapping[str, Any]) -> list[tuple[frozenset[str], frozenset[str]]] | None:
        if sel.get("op", "SETOP_NONE") != "SETOP_NONE":
            left, right = (self._sel_positions(sel[a]) if isinstance(sel.get(a), dict) else None
                           for a in ("larg", "rarg"))
            if left is None or right is None or len(left) != len(right):
                return None
            return [(a[0] | b[0], a[1] | b[1]) for a, b in zip(left, right, strict=True)]
        if sel.get("valuesLists"):
            rows = [r.get("List", {}).get("items", []) for r in sel["valuesLists"] if isinstance(r, dict)]
            width = len(rows[0]) if rows else 0
            cols = [[self._judge(r[i]) for r in rows if i < len(r)] for i in range(width)]
            return [(frozenset().union(*(a for a, _ in c)), frozenset().union(*(d for _, d in c)))
                    for c in cols]
        exprs, _, star = _target_list(sel.get("targetList"))
        return None if star else [self._judge(x) for x in exprs]

    def anywhere(self) -> tuple[frozenset[str], frozenset[str]]:
        every: set[str] = set()
        direct: set[str] = set()
        for sel in self.selects:
            for expr in sel.exprs:
                a, d = self._judge(expr)
                every |= a
                direct |= d
        return frozenset(every), frozenset(direct)


def derive(sql: str, idents: Mapping[str, frozenset[str]], tables: Mapping[str, frozenset[str]],
           pick: Callable[[Iterable[str]], str | None], *, session: Mapping[str, frozenset[str]],
           opaque: frozenset[str], functions: frozenset[str],
           mentions: Callable[[str], bool]) -> tuple[Derived, ...]:
    """Per statement of ``sql``: its computed columns that carry a rule column.

    ``idents``: per column name (lower case) that carries rule columns, those: each rule column carries
    itself, a view's column (:func:`trace_views`) what it is computed from; ``tables``: per table or view
    name (lower case, unqualified) whose rows hold rule columns, those columns; ``pick``: the rule column to
    judge a value computed from several as (the strictest). Text the parser refuses, or longer than
    :data:`MAX_SQL`: one statement whose computed columns are all judged by every rule column. ``session``:
    per relation written this session with rule columns' values (:attr:`Derived.learns`), those rules;
    ``opaque``: the ones of them whose columns are not known by name; ``functions``: the functions a call of
    which is judged as every rule column; ``mentions``: whether a function's or DO block's body names a rule
    column (or a table holding one)."""
    unknown = (Derived(None, pick(frozenset().union(*idents.values()))),)  # fail closed
    if len(sql) > MAX_SQL or "\x00" in sql:
        return unknown
    from pglast.parser import ParseError, parse_sql_json  # here: a session without rules never loads it

    try:
        tree = json.loads(parse_sql_json(sql))
    except (ParseError, ValueError, RecursionError):
        return unknown
    cx = _Context(idents, tables, pick, unknown[0], session, opaque, functions, mentions)
    out: list[Derived] = []
    for raw in tree.get("stmts", ()):
        try:
            out.append(_one(raw.get("stmt", {}), cx))
        except (KeyError, TypeError, AttributeError, ValueError, IndexError):
            # a parse tree of a shape this walker does not know (a newer libpg_query): fail closed
            out.append(unknown[0])
    return tuple(out)


def _output_names(sel: Mapping[str, Any]) -> list[str | None]:
    """The column names a SELECT's result gets (PostgreSQL's FigureColname, in part: an alias, a column's
    name, a function's, through casts; None where it would be ``?column?``)."""
    while sel.get("op", "SETOP_NONE") != "SETOP_NONE" and isinstance(sel.get("larg"), dict):
        sel = sel["larg"]
    out: list[str | None] = []
    for item in sel.get("targetList") or ():
        rt = item.get("ResTarget", {}) if isinstance(item, dict) else {}
        name = rt.get("name")
        val = rt.get("val")
        while name is None and isinstance(val, dict):
            if "ColumnRef" in val:
                parts = _strings(val["ColumnRef"].get("fields"))
                name = parts[-1] if parts else None
                break
            if "FuncCall" in val:
                parts = _strings(val["FuncCall"].get("funcname"))
                name = parts[-1] if parts else None
                break
            val = (val.get("TypeCast") or {}).get("arg")
        out.append(name.lower() if isinstance(name, str) else None)
    return out


@dataclass(frozen=True)
class _Context:
    idents: Mapping[str, frozenset[str]]
    tables: Mapping[str, frozenset[str]]
    pick: Callable[[Iterable[str]], str | None]
    unknown: Derived
    session: Mapping[str, frozenset[str]]
    opaque: frozenset[str]
    functions: frozenset[str]  # OPAQUE_FUNCTIONS and the functions found naming rule columns
    mentions: Callable[[str], bool]  # the text names a rule column, a table holding one, ...


def _body(options: Any) -> str:
    """The text of a function's or DO block's ``AS`` option."""
    parts: list[str] = []
    for opt in options or ():
        de = opt.get("DefElem", {}) if isinstance(opt, dict) else {}
        if de.get("defname") == "as":
            arg = de.get("arg") or {}
            parts += _strings(arg.get("List", {}).get("items")) if "List" in arg else _strings([arg])
    return "\n".join(parts)


def _one(stmt: Mapping[str, Any], cx: _Context) -> Derived:
    fn = stmt.get("CreateFunctionStmt")
    if isinstance(fn, dict):
        names = _strings(fn.get("funcname"))
        body = _body(fn.get("options")) + json.dumps(fn.get("sql_body"))
        return Derived((), None, function=names[-1].lower() if names and cx.mentions(body) else None)
    if "VariableShowStmt" in stmt and "show" in cx.functions:  # a setting may hold a rule column's value
        return Derived(None, cx.unknown.fallback)
    do = stmt.get("DoStmt")
    if isinstance(do, dict):
        return Derived((), None, notices=cx.mentions(_body(do.get("args"))))
    call = stmt.get("CallStmt")
    if isinstance(call, dict):
        names = _strings((call.get("funccall") or {}).get("funcname"))
        return Derived((), None, notices=bool(names) and names[-1].lower() in cx.functions)
    named = _named(stmt)
    if named is not None:
        kind, name, query = named
        if query is None:
            return Derived((), None, uses=f"{kind}:{name}")
        return Derived((), None, defines=f"{kind}:{name}", inner=_one(query, cx))
    st = _Statement(cx.idents, cx.tables, cx.session, cx.opaque, cx.functions)
    try:
        st.collect(stmt)
        settled = st.settle()
        pos = st.positions(stmt)
        wrote = st.writes(stmt)
        stores = st.stores()
    except RecursionError:  # thousands of nested set operations
        settled = False
    if not settled:
        return cx.unknown
    learns: list[tuple[str, str | None, str]] = []
    if wrote is not None:
        rel, cols = wrote
        for col, rules in cols:
            rule = cx.pick(rules)
            if rule is not None:
                learns.append((rel, col, rule))
    every, direct = st.anywhere()
    every |= st.opaque_rules
    if pos is None:  # a * may spell out a session relation's columns, whose names are not in the text
        every |= st.session_rules
    fallback, rows_only = cx.pick(every), bool(every) and not direct and not st.opaque_rules
    if pos is False or pos is True:
        return Derived((), None, learns=tuple(learns), notices=st.calls_opaque, stores=stores)
    if pos is None or st.opaque_rules:  # an opaque relation: all its columns, which are not told apart
        return Derived(None, fallback, fallback_rows_only=rows_only, learns=tuple(learns),
                       session=bool(st.session_rules), notices=st.calls_opaque, stores=stores)
    return Derived(tuple(cx.pick(a) for a, _ in pos), fallback, tuple(bool(a) and not d for a, d in pos),
                   rows_only, learns=tuple(learns), session=bool(st.session_rules), notices=st.calls_opaque,
                   stores=stores)


def _named(stmt: Mapping[str, Any]) -> tuple[str, str, Mapping[str, Any] | None] | None:
    """PREPARE / DECLARE CURSOR (kind, name, query) or EXECUTE / FETCH (kind, name, None); MOVE is neither
    (it returns no rows)."""
    prep = stmt.get("PrepareStmt")
    if isinstance(prep, dict) and isinstance(prep.get("query"), dict):
        return "s", str(prep.get("name", "")), prep["query"]
    exe = stmt.get("ExecuteStmt")
    if isinstance(exe, dict):
        return "s", str(exe.get("name", "")), None
    dec = stmt.get("DeclareCursorStmt")
    if isinstance(dec, dict) and isinstance(dec.get("query"), dict):
        return "c", str(dec.get("portalname", "")), dec["query"]
    fetch = stmt.get("FetchStmt")
    if isinstance(fetch, dict) and not fetch.get("ismove"):
        return "c", str(fetch.get("portalname", "")), None
    return None


@dataclass(frozen=True, slots=True)
class View:
    """A view or materialized view as the catalog has it (``pg_get_viewdef`` spells out a ``*``)."""

    key: Any  # the caller's handle (the tunnel's: the relation OID)
    name: str  # unqualified, lower case
    columns: tuple[str, ...]  # its attribute names in order (attnum 1, 2, ...)
    definition: str


@dataclass
class ViewColumns:
    """What :func:`trace_views` found: per view (by key), per attribute the rule column to judge it as (and
    whether it is computed from whole rows only), and for the statements of the session, the view column
    names and view names that carry rule columns."""

    columns: dict[Any, tuple[tuple[str | None, bool], ...]]
    aliases: dict[str, frozenset[str]]
    tables: dict[str, frozenset[str]]


def trace_views(views: Iterable[View], columns: Iterable[str], tables: Mapping[str, Iterable[str]],
                rank: Callable[[str], int], passes: int = 4) -> ViewColumns:
    """Which columns of each view carry a rule column: a view reports its own OID and attribute numbers in
    RowDescription, so ``SELECT x FROM v`` over ``CREATE VIEW v AS SELECT cvv AS x FROM cards`` had no
    origin a rule knew. Views over views: a view column found is a name that carries its rule columns for
    the views read after it, so views given in creation order are followed in one pass whatever the depth;
    a view replaced later to name newer views is caught by the next pass, up to ``passes`` in all."""
    judge = ComputedColumns(columns, tables, rank)
    todo = [v for v in views if len(v.definition) <= MAX_SQL]
    out = ViewColumns({}, {}, {})
    learnt: list[bytes] = []  # names carrying rule columns, in the order found
    read_at: dict[Any, int] = {}  # per view: how many of them there were when it was last read
    for _ in range(passes):
        changed = False
        for view in todo:
            seen = read_at.get(view.key)
            # read before: again only if it names a name found since
            if seen is not None and set(_TOKEN.findall(view.definition.lower().encode())).isdisjoint(
                    learnt[seen:]):
                continue
            read_at[view.key] = len(learnt)
            got = judge.statements(view.definition.encode())
            if not got or len(got) != 1:
                continue  # nothing carried (a definition is one SELECT)
            d, n = got[0], len(view.columns)
            found = tuple((rule, rule is not None and d.column(i, n, json=True) is None)
                          for i, rule in ((i, d.column(i, n)) for i in range(n)))
            if found == out.columns.get(view.key) or not any(r for r, _ in found):
                continue
            out.columns[view.key] = found
            rules = frozenset(r for r, _ in found if r is not None)
            _grow(out.tables, view.name, rules)
            aliases = {name.lower(): frozenset({rule})
                       for name, (rule, _) in zip(view.columns, found, strict=True) if rule is not None}
            for name, got_rules in aliases.items():
                _grow(out.aliases, name, got_rules)
            judge.add(aliases, {view.name: rules})  # the views read after it in this pass see it
            learnt += [n.encode() for n in (view.name, *aliases)]
            changed = True
        if not changed:
            break
    return out


class ComputedColumns:
    """:func:`derive` for one session's rules, with a cache per query text and a cheap look for the names
    first: text that names no rule column and no rule table (the usual case) is not parsed at all."""

    def __init__(self, columns: Iterable[str], tables: Mapping[str, Iterable[str]],
                 rank: Callable[[str], int], aliases: Mapping[str, Iterable[str]] | None = None,
                 functions: Iterable[str] = ()) -> None:
        """``columns``: the rule columns; ``tables``: per table (or view) name, the rule columns its rows
        hold; ``rank``: a rule column's strictness; ``aliases``: per other column name (a view's), the rule
        columns it is computed from; ``functions``: names of functions whose source names a rule column
        (:meth:`mentions`), a call of which is judged as every rule column."""
        self._columns = frozenset(c.lower() for c in columns)
        self._idents = {c: frozenset((c,)) for c in self._columns}
        self._tables: dict[str, frozenset[str]] = {}
        self._rank = rank
        # relations this session wrote rule columns' values into (Derived.learns); those whose columns
        # holding them are not known
        self._session: dict[str, frozenset[str]] = {}
        self._opaque: set[str] = set()
        self._functions = set(OPAQUE_FUNCTIONS) | {f.lower() for f in functions}
        self._cache: dict[bytes, tuple[Derived, ...]] = {}
        # the look for a name worth parsing for (a rule column, a name carrying one, a table, relation or
        # function holding or reading one): the text's identifiers against a set, ~1.7 us for a short
        # statement whatever the number of names (an alternation of 600 names took 10 us); a name that is no
        # plain identifier is looked for as a substring
        self._words: set[bytes] = set()
        self._odd: set[bytes] = set()
        self._add_words(set(self._idents) | self._functions)
        self.add(aliases or {}, tables)
        # ANALYZE keeps sample values of every column, rule ones too: the statistics are such relations
        self.learn([(rel, col, rule) for rel, cols in STATISTICS.items() for col in (cols or (None,))
                    for rule in self._columns])

    def _add_words(self, names: Iterable[str]) -> None:
        for name in names:
            word = name.lower().encode()
            (self._words if _TOKEN.fullmatch(word) else self._odd).add(word)

    def _names_any(self, low: bytes) -> bool:
        """Lower-cased text holds a word worth parsing for, or a U& identifier (it can spell one in
        escapes)."""
        return (b"u&" in low or not self._words.isdisjoint(_TOKEN.findall(low))
                or any(w in low for w in self._odd))

    def mentions(self, text: str) -> bool:
        """``text`` (a function's source, a DO block) names a rule column, a name carrying one, or a table,
        relation or function holding or reading one."""
        return self._names_any(text.lower().encode())

    def learn_function(self, name: str) -> None:
        """A function whose body names a rule column (created this session, or found at its start): calls
        of it are judged."""
        if name not in self._functions:
            self._functions.add(name)
            self._add_words((name,))
            self._cache.clear()

    def learn_state(self, writers: Iterable[str]) -> None:
        """A statement kept a rule column's value in server state (:data:`STATE_WRITERS`): what reads it
        back is judged from now on, on every connection (current_setting, SHOW, currval, pg_locks, ...)."""
        rules = frozenset(self._columns)
        for writer in writers:
            functions, relations = STATE_WRITERS.get(writer, (_EMPTY, _EMPTY))
            for fn in functions:
                self.learn_function(fn)
            if relations:
                self.learn([(rel, None, rule) for rel in relations for rule in rules])

    def add(self, aliases: Mapping[str, Iterable[str]], tables: Mapping[str, Iterable[str]]) -> None:
        """More names carrying rule columns (a view's columns) and relations holding them (a view)."""
        for name, cols in aliases.items():
            _grow(self._idents, name.lower(), (c.lower() for c in cols))
        for name, cols in tables.items():
            _grow(self._tables, name.lower(), (c.lower() for c in cols))
        self._add_words([*aliases, *tables])
        self._cache.clear()

    def learn(self, learns: Iterable[tuple[str, str | None, str]]) -> None:
        """A statement wrote rule columns' values into a relation (``CREATE TEMP TABLE t AS SELECT cvv AS
        x``): from now on, for every connection of the session, its column (``x``) carries the rule column,
        and a statement reading the relation has its columns judged, not only its computed ones."""
        changed = False
        for rel, col, rule in learns:
            changed |= _grow(self._session, rel, (rule,))
            if col is None:
                if rel not in self._opaque:
                    self._opaque.add(rel)
                    changed = True
            else:
                changed |= _grow(self._idents, col, (rule,))
        if changed:
            self._cache.clear()  # what was judged before may read these now
            self._add_words([rel for rel, _, _ in learns] + [c for _, c, _ in learns if c is not None])

    def pick(self, names: Iterable[str]) -> str | None:
        ordered = sorted(names)
        return max(ordered, key=self._rank) if ordered else None

    def statements(self, sql: bytes, named: bool = False) -> tuple[Derived, ...] | None:
        """Per statement of the query text ``sql`` (as sent, UTF-8), its computed rule columns; None when the
        text names no rule column (nor anything carrying one): a statement it reports names one somewhere,
        so a data exception it raises may quote a value (``cvv::date`` -> invalid input syntax for type
        date: "001"). ``named``: the connection holds a PREPAREd
        statement or cursor that carries rule columns, so text that may use (or redefine) one is parsed
        too."""
        if not self._columns:
            return None
        if len(sql) > MAX_SQL:  # not copied, searched or parsed: fail closed
            return (Derived(None, self.pick(self._columns)),)
        low = sql.lower()
        if not self._names_any(low) and not (named and _NAMED.search(low)):
            return None
        hit = self._cache.get(sql)
        if hit is not None:
            return hit
        got = derive(sql.decode("utf-8", "replace"), self._idents, self._tables, self.pick,
                     session=self._session, opaque=frozenset(self._opaque),
                     functions=frozenset(self._functions), mentions=self.mentions)
        if len(sql) <= CACHE_TEXT:
            if len(self._cache) >= CACHE_SIZE:
                self._cache.pop(next(iter(self._cache)))
            self._cache[sql] = got
        return got
