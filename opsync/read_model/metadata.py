"""The one metadata file Datasette serves: the engine's part (``datasette.yml`` here) merged with the domain's.

Datasette 0.65 takes one metadata file. Who may read (the ``allow`` blocks, the access, SQL-limit
and token plugins' settings), the read model's own tables and the sync dashboard are the engine's,
the same for every domain; a domain's ``datasette.yml`` holds its tables, queries and dashboards
(and any settings of plugins of its own). They are merged in a file written when Datasette starts,
not by Datasette's ``get_metadata`` hook, under which the metadata file would win over the engine
(and which Datasette calls on every metadata lookup, and drops in 1.0).

The engine wins on every entry it sets, taken whole: a plugin's settings, a dashboard, a table, a
database's ``allow`` and ``allow_sql`` (a domain's ``allow`` merged into the engine's would widen it).
It also describes the columns the read model adds to every domain table (``SYNC_COLUMNS``), where
the domain's file does not.

``python -m opsync.read_model.metadata PATH`` writes the configured domain's merged metadata to
``PATH`` and prints ``PATH``: the compose datasette command passes ``--metadata "$(...)"``.
"""

import json
import logging
import sys
from pathlib import Path
from typing import Any

import yaml

from opsync import domain
from opsync.read_model.tables import ENGINE_TABLES

log = logging.getLogger(__name__)

ENGINE = Path(__file__).with_name("datasette.yml")
SYNC_COLUMNS = {  # the read model's columns of every domain table (store.SYNC_COLUMNS), described once
    "_sync_state": "How far the row has travelled: buffered (at the site), committed (in Cologne), replicated (back at the site), failed",
    "_txn_id": "Transaction (envelope) that last wrote the row; empty for rows loaded from the replica",
    "_commit_lsn": "WAL position of that transaction's commit on the primary (PostgreSQL LSN)",
    "_updated_at": "When the read model last changed the row (UTC)",
}
# Where the merge goes one level deeper (entries by name) before the engine's entry replaces the domain's.
NAMED: dict[str, Any] = {"plugins": {"datasette-dashboards": {}}, "databases": {"*": {"tables": {}}}}


def merge(domain_part: dict[str, Any], engine_part: dict[str, Any], named: dict[str, Any], at: str = "") -> dict[str, Any]:
    """``domain_part`` with ``engine_part``'s entries put in: whole, or merged by name where ``named`` says."""
    merged = dict(domain_part)
    for key, value in engine_part.items():
        deeper = named.get(key, named.get("*"))
        if deeper is not None and isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value, deeper, f"{at}{key}.")
            continue
        if key in merged and merged[key] != value:
            log.warning("Datasette metadata: the domain's %s%s is the engine's; the engine's is used", at, key)
        merged[key] = value
    return merged


def load(path: Path) -> dict[str, Any]:
    loaded = yaml.safe_load(path.read_text()) or {}
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: Datasette metadata must be a mapping")
    return loaded


def with_sync_columns(domain_part: dict[str, Any]) -> dict[str, Any]:
    """The domain's table entries, each describing the read model's columns (its own words first)."""
    for database in (domain_part.get("databases") or {}).values():
        for name, entry in ((database or {}).get("tables") or {}).items():
            if isinstance(entry, dict) and name not in ENGINE_TABLES:  # in a file merged before, the engine's are there
                entry["columns"] = SYNC_COLUMNS | (entry.get("columns") or {})
    return domain_part


def merged(domain_metadata: Path) -> dict[str, Any]:
    """What Datasette serves for the domain whose metadata file is ``domain_metadata``."""
    return merge(with_sync_columns(load(domain_metadata)), load(ENGINE), NAMED)


def write(path: Path, domain_metadata: Path) -> Path:
    """Write the merged metadata to ``path`` (JSON, which Datasette reads as it reads YAML); return ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(merged(domain_metadata), indent=1))
    return path


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    sys.stdout.write(f"{write(Path(sys.argv[1]), domain.current().datasette_metadata)}\n")
