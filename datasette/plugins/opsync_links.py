"""Links between the read model's tables, from the primary's foreign keys.

The read model's SQLite tables declare no foreign keys, so Datasette would neither link a
referencing cell to its row nor list "Links from other tables" on a row page (for an executed
observation: its raw data files and packages). This plugin derives both from the SQLAlchemy
models of the configured domain (through the registry of published tables), so they never drift
from it: a cell holding a referenced key links to that row, and a row page lists, with counts,
the rows of other tables that reference it. Foreign keys the SQLite file does declare are left to
Datasette, so nothing shows twice.
"""

import time
from collections import defaultdict
from urllib.parse import quote

from datasette.utils import tilde_decode
from markupsafe import Markup, escape

from datasette import hookimpl
from opsync.registry import ingestible_tables


def schema_links() -> tuple[dict[tuple[str, str], str], dict[str, list[tuple[str, str]]]]:
    """(table, column) -> referenced table, and table -> [(referencing table, column)], between published tables."""
    entries = {entry.name: entry for entry in ingestible_tables()}
    published = {name: entry.table for name, entry in entries.items()}
    outgoing: dict[tuple[str, str], str] = {}
    incoming: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for name, table in published.items():
        for column in table.columns:
            for fk in column.foreign_keys:
                target = fk.column.table.name
                if target in published and fk.column is entries[target].key:
                    outgoing[(name, column.name)] = target
                    incoming[target].append((name, column.name))
    return outgoing, dict(incoming)


OUTGOING, INCOMING = schema_links()
KEYS = {entry.name: entry.key.name for entry in ingestible_tables()}  # each published table's key column
DECLARED_TTL_S = 30  # how long the file's declared foreign keys are trusted (render_cell asks per cell)
_declared: dict[tuple[int, str], tuple[float, dict]] = {}


async def declared_foreign_keys(datasette, database: str) -> dict:
    """Datasette's ``get_all_foreign_keys`` of the database, cached briefly: it reads every table's PRAGMA."""
    key = (id(datasette), database)
    cached = _declared.get(key)
    if cached is None or time.monotonic() - cached[0] > DECLARED_TTL_S:
        cached = (time.monotonic(), await datasette.get_database(database).get_all_foreign_keys())
        _declared[key] = cached
    return cached[1]


@hookimpl
def render_cell(value, column, table, database, datasette):
    """A referenced key links to its row (unless Datasette links it already)."""
    target = OUTGOING.get((table, column))
    if target is None or not isinstance(value, str) or not value:
        return None

    async def link():
        declared = await declared_foreign_keys(datasette, database)
        if target not in declared or any(fk["column"] == column for fk in declared.get(table, {}).get("outgoing", [])):
            return None
        href = datasette.urls.row(database, target, quote(value, safe=""))
        return Markup(f'<a href="{escape(href)}">{escape(value)}</a>')

    return link


@hookimpl
def extra_template_vars(view_name, database, table, request, datasette):
    """On a row page, the row template's "Links from other tables" (``foreign_key_tables``): the
    references the SQLite file declares (as Datasette lists them) plus those only the schema knows."""
    if view_name != "row" or table not in INCOMING or request is None or "pks" not in request.url_vars:
        return {}

    async def links():
        row_id = tilde_decode(request.url_vars["pks"])
        db = datasette.get_database(database)
        declared = await declared_foreign_keys(datasette, database)
        references = [(fk["other_table"], fk["other_column"]) for fk in declared.get(table, {}).get("incoming", [])]
        references += [ref for ref in INCOMING[table] if ref not in references and ref[0] in declared]
        if not references or "," in request.url_vars["pks"]:
            return {}
        counts = ", ".join(f'(select count(*) from "{other}" where "{column}" = :id)' for other, column in references)
        found = (await db.execute(f"select {counts}", {"id": row_id})).rows[0]
        return {
            "foreign_key_tables": [
                {
                    "other_table": other,
                    "other_column": column,
                    "column": KEYS[table],
                    "count": count or 0,
                    "link": f"{datasette.urls.table(database, other)}?{column}={quote(row_id, safe='')}",
                }
                for (other, column), count in zip(references, found, strict=True)
            ]
        }

    return links
