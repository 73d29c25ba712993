"""A realistic observing night, recorded through the public ingest API (``make demo``).

It plays the observatory's scripts: it plans CHAI and a few sources (direct tables, in the
primary at once), then replays one night in the site's time zone — each execution opened as
``running`` with its data package, its raw files, the sealed package and the final status — plus
the instrument's housekeeping, posted in hourly batches as a logger would.

Everything is derived from ``--night`` and ``--seed``, so a run can be repeated safely: planned
rows have keys derived from their names and are upserted, and every write of the night carries
an ``Idempotency-Key`` derived from the run and the write, so a repeated run is answered with the
original receipts and buffers nothing twice.
"""

import argparse
import hashlib
import os
import random
import re
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from math import asin, cos, degrees, radians, sin
from typing import Any
from zoneinfo import ZoneInfo

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from opsync.client import OpsyncClient, OpsyncError, Receipt, Unavailable
from opsync.config import get_settings
from opsync.envelope import Op, State

Row = dict[str, Any]

NAMESPACE = uuid.UUID("d3f2eb5b-002f-4f08-95c8-95c63e222379")  # keys and Idempotency-Keys of the demo
LATITUDE_DEG, LONGITUDE_DEG = -22.9856, -67.7403  # FYST on Cerro Chajnantor, where CHAI observes
MIN_ALTITUDE_DEG = 30
NIGHT_START = time(21)
NIGHT_LENGTH = timedelta(hours=9)
SAMPLE_EVERY = timedelta(minutes=5)
SAMPLES_PER_BATCH = 12  # the housekeeping logger flushes hourly
PROGRAM = "CHAI-GT"
INSTRUMENT = "CHAI"
MODULES = {"LFA": "Low Frequency Array, 455-495 GHz", "HFA": "High Frequency Array, 800-820 GHz"}
ABORT_REASONS = ("LO lost lock", "wind above 15 m/s", "operator abort")
ALIVE = {State.accepted, State.committed, State.replicated}


@dataclass(frozen=True)
class Source:
    name: str
    ra_deg: float  # ICRS
    dec_deg: float
    line: str
    module: str

    @property
    def slug(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-")


SOURCES = (
    Source("NGC 253", 11.8880, -25.2883, "CO(4-3) 461.04 GHz", "LFA"),
    Source("Orion KL", 83.8092, -5.3726, "CO(7-6) 806.65 GHz", "HFA"),
    Source("30 Doradus", 84.6750, -69.1008, "[CI] 1-0 492.16 GHz", "LFA"),
    Source("Eta Carinae", 161.2650, -59.6844, "[CI] 2-1 809.34 GHz", "HFA"),
    Source("Centaurus A", 201.3650, -43.0192, "CO(4-3) 461.04 GHz", "LFA"),
    Source("rho Oph A", 246.6125, -24.3983, "[CI] 1-0 492.16 GHz", "LFA"),
    Source("Sgr B2(N)", 266.8329, -28.3714, "[CI] 2-1 809.34 GHz", "HFA"),
    Source("W43-main", 281.9000, -1.9425, "CO(4-3) 461.04 GHz", "LFA"),
)


@dataclass(frozen=True)
class Sensor:
    name: str
    unit: str
    mean: float
    sd: float


SENSORS = (Sensor("cryostat_temperature", "K", 4.2, 0.01), Sensor("lo_power", "dBm", 3.0, 0.15))
SAMPLED = [(module, sensor) for module in MODULES for sensor in SENSORS]


def planned_id(kind: str, name: str) -> uuid.UUID:
    """The same key on every run, so planning is an upsert and never a second row."""
    return uuid.uuid5(NAMESPACE, f"{kind}/{name}")


def instrument_id() -> uuid.UUID:
    return planned_id("instrument", INSTRUMENT)


def module_id(module: str) -> uuid.UUID:
    return planned_id("instrument_module", f"{INSTRUMENT}/{module}")


def obs_unit_id(source: Source) -> uuid.UUID:
    return planned_id("obs_unit", f"{PROGRAM}/{source.slug}")


def upsert(table: str, key: uuid.UUID, **values: Any) -> Row:
    return {"op": Op.upsert, "table": table, "id": key, "values": values}


def planning_steps() -> list[Row]:
    steps = [upsert("instrument", instrument_id(), name=INSTRUMENT, description="CCAT Heterodyne Array Instrument")]
    steps += [
        upsert("instrument_module", module_id(name), instrument_id=instrument_id(), name=name, description=text)
        for name, text in MODULES.items()
    ]
    steps += [
        upsert(
            "obs_unit",
            obs_unit_id(source),
            name=f"{source.slug}-map",
            program=PROGRAM,
            source_name=source.name,
            ra_deg=source.ra_deg,
            dec_deg=source.dec_deg,
            priority=3,
            parameters={"mode": "otf_map", "line": source.line, "module": source.module},
        )
        for source in SOURCES
    ]
    return steps


def altitude_deg(source: Source, at: datetime) -> float:
    """Altitude above the site's horizon, from the local sidereal time (good to a fraction of a degree)."""
    days = (at - datetime(2000, 1, 1, 12, tzinfo=UTC)).total_seconds() / 86400
    sidereal_deg = 280.46061837 + 360.98564736629 * days + LONGITUDE_DEG
    hour_angle, lat, dec = radians(sidereal_deg - source.ra_deg), radians(LATITUDE_DEG), radians(source.dec_deg)
    return degrees(asin(sin(lat) * sin(dec) + cos(lat) * cos(dec) * cos(hour_angle)))


def pick_source(rng: random.Random, at: datetime) -> Source:
    """A source that is up; the highest one if none is above the limit."""
    up = [source for source in SOURCES if altitude_deg(source, at) >= MIN_ALTITUDE_DEG]
    return rng.choice(up) if up else max(SOURCES, key=lambda source: altitude_deg(source, at))


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class ScanFile:
    path: str
    size_bytes: int
    checksum_sha256: str


@dataclass(frozen=True)
class Execution:
    at: datetime  # start, UTC
    end: datetime
    label: str  # data directory, e.g. 231004_orion-kl
    source: Source
    status: str
    files: tuple[ScanFile, ...]
    metadata: Row

    @property
    def package(self) -> Row:
        """The sealed package: total size and the SHA-256 of its manifest (``sha256sum`` lines)."""
        manifest = "".join(f"{f.checksum_sha256}  {f.path}\n" for f in self.files)
        return {
            "status": "sealed",
            "size_bytes": sum(f.size_bytes for f in self.files),
            "checksum_sha256": digest(manifest.encode()),
        }


@dataclass(frozen=True)
class HousekeepingBatch:
    at: datetime  # when the logger flushes: its last sample
    rows: tuple[Row, ...]


@dataclass(frozen=True)
class Night:
    date: date
    seed: int
    tz: ZoneInfo
    executions: tuple[Execution, ...]
    housekeeping: tuple[HousekeepingBatch, ...]

    @property
    def run(self) -> str:
        """What decides every record: the same run posts the same requests."""
        return f"{self.date}/{self.seed}/{len(self.executions)}"

    def events(self) -> list[Execution | HousekeepingBatch]:
        """Everything in the order it happens."""
        return sorted((*self.executions, *self.housekeeping), key=lambda event: event.at)


def night_start(night: date, tz: ZoneInfo) -> datetime:
    """Evening of ``night`` in the site's zone, in UTC so that adding hours is exact across DST changes."""
    return datetime.combine(night, NIGHT_START, tz).astimezone(UTC)


def last_complete_night(now: datetime, tz: ZoneInfo) -> date:
    night = now.astimezone(tz).date()
    while night_start(night, tz) + NIGHT_LENGTH > now:
        night -= timedelta(days=1)
    return night


def plan_night(night: date, seed: int, observations: int, tz: ZoneInfo) -> Night:
    """The whole night, decided up front from the seed: nothing depends on the clock or the API."""
    rng = random.Random(f"{night}/{seed}")
    start = night_start(night, tz)
    slot = timedelta(seconds=NIGHT_LENGTH.total_seconds() // observations)
    aborted = rng.randrange(observations)
    executions = tuple(plan_execution(rng, night, tz, start + index * slot, slot, index == aborted) for index in range(observations))
    return Night(night, seed, tz, executions, plan_housekeeping(rng, start))


def plan_execution(rng: random.Random, night: date, tz: ZoneInfo, slot_start: datetime, slot: timedelta, aborted: bool) -> Execution:
    begin = slot_start + timedelta(seconds=rng.randrange(int(slot.total_seconds() / 10)))
    source = pick_source(rng, begin)
    label = f"{begin.astimezone(tz):%H%M%S}_{source.slug}"
    scans = rng.randint(1, 2) if aborted else rng.randint(3, 6)
    files = tuple(
        ScanFile(f"/data/{night}/{label}/scan_{scan:03d}.fits", rng.randint(80, 400) << 20, digest(rng.randbytes(64)))
        for scan in range(1, scans + 1)
    )
    metadata: Row = {
        "pwv_mm": round(rng.uniform(0.25, 1.1), 2),
        "elevation_deg": round(altitude_deg(source, begin), 1),
        "scans": scans,
    }
    if aborted:
        metadata["abort_reason"] = rng.choice(ABORT_REASONS)
    fraction = rng.uniform(0.15, 0.4) if aborted else rng.uniform(0.6, 0.85)
    duration = timedelta(seconds=round(slot.total_seconds() * fraction))
    status = "aborted" if aborted else "completed"
    return Execution(begin, begin + duration, label, source, status, files, metadata)


def plan_housekeeping(rng: random.Random, start: datetime) -> tuple[HousekeepingBatch, ...]:
    """Samples every few minutes; the phase is seeded, so two seeds of one night rarely share a sample time.

    (module, sensor, sampled_at) is unique in the primary: a shared time would be dead-lettered there.
    """
    first = start + timedelta(seconds=rng.randrange(int(SAMPLE_EVERY.total_seconds())))
    times = [first + index * SAMPLE_EVERY for index in range(int(NIGHT_LENGTH / SAMPLE_EVERY))]
    batches = [times[index : index + SAMPLES_PER_BATCH] for index in range(0, len(times), SAMPLES_PER_BATCH)]
    return tuple(HousekeepingBatch(batch[-1], tuple(sample(rng, *sampled, at) for at in batch for sampled in SAMPLED)) for batch in batches)


def sample(rng: random.Random, module: str, sensor: Sensor, at: datetime) -> Row:
    return {
        "instrument_module_id": module_id(module),
        "sensor": sensor.name,
        "sampled_at": at,
        "value": round(rng.gauss(sensor.mean, sensor.sd), 4),
        "unit": sensor.unit,
    }


def opening_steps(run: Execution) -> list[Row]:
    """The execution as ``running`` with its (open) package, which names it by ``$ref`` before it has a key."""
    return [
        {
            "table": "executed_obs_unit",
            "ref": "obs",
            "values": {
                "obs_unit_id": obs_unit_id(run.source),
                "instrument_module_id": module_id(run.source.module),
                "status": "running",
                "start_time": run.at,
                "metadata": run.metadata,
            },
        },
        {
            "table": "raw_data_package",
            "values": {"name": f"{run.at:%Y%m%d}_{run.label}.tar", "executed_obs_unit_id": {"$ref": "obs"}, "status": "open"},
        },
    ]


class Recorder:
    """Posts a planned night through the client and keeps every receipt for the summary."""

    def __init__(self, client: OpsyncClient, run: str, console: Console):
        self.client = client
        self.run = run
        self.console = console
        self.receipts: list[Receipt] = []
        self.rows: Counter[tuple[str, str]] = Counter()

    def key(self, label: str) -> str:
        """The same Idempotency-Key for the same write of the same run, so a repeated run buffers nothing twice."""
        return str(uuid.uuid5(NAMESPACE, f"{self.run}/{label}"))

    def keep(self, receipt: Receipt, *written: tuple[str, Op, int]) -> None:
        """One receipt per transaction; ``written`` counts its rows as (table, op, rows)."""
        self.receipts.append(receipt)
        for table, op, rows in written:
            self.rows[table, op] += rows

    def planning(self) -> None:
        """Upsert the instrument and the obs_units; the night is recorded even if the primary is out of reach.

        Keys derive from the names, so a 409 here means a name is taken by a row the demo did not create.
        """
        steps = planning_steps()
        try:
            receipt = self.client.transaction(steps)
        except Unavailable as exc:
            self.console.print(f"[yellow]planning not written ({exc.detail}); recording the night anyway")
            return
        self.keep(receipt, *((step["table"], Op.upsert, 1) for step in steps))

    def record(self, event: Execution | HousekeepingBatch) -> None:
        if isinstance(event, Execution):
            self.execution(event)
        else:
            self.housekeeping(event)

    def execution(self, run: Execution) -> None:
        """Open the observation and its package together (one transaction, ``$ref``), then files, seal, finish."""
        opened = self.client.transaction(opening_steps(run), self.key(f"{run.label}/open"))
        self.keep(opened, ("executed_obs_unit", Op.insert, 1), ("raw_data_package", Op.insert, 1))
        obs, package = opened.ids
        files = [
            {
                "executed_obs_unit_id": obs,
                "raw_data_package_id": package,
                "path": f.path,
                "size_bytes": f.size_bytes,
                "checksum_sha256": f.checksum_sha256,
                "file_type": "fits",
            }
            for f in run.files
        ]
        stored = self.client.records("raw_data_file", files, self.key(f"{run.label}/files"))
        self.keep(stored, ("raw_data_file", Op.insert, len(files)))
        sealed = self.client.update("raw_data_package", package, run.package, self.key(f"{run.label}/seal"))
        self.keep(sealed, ("raw_data_package", Op.update, 1))
        finish = {"status": run.status, "end_time": run.end}
        finished = self.client.update("executed_obs_unit", obs, finish, self.key(f"{run.label}/finish"))
        self.keep(finished, ("executed_obs_unit", Op.update, 1))

    def housekeeping(self, batch: HousekeepingBatch) -> None:
        key = self.key(f"housekeeping/{batch.at.isoformat()}")
        receipt = self.client.records("housekeeping_sample", list(batch.rows), key)
        self.keep(receipt, ("housekeeping_sample", Op.insert, len(batch.rows)))

    def states(self) -> Counter[str]:
        """Where each transaction is now (a repeated run's receipts are the original ones, possibly further on)."""
        return Counter(self.client.status(receipt.txn_id).state.value for receipt in self.receipts)


def describe(event: Execution | HousekeepingBatch, tz: ZoneInfo) -> str:
    local = f"{event.at.astimezone(tz):%H:%M}"
    if isinstance(event, Execution):
        return f"{local} {event.source.name} ({event.source.module}, {event.status})"
    return f"{local} housekeeping ({len(event.rows)} samples)"


def record_night(client: OpsyncClient, night: Night, console: Console) -> Recorder:
    recorder = Recorder(client, night.run, console)
    recorder.planning()
    events = night.events()
    with Progress(console=console) as progress:
        task = progress.add_task(f"night of {night.date}", total=len(events))
        for event in events:
            progress.update(task, description=describe(event, night.tz))
            recorder.record(event)
            progress.advance(task)
    return recorder


def summary(title: str, recorder: Recorder, states: Counter[str]) -> Table:
    table = Table(title=title)
    for column in ("table", "op", "rows"):
        table.add_column(column)
    for (name, op), rows in sorted(recorder.rows.items()):
        table.add_row(name, op, str(rows))
    table.add_section()
    for state, count in sorted(states.items()):
        table.add_row("transactions", state, str(count))
    return table


def api_url() -> str:
    return from_env("OPSYNC_API_URL")


def api_token() -> str:
    return from_env("OPSYNC_API_TOKEN")


def from_env(name: str) -> str:
    """Any site's API: ``make demo`` sets both variables for the one ``make up`` runs (:mod:`devstack.demo`)."""
    if value := os.environ.get(name):
        return value
    raise SystemExit(f"set {name}, or run `make demo` against the site of `make up`")


def observations(value: str) -> int:
    count = int(value)
    if not 1 <= count <= 50:
        raise argparse.ArgumentTypeError("between 1 and 50 observations fit a night")
    return count


def parse_args(argv: list[str] | None, tz: ZoneInfo) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m opsync_observatory.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--night",
        type=date.fromisoformat,
        default=last_complete_night(datetime.now(UTC), tz),
        help="evening date (site time) of the night; default: the last complete night",
    )
    parser.add_argument("--seed", type=int, default=1, help="the same seed and night give the same records")
    parser.add_argument("--observations", type=observations, default=8, help="executed observations (1-50)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Exit 0 when every transaction is accepted or further on, 1 otherwise."""
    tz = ZoneInfo(get_settings().timezone)
    args = parse_args(argv, tz)
    console = Console()
    night = plan_night(args.night, args.seed, args.observations, tz)
    try:
        with OpsyncClient(api_url(), api_token()) as client:
            recorder = record_night(client, night, console)
            states = recorder.states()
    except OpsyncError as exc:
        console.print(f"[red]demo stopped: {exc}")
        return 1
    console.print(summary(f"Night of {night.date} (seed {night.seed})", recorder, states))
    return 0 if set(states) <= ALIVE else 1


if __name__ == "__main__":
    raise SystemExit(main())
