"""``make soak``: the whole site under continuous writes and injected faults, then proof that nothing was lost.

The site comes up as ``make up`` brings it (in a temporary directory, on free ports), except that the
site and the replica reach the primary only through a :class:`~devstack.wan.WanProxy` this process
controls. Writer threads post through the public API with :class:`~opsync.client.OpsyncClient`
what the configured domain's :class:`Workload` (``Domain.workload``; the observatory's is
:mod:`opsync_observatory.workload`) scripts: batches of rows, transactions with dependent steps,
updates of rows that are likely still buffered, deletes, and a few transactions the primary must
refuse (valid at the site, a constraint violation in Cologne); the harness adds resubmissions of
earlier requests with their Idempotency-Key. It names no table or column of the domain: every 202 is
logged with the rows the workload says it must have left behind, compared by the columns the
workload names, keys and types read from the models; each update and delete is read back at once
through the API's merged view. Meanwhile :class:`~devstack.faults.Faults` kills, stops and cuts
things, every kind until it took effect.

Then the faults are healed, the site settles, and the log is checked against the primary, the
replica, the read model (its SQLite file), the API's merged pages, Datasette's JSON, the buffer
(Redis) and the status API. Progress goes to stderr; the last stdout line is one JSON object (see
README "Soak test"); the exit code is 1 when anything was lost, duplicated, stuck, stale or
undeleted, a valid transaction was dead-lettered, or a kind of fault never took effect.

    python -m devstack.soak --duration 300 --seed 42 --records 5000
"""

import argparse
import json
import os
import random
import shutil
import socket
import sqlite3
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from pkgutil import resolve_name
from typing import Any, Protocol

import httpx
import redis
from psycopg import sql
from rich.console import Console
from sqlalchemy import JSON, DateTime

from devstack.faults import BASE_RTT_S, KINDS, Faults
from devstack.local import LocalStack
from devstack.settings import StackSettings
from devstack.wan import WanProxy
from opsync import domain, registry
from opsync.buffer import Buffer
from opsync.client import ApiError, OpsyncClient, Receipt, Unavailable
from opsync.read_model.store import json_text, utc_text

# Shorter waits than production so that a few minutes settle everything a fault left behind. A task
# whose scheduler was killed is adopted by the next scheduler only at its orphan check (60 s under
# make up, 300 s by Airflow's default), then failed after the heartbeat timeout (120 s, default 300 s);
# until then its DAG run (one at a time) blocks the drain. Retries wait at most 20 s.
SOAK_SITE_ENV = {
    "AIRFLOW__SCHEDULER__ORPHANED_TASKS_CHECK_INTERVAL": "20",
    "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "30",
    "OPSYNC_DRAIN_MAX_RETRY_DELAY_S": "20",
    "OPSYNC_RECONCILE_INTERVAL_S": "20",
}
STATUS_CHUNK = 200  # transaction ids per status request: the URL stays well below server limits
WRITERS = 2
RECENT = 30  # requests a writer may resubmit
HARMS = (  # counts in the result that fail the run when not zero
    "lost",
    "duplicated",
    "stuck",
    "stale",
    "undeleted",
    "dead_lettered_valid",
    "read_mismatches",
    "refused",
    "unresolved",
)

console = Console(stderr=True, highlight=False, soft_wrap=True)
started_at = time.monotonic()


def say(message: str) -> None:
    console.print(f"[{time.monotonic() - started_at:6.1f}s] {message}", markup=False)


@dataclass
class Acks:
    """The harness's log of every 202: the rows each acknowledged write must leave, with their final values."""

    rows: dict[str, tuple[str, dict[str, Any]]] = field(default_factory=dict)  # id -> (table, expected values)
    deleted: dict[str, str] = field(default_factory=dict)  # id -> table: rows an acknowledged delete removed
    txns: dict[str, bool] = field(default_factory=dict)  # txn_id -> refused by the primary on purpose
    records: int = 0
    updates: int = 0
    deletes: int = 0
    resubmitted: int = 0
    in_flight: int = 0  # write requests sent and not answered yet (what a killed API or publisher has to deal with)
    read_mismatches: list[str] = field(default_factory=list)  # a merged read right after a write that did not show it
    reads_unanswered: int = 0  # such reads that got no answer (a fault): not checked
    replay_mismatches: list[str] = field(default_factory=list)  # a resubmission answered with another transaction
    refused: list[str] = field(default_factory=list)  # answers that should not have come (4xx, 500)
    unresolved: int = 0  # requests still unanswered when the harness gave up
    lock: threading.Lock = field(default_factory=threading.Lock)

    def created(self, receipt: Receipt, rows: list[tuple[str, dict[str, Any]]], invalid: bool = False) -> None:
        with self.lock:
            self.txns[str(receipt.txn_id)] = invalid
            if not invalid:
                for key, (table, expected) in zip(receipt.ids, rows, strict=True):
                    self.rows[str(key)] = (table, expected)
                self.records += len(rows)

    def updated(self, receipt: Receipt, key: str, changes: dict[str, Any]) -> None:
        with self.lock:
            self.txns[str(receipt.txn_id)] = False
            self.rows[key][1].update(changes)
            self.updates += 1

    def removed(self, receipt: Receipt, key: str) -> None:
        with self.lock:
            self.txns[str(receipt.txn_id)] = False
            self.deleted[key] = self.rows.pop(key)[0]
            self.deletes += 1

    def valid_txns(self) -> list[str]:
        return [txn for txn, invalid in self.txns.items() if not invalid]

    def invalid_txns(self) -> list[str]:
        return [txn for txn, invalid in self.txns.items() if invalid]


@dataclass
class Plan:
    seed: int
    quota: int  # records this writer acknowledges at least
    invalid: int  # transactions the primary must refuse
    write_until: float  # monotonic: stop starting writes once the quota is met
    give_up_at: float  # monotonic: stop retrying an unanswered request
    faults_done: threading.Event  # writes go on until the faults are done: each needs writes in flight


class Request(Protocol):
    """One create request of a workload: an :class:`~opsync.client.OpsyncClient` method (``records`` or
    ``transaction``) with its arguments, and ``acknowledged``, which takes the 202's receipt and returns the
    (table, final values of its checked columns) of every row it created, in the receipt's order."""

    method: str
    args: tuple
    acknowledged: Callable[[Receipt], list[tuple[str, dict[str, Any]]]]


class Script(Protocol):
    """One writer's share of a workload: the requests it makes, the rows it changes and deletes."""

    def batch(self) -> Request:
        """Rows of a buffered table without dependencies, in one request."""

    def transaction(self, invalid: bool) -> Request:
        """Dependent steps in one transaction; ``invalid``: one the site accepts and the primary must refuse."""

    def update(self) -> tuple[str, str, dict[str, Any]] | None:
        """(table, key, changes) of a row an acknowledged request created (better still buffered); None: none yet."""

    def delete(self) -> tuple[str, str] | None:
        """(table, key) of such a row of a deletable table, never offered again; None: none yet."""


class Workload(Protocol):
    """What a domain gives the soak (``Domain.workload``): the harness names no table or column of it."""

    checked: Mapping[str, tuple[str, ...]]  # per buffered table it writes, the columns compared everywhere

    def fixtures(self, client: OpsyncClient, tag: str) -> tuple[dict[str, str], list[Receipt]]:
        """The rows the writes refer to, written once before them, and their receipts."""

    def writer(self, index: int, seed: int, fixtures: dict[str, str], rng: random.Random) -> Script:
        """Writer ``index``'s script, drawing every choice from ``rng`` so that a seed replays."""


def domain_workload() -> Workload:
    """The configured domain's soak workload, loaded only here (production code never needs it)."""
    current = domain.current()
    if current.workload is None:
        raise SystemExit(f"domain {current.name!r} has no soak workload")
    return resolve_name(current.workload)


class Writer(threading.Thread):
    """One script writing continuously: batches, transactions, updates, deletes, resubmissions; paced to spread
    its quota. Each update and delete is read back at once through the API's merged view."""

    def __init__(self, index: int, api: str, token: str, script: Script, rng: random.Random, plan: Plan, acks: Acks) -> None:
        super().__init__(name=f"writer-{index}", daemon=True)
        self.index, self.api, self.token, self.script, self.rng, self.plan, self.acks = index, api, token, script, rng, plan, acks
        self.written = 0  # records acknowledged
        self.calls = 0
        self.sent: list[tuple[str, tuple, str, str]] = []  # recent (method, args, key, txn_id) to resubmit
        self.invalid_at = sorted(self.rng.randrange(plan.quota) for _ in range(plan.invalid))
        self.client: OpsyncClient | None = None
        self.reader: httpx.Client | None = None  # merged reads right after a write
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with (
                OpsyncClient(self.api, self.token, timeout=15, retries=6, backoff=0.25, max_backoff=4) as self.client,
                httpx.Client(base_url=self.api, headers={"Authorization": f"Bearer {self.token}"}, timeout=10) as self.reader,
            ):
                began = time.monotonic()
                rate = self.plan.quota / max(1.0, self.plan.write_until - began)
                while time.monotonic() < self.plan.write_until or self.written < self.plan.quota or not self.plan.faults_done.is_set():
                    if time.monotonic() > self.plan.give_up_at:
                        break
                    self.step()
                    time.sleep(max(0.0, self.written / rate - (time.monotonic() - began)))
        except BaseException as exc:  # reported by the harness: a writer must not die silently
            self.error = exc
            traceback.print_exc()

    def step(self) -> None:
        if self.invalid_at and self.written >= self.invalid_at[0]:
            self.invalid_at.pop(0)
            return self.create(self.script.transaction(invalid=True), invalid=True)
        op = self.rng.choices(["batch", "transaction", "update", "delete", "resubmit"], weights=[5, 3, 3, 2, 1])[0]
        if op == "update" and (change := self.script.update()):
            return self.update(*change)
        if op == "delete" and (gone := self.script.delete()):
            return self.delete(*gone)
        if op == "resubmit" and self.sent:
            return self.resubmit()
        return self.create(self.script.transaction(invalid=False) if op == "transaction" else self.script.batch())

    def create(self, request: Request, invalid: bool = False) -> None:
        """Send a create; log its rows once acknowledged (none for one the primary must refuse)."""
        receipt = self.call(request.method, *request.args)
        if receipt is None:
            return
        rows = [] if invalid else request.acknowledged(receipt)
        self.acks.created(receipt, rows, invalid=invalid)
        self.written += len(rows)

    def update(self, table: str, key: str, changes: dict[str, Any]) -> None:
        """Change a row (most still buffered, some already replicated): seen at once in the merged view."""
        if receipt := self.call("update", table, key, changes):
            self.acks.updated(receipt, key, changes)
            self.read_back(table, key, changes)

    def delete(self, table: str, key: str) -> None:
        """Delete a row (most still buffered): gone at once from the merged view, and for good."""
        if receipt := self.call("delete", table, key):
            self.acks.removed(receipt, key)
            self.read_back(table, key, None)

    def read_back(self, table: str, key: str, changes: dict[str, Any] | None) -> None:
        """The merged view right after a 202: the row with the changes, or (``None``) no row. One try: a fault
        that keeps the read from an answer is counted, not retried; a wrong answer is a mismatch."""
        try:
            response = self.reader.get(f"/v1/records/{table}/{key}")
        except httpx.HTTPError:
            response = None
        if response is None or response.status_code not in (200, 404):
            with self.acks.lock:
                self.acks.reads_unanswered += 1
            return
        seen = response.json() if response.status_code == 200 else None
        if (seen is None) != (changes is None) or (seen is not None and stale(table, changes, seen)):
            with self.acks.lock:
                self.acks.read_mismatches.append(f"{table} {key}: {changes or 'deleted'} read as {seen}")

    def resubmit(self) -> None:
        """Send an earlier request again with its Idempotency-Key: the answer must be the original's, nothing new written."""
        method, args, key, txn_id = self.rng.choice(self.sent)
        receipt = self.send(method, args, key)
        with self.acks.lock:
            self.acks.resubmitted += 1
            if receipt is not None and str(receipt.txn_id) != txn_id:
                self.acks.replay_mismatches.append(f"{key}: {txn_id} then {receipt.txn_id}")

    def call(self, method: str, *args) -> Receipt | None:
        self.calls += 1
        key = f"soak-{self.plan.seed}-w{self.index}-{self.calls}"
        receipt = self.send(method, args, key)
        if receipt is not None:
            self.sent = [*self.sent, (method, args, key, str(receipt.txn_id))][-RECENT:]
        return receipt

    def send(self, method: str, args: tuple, key: str) -> Receipt | None:
        """As a careful script does: on no answer, the same request with the same key again until it is answered."""
        while True:
            try:
                with self.open_request():
                    return getattr(self.client, method)(*args, idempotency_key=key)
            except Unavailable as exc:
                if time.monotonic() > self.plan.give_up_at:
                    with self.acks.lock:
                        self.acks.unresolved += 1
                    say(f"{self.name}: gave up on {method} ({key}): {exc}")
                    return None
                time.sleep(1)
            except ApiError as exc:
                with self.acks.lock:
                    self.acks.refused.append(f"{method} ({key}): {exc}")
                say(f"{self.name}: refused: {exc}")
                return None

    @contextmanager
    def open_request(self) -> Iterator[None]:
        """Counted while unanswered: the faults that need requests in flight wait for one."""
        with self.acks.lock:
            self.acks.in_flight += 1
        try:
            yield
        finally:
            with self.acks.lock:
                self.acks.in_flight -= 1


def json_form(value: Any) -> str:
    return json_text(json.loads(value) if isinstance(value, str) else value)


@cache
def forms(table: str) -> dict[str, Callable[[Any], Any]]:
    """Per time or JSON column of ``table`` (read from its model), what brings its values to one form."""
    columns = registry.get_table(table).table.columns
    return {c.name: utc_text if isinstance(c.type, DateTime) else json_form for c in columns if isinstance(c.type, DateTime | JSON)}


def canonical(table: str, column: str, value: Any) -> Any:
    """One form for a value from the log, PostgreSQL or the read model, so they compare equal when they are."""
    if value is None:
        return None
    if form := forms(table).get(column):
        return form(value)
    if isinstance(value, uuid.UUID):
        return str(value)
    return value


def stale(table: str, expected: dict[str, Any], actual: dict[str, Any]) -> bool:
    return any(canonical(table, c, v) != canonical(table, c, actual.get(c)) for c, v in expected.items())


def key_of(table: str) -> str:
    """The name of ``table``'s key column, read from its model."""
    return registry.get_table(table).key.name


def chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@dataclass
class Soak:
    stack: LocalStack
    wan: WanProxy
    seed: int
    duration_s: float
    records: int
    invalid: int
    settle_timeout_s: float
    fault_gap_s: tuple[float, float]
    workload: Workload
    acks: Acks = field(default_factory=Acks)

    @property
    def api(self) -> str:
        return f"http://{self.stack.settings.host}:{self.stack.settings.api_port}"

    @property
    def token(self) -> str:
        return self.stack.settings.secrets["demo_token"]

    def run(self) -> dict[str, Any]:
        up_started = time.monotonic()
        self.stack.up(say)
        self.wait_streaming_through_link()
        fixtures = self.fixtures()
        up_s = time.monotonic() - up_started
        faults = Faults(self.stack, self.wan, random.Random(f"{self.seed}/faults"), say, lambda: self.acks.in_flight)
        faults_done = threading.Event()
        write_started = time.monotonic()
        write_until = write_started + self.duration_s
        plan = Plan(
            self.seed,
            -(-self.records // WRITERS),
            -(-self.invalid // WRITERS),
            write_until,
            write_until + self.duration_s / 2 + self.settle_timeout_s,
            faults_done,
        )
        writers = [self.writer(i, fixtures, plan) for i in range(WRITERS)]
        say(f"writing {self.records} records for {self.duration_s:.0f} s with {WRITERS} writers, injecting faults")
        for writer in writers:
            writer.start()
        fault_error: list[BaseException] = []
        injector = threading.Thread(target=guarded(faults.schedule, fault_error, faults_done), args=(write_until, self.fault_gap_s))
        injector.start()
        ticks = 0
        while any(w.is_alive() for w in writers) or injector.is_alive():
            time.sleep(1)
            ticks += 1
            if ticks % 15 == 0:
                say(f"{self.acks.records} records acknowledged; faults so far {dict(faults.injected)}")
        errors = [repr(e) for e in fault_error] + [f"{w.name}: {w.error!r}" for w in writers if w.error]
        say("writes done; healing every fault and letting the site settle")
        settle_started = time.monotonic()
        write_s = settle_started - write_started
        faults.heal()
        settled = self.settle(settle_started + self.settle_timeout_s)
        settle_s = time.monotonic() - settle_started
        report = self.check()
        return {
            "seed": self.seed,
            "duration_s": self.duration_s,
            "acknowledged": self.acks.records,
            "transactions": len(self.acks.valid_txns()),
            "updates": self.acks.updates,
            "deletes": self.acks.deletes,
            "resubmitted": self.acks.resubmitted,
            "invalid_sent": len(self.acks.invalid_txns()),
            "faults": faults.counts(),
            "fault_kinds": sum(1 for c in faults.counts().values() if c["effective"]),
            **report,
            "refused": len(self.acks.refused),
            "unresolved": self.acks.unresolved,
            "errors": errors,
            "settled": settled,
            "settle_s": round(settle_s, 1),
            "up_s": round(up_s, 1),
            "write_s": round(write_s, 1),
        }

    def wait_streaming_through_link(self, timeout_s: float = 60) -> None:
        """The replica's WAL must cross the link too, or its faults would test nothing there."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self.stack.replica.connect() as conn:
                row = conn.execute("SELECT sender_port FROM pg_stat_wal_receiver WHERE status = 'streaming'").fetchone()
            if row and row[0] == self.wan.port:
                say(f"the replica streams through the link (port {self.wan.port})")
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the replica does not stream through the link on port {self.wan.port}: {row}")
            time.sleep(0.5)

    def writer(self, index: int, fixtures: dict[str, str], plan: Plan) -> Writer:
        """Writer ``index`` with its script of the workload, both drawing from one generator of the seed."""
        rng = random.Random(f"{self.seed}/writer/{index}")
        script = self.workload.writer(index, self.seed, fixtures, rng)
        return Writer(index, self.api, self.token, script, rng, plan, self.acks)

    def fixtures(self) -> dict[str, str]:
        """The workload's fixtures (the rows its writes refer to), their transactions logged as valid."""
        with OpsyncClient(self.api, self.token, retries=10, max_backoff=3) as client:
            fixtures, receipts = self.workload.fixtures(client, f"SOAK-{self.seed}")
        for receipt in receipts:
            self.acks.txns[str(receipt.txn_id)] = False
        return fixtures

    def settle(self, deadline: float) -> bool:
        """Wait until every acknowledged transaction is final, the read model shows every row replicated with
        its last values, and the buffer holds nothing; False when the deadline came first."""
        waiting = list(self.acks.txns)
        while True:
            waiting = [t for t, s in self.statuses(waiting).items() if (s or {}).get("state") not in ("replicated", "failed")]
            behind = self.read_model_behind() if not waiting else -1
            leftovers = self.buffer_leftovers() if behind == 0 else {}
            if not waiting and behind == 0 and not any(leftovers.values()):
                return True
            if time.monotonic() > deadline:
                return False
            say(
                f"settling: {len(waiting)} transactions not final"
                if waiting
                else f"settling: read model behind by {behind} rows, buffer holds {leftovers}"
            )
            time.sleep(3)

    def statuses(self, txn_ids: list[str]) -> dict[str, dict | None]:
        """States from the public status API, many per request; transport failures just mean: not known yet."""
        found: dict[str, dict | None] = {}
        with httpx.Client(base_url=self.api, headers={"Authorization": f"Bearer {self.token}"}, timeout=15) as http:
            for chunk in chunks(txn_ids, STATUS_CHUNK):
                try:
                    response = http.get("/v1/transactions", params={"ids": ",".join(chunk)})
                    response.raise_for_status()
                    found.update(response.json())
                except httpx.HTTPError as exc:
                    say(f"status API: {exc!r}")
                    found.update(dict.fromkeys(chunk))
        return found

    def read_model_rows(self) -> dict[str, dict[str, Any]]:
        """The read model's rows of every acknowledged record, deleted ones too, by id: state and checked columns."""
        found: dict[str, dict[str, Any]] = {}
        by_table: dict[str, list[str]] = {}
        with self.acks.lock:
            tables = [*((key, table) for key, (table, _) in self.acks.rows.items()), *self.acks.deleted.items()]
        for key, table in tables:
            by_table.setdefault(table, []).append(key)
        with sqlite3.connect(f"file:{self.stack.read_model_path}?mode=ro", uri=True, timeout=10) as db:
            for table, keys in by_table.items():
                columns = (key_of(table), "_sync_state", *self.workload.checked[table])
                listed = ", ".join(f'"{column}"' for column in columns)
                for chunk in chunks(keys, 500):
                    query = f'SELECT {listed} FROM "{table}" WHERE "{columns[0]}" IN ({", ".join("?" * len(chunk))})'
                    found.update({row[0]: dict(zip(columns, row, strict=True)) for row in db.execute(query, chunk)})
        return found

    def read_model_behind(self) -> int:
        """Acknowledged rows the read model does not yet show as replicated with their last values, or still shows deleted."""
        try:
            rows = self.read_model_rows()
        except sqlite3.Error as exc:
            say(f"read model: {exc}")
            return len(self.acks.rows)
        return sum(
            1
            for key, (table, expected) in self.acks.rows.items()
            if (row := rows.get(key)) is None or row["_sync_state"] != "replicated" or stale(table, expected, row)
        ) + sum(1 for key in self.acks.deleted if key in rows)

    def api_rows(self) -> dict[str, dict[str, Any]]:
        """Every row of the buffered tables as the API's merged view pages them (``GET /v1/records/{table}``), by id."""
        found: dict[str, dict[str, Any]] = {}
        with httpx.Client(base_url=self.api, headers={"Authorization": f"Bearer {self.token}"}, timeout=30) as http:
            for table in self.workload.checked:
                key, after = key_of(table), None
                while True:
                    response = http.get(f"/v1/records/{table}", params={"limit": 1000, **({"after": after} if after else {})})
                    response.raise_for_status()
                    page = response.json()
                    found.update((str(row[key]), row) for row in page["rows"])
                    if not (after := page["next"]):
                        break
        return found

    def datasette_rows(self) -> dict[str, dict[str, Any]]:
        """Every row of the buffered tables as Datasette's JSON API pages them (``/opsync/{table}.json``), by id.

        Paged in key order (``_sort`` on the key): under a table's default sort on a column with ties (two
        writers' rows sharing a time) Datasette 0.65.5 orders its first page without the key as tie-break,
        so a row at the page boundary can be skipped."""
        found: dict[str, dict[str, Any]] = {}
        base = f"http://{self.stack.settings.host}:{self.stack.settings.datasette_port}"
        with httpx.Client(timeout=30) as http:
            for table in self.workload.checked:
                key = key_of(table)
                url: str | None = f"{base}/{self.stack.read_model_path.stem}/{table}.json?_shape=objects&_size=max&_sort={key}"
                while url:
                    response = http.get(url)
                    response.raise_for_status()
                    page = response.json()
                    found.update((str(row[key]), row) for row in page["rows"])
                    url = page.get("next_url")
        return found

    def buffer(self) -> Buffer:
        return Buffer(redis.Redis.from_url(self.stack.redis.url, socket_timeout=10))

    def buffer_leftovers(self) -> dict[str, int]:
        """What the buffer still holds once all is replicated: nothing, in any of these."""
        buffer = self.buffer()
        try:
            return {
                "stream": buffer.depth(),
                "pending": buffer.client.xpending(buffer.stream, buffer.group)["pending"],
                "unsent": int(buffer.client.get(buffer.unsent) or 0),
                "awaiting_replica": buffer.client.zcard(buffer.awaiting_replica),
            }
        except redis.RedisError as exc:
            say(f"buffer: {exc!r}")
            return {"unreachable": 1}
        finally:
            buffer.client.close()

    def database_rows(self, server) -> dict[str, dict[str, Any]]:
        """Every row of the buffered tables in one database (the whole run's: the site is new), by id."""
        found: dict[str, dict[str, Any]] = {}
        with server.connect() as conn:
            for table, checked in self.workload.checked.items():
                columns = (key_of(table), *checked)
                query = sql.SQL("SELECT {} FROM {}").format(sql.SQL(", ").join(map(sql.Identifier, columns)), sql.Identifier(table))
                for row in conn.execute(query):
                    found[str(row[0])] = {"table": table, **dict(zip(columns[1:], row[1:], strict=True))}
        return found

    def readers_rows(self) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
        """The rows as the API and Datasette serve them; a reader that does not answer shows none (all lost)."""
        found = []
        for name, rows in (("API", self.api_rows), ("Datasette", self.datasette_rows)):
            try:
                found.append(rows())
            except (httpx.HTTPError, KeyError, ValueError) as exc:
                say(f"{name} rows unreadable: {exc!r}")
                found.append({})
        return found[0], found[1]

    def ledger(self) -> list[str]:
        with self.stack.primary.connect() as conn:
            return [str(row[0]) for row in conn.execute("SELECT txn_id FROM sync_ledger")]

    def check(self) -> dict[str, Any]:
        """Every acknowledged record once in the primary, in the replica, replicated in the read model, the API
        and Datasette, with its last update; every deleted one nowhere; every transaction final as expected
        (no valid one dead-lettered); nothing left in the buffer; no second row anywhere."""
        expected, deleted = dict(self.acks.rows), set(self.acks.deleted)
        primary, replica = self.database_rows(self.stack.primary), self.database_rows(self.stack.replica)
        try:
            model = self.read_model_rows()
        except sqlite3.Error as exc:  # counted below: every row then is not replicated in the read model
            say(f"read model unreadable: {exc}")
            model = {}
        api, datasette = self.readers_rows()
        statuses = self.statuses(list(self.acks.txns))
        missing_primary = {k for k in expected if k not in primary}
        missing_replica = {k for k in expected if k not in replica}
        not_replicated = {k for k in expected if (model.get(k) or {}).get("_sync_state") != "replicated"}
        missing_api = {k for k in expected if (api.get(k) or {}).get("_sync_state") != "replicated"}
        missing_datasette = {k for k in expected if (datasette.get(k) or {}).get("_sync_state") != "replicated"}
        stale_rows = {
            k
            for k, (table, values) in expected.items()
            if any(k in rows and stale(table, values, rows[k]) for rows in (primary, replica, model, api, datasette))
        }
        undeleted = {k for k in deleted if any(k in rows for rows in (primary, replica, model, api, datasette))}
        acked = set(self.acks.txns)
        extra_rows = [k for k in primary if k not in expected and k not in deleted]
        unacked_ledger = [t for t in self.ledger() if t not in acked]
        state = {t: (s or {}).get("state") for t, s in statuses.items()}
        invalid = set(self.acks.invalid_txns())
        not_final = [t for t in self.acks.valid_txns() if state.get(t) != "replicated" and state.get(t) != "failed"]
        valid_failed = [t for t in self.acks.valid_txns() if state.get(t) == "failed"]
        invalid_not_failed = [t for t in invalid if state.get(t) != "failed"]
        leftovers = self.buffer_leftovers()
        buffer = self.buffer()
        try:
            dead = [e[1].get(b"txn_id", b"").decode() for e in buffer.client.xrange(buffer.dead_letters)]
        finally:
            buffer.client.close()
        dead_valid = {t for t in dead if t not in invalid} | set(valid_failed)
        details = {
            "missing_primary": len(missing_primary),
            "missing_replica": len(missing_replica),
            "read_model_not_replicated": len(not_replicated),
            "api_not_replicated": len(missing_api),
            "datasette_not_replicated": len(missing_datasette),
            "valid_failed": len(valid_failed),
            "extra_rows": len(extra_rows),
            "unacknowledged_ledger_txns": len(unacked_ledger),
            "replay_mismatches": len(self.acks.replay_mismatches),
            "not_final": len(not_final),
            "invalid_not_failed": len(invalid_not_failed),
            "buffer": leftovers,
            "unexpected_dead_letters": len([t for t in dead if t not in invalid]),
        }
        for name, sample in (
            ("missing in the primary", missing_primary),
            ("missing in the replica", missing_replica),
            ("not replicated in the read model", not_replicated),
            ("not replicated in the API's merged view", missing_api),
            ("not replicated in Datasette's JSON", missing_datasette),
            ("stale", stale_rows),
            ("extra rows", extra_rows),
            ("deleted but still there", undeleted),
            ("valid but dead-lettered", dead_valid),
            ("merged reads after a write that did not show it", self.acks.read_mismatches),
            ("not final", not_final),
            ("valid but failed", valid_failed),
            ("refused", self.acks.refused),
            ("replay mismatches", self.acks.replay_mismatches),
        ):
            if sample:
                say(f"{name}: {len(sample)}, e.g. {sorted(sample)[:5]}")
        return {
            "invalid_failed": len(invalid) - len(invalid_not_failed),
            "lost": len(missing_primary | missing_replica | not_replicated | missing_api | missing_datasette),
            "duplicated": len(extra_rows) + len(unacked_ledger) + len(self.acks.replay_mismatches),
            "stuck": len(not_final) + len(invalid_not_failed) + sum(leftovers.values()),
            "stale": len(stale_rows),
            "undeleted": len(undeleted),
            "dead_lettered_valid": len(dead_valid),
            "read_mismatches": len(self.acks.read_mismatches),
            "reads_unanswered": self.acks.reads_unanswered,
            "details": details,
        }


def guarded(target: Callable, errors: list[BaseException], done: threading.Event) -> Callable:
    """``target`` for a thread, its exception kept for the report instead of lost in the thread; ``done`` set after."""

    def run(*args) -> None:
        try:
            target(*args)
        except BaseException as exc:
            errors.append(exc)
            traceback.print_exc()
        finally:
            done.set()

    return run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def airflow_port() -> int:
    """A free port whose next two are free too: Airflow's log servers listen there (see ``airflow_env``)."""
    while True:
        port = free_port()
        try:
            for offset in (1, 2):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port + offset))
            return port
        except OSError:
            continue


def failures(result: dict[str, Any]) -> list[str]:
    """Why the run failed (none: it passed): a count of harm, an error, no settling, or a kind of fault that
    never took effect (then the run proved nothing about it)."""
    found = [f"{name}: {result[name]}" for name in HARMS if result[name]]
    found += [
        f"{kind}: no effect in {result['faults'].get(kind, {}).get('injected', 0)} injections"
        for kind in KINDS
        if not result["faults"].get(kind, {}).get("effective")
    ]
    found += [f"error: {error}" for error in result["errors"]]
    return found if result["settled"] else [*found, f"not settled within {result['settle_s']} s"]


def parse_gap(value: str) -> tuple[float, float]:
    low, _, high = value.partition(",")
    return float(low), float(high or low)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devstack.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=300, help="seconds of writes and faults (default 300)")
    parser.add_argument("--seed", type=int, default=None, help="replays a run; default: a random one, printed")
    parser.add_argument("--records", type=int, default=5000, help="records to acknowledge at least (default 5000)")
    parser.add_argument("--invalid", type=int, default=4, help="transactions the primary must refuse (default 4)")
    parser.add_argument("--settle-timeout", type=float, default=300, help="seconds to wait for the site to settle")
    parser.add_argument("--fault-gap", type=parse_gap, default=(1.0, 10.0), help="MIN,MAX seconds between faults")
    parser.add_argument("--keep", action="store_true", help="keep the run directory (logs, databases) afterwards")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(10**6)
    workload = domain_workload()
    for name, value in SOAK_SITE_ENV.items():
        os.environ.setdefault(name, value)

    run_dir = Path(tempfile.mkdtemp(prefix="opsync-soak-"))
    run_dir.chmod(0o755)  # PostgreSQL's unprivileged user must traverse it
    say(f"soak seed {seed} (replay: python -m devstack.soak --seed {seed} ...); site in {run_dir}")
    primary_port = free_port()
    wan = WanProxy("127.0.0.1", primary_port, delay_s=BASE_RTT_S / 2)
    wan.start()
    settings = StackSettings(
        run_dir=run_dir,
        primary_port=primary_port,
        replica_port=free_port(),
        redis_port=free_port(),
        api_port=free_port(),
        datasette_port=free_port(),
        airflow_port=airflow_port(),
        primary_link_port=wan.port,
        api_workers=1,
    )
    stack = LocalStack(settings)
    soak = Soak(stack, wan, seed, args.duration, args.records, args.invalid, args.settle_timeout, args.fault_gap, workload)
    try:
        result = soak.run()
    finally:
        try:
            stack.down(say)
        finally:
            wan.stop()
            if args.keep:
                say(f"run directory kept: {run_dir}")
            else:
                shutil.rmtree(run_dir, ignore_errors=True)
    result["failures"] = failures(result)
    print(json.dumps(result), flush=True)
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
