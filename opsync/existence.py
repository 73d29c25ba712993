"""Updates and deletes only of rows that exist: the rest is refused at once (404), never buffered as a ghost.

The buffer's side of the check runs inside the ENQUEUE script, atomic with the write, so no
concurrent delete can slip in between: a row deleted by a buffered transaction is refused naming
that transaction. A row the overlay does not hold must be in the local replica, which is asked only
then: inserts never need it (the hot path stays one Redis call), nor do updates of rows still
buffered. The replica is asked after the script said so, and the script runs again with its answer;
since the overlay of a row is released only once the replica has it, a row cannot fall between the
two reads. A replica that cannot be asked means 503: accepting the write could promise a change
the primary will refuse.
"""

import asyncio

from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError

from opsync import merged, registry
from opsync.buffer import AsyncEnqueuer, Enqueued, NoSuchRow, UnknownRows
from opsync.envelope import Transaction


class ReplicaUnavailable(Exception):
    """The local replica could not say whether a row to update or delete exists; nothing was written (503)."""


async def enqueue_existing(
    enqueuer: AsyncEnqueuer,
    replica: Engine,
    txn: Transaction,
    response: dict,
    idempotency: tuple[str, str] | None,
    body_hash: str,
) -> Enqueued:
    """:meth:`AsyncEnqueuer.enqueue`, refusing (:class:`NoSuchRow`) updates and deletes of rows that are not there."""
    try:
        return await enqueuer.enqueue(txn, response, idempotency, body_hash, in_replica=())
    except UnknownRows as unknown:
        found = await asyncio.to_thread(in_replica, replica, unknown.rows())
    try:
        return await enqueuer.enqueue(txn, response, idempotency, body_hash, in_replica=found)
    except UnknownRows as still:
        raise NoSuchRow(txn, still.steps[0]) from None


def in_replica(replica: Engine, rows: list[tuple[str, str]]) -> list[str]:
    """Which of ``rows`` ((table, key)) the replica holds, named as the ENQUEUE script names them ('table:key')."""
    found = []
    try:
        for table in sorted({table for table, _ in rows}):
            entry = registry.get_table(table)
            keys = [entry.key_of(key) for t, key in rows if t == table]
            found += [f"{table}:{key}" for key in merged.replica_rows(replica, entry, {}, ids=keys)]
    except DBAPIError as exc:
        raise ReplicaUnavailable(
            f"local replica unavailable ({exc.orig.__class__.__name__}): cannot tell whether the rows "
            "to update or delete exist; retry later"
        ) from None
    return found
