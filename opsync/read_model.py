"""The read model Datasette serves: one SQLite file in WAL mode, written by a single publisher.

WAL lets Datasette read while the publisher writes, and Datasette sees external commits without a
restart; the file is only ever modified in place, never replaced (a renamed-over file would leave
Datasette reading the old inode).
"""

import sqlite3
from pathlib import Path


def ensure_read_model(path: Path) -> None:
    """Create the file (WAL mode) if it is missing; an existing file is left as it is."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
