"""The soak: a whole site under writes and every kind of fault loses, duplicates and strands nothing.

The short run goes as ``make soak`` does (its own temporary site on free ports), with a fixed seed so
that a failure replays, and is judged by the one JSON line it prints last. The verdict, the fault
schedule and the domain's workload it relies on are also tested alone, without a site.
"""

import json
import random
import subprocess
import sys
import time
from collections import Counter, defaultdict
from datetime import UTC, datetime

import pytest

from devstack import faults as faults_module
from devstack.faults import FIRST_ROUND_TRIES, KINDS, Faults, Outcome
from devstack.settings import REPO
from devstack.soak import domain_workload, failures
from opsync import registry
from opsync.client import Receipt
from opsync.envelope import Op, State
from opsync.ids import new_id
from opsync.ingest import StepIn, build_transaction

SEED = 20261121
RECORDS = 5000


def passing() -> dict:
    return {
        "lost": 0,
        "duplicated": 0,
        "stuck": 0,
        "stale": 0,
        "undeleted": 0,
        "dead_lettered_valid": 0,
        "read_mismatches": 0,
        "refused": 0,
        "unresolved": 0,
        "errors": [],
        "settled": True,
        "settle_s": 12.0,
        "faults": {kind: {"injected": 2, "effective": 1} for kind in KINDS},
    }


def test_verdict_passes_a_clean_run_with_every_kind_effective():
    assert failures(passing()) == []


@pytest.mark.parametrize("harm", ["lost", "duplicated", "stuck", "stale", "undeleted", "dead_lettered_valid", "read_mismatches"])
def test_verdict_fails_on_any_harm(harm):
    result = passing() | {harm: 1}
    assert failures(result) == [f"{harm}: 1"]


def test_verdict_fails_on_a_dead_lettered_valid_transaction():
    assert failures(passing() | {"dead_lettered_valid": 1}) == ["dead_lettered_valid: 1"]


def test_verdict_fails_on_a_kind_injected_without_effect_or_never_injected():
    result = passing()
    result["faults"]["wan_reset"] = {"injected": 3, "effective": 0}
    del result["faults"]["kill_redis"]
    assert sorted(failures(result)) == ["kill_redis: no effect in 0 injections", "wan_reset: no effect in 3 injections"]


def test_verdict_fails_when_the_site_did_not_settle():
    assert failures(passing() | {"settled": False}) == ["not settled within 12.0 s"]


class Scripted(Faults):
    """The real schedule over stand-in faults: each kind's effects in order (True: effective), then effective."""

    def __init__(self, effects: dict[str, list[bool]]):
        super().__init__(stack=None, wan=None, rng=random.Random(7), say=lambda _: None)
        self.effects, self.order = effects, []

    def kinds(self):
        return {kind: (lambda kind=kind: self.run(kind)) for kind in KINDS}

    def run(self, kind: str) -> Outcome:
        self.order.append(kind)
        hits = self.effects.get(kind, [])
        return Outcome("stand-in", "hit" if (hits.pop(0) if hits else True) else None)


def test_schedule_injects_every_kind_redis_first_even_when_the_time_is_up(monkeypatch):
    monkeypatch.setattr(faults_module.time, "sleep", lambda _: None)
    faults = Scripted({})
    faults.schedule(until=time.monotonic() - 1, gap_s=(0, 0))
    assert faults.order[0] == "kill_redis" and sorted(faults.order) == sorted(KINDS)
    assert faults.counts() == {kind: {"injected": 1, "effective": 1} for kind in sorted(KINDS)}


def test_schedule_retries_a_kind_until_it_takes_effect_a_few_times_at_most(monkeypatch):
    monkeypatch.setattr(faults_module.time, "sleep", lambda _: None)
    faults = Scripted({"wan_reset": [False, True], "replica_lag": [False] * 10})
    faults.schedule(until=time.monotonic() - 1, gap_s=(0, 0))
    tries = Counter(faults.order)
    assert tries["wan_reset"] == 2 and faults.effective["wan_reset"] == 1
    assert tries["replica_lag"] == FIRST_ROUND_TRIES and faults.effective["replica_lag"] == 0
    assert failures(passing() | {"faults": faults.counts()}) == [f"replica_lag: no effect in {FIRST_ROUND_TRIES} injections"]


def test_every_kind_the_faults_inject_is_judged():
    assert sorted(Scripted({}).kinds()) == sorted(KINDS) == sorted(Faults.kinds(Scripted({})))


def admitted(steps: list[StepIn]) -> Receipt:
    """The receipt the site would give ``steps`` (admitted as the API admits them: with the keys it makes)."""
    txn = build_transaction(steps, "soak")
    return Receipt(txn_id=txn.txn_id, state=State.accepted, ids=[s.key for s in txn.steps], accepted_at=datetime.now(UTC), status_url="/")


def test_the_domains_workload_writes_what_the_site_admits_and_names_what_the_harness_compares():
    """One writer's script of the configured domain's workload, driven as the harness drives it (without a site):
    every write is admitted; the rows a receipt leaves, the updates and the deletes name only the tables and
    columns the harness compares, rows it created, and deletable tables; an invalid transaction is valid at the site."""
    workload = domain_workload()
    script = workload.writer(0, SEED, defaultdict(lambda: str(new_id())), random.Random(SEED))
    created: dict[str, set[str]] = defaultdict(set)
    counts: Counter = Counter()
    for n in range(300):
        request = script.transaction(invalid=n % 50 == 49) if n % 3 else script.batch()
        args = request.args
        steps = (
            [StepIn(**step) for step in args[0]]
            if request.method == "transaction"
            else [StepIn(table=args[0], values=row) for row in args[1]]
        )
        receipt = admitted(steps)
        if n % 50 == 49:
            counts["invalid"] += 1
            continue
        rows = request.acknowledged(receipt)
        assert len(rows) == len(receipt.ids)
        for key, (table, expected) in zip(receipt.ids, rows, strict=True):
            assert set(expected) <= set(workload.checked[table]), table
            created[table].add(str(key))
        if change := script.update():
            table, key, changes = change
            assert key in created[table] and set(changes) <= set(workload.checked[table]), change
            admitted([StepIn(op=Op.update, table=table, id=key, values=changes)])
            counts["update"] += 1
        if gone := script.delete():
            table, key = gone
            assert registry.get_table(table).deletable and key in created[table], gone
            created[table].discard(key)
            counts["delete"] += 1
    assert set(created) == set(workload.checked) and min(counts.values()) > 0, counts


@pytest.mark.stack
def test_nothing_acknowledged_is_lost_duplicated_or_stuck_under_faults():
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "devstack.soak",
            "--seed",
            str(SEED),
            "--records",
            str(RECORDS),
            "--duration",
            "100",
            "--fault-gap",
            "0.5,2",
            "--settle-timeout",
            "120",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=480,
    )
    lines = proc.stdout.strip().splitlines()
    assert lines, f"no report (exit {proc.returncode}):\n{proc.stderr[-6000:]}"
    result = json.loads(lines[-1])
    context = f"{json.dumps(result, indent=1)}\n{proc.stderr[-6000:]}"
    assert result["acknowledged"] >= RECORDS, context
    assert all(result["faults"][kind]["effective"] >= 1 for kind in KINDS), context
    assert (result["lost"], result["duplicated"], result["stuck"], result["stale"]) == (0, 0, 0, 0), context
    assert (result["undeleted"], result["dead_lettered_valid"], result["read_mismatches"]) == (0, 0, 0), context
    assert result["invalid_sent"] > 0 and result["invalid_failed"] == result["invalid_sent"], context
    assert result["resubmitted"] > 0 and result["updates"] > 0 and result["deletes"] > 0, context
    assert result["settled"] and not result["errors"] and not result["refused"], context
    assert result["failures"] == [] and proc.returncode == 0, context
