"""``opsync replay``: re-publish into the read model the rows the change capture says changed in a time range."""

from datetime import UTC, datetime

import click
from rich.table import Table

from opsync.cli.common import DEGRADED, MomentType, NotFound, console, echo_json, json_option, say
from opsync.cli.services import buffer_or_exit, database
from opsync.config import get_settings
from opsync.read_model.publisher import Publisher
from opsync.read_model.store import ReadModel
from opsync.registry import ingestible_tables


@click.command()
@click.option("--since", type=MomentType(), required=True, help="Start: 6h or 3d ago, a date (00:00 UTC) or an ISO time.")
@click.option("--until", type=MomentType(), help="End, excluded; default now.")
@click.option(
    "--table",
    "tables",
    multiple=True,
    type=click.Choice([t.name for t in ingestible_tables()]),
    metavar="TABLE",
    help="Only this table; repeat for several; default all.",
)
@json_option
def replay(since: datetime, until: datetime | None, tables: tuple[str, ...], as_json: bool) -> None:
    """Re-publish into the read model (the SQLite file Datasette serves) the rows changed in a time range.

    The repair after restoring the file from a backup, or after a publisher bug: the keys come from
    the primary's change capture (read on the local replica), each row as the publisher would show it
    now. Replaying twice changes nothing more. Exits 3 when changes of the range were purged already
    (older than the change table keeps): the opsync_read_model_check DAG repairs every row instead.
    """
    settings = get_settings()
    since, until = since.astimezone(UTC), (until or datetime.now(UTC)).astimezone(UTC)
    if since >= until:
        raise click.UsageError(f"--since {since.isoformat()} is not before --until {until.isoformat()}")
    path = settings.read_model_path
    if not path.exists():
        raise NotFound(f"no read model at {path} (the publisher creates it; check OPSYNC_READ_MODEL_PATH)")
    names = list(tables) or [t.name for t in ingestible_tables()]
    with buffer_or_exit() as buffer, database("replica") as replica_db:
        publisher = Publisher(ReadModel(path, settings.timezone), buffer, replica_db)
        try:
            done = publisher.replay(since, until, names)
        finally:
            publisher.close()
    if as_json:
        echo_json(
            {
                "since": since.isoformat(),
                "until": until.isoformat(),
                "read_model": str(path),
                "complete": done.complete,
                "tables": {
                    name: {"changed": done.keys[name], "written": done.written[name], "skipped": done.skipped[name]} for name in names
                },
            }
        )
    else:
        table = Table(
            "table",
            "changed in range",
            "rewritten",
            "skipped (poison)",
            title=f"replayed {since:%Y-%m-%d %H:%M} – {until:%Y-%m-%d %H:%M} UTC",
        )
        for name in names:
            table.add_row(name, str(done.keys[name]), str(done.written[name]), str(done.skipped[name]))
        console().print(table)
    if not done.complete:
        say(
            "Warning: changes of this range were purged from the change table already, so rows changed before the"
            " oldest change kept were not replayed; the opsync_read_model_check DAG compares and repairs every row."
        )
        click.get_current_context().exit(DEGRADED)
