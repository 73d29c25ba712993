"""``opsync backlog drain``: drain the site buffer into the primary from this terminal, with the DAG's functions."""

import json
import os
import signal
import socket
import threading
import time as clock
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import click
from pydantic import ValidationError
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text
from sqlalchemy import Engine

from opsync import connections
from opsync.apply import Transient
from opsync.buffer import Buffer
from opsync.buffer.figures import buffer_stats
from opsync.cli.common import INTERRUPTED, Unavailable, json_option, say
from opsync.cli.services import buffer_or_exit, database
from opsync.config import get_settings
from opsync.connections import Database
from opsync.drain import BatchLimits, BatchSettings, Confirmation, DrainSummary, confirm, confirm_replica, drain
from opsync.lsn import current_position

DRAIN_SLICE_S = 1.0  # budget of each drain run of `backlog drain`: progress shows, and Ctrl-C is honoured, this often
IDLE_WAIT_S = 0.2  # `backlog drain --follow` with nothing to claim: what is left awaits the replica or another drainer


@click.group("backlog")
def backlog_group() -> None:
    """The site buffer's backlog, drained from this terminal beside the Airflow DAG's drainer."""


@dataclass
class Drained:
    """What a `backlog drain` did, and what is left: its progress lines and final summary (``--json``)."""

    buffered: int = 0
    awaiting_replica: int = 0
    applied: int = 0
    duplicates: int = 0  # in the primary's ledger already: skipped
    dead_lettered: int = 0
    confirmed: int = 0  # marked replicated
    batches: int = 0

    @property
    def remaining(self) -> int:
        """Transactions not done yet: buffered, or committed and not yet readable from the replica."""
        return self.buffered + self.awaiting_replica

    def measure(self, buffer: Buffer) -> None:
        stats = buffer_stats(buffer.client, buffer)
        self.buffered, self.awaiting_replica = stats.depth, stats.awaiting_replica

    def add(self, run: DrainSummary) -> None:
        self.applied += run.applied
        self.duplicates += run.duplicates
        self.dead_lettered += run.dead_lettered
        self.batches += run.batches

    def as_json(self, event: str, rate: float | None, eta: float | None, elapsed: float) -> dict:
        return {
            "event": event,
            "remaining": self.remaining,
            "buffered": self.buffered,
            "awaiting_replica": self.awaiting_replica,
            "applied": self.applied,
            "duplicates": self.duplicates,
            "dead_lettered": self.dead_lettered,
            "confirmed": self.confirmed,
            "batches": self.batches,
            "rate_per_s": rate and round(rate, 1),
            "eta_s": eta,
            "elapsed_s": round(elapsed, 2),
        }

    def describe(self) -> str:
        return (
            f"{self.applied} applied, {self.duplicates} already applied (skipped), {self.dead_lettered} dead-lettered,"
            f" {self.confirmed} confirmed replicated in {self.batches} batches; {self.buffered} still buffered,"
            f" {self.awaiting_replica} await the replica"
        )


class RateColumn(ProgressColumn):
    """Transactions per second (rich's own speed column counts bytes)."""

    def render(self, task: Task) -> Text:
        return Text("? txn/s" if task.speed is None else f"{task.speed:,.0f} txn/s", style="progress.data.speed")


@dataclass
class Meter:
    """A backlog drain's progress: rich's bar on stderr, or JSON lines on stdout; the rate and ETA are rich's either way."""

    progress: Progress
    as_json: bool
    started: float = field(default_factory=clock.monotonic)
    task: TaskID | None = None

    def show(self, done: Drained, event: str) -> None:
        if self.task is None:
            self.task = self.progress.add_task("draining", total=done.remaining, remaining=done.remaining)
        state = self.progress.tasks[self.task]
        if done.remaining > state.total - state.completed:  # type: ignore[operator]  # add_task set it; arriving faster than draining: the total grows
            self.progress.update(self.task, total=state.completed + done.remaining, remaining=done.remaining)
        else:
            self.progress.update(self.task, completed=state.total - done.remaining, remaining=done.remaining)  # type: ignore[operator]  # as above
        if self.as_json:
            click.echo(json.dumps(done.as_json(event, state.speed, state.time_remaining, clock.monotonic() - self.started)))


@contextmanager
def backlog_meter(as_json: bool, bar: bool) -> Iterator[Meter]:
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[remaining]} remaining"),
        RateColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), disable=not bar) as progress:  # stderr: stdout is for data
        yield Meter(progress, as_json)


@contextmanager
def stop_on_ctrl_c() -> Iterator[threading.Event]:
    """The first Ctrl-C sets the event, so the loop stops between drain runs, never inside a batch; a second one
    interrupts at once (a batch cut short is redelivered, and the ledger skips what it had committed)."""
    stop = threading.Event()

    def first(*_) -> None:
        stop.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    previous = signal.signal(signal.SIGINT, first)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


@backlog_group.command("drain")
@click.option(
    "--follow", is_flag=True, help="Keep draining, and confirming against the replica, until nothing is buffered or awaits the replica."
)
@click.option(
    "--batch",
    type=click.IntRange(1, 100_000),
    help="Transactions per batch: one DB transaction each. [default: OPSYNC_DRAIN_BATCH_SIZE, as the DAG's]",
)
@click.option(
    "--batch-records",
    type=click.IntRange(min=1),
    help="A batch ends before the transaction that would pass this many records. [default: OPSYNC_DRAIN_BATCH_RECORDS, as the DAG's]",
)
@click.option(
    "--batch-bytes",
    type=click.IntRange(min=1),
    help="A batch ends before the transaction that would pass this many envelope bytes (a larger one goes"
    " alone, whole). [default: OPSYNC_DRAIN_BATCH_BYTES, as the DAG's]",
)
@json_option
def backlog_drain(follow: bool, batch: int | None, batch_records: int | None, batch_bytes: int | None, as_json: bool) -> None:
    """Drain the site buffer into the primary now, with the functions the opsync_drain DAG runs.

    Without --follow: until a batch comes back less than full (the buffer was empty). With
    --follow: until nothing is buffered or awaits the replica, showing what remains, the rate and
    the ETA (--json: a start line, a progress line a second, then a summary line). Ctrl-C stops
    between batches, exit 130: nothing is half-applied.
    """
    limits = batch_limits(batch, batch_records, batch_bytes)
    consumer = f"cli-{socket.gethostname()}-{os.getpid()}"  # its own claims: never re-read another drainer's
    done = Drained()
    with (
        buffer_or_exit() as buffer,
        database("replica") as replica_db,
        database("primary", autocommit=True) as primary_db,  # apply_batch's alone
        stop_on_ctrl_c() as stop,
        backlog_meter(as_json, bar=follow and not as_json) as meter,
    ):
        buffer.ensure_group()  # a new site may drain before its first DAG run
        done.measure(buffer)
        try:
            if follow:
                meter.show(done, "start")
                follow_backlog(buffer, primary_db, replica_db, limits, consumer, stop, done, meter)
            else:
                drain_backlog(buffer, primary_db, limits, consumer, stop, done)
        finally:
            buffer.forget_consumer(consumer)
        done.measure(buffer)
        meter.show(done, "interrupted" if stop.is_set() else "done")
    say(("Interrupted between batches: " if stop.is_set() else "") + done.describe())
    if stop.is_set():
        click.get_current_context().exit(INTERRUPTED)


def batch_limits(batch: int | None, records: int | None, size: int | None) -> BatchLimits:
    """The options given, the rest as the DAG has them (``OPSYNC_DRAIN_BATCH_*``, else the defaults); a bad variable
    is a usage error naming it."""
    try:
        configured = BatchSettings().limits()
    except ValidationError as exc:
        wrong = "; ".join(f"OPSYNC_DRAIN_{str(e['loc'][0]).upper()}: {e['msg']}" for e in exc.errors())
        raise click.UsageError(wrong) from None
    return BatchLimits(batch or configured.transactions, records or configured.records, size or configured.bytes)


def drain_backlog(buffer: Buffer, primary_db: Engine, limits: BatchLimits, consumer: str, stop: threading.Event, done: Drained) -> None:
    """Drain runs until one ends at a batch less than full (the buffer was empty), or Ctrl-C."""
    while not stop.is_set():
        if not drain_slice(buffer, primary_db, limits, consumer, done).budget_spent:
            return


def follow_backlog(
    buffer: Buffer,
    primary_db: Engine,
    replica_db: Engine,
    limits: BatchLimits,
    consumer: str,
    stop: threading.Event,
    done: Drained,
    meter: Meter,
) -> None:
    """Drain and confirm, showing progress after each drain run, until nothing remains or Ctrl-C."""
    while not stop.is_set():
        run = drain_slice(buffer, primary_db, limits, consumer, done)
        if done.awaiting_replica or run.batches:
            done.confirmed += readable(buffer, primary_db, replica_db).confirmed
        done.measure(buffer)
        if not done.remaining:
            return
        meter.show(done, "progress")
        if not run.batches:  # what is left awaits the replica, or is claimed by the DAG's drainer
            stop.wait(IDLE_WAIT_S)


def drain_slice(buffer: Buffer, primary_db: Engine, limits: BatchLimits, consumer: str, done: Drained) -> DrainSummary:
    """One drain run of about a second; a primary that cannot take a batch ends the command, losing nothing."""
    try:
        run = drain(
            buffer,
            primary_db,
            budget_s=DRAIN_SLICE_S,
            batch_size=limits.transactions,
            consumer=consumer,
            batch_records=limits.records,
            batch_bytes=limits.bytes,
        )
    except Transient as exc:
        depth = buffer_stats(buffer.client, buffer).depth
        raise Unavailable(f"{exc}; nothing lost: {depth} transactions stay buffered, run it again later") from None
    done.add(run)
    return run


def readable(buffer: Buffer, primary_db: Engine, replica_db: Engine) -> Confirmation:
    """Confirm what this site can read now: its replica's replay position; on the main site, the primary's own."""
    if connections.readable(get_settings()) is Database.primary:
        return confirm(buffer, current_position(primary_db))
    return confirm_replica(buffer, replica_db)
