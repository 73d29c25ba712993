"""Check the read model against the replica, and repair drift in place.

Drift should not happen (the publisher follows every change), but the file can be edited by hand,
restored from a backup, or hit by a bug; this is the independent check. Per table it walks the
replica in key ranges of ``chunk`` rows and compares each range with the same key range of the
file: row counts and a checksum over the rows in stored form (the full load's conversion), and
only where those differ, row by row. The replica is at the site, so reading it whole is local and
cheap, and the comparison is exact rather than sampled.

Rows the file shows as buffered, committed or failed come from the buffer's overlay, not (only)
the replica: they are left out on both sides (the publisher's sweep re-checks them). Differing
keys are repaired through the publisher's own merge (:meth:`Publisher.refresh`), holding the
file's write lock from the replica read to the write, so a publisher running meanwhile cannot
have a newer row overwritten by an older one. The file is only ever written in place.
"""

import hashlib
from dataclasses import dataclass, field

from sqlalchemy import Engine

from opsync.read_model.publisher import CHANGES_STATE, FETCH_POISON, Publisher, isolate, plain, render_each
from opsync.read_model.store import Layout, ReadModel, chunks

REPAIR_CHUNK = 1000  # keys per repair under the write lock: well within the publisher's busy timeout


@dataclass
class TableCheck:
    table: str
    replica_rows: int = 0
    model_rows: int = 0  # replicated rows in the file
    unsettled: int = 0  # rows backed by the buffer's overlay, not compared
    ranges: int = 0
    mismatched_ranges: list[tuple[str, str]] = field(default_factory=list)  # (after, upto] key ranges
    missing: list[str] = field(default_factory=list)  # in the replica, not in the file
    extra: list[str] = field(default_factory=list)  # replicated in the file, not in the replica
    altered: list[str] = field(default_factory=list)  # in both, different
    poison: dict[str, str] = field(default_factory=dict)  # replica rows that cannot be read or rendered -> why; not compared
    repaired: int = 0  # rows rewritten or deleted
    replica_checksum: str = ""
    model_checksum: str = ""

    @property
    def drift(self) -> list[str]:
        return self.missing + self.extra + self.altered

    def describe(self) -> str:
        counts = (
            f"{self.table}: replica {self.replica_rows:,} rows (checksum {self.replica_checksum}), "
            f"read model {self.model_rows:,} replicated rows ({self.model_checksum}), {self.unsettled:,} buffered or in flight"
        )
        if self.poison:
            counts += f"; {len(self.poison)} rows cannot be published, not compared {sample(sorted(self.poison))}"
        if not self.drift:
            return f"{counts}: no drift"
        return (
            f"{counts}: drift in {len(self.mismatched_ranges)} of {self.ranges} key ranges: {len(self.missing)} missing "
            f"{sample(self.missing)}, {len(self.extra)} extra {sample(self.extra)}, {len(self.altered)} altered "
            f"{sample(self.altered)}; {self.repaired} rows repaired"
        )


@dataclass
class CheckReport:
    tables: list[TableCheck]

    @property
    def drift(self) -> int:
        return sum(len(t.drift) for t in self.tables)

    @property
    def repaired(self) -> int:
        return sum(t.repaired for t in self.tables)


def sample(keys: list[str], limit: int = 5) -> str:
    return "[" + ", ".join(keys[:limit]) + (", …" if len(keys) > limit else "") + "]" if keys else ""


def digest(records: list[tuple]) -> bytes:
    return hashlib.blake2b(repr(records).encode(), digest_size=16).digest()


class ReadModelCheck:
    """Compare (and repair) every table; ``publisher`` supplies the file, the replica and the merge."""

    def __init__(self, publisher: Publisher, chunk: int = 10_000):
        self.publisher = publisher
        self.chunk = chunk

    @classmethod
    def open(cls, model: ReadModel, buffer, replica: Engine, chunk: int = 10_000) -> "ReadModelCheck":
        return cls(Publisher(model, buffer, replica), chunk)

    @property
    def model(self) -> ReadModel:
        return self.publisher.model

    def loaded(self) -> bool:
        """False until the publisher's first full load is done: before that there is nothing to check."""
        return self.model.get_state(CHANGES_STATE) is not None

    def run(self, repair: bool = True) -> CheckReport:
        return CheckReport([self.table(layout, repair) for layout in self.publisher.layouts.values()])

    def table(self, layout: Layout, repair: bool = True) -> TableCheck:
        found, after = TableCheck(layout.name), ""
        replica_sum, model_sum = hashlib.blake2b(digest_size=8), hashlib.blake2b(digest_size=8)
        width, state = len(layout.columns) - 1, layout.columns.index("_sync_state")  # every column but _updated_at
        while True:
            replica, poison, upto = self.replica_range(layout, after)
            stored = self.model.records_between(layout, after, upto, width)
            unsettled = {k for k, r in stored.items() if r[state] != "replicated"}
            model = {k: r for k, r in stored.items() if k not in unsettled and k not in poison}
            replica = {k: r for k, r in replica.items() if k not in unsettled}
            found.poison |= poison
            found.ranges += 1
            found.replica_rows += len(replica)
            found.model_rows += len(model)
            found.unsettled += len(unsettled)
            ours, theirs = digest(list(replica.values())), digest(list(model.values()))  # both in key order
            replica_sum.update(ours)
            model_sum.update(theirs)
            if ours != theirs:
                found.mismatched_ranges.append((after, upto or ""))
                found.missing += sorted(replica.keys() - model.keys())
                found.extra += sorted(model.keys() - replica.keys())
                found.altered += sorted(k for k in replica.keys() & model.keys() if replica[k] != model[k])
            if upto is None:
                break
            after = upto
        found.replica_checksum, found.model_checksum = replica_sum.hexdigest(), model_sum.hexdigest()
        if repair:
            for keys in chunks(sorted(found.drift), REPAIR_CHUNK):
                with self.model.transaction():
                    found.repaired += self.publisher.refresh(layout, keys)
        return found

    def replica_range(self, layout: Layout, after: str) -> tuple[dict[str, tuple], dict[str, str], str | None]:
        """The next ``chunk`` replica rows past ``after``, as the file stores them (but for ``_updated_at``), the
        rows of the range that cannot be (poison: why), and the range's last key (None: the table's end)."""
        key = layout.entry.key
        query = layout.load_query().limit(self.chunk)
        if after:
            query = query.where(layout.entry.key_order > layout.entry.key_of(after))
        poison: dict[str, Exception] = {}
        with self.publisher.replica.connect() as conn:
            try:
                rows = {row[0]: row for row in conn.execute(query)}
            except FETCH_POISON:  # a value that cannot be decoded: read the range by key, isolating it
                keys = [str(k) for k in conn.scalars(query.with_only_columns(key))]
                rows = {}
                for part in isolate(keys, lambda some: self.publisher.replica_records(layout, some), poison.__setitem__):
                    rows |= part
        keys = sorted(rows.keys() | poison.keys())
        records, unrendered = render_each({k: rows[k] for k in keys if k in rows}, lambda row: layout.loaded_record(row, "")[:-1])
        why = {key: plain(exc) for key, exc in (poison | unrendered).items()}
        return records, why, keys[-1] if len(keys) == self.chunk else None
