"""The site's measurement as numbers and as ``opsync status`` shows it, on constructed measurements
(tests/measurements.py): lag in bytes and seconds, from the replica or its slot, the JSON report and the rows
people read. Measured on real services: tests/test_cli.py and tests/test_metrics_rules.py."""

from dataclasses import replace

from opsync.cli.status import status_rows
from opsync.errors import one_line
from opsync.monitoring.capacity import Capacity, Forecast
from opsync.read_model.figures import Poison
from tests.measurements import CAUGHT_UP, HEALTHY, PRIMARY, STREAMING, site_status


def test_lag_is_bytes_behind_the_primary_and_seconds_only_when_the_replica_says_when_it_replayed():
    caught_up = site_status(replay_age_s=40.0)
    assert (caught_up.lag_bytes, caught_up.lag_s) == (0, 0.0)  # caught up: 0 s, however long ago the last replay
    behind = site_status(lag_bytes=4096, replay_age_s=3.5)
    assert (behind.lag_bytes, behind.lag_s) == (4096, 3.5)
    from_slot = site_status(slot=replace(STREAMING, restart_lsn=PRIMARY - 100), replica="connection refused")
    assert (from_slot.lag_from, from_slot.lag_bytes, from_slot.lag_s) == ("slot", 100, None)
    ahead = site_status(slot=replace(STREAMING, restart_lsn=PRIMARY + 8), replica="connection refused")
    assert ahead.lag_bytes == 0, "the primary is read first: a replica never shows ahead of it"
    cut = site_status(primary="timeout expired")
    assert (cut.lag_bytes, cut.lag_s, cut.degraded) == (None, 1.0, True)  # seconds from the replica alone: an upper bound
    assert not site_status().degraded


def test_the_json_report_names_every_part_and_prints_positions_as_postgresql_does():
    report = site_status(lag_bytes=16, buffer=replace(HEALTHY, depth=3, awaiting_replica=2)).as_json()
    assert report["buffer"] == {
        "depth": 3,
        "pending": 0,
        "oldest_age_s": 0.0,
        "committed_not_replicated": 2,
        "dead_letters": 0,
        "last_drain_s": 5.0,
        "last_confirm_s": 5.0,
    }
    assert report["replica"] | {"slot": None} == {
        "primary_lsn": "5/0",
        "replica_lsn": "4/FFFFFFF0",
        "lag_from": "replica",
        "lag_bytes": 16,
        "lag_s": 1.0,
        "slot": None,
    }
    assert report["replica"]["slot"]["name"] == "observatory" and report["capacity"] is None
    down = site_status(buffer=None, redis="Connection refused").as_json()
    assert down["buffer"] is None and down["degraded"] and down["unavailable"] == {"redis": "Connection refused"}


def test_the_status_rows_say_what_waits_where_the_lag_comes_from_and_what_is_unavailable():
    rows = dict(status_rows(site_status(buffer=replace(HEALTHY, depth=7, pending=2, dead_letters=1, last_confirm_s=None))))
    assert rows["buffered"] == "7 (2 claimed by a drainer)"
    assert rows["dead letters"] == "1 (see opsync dlq list)"
    assert (rows["last drain"], rows["last confirm"]) == ("5 s ago", "never")
    assert rows["replica lag"] == "0 bytes, 0.0 s"
    assert rows["replica slot"].startswith("observatory: reserved, 10,737,418,240 bytes of WAL")
    assert rows["read model"] == "0.0 s behind" and rows["poison rows skipped"] == "0 now (0 since counting began)"

    slot_only = dict(status_rows(site_status(slot=replace(STREAMING, restart_lsn=PRIMARY - 64), replica="connection refused")))
    assert slot_only["replica lag"] == "64 bytes (from the replication slot: the replica is down)"
    assert slot_only["replica"] == "[red]unavailable[/]: connection refused"
    assert "buffered" not in dict(status_rows(site_status(buffer=None, redis="Connection refused")))


def test_forecasts_and_poison_rows_are_shown_with_their_reasons_escaped():
    poison = Poison(
        "raw_data_file", "0190c0de-0000-7000-8000-000000000001", "replica changes", "bad [value]", "2026-12-07T03:00:00.5+00:00"
    )
    report = site_status(read_model=replace(CAUGHT_UP, poison_rows=1, poison_skipped=3, recent=[poison]))
    rows = status_rows(report)
    assert ("poison rows skipped", "[red]1 now (3 since counting began)[/]") in rows
    assert (
        "  skipped",
        "raw_data_file 0190c0de-0000-7000-8000-000000000001 (replica changes, 2026-12-07T03:00:00Z): bad \\[value]",
    ) in rows
    assert not [figure for figure, _ in rows if figure in ("ingest", "high-water in", "room", "drain ETA")]  # no capacity measured

    report.capacity = Capacity(
        span_s=60.0,
        ingest_per_s=2.5,
        finished_per_s=None,
        applied_per_s=None,
        bytes_per_txn=1284.4,
        bytes_measured_over=5000,
        room=9000,
        high_water=Forecast(3600.0, "9,000 transactions to the [entries] mark at 2.5/s"),
        drain_eta=Forecast(0.0, "nothing waits"),
    )
    shown = dict(status_rows(report))
    assert shown["ingest"] == "2.5 transactions/s, 1,284 bytes each (measured over 5,000)"
    assert shown["high-water in"] == "60 min (9,000 transactions to the \\[entries] mark at 2.5/s)"
    assert (shown["room"], shown["drain ETA"]) == ("9,000 transactions before the high-water mark", "now (nothing waits)")


def test_an_error_is_reported_by_its_first_line_or_its_type():
    assert one_line(OSError("connection refused\n\tIs the server running?")) == "connection refused"
    assert one_line(TimeoutError()) == "TimeoutError"
