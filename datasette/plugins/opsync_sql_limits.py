"""Datasette under hostile SQL: what one query may use, and how many run at once.

Members (and anyone under ``make up``) may run arbitrary read-only SQL; anyone who reads may ask a
table page for facets and filters over every row. Without limits a handful of slow queries took
every SQL thread, so table pages waited 14-30 s behind them, one query could allocate gigabytes,
and functions with no place in a read-only public SQL box (``fts3_tokenizer`` hands out a pointer)
were callable. This plugin bounds each of those:

- **Slots.** At most ``sql_slots`` (plugin config) requests that run SQL of the client's choosing run
  at once: arbitrary SQL (``?sql=``, ``?_where=``) and table pages asked for more than their default
  view (``?_facet=``, ``?_search=``, ``?_stream=``, any filter but equality on an indexed column, a
  sort on an unindexed one: each scans every row). Others wait up to ``sql_wait_s`` for a slot, then
  get ``503`` with ``Retry-After``. Datasette runs ``num_sql_threads`` threads (``devstack/local.py``
  sets them), so the rest stay free for the ordinary pages, which are never queued here: table pages
  with their default facets and sort, equality filters and sorts on indexed columns (the facet links,
  a row's "links from other tables"), rows, canned queries, and the dashboards' own chart queries
  (their SQL exactly as in the metadata). Datasette refuses to start if the slots would take every
  thread. ``_timelimit`` that is not a number (Datasette answers it with a 500) gets a 400.
- **Functions and statements.** An SQLite authorizer on every connection Datasette opens to the
  read model allows only reading: ``SELECT`` (recursive CTEs too), reading tables and views, the
  read-only introspection pragmas Datasette itself uses, and the functions in ``ALLOWED_FUNCTIONS``
  (pure, side-effect-free ones: core, math, date, JSON, aggregate, window, FTS ranking). Anything
  else (``fts3_tokenizer``, ``load_extension``, ``sqlite_compileoption_*``, ``ATTACH``, pragma
  writes, the ``dbstat`` and ``sqlite_stmt`` tables, a function a plugin adds) is refused by SQLite
  at prepare time with an error naming it. The publisher writes through its own connection.
- **Memory.** Each value is at most ``MAX_VALUE_BYTES`` (``SQLITE_LIMIT_LENGTH``, above the ingest
  API's body limit, so every value the site accepts stays readable), a result row at most
  ``MAX_COLUMNS`` columns, and the rows one query hands to Datasette at most ``MAX_RESULT_BYTES`` of
  text and blobs in all. SQLite's heap for the whole process is capped at ``SQLITE_HEAP_BYTES``
  (``PRAGMA hard_heap_limit``, set when the server starts); a query that needs more fails, not the
  process. Such failures answer ``400`` with the limit named.

Time stays Datasette's: ``sql_time_limit_ms`` for every query (arbitrary SQL included), and
``facet_time_limit_ms`` per facet. Failed queries are no longer logged with their locals (see below).
"""

import asyncio
import re
import sqlite3
import time
import weakref
from urllib.parse import parse_qs

import datasette.handle_exception
from datasette.utils.asgi import Request, Response

from datasette import hookimpl

# Datasette's default error handler prints, when rich is installed (it is here), every local of every frame
# for each failed query: each request scope with its cookies and tokens, in the log, and ~50 ms of the
# event loop per error, which under a flood of time-limited queries stalled every page for seconds.
# Without rich it prints a plain traceback for real errors only.
datasette.handle_exception.rich = None

ALLOWED_FUNCTIONS = frozenset(
    {
        # core scalar
        "abs",
        "char",
        "coalesce",
        "format",
        "glob",
        "hex",
        "ifnull",
        "iif",
        "instr",
        "length",
        "like",
        "likelihood",
        "likely",
        "lower",
        "ltrim",
        "max",
        "min",
        "nullif",
        "printf",
        "quote",
        "random",
        "randomblob",
        "replace",
        "round",
        "rtrim",
        "sign",
        "soundex",
        "substr",
        "substring",
        "subtype",
        "trim",
        "typeof",
        "unicode",
        "unlikely",
        "upper",
        "zeroblob",
        "sqlite_version",
        # math
        "acos",
        "acosh",
        "asin",
        "asinh",
        "atan",
        "atan2",
        "atanh",
        "ceil",
        "ceiling",
        "cos",
        "cosh",
        "degrees",
        "exp",
        "floor",
        "ln",
        "log",
        "log10",
        "log2",
        "mod",
        "pi",
        "pow",
        "power",
        "radians",
        "sin",
        "sinh",
        "sqrt",
        "tan",
        "tanh",
        "trunc",
        # date and time
        "date",
        "time",
        "datetime",
        "julianday",
        "strftime",
        "unixepoch",
        "current_date",
        "current_time",
        "current_timestamp",
        # JSON (each returns a new value; nothing is written)
        "json",
        "json_array",
        "json_array_length",
        "json_extract",
        "json_insert",
        "json_object",
        "json_patch",
        "json_quote",
        "json_remove",
        "json_replace",
        "json_set",
        "json_type",
        "json_valid",
        "json_group_array",
        "json_group_object",
        "->",
        "->>",
        # aggregate and window
        "avg",
        "count",
        "group_concat",
        "sum",
        "total",
        "row_number",
        "rank",
        "dense_rank",
        "percent_rank",
        "cume_dist",
        "ntile",
        "lag",
        "lead",
        "first_value",
        "last_value",
        "nth_value",
        # full-text search: MATCH, ranking and snippets, and Datasette's own escape_fts (its search box)
        "match",
        "bm25",
        "highlight",
        "snippet",
        "offsets",
        "matchinfo",
        "escape_fts",
    }
)
DESCRIBING_PRAGMAS = frozenset(
    {  # with any argument: they describe the schema (Datasette reads them itself)
        "table_info",
        "table_xinfo",
        "index_list",
        "index_info",
        "index_xinfo",
        "foreign_key_list",
        "database_list",
        "function_list",
    }
)
VALUE_PRAGMAS = frozenset({"schema_version", "page_count", "page_size", "max_page_count"})  # read only, never set
HIDDEN_TABLES = frozenset({"dbstat", "sqlite_stmt"})  # page-level layout of every table; other requests' SQL
UNGUARDED_DATABASES = frozenset({"_internal", "_memory"})  # Datasette's own in-memory ones: no data, not served here

MAX_VALUE_BYTES = 16 * 1024 * 1024
MAX_COLUMNS = 100
MAX_RESULT_BYTES = 32 * 1024 * 1024
SQLITE_HEAP_BYTES = 512 * 1024 * 1024
DEFAULT_SLOTS, DEFAULT_WAIT_S = 2, 5.0
RETRY_AFTER_S = 2
INDEX_TTL_S = 30  # the publisher may add tables and indexes while Datasette runs
PRESENTATION = frozenset(
    {  # parameters that change how a table page is shown, not which SQL it runs
        "_size",
        "_next",
        "_shape",
        "_labels",
        "_nolabels",
        "_col",
        "_nocol",
        "_json",
        "_nofacet",
        "_nocount",
        "_nosuggest",
        "_timelimit",
        "_trace",
        "_context",
        "_hide_sql",
        "_show_sql",
    }
)
FORMAT = re.compile(r"\.(json|jsono|csv)$")


class ResultTooLarge(sqlite3.OperationalError):
    """An OperationalError, so every Datasette view answers it as a query error (400), not a 500."""


def authorize(action: int, arg1: str | None, arg2: str | None, database: str | None, source: str | None) -> int:
    """SQLite's authorizer: only reading gets through (see the module docstring)."""
    if action in (sqlite3.SQLITE_SELECT, sqlite3.SQLITE_RECURSIVE):
        return sqlite3.SQLITE_OK
    if action == sqlite3.SQLITE_READ:
        return sqlite3.SQLITE_DENY if arg1 in HIDDEN_TABLES else sqlite3.SQLITE_OK
    if action == sqlite3.SQLITE_FUNCTION:
        return sqlite3.SQLITE_OK if arg2 in ALLOWED_FUNCTIONS else sqlite3.SQLITE_DENY
    if action == sqlite3.SQLITE_PRAGMA:
        allowed = arg1 in DESCRIBING_PRAGMAS or (arg1 in VALUE_PRAGMAS and arg2 is None)
        return sqlite3.SQLITE_OK if allowed else sqlite3.SQLITE_DENY
    if action == sqlite3.SQLITE_UPDATE and arg1 == "sqlite_master":
        return sqlite3.SQLITE_OK  # SQLite registering an eponymous virtual table (json_each, pragma_*) on first use
    return sqlite3.SQLITE_DENY


def budgeted_rows(limit: int):
    """A row factory (``sqlite3.Row``, as Datasette uses) that stops a query whose rows exceed ``limit`` bytes."""
    spent: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def row(cursor, values):
        total = spent.get(cursor, 0) + sum(len(v) for v in values if isinstance(v, str | bytes))
        if total > limit:
            raise ResultTooLarge(
                f"query result too large: its rows exceed {limit // 2**20} MiB of text and blobs "
                "(fetch fewer rows or columns, e.g. with LIMIT or _size)"
            )
        spent[cursor] = total
        return sqlite3.Row(cursor, values)

    return row


@hookimpl
def prepare_connection(conn, database):
    if database in UNGUARDED_DATABASES:
        return
    conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, MAX_VALUE_BYTES)
    conn.setlimit(sqlite3.SQLITE_LIMIT_COLUMN, MAX_COLUMNS)
    conn.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 0)
    conn.row_factory = budgeted_rows(MAX_RESULT_BYTES)
    conn.set_authorizer(authorize)


def slots_config(datasette) -> tuple[int, float]:
    own = datasette.plugin_config("opsync-sql-limits") or {}
    slots, wait_s = int(own.get("sql_slots", DEFAULT_SLOTS)), float(own.get("sql_wait_s", DEFAULT_WAIT_S))
    if slots < 1 or wait_s < 0:
        raise ValueError(f"opsync-sql-limits: sql_slots must be at least 1 and sql_wait_s not negative, not {own}")
    return slots, wait_s


@hookimpl
def startup(datasette):
    """Refuse settings under which arbitrary SQL could take every SQL thread."""
    slots, _ = slots_config(datasette)
    threads = datasette.setting("num_sql_threads")
    if threads <= slots:
        raise ValueError(
            f"num_sql_threads ({threads}) must exceed opsync-sql-limits sql_slots ({slots}): table pages need threads of their own"
        )


def chart_queries(datasette) -> frozenset[str]:
    """The SQL of every dashboard chart in the metadata: the dashboards fetch it as ``?sql=``."""
    dashboards = datasette.plugin_config("datasette-dashboards") or {}
    return frozenset(
        chart["query"]
        for board in dashboards.values()
        if isinstance(board, dict)
        for chart in (board.get("charts") or {}).values()
        if isinstance(chart, dict) and "query" in chart
    )


def indexed_columns(conn) -> dict[str, frozenset[str]]:
    """Table -> its key and the leading column of each index: what an equality filter or a sort finds without a scan."""
    found = {}
    for (table,) in conn.execute("select name from sqlite_master where type = 'table'").fetchall():
        columns = {row[1] for row in conn.execute("select * from pragma_table_info(?)", [table]) if row[5]}
        for index in conn.execute("select name from pragma_index_list(?)", [table]).fetchall():
            columns |= {row[2] for row in conn.execute("select * from pragma_index_info(?)", [index[0]]) if row[0] == 0}
        found[table] = frozenset(columns | {"rowid"})
    return found


def is_costly(path: str, args: dict[str, list[str]], charts: frozenset[str], indexed: dict[str, frozenset[str]]) -> bool:
    """Whether a request runs SQL of the client's choosing: arbitrary SQL (but the dashboards' own), ``_where``,
    or a table page asked for more than its default view, equality filters and sorts on indexed columns."""
    if "sql" in args:
        return any(sql not in charts for sql in args["sql"])
    if "_where" in args:
        return True
    parts = path.strip("/").split("/")
    columns = indexed.get(FORMAT.sub("", parts[1])) if len(parts) == 2 else None
    if columns is None:  # not a table page: a row, a canned query (its SQL is fixed), a /-/ page
        return False
    for key, values in args.items():
        if key in PRESENTATION:
            continue
        if key in ("_sort", "_sort_desc"):
            if all(value in columns for value in values):
                continue
            return True
        if key.removesuffix("__exact") not in columns:  # any other filter, facet, search or stream
            return True
    return False


async def error_response(datasette, request: Request, status: int, title: str, message: str, headers: dict | None = None) -> Response:
    """An error in Datasette's own shape: JSON for ``.json`` paths, its error page otherwise."""
    body = {"ok": False, "error": message, "status": status, "title": title}
    if request.path.endswith(".json"):
        return Response.json(body, status=status, headers=headers)
    # Without the request: the gate answers outside Datasette's own middleware (no CSRF token in the scope yet).
    return Response.html(await datasette.render_template("error.html", body), status=status, headers=headers)


def set_heap_limit() -> None:
    """Process-wide (it can only ever be lowered), so set once by the server, not per connection."""
    conn = sqlite3.connect(":memory:")
    try:
        conn.execute(f"PRAGMA hard_heap_limit = {SQLITE_HEAP_BYTES}")
    finally:
        conn.close()


class Gate:
    """The slots, and what the gate needs to tell a costly request from an ordinary one."""

    def __init__(self, datasette) -> None:
        self.datasette = datasette
        self.count, self.wait_s = slots_config(datasette)
        self.slots = asyncio.Semaphore(self.count)
        self.charts = chart_queries(datasette)
        self.indexed: dict[str, tuple[float, dict]] = {}

    async def indexes(self, path: str) -> dict[str, frozenset[str]]:
        name = FORMAT.sub("", path.strip("/").split("/")[0])
        if name not in self.datasette.databases or name in UNGUARDED_DATABASES:
            return {}
        cached = self.indexed.get(name)
        if cached is None or time.monotonic() - cached[0] > INDEX_TTL_S:
            cached = (time.monotonic(), await self.datasette.get_database(name).execute_fn(indexed_columns))
            self.indexed[name] = cached
        return cached[1]

    async def costly(self, scope) -> bool:
        query = scope.get("query_string", b"")
        if not query:
            return False
        args = parse_qs(query.decode("latin-1"), keep_blank_values=True)
        return bool(args) and is_costly(scope.get("path", ""), args, self.charts, await self.indexes(scope.get("path", "")))


def bad_time_limit(scope) -> bool:
    """``_timelimit`` that is not a whole number of milliseconds (Datasette would answer it with a 500)."""
    query = scope.get("query_string", b"")
    if b"_timelimit=" not in query:
        return False
    return not all(value.isdigit() for value in parse_qs(query.decode("latin-1")).get("_timelimit", []))


@hookimpl
def asgi_wrapper(datasette):
    def wrap(app):
        gates: list[Gate] = []

        async def limited(scope, receive, send):
            if scope["type"] == "lifespan":
                set_heap_limit()
                return await app(scope, receive, send)
            if scope["type"] != "http":
                return await app(scope, receive, send)
            if bad_time_limit(scope):
                response = await error_response(
                    datasette, Request(scope, receive), 400, "Invalid _timelimit", "_timelimit must be a whole number of milliseconds"
                )
                return await response.asgi_send(send)
            if not gates:
                gates.append(Gate(datasette))
            gate = gates[0]
            if not await gate.costly(scope):
                return await app(scope, receive, send)
            try:
                async with asyncio.timeout(gate.wait_s):
                    await gate.slots.acquire()
            except TimeoutError:
                message = (
                    f"Too many SQL queries of the clients' own choosing running: at most {gate.count} at once, "
                    f"and none finished within {gate.wait_s:g} s; try again in {RETRY_AFTER_S} s"
                )
                response = await error_response(
                    datasette, Request(scope, receive), 503, "SQL busy", message, {"Retry-After": str(RETRY_AFTER_S)}
                )
                return await response.asgi_send(send)
            try:
                return await app(scope, receive, send)
            finally:
                gate.slots.release()

        return limited

    return wrap


@hookimpl
def handle_exception(datasette, request, exception):
    """SQLite out of its heap allowance, or a value over the length limit: the query's fault, answered 400."""
    if isinstance(exception, MemoryError):
        message = (
            f"query needs more memory than SQL may use here ({SQLITE_HEAP_BYTES // 2**20} MiB for all "
            "queries at once); fetch or compute less"
        )
    elif isinstance(exception, sqlite3.DataError):
        message = f"{exception}: values are limited to {MAX_VALUE_BYTES // 2**20} MiB here"
    else:
        return None

    return error_response(datasette, request, 400, "Query error", message)
