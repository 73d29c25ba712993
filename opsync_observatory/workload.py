"""The observatory's soak workload (``make soak``): what :mod:`devstack.soak` writes while it injects faults.

Each writer posts batches of housekeeping samples and observation transactions (an executed
observation, its package and its files, later steps referencing earlier ones), updates recent
observations and packages (most still buffered), deletes recent files (the one deletable buffered
table), and now and then a transaction the primary must refuse: an unknown ``obs_unit_id``, valid at
the site, a foreign-key violation in Cologne. The harness sends, resubmits, reads back and checks;
this module names the tables and says which rows each acknowledged write must leave behind.
"""

import hashlib
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from opsync.client import OpsyncClient, Receipt

Expected = list[tuple[str, dict[str, Any]]]  # (table, final values of its checked columns) per row, in receipt order

CHECKED = {  # per buffered table, the columns whose final values are compared everywhere
    "housekeeping_sample": ("sensor", "sampled_at", "value"),
    "executed_obs_unit": ("status", "end_time", "metadata"),
    "raw_data_package": ("name", "status", "size_bytes", "checksum_sha256"),
    "raw_data_file": ("path", "size_bytes", "raw_data_package_id"),
}
T0 = datetime(2026, 11, 21, tzinfo=UTC)
RECENT = 30  # observations a writer may still update, files it may delete


@dataclass(frozen=True)
class Request:
    """One create request: an :class:`~opsync.client.OpsyncClient` method with its arguments, and what its receipt leaves."""

    method: str
    args: tuple
    acknowledged: Callable[[Receipt], Expected]  # called once with the 202's receipt (not for a refused one)


def pick(values: dict[str, Any], table: str) -> dict[str, Any]:
    return {column: values.get(column) for column in CHECKED[table]}


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class Script:
    """One writer's share: builds its requests, remembers recent rows to update and delete."""

    index: int
    seed: int
    fixtures: dict[str, str]
    rng: random.Random
    seq: int = 0  # rows built: makes times, paths and names unique
    observations: list[dict[str, Any]] = field(default_factory=list)  # recent observations to update
    deletable: list[tuple[str, str]] = field(default_factory=list)  # recent (table, id) of files to delete

    def batch(self) -> Request:
        """Housekeeping samples, as a logger flushes them."""
        rows = []
        for _ in range(self.rng.randint(10, 40)):
            self.seq += 1
            rows.append(
                {
                    "instrument_module_id": self.fixtures["module"],
                    "sensor": f"w{self.index}-s{self.seq % 8}",
                    "sampled_at": (T0 + timedelta(milliseconds=10 * self.seq)).isoformat(),
                    "value": round(self.rng.uniform(-50, 300), 6),
                    "unit": "K",
                }
            )
        return Request(
            "records", ("housekeeping_sample", rows), lambda _: [("housekeeping_sample", pick(row, "housekeeping_sample")) for row in rows]
        )

    def transaction(self, invalid: bool) -> Request:
        """An executed observation, its package and its files in one transaction; ``invalid``: of an unknown obs unit."""
        self.seq += 1
        n, start = self.seq, T0 + timedelta(seconds=self.seq)
        obs_unit = str(uuid.UUID(int=self.rng.getrandbits(128))) if invalid else self.fixtures["obs_unit"]
        steps: list[dict[str, Any]] = [
            {
                "table": "executed_obs_unit",
                "ref": "obs",
                "values": {
                    "obs_unit_id": obs_unit,
                    "instrument_module_id": self.fixtures["module"],
                    "start_time": start.isoformat(),
                    "metadata": {"soak": self.seed, "writer": self.index, "n": n},
                },
            },
            {
                "table": "raw_data_package",
                "ref": "pkg",
                "values": {"name": f"soak-{self.seed}-w{self.index}-{n}.tar", "executed_obs_unit_id": {"$ref": "obs"}},
            },
        ]
        for j in range(self.rng.randint(1, 3)):
            path = f"/soak/{self.seed}/w{self.index}/{n}/scan{j}.fits"
            steps.append(
                {
                    "table": "raw_data_file",
                    "values": {
                        "path": path,
                        "size_bytes": self.rng.randint(1, 10**9),
                        "checksum_sha256": sha256(path),
                        "file_type": "fits",
                        "executed_obs_unit_id": {"$ref": "obs"},
                        "raw_data_package_id": {"$ref": "pkg"},
                    },
                }
            )

        def acknowledged(receipt: Receipt) -> Expected:
            package = str(receipt.ids[1])
            self.observations = [*self.observations, {"obs": str(receipt.ids[0]), "pkg": package, "start": start}][-RECENT:]
            self.deletable = [*self.deletable, *(("raw_data_file", str(key)) for key in receipt.ids[2:])][-RECENT:]
            return [
                ("executed_obs_unit", {"status": "running", "end_time": None, "metadata": steps[0]["values"]["metadata"]}),
                ("raw_data_package", {"name": steps[1]["values"]["name"], "status": "open", "size_bytes": None, "checksum_sha256": None}),
                *(("raw_data_file", {**pick(s["values"], "raw_data_file"), "raw_data_package_id": package}) for s in steps[2:]),
            ]

        return Request("transaction", (steps,), acknowledged)

    def update(self) -> tuple[str, str, dict[str, Any]] | None:
        """(table, key, changes) of a recent observation or its package: most are still buffered, some already replicated."""
        if not self.observations:
            return None
        obs = self.rng.choice(self.observations[-10:])
        if self.rng.random() < 0.5:
            changes: dict[str, Any] = {
                "status": self.rng.choice(["completed", "failed", "aborted", "running"]),
                "end_time": (obs["start"] + timedelta(seconds=self.rng.randint(1, 3600))).isoformat(),
            }
            if self.rng.random() < 0.5:
                changes["metadata"] = {"soak": self.seed, "revision": self.rng.randint(1, 10**6)}
            return "executed_obs_unit", obs["obs"], changes
        key = obs["pkg"]
        changes = {
            "status": self.rng.choice(["sealed", "transferred", "archived"]),
            "size_bytes": self.rng.randint(0, 10**12),
            "checksum_sha256": sha256(f"{key}/{self.rng.random()}"),
        }
        return "raw_data_package", key, changes

    def delete(self) -> tuple[str, str] | None:
        """(table, key) of a recent file (most still buffered), taken off the list."""
        return self.deletable.pop(self.rng.randrange(len(self.deletable))) if self.deletable else None


class Workload:
    """The observatory's workload as :class:`devstack.soak.Workload` describes it."""

    checked = CHECKED

    def fixtures(self, client: OpsyncClient, tag: str) -> tuple[dict[str, str], list[Receipt]]:
        """The planning rows observations refer to (direct tables, written straight to the primary)."""
        instrument = client.records("instrument", {"name": tag})
        module = client.records("instrument_module", {"instrument_id": str(instrument.id), "name": "M1"})
        obs_unit = client.records(
            "obs_unit",
            {"name": tag, "program": "SOAK", "source_name": "Orion KL", "ra_deg": 83.8, "dec_deg": -5.4},
        )
        return {"module": str(module.id), "obs_unit": str(obs_unit.id)}, [instrument, module, obs_unit]

    def writer(self, index: int, seed: int, fixtures: dict[str, str], rng: random.Random) -> Script:
        return Script(index, seed, fixtures, rng)


WORKLOAD = Workload()
