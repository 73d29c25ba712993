"""Draining the site buffer into the primary, and confirming what the replica has replayed.

claim → apply → settle: entries are claimed through the stream's consumer group, applied in one
DB transaction per batch (:func:`opsync.apply.apply_batch`; a batch is bounded in transactions, records
and envelope bytes: :class:`BatchLimits`), and only then acknowledged, with
their new states, in atomic Redis steps of bounded size. A crash before or between them leaves the
rest claimed and redelivered; the ledger skips what had been committed. Committed transactions
then wait, scored by commit LSN, until :func:`confirm` sees the replica past them; any run may
confirm them, so nothing depends on one waiting sensor. Airflow tasks (and the CLI) call these
functions; they hold no Airflow knowledge. Every batch and every run is counted in Redis (:mod:`opsync.monitoring.drain_metrics`).
"""

import contextlib
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime

import redis
from pydantic import PositiveInt
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy import Engine

from opsync import fault_points
from opsync.apply import BatchResult, Pending, Transient, apply_batch
from opsync.buffer import CLAIM_PAGE, Buffer, Entry, Settlement
from opsync.buffer.codec import UnreadableEnvelope
from opsync.lsn import Lsn, ReplicaError, replica_position
from opsync.monitoring import drain_metrics
from opsync.registry import UnknownTable

UNREADABLE = "unreadable envelope"
DEPENDS = "depends on dead-lettered"  # how apply_batch words the failure of a transaction needing a dead one
CONFIRM_CHUNK = 1000  # transactions confirmed per pipelined round of status reads and CONFIRM calls
CONSUMER = "drainer"  # one logical drainer per site: a rerun picks up what a dead run had claimed
BATCH_SIZE = 4000  # transactions per batch: a round trip to the primary (200-500 ms) per batch bounds the rate
BATCH_RECORDS = 40_000  # records (steps) per batch: what one primary transaction and the drainer's memory hold
BATCH_BYTES = 32 * 1024 * 1024  # envelope bytes per batch: the same bound for records near the body limit
# The three chosen by bench-drain's sweep (README "Benchmarks"): twice these, both backlogs drained slower.


@dataclass(frozen=True)
class BatchLimits:
    """What one applied batch holds at most. A transaction alone over ``records`` or ``bytes`` is a batch of its
    own, whole: a transaction is never split (its steps commit together or not at all)."""

    transactions: int = BATCH_SIZE
    records: int = BATCH_RECORDS
    bytes: int = BATCH_BYTES


class BatchSettings(BaseSettings):
    """The configured :class:`BatchLimits` (``OPSYNC_DRAIN_BATCH_SIZE``, ``_RECORDS``, ``_BYTES``), read where there is
    no DAG to pass them: ``opsync backlog drain`` and the benchmarks drain with what the DAG drains with."""

    model_config = SettingsConfigDict(env_prefix="OPSYNC_DRAIN_", env_file=".env", extra="ignore")

    batch_size: PositiveInt = BATCH_SIZE
    batch_records: PositiveInt = BATCH_RECORDS
    batch_bytes: PositiveInt = BATCH_BYTES

    def limits(self) -> BatchLimits:
        return BatchLimits(self.batch_size, self.batch_records, self.batch_bytes)


@dataclass(frozen=True)
class BatchReport:
    entries: int
    applied: int
    duplicates: int  # in the ledger already (redelivered after a crash): skipped
    dead_lettered: int
    round_trips: int  # to the primary
    commit_lsn: Lsn | None


@dataclass
class DrainSummary:
    batches: int = 0
    applied: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    round_trips: int = 0
    reclaimed: int = 0  # entries taken over from consumers that died holding them
    confirmed: int = 0  # transactions marked replicated between batches (see drain's ``readable``)
    elapsed_s: float = 0.0
    max_commit_lsn: Lsn | None = None  # what the replica must replay for this run's work to be readable
    budget_spent: bool = False  # stopped by the time budget, not by a short batch: entries may be left for the next run

    def add(self, batch: BatchReport) -> None:
        self.batches += 1
        self.applied += batch.applied
        self.duplicates += batch.duplicates
        self.dead_lettered += batch.dead_lettered
        self.round_trips += batch.round_trips
        if batch.commit_lsn is not None:
            self.max_commit_lsn = max(self.max_commit_lsn or batch.commit_lsn, batch.commit_lsn)

    def describe(self) -> str:
        """One line for the task log: a run with nothing to do says so."""
        if not self.batches:
            return "nothing to drain: the buffer is empty"
        text = (
            f"{self.applied} applied, {self.duplicates} already applied (skipped), {self.dead_lettered} dead-lettered"
            f" in {self.batches} batches, {self.round_trips} round trips, {self.elapsed_s:.1f} s"
        )
        if self.confirmed:
            text += f"; {self.confirmed} confirmed replicated meanwhile"
        if self.max_commit_lsn is not None:
            text += f"; replica must reach {self.max_commit_lsn}"
        return text + ("; time budget spent, more may be buffered" if self.budget_spent else "")


def drain(
    buffer: Buffer,
    primary: Engine,
    budget_s: float = 60,
    batch_size: int = BATCH_SIZE,
    consumer: str = CONSUMER,
    timeout_s: float = 60,
    min_idle_ms: int = 60_000,
    readable: Callable[[], Lsn] | None = None,
    batch_records: int = BATCH_RECORDS,
    batch_bytes: int = BATCH_BYTES,
) -> DrainSummary:
    """Drain batch after batch until a claim comes back less than full (the buffer was empty) or ``budget_s`` is spent.

    A batch is ``batch_size`` transactions, or fewer where the next one would take it past
    ``batch_records`` records or ``batch_bytes`` envelope bytes (:class:`BatchLimits`); a batch cut
    there counts as full.

    Ending at the first short batch, rather than when a claim finds nothing, keeps a run short under
    steady ingest, so its work is confirmed at once; what arrived meanwhile is the next run's (the DAG
    runs every few seconds, and at once on a wake-up). The budget still bounds a backlog.

    While a batch's round trips to the primary are in flight, the next batch is claimed and decoded,
    and, given ``readable`` (how far this site can read now), up to a batch of earlier transactions
    the replica has passed is confirmed: a backlog is then ``replicated`` as it drains, not only
    after the run.

    Entries other consumers left idle for ``min_idle_ms`` are taken over first, so a crashed run's
    work is redone in stream order. Raises :class:`opsync.apply.Transient` when the primary
    cannot take a batch: nothing is lost or dead-lettered, the caller retries with backoff.
    The run is counted as succeeded or failed (with its error class) for the alert rules.
    """
    try:
        limits = BatchLimits(batch_size, batch_records, batch_bytes)
        summary = drain_run(buffer, primary, budget_s, limits, consumer, timeout_s, min_idle_ms, readable)
    except Exception as exc:
        with contextlib.suppress(redis.RedisError):  # the buffer's own failure cannot be counted in it
            drain_metrics.record_run(buffer, ok=False, error_class=run_error_class(exc))
        raise
    drain_metrics.record_run(buffer, ok=True)
    return summary


def drain_run(
    buffer: Buffer,
    primary: Engine,
    budget_s: float,
    limits: BatchLimits,
    consumer: str,
    timeout_s: float,
    min_idle_ms: int,
    readable: Callable[[], Lsn] | None = None,
) -> DrainSummary:
    """Batches in stream order, each applied while the next is claimed (two at most are held, one commits at a time).

    Batch N+1 is only claimed and decoded while batch N commits: its dead-row lookup and its apply
    wait for N's settle, so it sees N's dead letters and commits after N, as one batch after another
    would. A crash anywhere leaves both claimed: redelivered in order, the ledger skips what committed.
    """
    started = time.monotonic()
    buffer.ensure_group()
    summary = DrainSummary(reclaimed=buffer.reclaim(consumer, min_idle_ms))
    with ThreadPoolExecutor(1, thread_name_prefix="opsync-apply") as database:
        batch = claim_batch(buffer, consumer, limits)
        if batch is not None:
            fault_points.reach("after_claim")  # crash tests (tests/test_drain_crash.py); inert unless armed
        while batch is not None:
            committing = database.submit(commit_batch, buffer, primary, batch, timeout_s)
            summary.budget_spent = batch.full and time.monotonic() - started >= budget_s
            following = None
            if batch.full and not summary.budget_spent:
                following = claim_batch(buffer, consumer, limits, after=batch.entries[-1].stream_id)
                if following is not None:
                    fault_points.reach("next_claimed")  # batch N+1 claimed while batch N commits
            if readable is not None:
                confirmed = confirm_passed(buffer, readable, limits.transactions)
                if confirmed is None:
                    readable = None  # the replica cannot say how far it is: not asked again in this run
                summary.confirmed += confirmed or 0
            summary.add(settle_batch(buffer, batch, committing.result()))
            batch = following
    summary.elapsed_s = time.monotonic() - started
    buffer.note("drain", now())
    return summary


def drain_batch(
    buffer: Buffer,
    primary: Engine,
    consumer: str = CONSUMER,
    batch_size: int = BATCH_SIZE,
    timeout_s: float = 60,
    batch_records: int = BATCH_RECORDS,
    batch_bytes: int = BATCH_BYTES,
) -> BatchReport | None:
    """Claim, apply, settle one batch (within :class:`BatchLimits`); None when there was nothing to claim."""
    batch = claim_batch(buffer, consumer, BatchLimits(batch_size, batch_records, batch_bytes))
    if batch is None:
        return None
    return settle_batch(buffer, batch, commit_batch(buffer, primary, batch, timeout_s))


@dataclass
class Claimed:
    """A claimed batch, decoded: what will be applied, and the settlements already known (gone, unreadable)."""

    entries: list[Entry]
    txns: list[tuple[str, Pending]]
    settlements: list[Settlement]
    started: float  # when it was claimed: a batch's time runs from its claim to its settle
    full: bool = False  # it ended at a limit, not at the end of the stream: more may be waiting
    records: int = 0
    bytes: int = 0

    def fits(self, entry: Entry, decoded: Pending | Settlement, limits: BatchLimits) -> bool:
        """Whether ``entry`` may join; the first one always does, however large (a transaction is never split)."""
        if not self.entries:
            return True
        return self.records + records_of(decoded) <= limits.records and self.bytes + len(entry.envelope or b"") <= limits.bytes

    def add(self, entry: Entry, decoded: Pending | Settlement) -> None:
        self.entries.append(entry)
        self.records += records_of(decoded)
        self.bytes += len(entry.envelope or b"")
        if isinstance(decoded, Settlement):
            self.settlements.append(decoded)
        else:
            self.txns.append((entry.stream_id, decoded))


def claim_batch(buffer: Buffer, consumer: str, limits: BatchLimits, after: str = "0") -> Claimed | None:
    """Claim entries in stream order (``consumer``'s pending ones past ``after`` first) and decode them, up to
    ``limits``; None if none.

    Read a page at a time and stopped at the first entry over the records or bytes cap, so at most
    one page beyond the cap is read. What was read past the cut stays claimed by ``consumer``,
    pending after this batch's last entry: the next claim (``after`` it) reads it first, in order,
    and a run that ends before then leaves it to be redelivered, as a crash would.
    """
    batch = Claimed([], [], [], time.monotonic())
    while not batch.full:
        room = min(limits.transactions - len(batch.entries), limits.records - batch.records)
        if room <= 0 or batch.bytes >= limits.bytes:
            batch.full = True
            break
        want = min(CLAIM_PAGE, room)
        page = buffer.claim(consumer, want, after)
        txns, settlements = read_entries(page)
        decoded = dict(txns) | {s.stream_id: s for s in settlements}  # stream IDs are unique: back in stream order
        for entry in page:
            if not batch.fits(entry, decoded[entry.stream_id], limits):
                batch.full = True
                break
            batch.add(entry, decoded[entry.stream_id])
        if len(page) < want:
            break  # the stream has nothing more for now
        after = page[-1].stream_id
    return batch if batch.entries else None


def records_of(decoded: Pending | Settlement) -> int:
    return 0 if isinstance(decoded, Settlement) else len(decoded.steps)


def commit_batch(buffer: Buffer, primary: Engine, batch: Claimed, timeout_s: float) -> BatchResult:
    """One DB transaction for the batch; the rows it needs from earlier dead letters are looked up first."""
    if not batch.txns:
        return BatchResult()
    return apply_batch(primary, [txn for _, txn in batch.txns], dead_rows(buffer, batch.txns), timeout_s)


def settle_batch(buffer: Buffer, batch: Claimed, result: BatchResult) -> BatchReport:
    """Acknowledge the committed batch with each entry's outcome, in stream order, and count it."""
    fault_points.reach("after_commit")
    settlements = batch.settlements + outcomes(batch.txns, result)
    buffer.settle(sorted(settlements, key=lambda s: stream_order(s.stream_id)), result.commit_lsn, now())
    drain_metrics.record_batch(
        buffer,
        records=sum(len(t.steps) for t in result.applied),
        transactions=len(result.applied),
        seconds=time.monotonic() - batch.started,
        round_trips=result.round_trips,
        errors=batch_errors(settlements),
    )
    return BatchReport(
        entries=len(batch.entries),
        applied=len(result.applied),
        duplicates=len(result.duplicates),
        dead_lettered=sum(s.outcome == "failed" for s in settlements),
        round_trips=result.round_trips,
        commit_lsn=result.commit_lsn,
    )


def confirm_passed(buffer: Buffer, readable: Callable[[], Lsn], most: int) -> int | None:
    """Confirm up to ``most`` transactions the site can read now; None when its position is unknown (the DAG's
    confirm task, after its sensor, reports that): draining never waits for, or fails with, the replica."""
    try:
        position = readable()
    except ReplicaError:
        return None
    return confirm(buffer, position, chunk=min(most, CONFIRM_CHUNK), most=most).confirmed


def batch_errors(settlements: list[Settlement]) -> Counter[str]:
    """Dead-lettered entries by class: unreadable, needing a dead-lettered transaction, or refused by the primary."""
    return Counter(failure_class(s.reason) for s in settlements if s.outcome == "failed")


def failure_class(reason: str) -> str:
    if reason.startswith(UNREADABLE):
        return "unreadable"
    return "dependent" if reason.startswith(DEPENDS) else "poison"


def run_error_class(exc: Exception) -> str:
    if isinstance(exc, Transient):
        return "transient"
    return "redis" if isinstance(exc, redis.RedisError) else "other"


def read_entries(entries: list[Entry]) -> tuple[list[tuple[str, Pending]], list[Settlement]]:
    """Decode the envelopes; an entry deleted meanwhile is only acknowledged, an unreadable one dead-lettered.

    Only what applying needs is decoded, without the ingest model's validation: the API validated
    each envelope before buffering it, and the primary's constraints still judge every row.
    """
    txns, settlements = [], []
    for entry in entries:
        if entry.envelope is None:
            settlements.append(Settlement("gone", entry.stream_id))
            continue
        try:
            txns.append((entry.stream_id, Pending.read(entry.envelope)))
        except (UnreadableEnvelope, UnknownTable) as exc:
            settlements.append(Settlement("failed", entry.stream_id, reason=f"{UNREADABLE}: {exc}"))
    return txns, settlements


def dead_rows(buffer: Buffer, txns: list[tuple[str, Pending]]) -> dict[tuple[str, str], str]:
    """Rows the batch needs that earlier dead-lettered transactions would have created: one Redis round trip."""
    wanted = sorted({f"{table}:{key}" for _, txn in txns for table, key in txn.needs})
    return {tuple(row.split(":", 1)): owner for row, owner in buffer.dead_owners(wanted).items()}  # type: ignore[misc]  # "table:key"


def outcomes(txns: list[tuple[str, Pending]], result: BatchResult) -> list[Settlement]:
    """Each applied transaction's settlement, matched to its entry by identity (a txn_id may sit in two entries)."""
    stream_ids = {id(txn): stream_id for stream_id, txn in txns}
    settled = [Settlement("committed", stream_ids[id(t)], t.txn_id) for t in result.applied]
    settled += [Settlement("duplicate", stream_ids[id(t)], t.txn_id) for t in result.duplicates]
    for failed in result.failed:
        rows = tuple(sorted(f"{table}:{key}" for table, key in failed.missing))
        settled.append(Settlement("failed", stream_ids[id(failed.txn)], failed.txn.txn_id, failed.reason, rows))
    return settled


def stream_order(stream_id: str) -> tuple[int, int]:
    millis, _, seq = stream_id.partition("-")
    return int(millis), int(seq)


@dataclass(frozen=True)
class Confirmation:
    position: Lsn  # the replay position confirmed against
    confirmed: int  # transactions marked replicated by this call
    remaining: int  # still waiting for the replica


def confirm(buffer: Buffer, position: Lsn, chunk: int = CONFIRM_CHUNK, most: int | None = None) -> Confirmation:
    """Mark replicated every awaiting transaction committed at or before ``position`` (about ``most`` at most,
    in chunks of ``chunk``: the drain confirms a batch's worth between its batches).

    Idempotent and safe to run concurrently (the sensor path and the reconcile job): each
    transaction changes state in one atomic step that first takes it out of the awaiting set.
    On the main site, pass the primary's own position: what is committed there is readable there.
    """
    confirmed = 0
    while True:
        txn_ids = buffer.awaiting(position, chunk)
        statuses = buffer.statuses(txn_ids)
        due = [(t, (s or {}).get("stream_id", "")) for t, s in zip(txn_ids, statuses, strict=True) if passed(s, position)]
        confirmed += buffer.mark_replicated(due, now())
        if len(txn_ids) < chunk or not due or (most is not None and confirmed >= most):
            break
    buffer.note("confirm", now())
    return Confirmation(position, confirmed, buffer.awaiting_count())


def confirm_replica(buffer: Buffer, replica: Engine) -> Confirmation:
    """Confirm against the local replica's replay position; raises :class:`opsync.lsn.ReplicaError` when it is unknown."""
    return confirm(buffer, replica_position(replica))


def passed(status: dict[str, str] | None, position: Lsn) -> bool:
    """Compare with the commit LSN as recorded: the awaiting set's float score is exact only below 2**53."""
    if not status or not status.get("commit_lsn"):
        return True  # the score is all there is
    return Lsn.parse(status["commit_lsn"]) <= position


def now() -> str:
    return datetime.now(UTC).isoformat()
