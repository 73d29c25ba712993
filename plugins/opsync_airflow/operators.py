"""Operators over :mod:`opsync.drain`, :mod:`opsync.reconcile` and :mod:`opsync.read_model.check`: connections in,
plain log lines out."""

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from airflow.sdk import BaseOperator
from sqlalchemy import Engine

from opsync.apply import Transient
from opsync.buffer.figures import buffer_stats
from opsync.config import get_settings
from opsync.connections import Database, readable
from opsync.drain import BATCH_BYTES, BATCH_RECORDS, BATCH_SIZE, confirm, drain
from opsync.lsn import Lsn, current_position, replica_position
from opsync.read_model.check import ReadModelCheck
from opsync.read_model.store import ReadModel
from opsync.reconcile import reconcile
from opsync_airflow.hooks import BUFFER_CONN_ID, PRIMARY_CONN_ID, REPLICA_CONN_ID, SiteBufferHook, SiteDatabaseHook


class PrimaryUnavailable(Exception):
    """The primary could not take a batch; the entries are still buffered and the task is retried with backoff."""


class Stuck(Exception):
    """Something has waited longer than the threshold: an operator should look."""


@contextmanager
def engine(conn_id: str, autocommit: bool = False):
    """An engine for one task: disposed at its end, so no connection outlives the task."""
    e = SiteDatabaseHook(conn_id).get_engine(autocommit)
    try:
        yield e
    finally:
        e.dispose()


def readable_position(primary_conn_id: str = PRIMARY_CONN_ID, replica_conn_id: str = REPLICA_CONN_ID) -> Lsn:
    """How far this site can read: its replica's replay position; on the main site, the primary's own position."""
    if readable(get_settings()) is Database.primary:
        with engine(primary_conn_id) as primary:
            return current_position(primary)
    with engine(replica_conn_id) as replica:
        return replica_position(replica)


@contextmanager
def readable_source(primary: Engine, replica_conn_id: str = REPLICA_CONN_ID) -> Iterator[Callable[[], Lsn]]:
    """:func:`readable_position` as a function for a whole task: one replica engine, asked between batches."""
    if readable(get_settings()) is Database.primary:
        yield lambda: current_position(primary)
        return
    with engine(replica_conn_id) as replica:
        yield lambda: replica_position(replica)


class DrainOperator(BaseOperator):
    """Claim → apply → acknowledge until a batch comes back less than full or the budget is spent; between
    batches, confirm what the replica has passed already (the ``confirm`` task after the sensor does the rest).

    Returns (as XCom) the highest commit LSN of the run for the replica sensor, ``""`` when nothing
    was committed (a None would not be stored, and the sensor's pull would log a missing XCom). A
    primary that cannot take a batch fails the task (retried by Airflow) without losing or
    dead-lettering anything. A batch is ``batch_size`` transactions, cut short before one that would
    pass ``batch_records`` records or ``batch_bytes`` envelope bytes (:class:`opsync.drain.BatchLimits`).
    """

    ui_color = "#d9ecff"

    def __init__(
        self,
        *,
        budget_s: float = 60,
        batch_size: int = BATCH_SIZE,
        batch_timeout_s: float = 60,
        reclaim_idle_s: float = 60,
        batch_records: int = BATCH_RECORDS,
        batch_bytes: int = BATCH_BYTES,
        buffer_conn_id: str = BUFFER_CONN_ID,
        primary_conn_id: str = PRIMARY_CONN_ID,
        replica_conn_id: str = REPLICA_CONN_ID,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.replica_conn_id = replica_conn_id
        self.budget_s = budget_s
        self.batch_size = batch_size
        self.batch_records = batch_records
        self.batch_bytes = batch_bytes
        self.batch_timeout_s = batch_timeout_s
        self.reclaim_idle_s = reclaim_idle_s
        self.buffer_conn_id = buffer_conn_id
        self.primary_conn_id = primary_conn_id

    def execute(self, context) -> str:
        buffer = SiteBufferHook(self.buffer_conn_id).get_buffer()
        with (
            engine(self.primary_conn_id, autocommit=True) as primary,  # apply_batch's alone: two round trips fewer
            readable_source(primary, self.replica_conn_id) as readable,
        ):
            try:
                summary = drain(
                    buffer,
                    primary,
                    budget_s=self.budget_s,
                    batch_size=self.batch_size,
                    timeout_s=self.batch_timeout_s,
                    min_idle_ms=int(self.reclaim_idle_s * 1000),
                    readable=readable,
                    batch_records=self.batch_records,
                    batch_bytes=self.batch_bytes,
                )
            except Transient as exc:
                depth = buffer_stats(buffer.client, buffer).depth
                raise PrimaryUnavailable(f"{exc}, entries stay buffered ({depth} waiting); retrying with backoff") from exc
        self.log.info("%s", summary.describe())
        return "" if summary.max_commit_lsn is None else str(summary.max_commit_lsn)


class ConfirmOperator(BaseOperator):
    """Mark replicated every transaction the site can now read (any run's, not only this one's)."""

    ui_color = "#dff5e1"

    def __init__(
        self,
        *,
        buffer_conn_id: str = BUFFER_CONN_ID,
        primary_conn_id: str = PRIMARY_CONN_ID,
        replica_conn_id: str = REPLICA_CONN_ID,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.buffer_conn_id = buffer_conn_id
        self.primary_conn_id = primary_conn_id
        self.replica_conn_id = replica_conn_id

    def execute(self, context) -> int:
        buffer = SiteBufferHook(self.buffer_conn_id).get_buffer()
        if not buffer.awaiting_count():
            self.log.info("nothing awaits the replica")
            return 0
        confirmation = confirm(buffer, readable_position(self.primary_conn_id, self.replica_conn_id))
        self.log.info(
            "replica at %s: %d confirmed replicated, %d still await the replica",
            confirmation.position,
            confirmation.confirmed,
            confirmation.remaining,
        )
        return confirmation.confirmed


class ReconcileOperator(BaseOperator):
    """Confirm what the replica has passed, take over abandoned claims, and fail when something is stuck."""

    def __init__(
        self,
        *,
        stuck_after_s: float = 600,
        reclaim_idle_s: float = 60,
        buffer_conn_id: str = BUFFER_CONN_ID,
        primary_conn_id: str = PRIMARY_CONN_ID,
        replica_conn_id: str = REPLICA_CONN_ID,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.stuck_after_s = stuck_after_s
        self.reclaim_idle_s = reclaim_idle_s
        self.buffer_conn_id = buffer_conn_id
        self.primary_conn_id = primary_conn_id
        self.replica_conn_id = replica_conn_id

    def execute(self, context) -> int:
        buffer = SiteBufferHook(self.buffer_conn_id).get_buffer()
        result = reconcile(
            buffer,
            lambda: readable_position(self.primary_conn_id, self.replica_conn_id),
            self.stuck_after_s,
            int(self.reclaim_idle_s * 1000),
        )
        self.log.info("%s", result.describe())
        if result.stats.dead_letters:
            self.log.warning("%d transactions are dead-lettered (stream %s)", result.stats.dead_letters, buffer.dead_letters)
        if result.problems:
            raise Stuck("; ".join(result.problems))
        return result.confirmed


class ReadModelCheckOperator(BaseOperator):
    """Compare the read model (``OPSYNC_READ_MODEL_PATH``) with the replica table by table and repair drift in place.

    Returns (as XCom) the number of drifted rows found. Drift is repaired, so it warns rather than fails.
    """

    ui_color = "#fdf3d8"

    def __init__(
        self,
        *,
        chunk: int = 10_000,
        buffer_conn_id: str = BUFFER_CONN_ID,
        replica_conn_id: str = REPLICA_CONN_ID,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.chunk = chunk
        self.buffer_conn_id = buffer_conn_id
        self.replica_conn_id = replica_conn_id

    def execute(self, context) -> int:
        settings = get_settings()
        path = settings.read_model_path
        if not path.exists():
            self.log.info("no read model at %s yet (the publisher creates it): nothing to check", path)
            return 0
        buffer = SiteBufferHook(self.buffer_conn_id).get_buffer()
        model = ReadModel(path, settings.timezone)
        try:
            with engine(self.replica_conn_id) as replica:
                check = ReadModelCheck.open(model, buffer, replica, self.chunk)
                if not check.loaded():
                    self.log.info("the publisher has not finished its first full load of %s: nothing to check", path)
                    return 0
                report = check.run()
        finally:
            model.close()
        for table in report.tables:
            (self.log.warning if table.drift else self.log.info)("%s", table.describe())
        rows = sum(t.replica_rows for t in report.tables)
        if report.drift:
            self.log.warning("read model drifted from the replica: %d rows differed, %d repaired", report.drift, report.repaired)
        else:
            self.log.info("read model equals the replica: %d rows in %d tables, no drift", rows, len(report.tables))
        return report.drift
