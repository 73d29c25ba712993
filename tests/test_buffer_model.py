"""Model-based test of the site buffer and the drain: any sequence of enqueues, claims, crashes,
redeliveries, drains and requeues leaves the primary holding exactly what a simple model says.

Hypothesis drives the real :class:`opsync.buffer.Buffer` on the test Redis (a fresh key prefix per
example) and the real :mod:`opsync.drain` / :func:`opsync.apply.apply_batch` on the test primary
(rows tagged per example). The model is a few dicts: the stream as an ordered list of entries and
who holds each, the primary's rows, the ledger, the dead letters and the rows they would have
created. It applies a batch as the drainer's SQL does: everything at once when it can, else halved
down to the transactions at fault, with inserts between two other changes grouped parent table first
(so within one batch a file may arrive before its observation; stream order otherwise). More
examples on demand: ``OPSYNC_MODEL_EXAMPLES`` (default 100) and ``OPSYNC_MODEL_STEPS`` (steps per
example, default 30).
"""

import os
import uuid
from dataclasses import dataclass, field

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test
from sqlalchemy import text

from opsync import dlq, drain
from opsync.apply import apply_batch
from opsync.buffer import Buffer
from opsync.envelope import Op, State
from opsync.ids import new_id
from opsync.ingest import StepIn, answer, build_transaction

EXAMPLES = int(os.environ.get("OPSYNC_MODEL_EXAMPLES", "100"))
STEPS = int(os.environ.get("OPSYNC_MODEL_STEPS", "30"))
NEVER_IDLE_MS = 3_600_000  # a normal drain run takes over nobody's entries
SHA = "ab" * 32
STATUSES = ("running", "completed", "failed", "aborted")
OBS, FILE = "executed_obs_unit", "raw_data_file"
WORKERS = ("worker-1", "worker-2")  # consumers that claim and die


@dataclass(frozen=True)
class Txn:
    """A transaction as the model sees it: steps are ("obs", key, unit, status, v), ("update", key, status, v),
    ("file", key, obs_key, path) or ("delete", key)."""

    txn_id: str
    steps: tuple[tuple, ...]
    needs: frozenset[tuple[str, str]]  # rows of other transactions it changes or refers to
    creates: frozenset[tuple[str, str]]


@dataclass
class Entry:
    txn: Txn
    holder: str | None = None  # the consumer that claimed it and has not acknowledged it


@dataclass
class Dead:
    txn: Txn
    depends_on: str | None  # the dead-lettered transaction it failed for, if that was its only fault


@dataclass
class Model:
    units: set[str]  # obs_unit rows in the primary
    stream: list[Entry] = field(default_factory=list)  # unacknowledged entries, in stream order
    obs: dict[str, tuple[str, int]] = field(default_factory=dict)  # key -> (status, v)
    files: dict[str, tuple[str, str]] = field(default_factory=dict)  # key -> (observation, path)
    ledger: set[str] = field(default_factory=set)
    dead: list[Dead] = field(default_factory=list)  # the dead-letter stream, in order
    dead_rows: dict[tuple[str, str], str] = field(default_factory=dict)  # row -> dead txn that would create it
    committed: set[str] = field(default_factory=set)  # settled as committed

    def claim(self, consumer: str, count: int) -> list[Entry]:
        """As :meth:`Buffer.claim`: the consumer's own unacknowledged entries first, then undelivered ones."""
        batch = [e for e in self.stream if e.holder == consumer][:count]
        batch += [e for e in self.stream if e.holder is None][: count - len(batch)]
        for entry in batch:
            entry.holder = consumer
        return batch

    def apply(self, entries: list[Entry], settle: bool) -> None:
        """One batch as :class:`opsync.apply.Batch` runs it: what the ledger has is skipped, what needs a row
        of a dead letter fails naming it, the rest is tried at once and, if that fails, halved down to the
        transactions at fault. Without ``settle`` the run died after its commit."""
        dead_rows, failed = dict(self.dead_rows), {}

        def fail(txn: Txn, owner: str | None) -> None:
            failed[txn.txn_id] = Dead(txn, owner)
            dead_rows.update(dict.fromkeys(txn.creates, txn.txn_id))

        def without_dependants(txns: list[Txn]) -> list[Txn]:
            kept = []
            for txn in txns:
                owner = next((dead_rows[row] for row in sorted(txn.needs) if row in dead_rows), None)
                if owner is None:
                    kept.append(txn)
                else:
                    fail(txn, owner)
            return kept

        def bisect(txns: list[Txn]) -> None:
            txns = without_dependants(txns)
            if not txns or self.attempt(txns):
                return
            if len(txns) == 1:
                fail(txns[0], None)
                return
            bisect(txns[: len(txns) // 2])
            bisect(txns[len(txns) // 2 :])

        bisect([e.txn for e in entries if e.txn.txn_id not in self.ledger])
        if not settle:
            return
        gone = {id(e) for e in entries}
        self.stream = [e for e in self.stream if id(e) not in gone]
        self.dead += [failed[e.txn.txn_id] for e in entries if e.txn.txn_id in failed]
        self.dead_rows = dead_rows
        self.committed |= {e.txn.txn_id for e in entries} - set(failed)

    def attempt(self, txns: list[Txn]) -> bool:
        """All of ``txns`` or nothing, as their SQL runs (:func:`opsync.apply.statements`): inserts between two
        other changes go together, parent table first, so a file inserted before its observation in stream
        order still finds it when both are in one attempt; updates and deletes apply in order."""
        obs, files = dict(self.obs), dict(self.files)
        inserts: list[tuple] = []

        def flush() -> bool:
            for step in sorted(inserts, key=lambda s: s[0] != "obs"):  # stable: stream order within a table
                kind, key = step[:2]
                if kind == "obs" and (step[2] not in self.units or key in obs):
                    return False
                if kind == "file" and (step[2] not in obs or key in files):
                    return False
                (obs if kind == "obs" else files)[key] = step[3:] if kind == "obs" else step[2:]
            inserts.clear()
            return True

        for step in (step for txn in txns for step in txn.steps):
            kind, key = step[:2]
            if kind in ("obs", "file"):
                inserts.append(step)
                continue
            if not flush():
                return False
            if key not in (obs if kind == "update" else files):
                return False
            if kind == "update":
                obs[key] = step[2:]
            else:
                del files[key]
        if not flush():
            return False
        self.obs, self.files = obs, files
        self.ledger |= {txn.txn_id for txn in txns}
        return True

    def requeue(self, txn_id: str) -> list[str]:
        """As :func:`opsync.dlq.requeue`: the letter, then, in one pass in dead-letter order, those that failed
        for it or for one of them."""
        names, moved = {txn_id}, [next(letter for letter in self.dead if letter.txn.txn_id == txn_id)]
        for letter in self.dead:
            if letter.txn.txn_id != txn_id and letter.depends_on in names:
                names.add(letter.txn.txn_id)
                moved.append(letter)
        for letter in moved:
            self.dead.remove(letter)
            self.stream.append(Entry(letter.txn))
            for row in letter.txn.creates:
                if self.dead_rows.get(row) == letter.txn.txn_id:
                    del self.dead_rows[row]
        return [letter.txn.txn_id for letter in moved]


def dependencies(steps: tuple[tuple, ...]) -> tuple[frozenset, frozenset]:
    created = {(OBS if s[0] == "obs" else FILE, s[1]) for s in steps if s[0] in ("obs", "file")}
    needed = set()
    for step in steps:
        if step[0] == "update":
            needed.add((OBS, step[1]))
        elif step[0] == "delete":
            needed.add((FILE, step[1]))
        elif step[0] == "file":
            needed.add((OBS, step[2]))
    return frozenset(needed - created), frozenset(created)


class BufferMachine(RuleBasedStateMachine):
    def __init__(self, redis_client, primary, planning):
        super().__init__()
        self.primary = primary
        self.module = str(planning["module"])
        self.tag = uuid.uuid4().hex
        self.buffer = Buffer(redis_client, prefix=f"model-{self.tag}")
        self.buffer.ensure_group()
        self.model = Model(units={str(planning["obs_unit"])})
        self.obs_keys: list[str] = []  # every observation ever enqueued, applied or not
        self.file_keys: list[str] = []
        self.missing_units: list[str] = []  # referenced by poison observations, not in the primary (yet)

    # --- enqueue ----------------------------------------------------------------------------------

    def enqueue(self, steps: list[tuple]) -> None:
        txn = build_transaction([self.step_in(s) for s in steps], "model")
        enqueued = self.buffer.enqueue(txn, answer(txn, State.accepted))
        assert enqueued.response["state"] == "accepted" and not enqueued.replayed
        self.model.stream.append(Entry(Txn(str(txn.txn_id), tuple(steps), *dependencies(tuple(steps)))))

    def step_in(self, step: tuple) -> StepIn:
        kind, key = step[:2]
        if kind == "obs":
            return StepIn(
                table=OBS,
                id=key,
                values={
                    "obs_unit_id": step[2],
                    "instrument_module_id": self.module,
                    "start_time": "2026-11-21T03:00:00Z",
                    "status": step[3],
                    "metadata": {"tag": self.tag, "v": step[4]},
                },
            )
        if kind == "update":
            return StepIn(op=Op.update, table=OBS, id=key, values={"status": step[2], "metadata": {"tag": self.tag, "v": step[3]}})
        if kind == "file":
            return StepIn(
                table=FILE,
                id=key,
                values={"executed_obs_unit_id": step[2], "path": step[3], "size_bytes": 1, "checksum_sha256": SHA, "file_type": "fits"},
            )
        return StepIn(op=Op.delete, table=FILE, id=key)

    def new_file(self, obs_key: str) -> tuple:
        key = str(new_id())
        self.file_keys.append(key)
        return ("file", key, obs_key, f"/model/{self.tag}/{key}.fits")

    @rule(files=st.integers(0, 2), poison=st.integers(0, 4).map(lambda n: n == 0))
    def observation(self, files, poison):
        """A new observation with its files in one transaction; a poison one names an obs_unit the primary lacks."""
        unit = next(iter(self.model.units))
        if poison:
            unit = str(uuid.uuid4())
            self.missing_units.append(unit)
        key = str(new_id())
        self.obs_keys.append(key)
        self.enqueue([("obs", key, unit, "running", 0), *(self.new_file(key) for _ in range(files))])

    @precondition(lambda self: self.obs_keys)
    @rule(data=st.data(), status=st.sampled_from(STATUSES), v=st.integers(1, 1000))
    def update(self, data, status, v):
        """An update of any observation: applied, still buffered, held by a dead consumer or dead-lettered."""
        self.enqueue([("update", data.draw(st.sampled_from(self.obs_keys)), status, v)])

    @precondition(lambda self: self.obs_keys)
    @rule(data=st.data())
    def file_of_earlier_observation(self, data):
        self.enqueue([self.new_file(data.draw(st.sampled_from(self.obs_keys)))])

    @precondition(lambda self: self.file_keys)
    @rule(data=st.data())
    def delete_file(self, data):
        self.enqueue([("delete", data.draw(st.sampled_from(self.file_keys)))])

    # --- the drainer's side -----------------------------------------------------------------------

    def waiting(self, *holders: str | None) -> bool:
        """Whether an entry is unacknowledged and held by one of ``holders`` (None: not delivered yet)."""
        return any(entry.holder in holders for entry in self.model.stream)

    @precondition(lambda self: self.waiting(None))
    @rule(worker=st.sampled_from(WORKERS), count=st.integers(1, 4))
    def claim_and_die(self, worker, count):
        """Another consumer claims entries and dies: they stay pending, held by it, until taken over."""
        expected = self.model.claim(worker, count)
        assert len(self.buffer.claim(worker, count)) == len(expected)

    @precondition(lambda self: self.waiting(None))
    @rule(count=st.integers(1, 4))
    def crash_before_commit(self, count):
        """The drainer claims and dies before the primary commits: its next run starts with these."""
        assert len(self.buffer.claim(drain.CONSUMER, count)) == len(self.model.claim(drain.CONSUMER, count))

    @precondition(lambda self: self.waiting(None, drain.CONSUMER))
    @rule(count=st.integers(1, 6))
    def crash_after_commit(self, count):
        """The drainer commits a batch and dies before acknowledging it: the ledger must skip it next time."""
        entries = self.buffer.claim(drain.CONSUMER, count)
        expected = self.model.claim(drain.CONSUMER, count)
        assert len(entries) == len(expected)
        txns, _ = drain.read_entries(entries)
        if txns:
            apply_batch(self.primary, [t for _, t in txns], drain.dead_rows(self.buffer, txns))
        self.model.apply(expected, settle=False)

    @precondition(lambda self: self.waiting(None, drain.CONSUMER))
    @rule(batch_size=st.integers(1, 8))
    def drain_run(self, batch_size):
        """A normal run (apply + ack): takes over no one, batch after batch until a short one."""
        self.run_drain(batch_size, NEVER_IDLE_MS)

    @precondition(lambda self: self.waiting(*WORKERS))
    @rule(batch_size=st.integers(1, 8))
    def redeliver(self, batch_size):
        """A run that takes over every entry dead consumers left (the reclaim the drain does after they idle)."""
        self.run_drain(batch_size, 0)

    def run_drain(self, batch_size: int, min_idle_ms: int) -> None:
        summary = drain.drain(self.buffer, self.primary, batch_size=batch_size, min_idle_ms=min_idle_ms)
        if min_idle_ms == 0:
            held = [e for e in self.model.stream if e.holder not in (None, drain.CONSUMER)]
            for entry in held:
                entry.holder = drain.CONSUMER
            assert summary.reclaimed == sum(e.holder == drain.CONSUMER for e in self.model.stream)
        batches = 0
        while True:
            batch = self.model.claim(drain.CONSUMER, batch_size)
            if batch:
                batches += 1
                self.model.apply(batch, settle=True)
            if len(batch) < batch_size:
                break
        assert summary.batches == batches

    @precondition(lambda self: self.model.dead)
    @rule(data=st.data(), fix=st.booleans())
    def requeue(self, data, fix):
        """An operator requeues a dead letter (and what failed for it), having fixed its cause or not."""
        letter = data.draw(st.sampled_from(self.model.dead))
        unit = next((s[2] for s in letter.txn.steps if s[0] == "obs" and s[2] in self.missing_units), None)
        if fix and unit is not None:
            with self.primary.begin() as conn:
                conn.execute(
                    text(
                        "INSERT INTO obs_unit (id, name, program, source_name, ra_deg, dec_deg)"
                        " VALUES (:u, :n, 'P1', 'Orion KL', 83.8, -5.4)"
                    ),
                    {"u": unit, "n": f"model-{unit}"},
                )
            self.missing_units.remove(unit)
            self.model.units.add(unit)
        actions = dlq.requeue(self.buffer, letter.txn.txn_id, by="model")
        assert [a.txn_id for a in actions] == self.model.requeue(letter.txn.txn_id)
        assert all(a.changed for a in actions)

    # --- what must always hold --------------------------------------------------------------------

    @invariant()
    def depth_and_claims_match(self):
        assert int(self.buffer.client.get(self.buffer.unsent) or 0) == len(self.model.stream)
        pending = self.buffer.client.xpending(self.buffer.stream, self.buffer.group)["pending"]
        assert pending == sum(e.holder is not None for e in self.model.stream)
        dead = [fields[b"txn_id"].decode() for _, fields in self.buffer.client.xrange(self.buffer.dead_letters)]
        assert dead == [d.txn.txn_id for d in self.model.dead]

    @invariant()
    def primary_holds_the_model(self):
        with self.primary.connect() as conn:
            obs = conn.execute(
                text("SELECT id::text, status, (metadata->>'v')::int FROM executed_obs_unit WHERE metadata->>'tag' = :t"), {"t": self.tag}
            ).all()
            files = conn.execute(
                text("SELECT id::text, executed_obs_unit_id::text, path FROM raw_data_file WHERE path LIKE :p"),
                {"p": f"/model/{self.tag}/%"},
            ).all()
        assert {k: (s, v) for k, s, v in obs} == self.model.obs
        assert {k: (o, p) for k, o, p in files} == self.model.files

    def teardown(self):
        """Drain everything left, taking over dead consumers' entries: exactly once, nothing pending, states right."""
        self.run_drain(1000, 0)
        self.primary_holds_the_model()
        assert self.buffer.client.xpending(self.buffer.stream, self.buffer.group)["pending"] == 0
        assert int(self.buffer.client.get(self.buffer.unsent) or 0) == 0
        dead = {d.txn.txn_id for d in self.model.dead}
        txn_ids = sorted(self.model.committed | dead)
        states = {t: (s or {}).get("state") for t, s in zip(txn_ids, self.buffer.statuses(txn_ids), strict=True)}
        assert states == {t: "failed" if t in dead else "committed" for t in txn_ids}
        self.buffer.client.delete(*self.buffer.client.keys(f"{self.buffer.prefix}:*") or ["-"])


def test_any_sequence_leaves_exactly_the_models_records(redis_server, primary_engine, planning):
    run_state_machine_as_test(
        lambda: BufferMachine(redis_server.client(), primary_engine, planning),
        settings=settings(
            max_examples=EXAMPLES,
            stateful_step_count=STEPS,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
