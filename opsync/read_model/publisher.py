"""The read-model publisher: the one writer of the SQLite file Datasette serves.

Every row it writes is the merged view of one key (:mod:`opsync.merged`): the buffer's overlay
over the replica's row, so a row keeps its key while it moves from buffered to committed to
replicated and can neither vanish nor appear twice. The publisher only decides *which* keys to
re-read, from four sources:

- the buffer stream, read past the last entry seen, woken by the buffer's pub/sub events: new
  buffered writes (inserts, updates, deletes) within a fraction of a second; and the dead-letter
  stream the same way: the rows of failed transactions, shown again as the replica holds them;
- state events (committed / replicated / failed): the rows whose ``_txn_id`` is that transaction;
- the replica's change capture (:mod:`opsync.read_model.changes`): replicated changes, including rows written
  at the main site by others, and deletes;
- a sweep, a chunk per table per run, of the overlay's key index and of rows the file still
  shows as unsettled: the safety net for a lost wake-up (pub/sub keeps nothing).

Each source is a :class:`Duty` with its own backoff: while the replica is down, buffered rows still
appear; while Redis is down, nothing from the buffer can be known, and the stream position, the
change position and the sweep pick up where they stopped. A row that cannot be read, rendered or
written (poison) is skipped by whichever duty meets it, logged once, counted and listed
(:mod:`opsync.read_model.figures`); every other row is written and the duty moves on. The file is created once and only ever
written in place. Run it inside Datasette (``datasette/plugins/opsync_publisher.py``) or as its
own process: ``python -m opsync.read_model.publisher``.
"""

import fcntl
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from itertools import groupby
from pathlib import Path
from typing import Any

import psycopg
import redis
from sqlalchemy import Engine, bindparam, select, text
from sqlalchemy.exc import DBAPIError

from opsync import connections, merged
from opsync.buffer import Buffer
from opsync.buffer.codec import UnreadableEnvelope, decode
from opsync.buffer.figures import buffer_stats
from opsync.config import Settings, get_settings
from opsync.connections import Database
from opsync.envelope import State
from opsync.events import parse_event
from opsync.monitoring.alerts import stored_findings
from opsync.monitoring.drain_metrics import rate_per_minute
from opsync.read_model.changes import SNAPSHOT_SQL, Changes, Position, purge_changes, read_changes, snapshot_xmin
from opsync.read_model.figures import POISON_KEEP, Poison, load_poison, read_model_figures, save_position, store_poison
from opsync.read_model.store import Layout, ReadModel

log = logging.getLogger("opsync.publisher")

OUTAGES = (redis.RedisError, DBAPIError, OSError)
# Raised reading one row (decoding a value, e.g. JSON nested deeper than Python parses, or rendering it):
# that row is poison. Anything else (an outage, a bug) fails the duty, which retries.
FETCH_POISON = (ArithmeticError, LookupError, RecursionError, TypeError, ValueError, psycopg.DataError)
REASON_CHARS = 200  # of an error's first line: enough to tell what failed, never a whole row
LAG_SQL = text(
    "SELECT CASE WHEN pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() THEN 0"
    " ELSE extract(epoch FROM now() - pg_last_xact_replay_timestamp()) END"
)
CHANGES_STATE, STREAM_STATE, DEAD_STATE = "changes", "stream", "dead"
REPLAY_CHUNK = 1000  # keys per write under the file's lock, as the read-model check's repair
# The rows changed in a time range, by the change capture's time (the start of the writing transaction)
REPLAY_SQL = text(
    "SELECT DISTINCT table_name, row_id::text FROM row_change"
    " WHERE changed_at >= :since AND changed_at < :until AND table_name IN :tables ORDER BY table_name, row_id"
).bindparams(bindparam("tables", expanding=True))
# Changes were purged, and none at or before the range's start is left: some of the range's may be gone
PURGED_SQL = text("SELECT purged_below > 0 AND NOT EXISTS (SELECT 1 FROM row_change WHERE changed_at <= :since) FROM row_change_horizon")


@dataclass(frozen=True)
class Tuning:
    change_every_s: float = 0.5
    sweep_every_s: float = 2.0
    metrics_every_s: float = 10.0
    purge_every_s: float = 3600.0
    change_retention: timedelta = timedelta(days=3)  # longer than any publisher outage worth catching up incrementally
    metrics_keep_days: int = 30
    chunk: int = 10_000  # rows per SQLite transaction (full load) and changes or entries per read
    sweep_chunk: int = 500
    max_backoff_s: float = 30.0
    catch_up_slice_s: float = 1.0  # then the buffer's events get a turn


@dataclass
class Duty:
    """One of the publisher's jobs, run every ``every_s``; ``run`` returns True when more is waiting now."""

    name: str
    every_s: float
    run: Callable[[], bool | None]
    next_at: float = 0.0
    failures: int = 0

    def tick(self, now: float, max_backoff_s: float) -> None:
        if now < self.next_at:
            return
        try:
            more = self.run()
        except OUTAGES as exc:
            self.failed(now, max_backoff_s, plain(exc))
            return
        except Exception as exc:  # a bug must not stop the other duties: log it whole, back off, retry
            log.exception("%s: unexpected error", self.name)
            self.failed(now, max_backoff_s, plain(exc))
            return
        if self.failures:
            log.info("%s: working again after %d failed attempts", self.name, self.failures)
        self.failures = 0
        self.next_at = now if more else now + self.every_s

    def failed(self, now: float, max_backoff_s: float, reason: str) -> None:
        self.failures += 1
        delay = min(max_backoff_s, 0.5 * 2 ** (self.failures - 1))
        self.next_at = now + delay
        log.warning("%s failed: %s; retrying in %.1f s (attempt %d)", self.name, reason, delay, self.failures)


def plain(exc: BaseException) -> str:
    """An error in one line, without SQLAlchemy's background links."""
    cause = getattr(exc, "orig", None) or exc
    first = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {first[0] if first else ''}"


def utc_minute(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:00Z")


def now_text() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


@dataclass(frozen=True)
class Fetched:
    """Rows read and rendered, ready to write: ``records`` for ``keys`` (a key without one is deleted), and the
    keys left out because their row could not be read or rendered (poison), with the error."""

    keys: list[str]
    records: dict[str, tuple]
    refused: dict[str, Exception] = field(default_factory=dict)

    def __add__(self, other: "Fetched") -> "Fetched":
        return Fetched(self.keys + other.keys, self.records | other.records, self.refused | other.refused)


def isolate(keys: list[str], read: Callable[[list[str]], Any], refuse: Callable[[str, Exception], None]) -> list:
    """``[read(keys)]``; when a row cannot be read (a value fails to decode, and with it the whole read), the
    halves of ``keys`` again, down to the keys that fail alone, which go to ``refuse``; returns the reads that
    worked. A poison row costs about two reads per halving; none costs nothing. Outages are raised."""
    try:
        return [read(keys)]
    except FETCH_POISON as exc:
        if len(keys) == 1:
            refuse(keys[0], exc)
            return []
        half = len(keys) // 2
        return isolate(keys[:half], read, refuse) + isolate(keys[half:], read, refuse)


def covered(records: dict[str, tuple], refused: dict[str, Exception], keys: list[str]) -> Fetched:
    """``keys`` but the refused ones: those are left as the file has them, not deleted."""
    return Fetched([k for k in keys if k not in refused] if refused else keys, records, refused)


def render_each(rows: dict[str, Any], render: Callable[[Any], tuple]) -> tuple[dict[str, tuple], dict[str, Exception]]:
    """Each row rendered; one that cannot be is left out and returned with its error, the others kept.
    The common case, nothing refused, costs one comprehension."""
    try:
        return {key: render(row) for key, row in rows.items()}, {}
    except Exception:  # rendering is pure: whatever it raises is that row's fault
        records, refused = {}, {}
        for key, row in rows.items():
            try:
                records[key] = render(row)
            except Exception as exc:
                refused[key] = exc
        return records, refused


@dataclass(frozen=True)
class Batch:
    """A chunk of the replica's changes, and the rows they changed, read and ready to write."""

    changes: Changes
    rows: list[tuple[Layout, Fetched]]


@dataclass(frozen=True)
class Replayed:
    """What :meth:`Publisher.replay` did, per table."""

    keys: dict[str, int]  # rows changed in the range
    written: dict[str, int]  # of which rewritten or deleted in the file (the rest were right already)
    skipped: dict[str, int]  # of which poison: they cannot be rendered or written, and were left as they were
    complete: bool  # False: changes of the range may have been purged from the change table


@dataclass
class Publisher:
    model: ReadModel
    buffer: Buffer
    replica: Engine
    primary: Engine | None = None  # for purging the change table; None: someone else purges
    tuning: Tuning = field(default_factory=Tuning)
    state_events: set[str] = field(default_factory=set)  # txn_ids whose state changed, not yet applied
    pubsub: redis.client.PubSub | None = None
    sweep_from: dict[str, tuple[str | None, str]] = field(default_factory=dict)  # table -> (overlay, unsettled) positions
    poisoned: dict[tuple[str, str], Poison] = field(default_factory=dict)  # (table, key) -> a row skipped now, and why
    poison_new: int = 0  # rows become poison since the count in Redis was last raised
    poison_stored: bool | None = None  # None: Redis' list not read yet; False: ours changed since it was stored

    def __post_init__(self) -> None:
        t = self.tuning
        self.duties = [
            Duty("replica changes", t.change_every_s, self.follow_replica),
            Duty("buffer", 0, self.follow_buffer),
            Duty("sweep", t.sweep_every_s, self.sweep),
            Duty("metrics", t.metrics_every_s, self.record_metrics),
        ]
        if self.primary is not None:
            self.duties.append(Duty("change purge", t.purge_every_s, self.purge))
        self.prefetch = ThreadPoolExecutor(1, thread_name_prefix="publisher-prefetch")

    @classmethod
    def from_settings(cls, settings: Settings, tuning: Tuning | None = None) -> "Publisher":
        timeouts, utc = connections.background_timeouts(settings), "-c timezone=UTC"  # UTC: no time zone conversions here
        return cls(
            ReadModel(settings.read_model_path, settings.timezone),
            Buffer(connections.redis_client(settings), status_ttl_s=settings.status_ttl_s),
            connections.engine(settings, Database.replica, timeouts, pre_ping=True, options=utc),
            connections.engine(settings, Database.primary, timeouts, pre_ping=True, options=utc),
            tuning or Tuning(),
        )

    @property
    def layouts(self) -> dict[str, Layout]:
        return self.model.layouts

    # --- the loop ---------------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Publish until ``stop`` is set; outages are retried with backoff, never fatal."""
        try:
            with single_writer(self.model.path, stop) as writing:
                if writing:
                    log.info("publishing the read model to %s", self.model.path)
                    with suppress(redis.RedisError):  # else at the first metrics sample
                        self.load_poison()
                while writing and not stop.is_set():
                    self.wait_for_events(stop, 0.2)
                    now = time.monotonic()
                    for duty in self.duties:
                        duty.tick(now, self.tuning.max_backoff_s)
        finally:
            self.close()

    def close(self) -> None:
        self.prefetch.shutdown()
        self.drop_pubsub()
        self.model.close()
        self.replica.dispose()
        if self.primary is not None:
            self.primary.dispose()

    def wait_for_events(self, stop: threading.Event, timeout: float) -> None:
        """Wait for a wake-up on the buffer's events channel (or the timeout); note state changes."""
        try:
            if self.pubsub is None:
                self.pubsub = self.buffer.subscribe()
            message = self.pubsub.get_message(timeout=timeout)
            while message is not None:
                event = parse_event(message["data"])
                if event and event["state"] != State.accepted:  # new entries are read from the stream
                    self.state_events.add(event["txn_id"])
                message = self.pubsub.get_message(timeout=0)
        except redis.RedisError:  # the buffer duty reports the outage; wake-ups resume on reconnect
            self.drop_pubsub()
            stop.wait(timeout)

    def drop_pubsub(self) -> None:
        if self.pubsub is not None:
            with suppress(redis.RedisError, OSError):
                self.pubsub.close()
            self.pubsub = None

    # --- rows -------------------------------------------------------------------------------------

    def refresh(self, layout: Layout, keys: list[str], replica_optional: bool = False, duty: str = "repair") -> int:
        """Rewrite ``keys`` as the merged view shows them now; returns rows written. ``duty`` names the caller
        in what is logged of a poison row."""
        return self.publish(layout, self.fetch(layout, keys, replica_optional), duty)

    def publish(self, layout: Layout, fetched: Fetched, duty: str) -> int:
        """Write ``fetched``; a row that could not be read or rendered, or that the file refuses, is skipped as
        poison (left as the file has it) and every other row is written. Returns rows written."""
        refused = dict(fetched.refused)
        written = self.model.apply(layout, fetched.keys, fetched.records, refused.__setitem__)
        for key, exc in refused.items():
            self.poison(layout.name, key, duty, exc)
        if self.poisoned:
            self.cured(layout.name, [key for key in fetched.keys if key not in refused])
        return written

    def poison(self, table: str, key: str, duty: str, exc: BaseException) -> None:
        """Skip a row that cannot be published: logged and counted once, until it is published again.

        The duty moves on past it; the row is tried again whenever it is read again (it changes, the sweep
        comes by), quietly while it stays poison."""
        if (table, key) in self.poisoned:
            return
        reason = plain(exc)[:REASON_CHARS]
        self.poisoned[(table, key)] = Poison(table, key, duty, reason, now_text())
        self.poison_new += 1
        self.changed_poison()
        log.warning("%s: skipping %s %s, which cannot be published: %s", duty, table, key, reason)

    def cured(self, table: str, keys: list[str]) -> None:
        """Rows written (or deleted) fine after being poison: no longer skipped."""
        for key in keys:
            if self.poisoned.pop((table, key), None) is not None:
                self.changed_poison()
                log.info("%s %s is published again", table, key)

    def changed_poison(self) -> None:
        if self.poison_stored:
            self.poison_stored = False

    def fetch(self, layout: Layout, keys: list[str], replica_optional: bool = False) -> Fetched:
        """:meth:`fetch_rows`, poison rows isolated (:func:`isolate`) and refused."""
        unread: dict[str, Exception] = {}
        parts = isolate(keys, lambda some: self.fetch_rows(layout, some, replica_optional), unread.__setitem__)
        return sum(parts, Fetched([], {}, unread))

    def fetch_rows(self, layout: Layout, keys: list[str], replica_optional: bool = False) -> Fetched:
        """The merged view of ``keys`` now, as stored records (a key without one is deleted), and the keys it covers;
        a row that cannot be rendered is refused, the others kept.

        The overlay is read before the replica: an overlay that is gone was released only after the
        replica had replayed its change, so the replica read that follows has the row, and a row never
        vanishes in between. With ``replica_optional``, a replica outage skips only the keys that need it
        (the sweep and the change capture come back to them). Keys without an overlay (nearly all, when
        catching up on the replica's changes) take the full load's path: rows formatted by PostgreSQL, no merge.
        """
        overlays = merged.read_overlays(self.buffer, layout.entry, self.buffer.overlaid(layout.name, keys))
        needed = [k for k in keys if k not in overlays or overlays[k].needs_base]
        try:
            base = self.replica_records(layout, needed)
        except DBAPIError as exc:
            if not replica_optional:
                raise
            log.warning("replica unavailable (%s): %d %s rows wait for it", plain(exc), len(needed), layout.name)
            waiting = set(needed)
            keys, base = [k for k in keys if k not in waiting], {}
            overlays = {k: overlays[k] for k in keys}
        at = now_text()
        if not overlays:
            return covered(*render_each(base, lambda row: layout.loaded_record(row, at)), keys)
        records, refused = render_each({k: row for k, row in base.items() if k not in overlays}, lambda row: layout.loaded_record(row, at))
        names = [c.name for c in layout.data_columns]
        under = {key: dict(zip(names, row, strict=True)) for key, row in base.items() if key in overlays}
        shown, unshown = render_each(
            {row[layout.key]: row for row in merged.merge_all(under, overlays, {}, layout.key)},
            lambda row: layout.record(row, row["_sync_state"] and str(row["_sync_state"]), row["_txn_id"], row["_commit_lsn"], at),
        )
        return covered(records | shown, refused | unshown, keys)

    def replica_records(self, layout: Layout, keys: list[str]) -> dict[str, tuple]:
        """The replica's rows for ``keys``, in stored form but for JSON (:attr:`Layout.keyed_sql`)."""
        if not keys:
            return {}
        sql, params = layout.keyed_sql
        with self.replica.connect() as conn, conn.connection.driver_connection.cursor() as cursor:  # type: ignore[union-attr]  # open: set
            cursor.execute(sql, {**params, "ids": layout.ids_text(keys)})
            return {row[0]: row for row in cursor.fetchall()}

    def refresh_all(self, keys: dict[str, set[str]], replica_optional: bool = False, duty: str = "buffer") -> None:
        for table, table_keys in keys.items():
            if table in self.layouts:
                self.refresh(self.layouts[table], sorted(table_keys), replica_optional, duty)

    # --- the buffer -------------------------------------------------------------------------------

    def follow_buffer(self) -> bool:
        """New stream entries and dead letters past the last ones read, then the rows of transactions whose state changed."""
        events, self.state_events = self.state_events, set()
        try:
            more = self.read_stream() | self.read_stream(DEAD_STATE, dead=True)
            for layout in self.layouts.values():
                if events and (keys := self.model.keys_of_txns(layout, sorted(events))):
                    self.refresh(layout, keys, replica_optional=True, duty="state events")
        except BaseException:
            self.state_events |= events
            raise
        return more

    def read_stream(self, state: str = STREAM_STATE, dead: bool = False) -> bool:
        """Entries stay in the stream until replicated (or dead-lettered), so reading past a position
        misses none that matter: one gone meanwhile is in the replica or in the overlay the sweep reads.

        The dead letters are read the same way: a failed transaction's rows are rewritten, including
        those its delete had hidden, which the file no longer holds and the sweep's key index leaves out.
        """
        entries = self.buffer.entries_after(self.model.get_state(state), self.tuning.chunk, dead=dead)
        if not entries:
            return False
        keys: dict[str, set[str]] = {}
        for _, envelope in entries:
            try:
                txn = decode(envelope)
            except UnreadableEnvelope:
                continue  # the drainer dead-letters it; it has no rows to show
            for table, key in txn.row_keys():
                keys.setdefault(table, set()).add(key)
        self.refresh_all(keys, replica_optional=True)
        with self.model.transaction() as conn:
            self.model.set_state(conn, state, entries[-1][0])
        save_position(self.buffer, state, entries[-1][0])
        return len(entries) == self.tuning.chunk

    def sweep(self) -> None:
        """The safety net for lost wake-ups: per table, the next chunk of overlay keys (by the overlay's key
        index, no scan) and of rows the file shows unsettled, re-read from the truth. Wraps around."""
        size = self.tuning.sweep_chunk
        for layout in self.layouts.values():
            overlay_from, unsettled_from = self.sweep_from.get(layout.name, (None, ""))
            overlay = self.buffer.index_range(self.buffer.rows_index(layout.name), overlay_from, size)
            unsettled = self.model.unsettled_keys(layout, unsettled_from, size)
            if overlay or unsettled:
                self.refresh(layout, sorted(set(overlay) | set(unsettled)), duty="sweep")
            self.sweep_from[layout.name] = (
                overlay[-1] if len(overlay) == size else None,
                unsettled[-1] if len(unsettled) == size else "",
            )

    # --- the replica ------------------------------------------------------------------------------

    def position(self) -> Position | None:
        saved = self.model.get_state(CHANGES_STATE)
        if saved is None:
            return None
        xid, seq = saved.split(":")
        return Position(int(xid), int(seq))

    def save_position(self, position: Position) -> None:
        """In the file (with the rows it reaches, inside a batch's transaction), then in Redis for the freshness
        figure: while Redis is down, only the figure waits."""
        with self.model.transaction() as conn:
            self.model.set_state(conn, CHANGES_STATE, f"{position.xid}:{position.seq}")
        if not self.model.conn.in_transaction:  # else once the batch around it has committed
            self.mirror_position(position)

    def mirror_position(self, position: Position) -> None:
        with suppress(redis.RedisError):
            save_position(self.buffer, CHANGES_STATE, f"{position.xid}:{position.seq}")

    def follow_replica(self) -> bool:
        """Apply the replica's final changes past the position; the first run loads everything.

        While catching up, the next chunk is read (changes, overlays, replica rows) in a thread while this
        one is written: PostgreSQL's and SQLite's work overlap. Each chunk still reads its overlays before
        its replica rows, and chunks are written in order, each with the position it reaches.
        """
        position = self.position()
        if position is None:
            self.full_load() if self.model.is_empty() else self.resync()  # data but no position: an interrupted load
            return False
        deadline = time.monotonic() + self.tuning.catch_up_slice_s
        batch = self.read_batch(position)
        while True:
            if batch.changes.missed:
                log.warning("changes past %s were purged from the change table: resyncing every table", batch.changes.position)
                self.resync()
                return False
            more = not batch.changes.complete
            ahead = self.prefetch.submit(self.read_batch, batch.changes.position) if more and time.monotonic() < deadline else None
            self.write_batch(batch)
            if ahead is None:
                return more
            batch = ahead.result()

    def read_batch(self, position: Position) -> Batch:
        """The next chunk of changes past ``position`` and the rows they changed, as they are now."""
        changes = read_changes(self.replica, position, self.tuning.chunk)
        fetched = [(self.layouts[t], self.fetch(self.layouts[t], sorted(ids))) for t, ids in changes.ids.items() if t in self.layouts]
        return Batch(changes, fetched)

    def write_batch(self, batch: Batch) -> None:
        """A chunk's rows and the position they reach, in one SQLite transaction; poison rows are skipped."""
        with self.model.transaction():
            for layout, fetched in batch.rows:
                self.publish(layout, fetched, "replica changes")
            self.save_position(batch.changes.position)
        self.mirror_position(batch.changes.position)

    def full_load(self) -> None:
        """Copy every table from one replica snapshot in key order, ``chunk`` rows per SQLite transaction.

        Everything below the snapshot's xmin is in it, so change capture starts there. A row that cannot be
        rendered or written is skipped as poison; one whose value cannot even be decoded stops the snapshot's
        stream of rows, so a resync (by key, which isolates it) finishes the load.
        """
        started, total, at = time.monotonic(), 0, now_text()
        snapshot = self.replica.connect().execution_options(isolation_level="REPEATABLE READ", yield_per=self.tuning.chunk)
        try:
            with snapshot as conn, self.model.bulk_load():
                xmin = conn.execute(SNAPSHOT_SQL).one()[0]
                for layout in self.layouts.values():
                    for rows in conn.execute(layout.load_query()).partitions():
                        total += self.load_rows(layout, rows, at)
        except FETCH_POISON as exc:
            log.warning("full load: a row could not be read (%s); finishing the load by key", plain(exc)[:REASON_CHARS])
            self.resync("full load")
            return
        self.save_position(Position(xmin))
        elapsed = time.monotonic() - started
        log.info("full load: %d rows in %.1f s (%.0f rows/s)", total, elapsed, total / max(elapsed, 1e-9))

    def load_rows(self, layout: Layout, rows: Sequence, at: str) -> int:
        """One chunk of the full load, written in its own transaction; returns rows written."""
        try:
            refused: dict
            records, refused = [layout.loaded_record(row, at) for row in rows], {}
        except Exception:  # rendering is pure: some row's fault, found row by row
            rendered, refused = render_each({row[layout.key_position]: row for row in rows}, lambda row: layout.loaded_record(row, at))
            records = list(rendered.values())
        unwritten: dict[str, Exception] = {}
        with self.model.transaction() as db:
            self.model.insert(db, layout, records, unwritten.__setitem__)
        for key, exc in (refused | unwritten).items():
            self.poison(layout.name, key, "full load", exc)
        return len(records) - len(unwritten)

    def resync(self, duty: str = "resync") -> None:
        """Bring every row in line with the replica without emptying anything (rows never vanish), walking
        keys in order on both sides; change capture then starts from before the walk."""
        xmin = snapshot_xmin(self.replica)
        for layout in self.layouts.values():
            key, after = layout.entry.key, ""
            while True:
                query = select(key).order_by(layout.entry.key_order).limit(self.tuning.chunk)
                with self.replica.connect() as conn:
                    ids = [
                        str(i) for i in conn.scalars(query.where(layout.entry.key_order > layout.entry.key_of(after)) if after else query)
                    ]
                upto = ids[-1] if len(ids) == self.tuning.chunk else None
                self.refresh(layout, sorted(set(ids) | set(self.model.keys_between(layout, after, upto))), duty=duty)
                if upto is None:
                    break
                after = upto
        self.save_position(Position(xmin))
        log.info("resync done; following changes from xid %d", xmin)

    def replay(self, since: datetime, until: datetime, tables: list[str]) -> Replayed:
        """Rewrite the rows of ``tables`` changed in ``[since, until)`` as the merged view shows them now.

        The repair for a file restored from a backup or hit by a publisher bug, without a full resync:
        keys come from the change capture (on the replica, as every read here), rows from :meth:`refresh`.
        Idempotent: a row already right is left alone. Each chunk holds the file's write lock from the
        replica read to the write, so a publisher running meanwhile cannot have a newer row overwritten.
        """
        keys, written, skipped = dict.fromkeys(tables, 0), dict.fromkeys(tables, 0), dict.fromkeys(tables, 0)
        params = {"since": since, "until": until, "tables": tables}
        with self.replica.connect().execution_options(yield_per=REPLAY_CHUNK) as conn:
            complete = not conn.execute(PURGED_SQL, params).scalar()
            for rows in conn.execute(REPLAY_SQL, params).partitions():
                for table, group in groupby(rows, key=lambda row: row[0]):
                    ids = [row[1] for row in group]
                    keys[table] += len(ids)
                    with self.model.transaction():
                        written[table] += self.refresh(self.layouts[table], ids, duty="replay")
                    skipped[table] += sum((table, key) in self.poisoned for key in ids)
        return Replayed(keys, written, skipped, complete)

    def purge(self) -> None:
        purged = purge_changes(self.primary, self.tuning.change_retention)  # type: ignore[arg-type]  # a duty only with a primary
        if purged:
            log.info("purged %d changes older than %s from the primary's change table", purged, self.tuning.change_retention)

    # --- metrics ----------------------------------------------------------------------------------

    def record_metrics(self) -> None:
        """One sample for the dashboards; what cannot be measured now (Redis or replica down) is NULL."""
        figures = dict.fromkeys(("buffer_depth", "oldest_buffered_age_s", "awaiting_replica", "dead_letters", "replica_lag_s"))
        with suppress(redis.RedisError):
            self.store_poison()
        read_model = read_model_figures(self.buffer, self.replica)
        figures |= {
            "poison_rows": len(self.poisoned),
            "poison_skipped": read_model.poison_skipped,
            "read_model_freshness_s": read_model.freshness_s,
        }
        with suppress(redis.RedisError):
            stats = buffer_stats(self.buffer.client, self.buffer)
            figures |= {
                "buffer_depth": stats.depth,
                "oldest_buffered_age_s": stats.oldest_age_s,
                "awaiting_replica": stats.awaiting_replica,
                "dead_letters": stats.dead_letters,
            }
        with suppress(DBAPIError), self.replica.connect() as conn:
            lag = conn.execute(LAG_SQL).scalar()
            figures["replica_lag_s"] = None if lag is None else float(lag)
        self.model.append_metrics(now_text(), figures, self.tuning.metrics_keep_days)
        listed = sorted(self.poisoned.values(), key=lambda p: p.at)[-POISON_KEEP:]
        self.model.store_poison((p.table, p.key, p.duty, p.reason, p.at) for p in listed)
        with suppress(redis.RedisError):
            self.record_drain()

    def load_poison(self) -> None:
        """Take over the rows a previous run skipped (they stay listed until they are published), once."""
        if self.poison_stored is None:
            self.poisoned = load_poison(self.buffer) | self.poisoned
            self.poison_stored = False

    def store_poison(self) -> None:
        """Our list of poison rows and the new skips into Redis, where the status, the page and /metrics read them."""
        self.load_poison()
        if self.poison_stored:
            return
        store_poison(self.buffer, self.poisoned, self.poison_new)
        self.poison_new, self.poison_stored = 0, True

    def record_drain(self) -> None:
        """The drainer's records applied per minute (the last hour: the current minute grows, a missed sample
        is filled in) and the alert findings the ``opsync_alerts`` DAG last stored: the figures Airflow shows."""
        rate = rate_per_minute(self.buffer.client, self.buffer, 60)
        at, findings = stored_findings(self.buffer)
        self.model.store_drain(
            [(utc_minute(minute), count) for minute, count in rate],
            [(f.figure, f.value, f.level, f.message, at) for f in findings],
            self.tuning.metrics_keep_days,
        )


@contextmanager
def single_writer(path: Path, stop: threading.Event) -> Iterator[bool]:
    """Hold an exclusive lock next to the file while publishing (two publishers would fight over rows);
    yields False when ``stop`` came first."""
    with open(path.with_name(path.name + ".publisher.lock"), "w") as lock:
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                log.warning("another publisher holds %s; waiting", lock.name)
                if stop.wait(5):
                    yield False
                    return
        yield True


def main() -> None:
    """``python -m opsync.read_model.publisher``: publish until SIGTERM or SIGINT."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    Publisher.from_settings(get_settings()).run(stop)


if __name__ == "__main__":
    main()
