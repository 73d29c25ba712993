"""Capacity arithmetic (``opsync.monitoring.capacity``) on constructed readings: the bytes a buffered transaction costs,
the high-water forecast and the drain's ETA, and how people read them. From a real buffer: tests/test_capacity.py."""

import math

import pytest

from opsync import sizing
from opsync.config import Settings
from opsync.monitoring.capacity import Forecast, Reading, Slot, duration, fill_bytes, forecast, since_reset

SETTINGS = Settings(_env_file=None, high_water_entries=10_000, high_water_memory_fraction=0.5)
MIB = 2**20


def reading(at: float, accepted: int, unsent: int = 0, awaiting: int = 0, applied: int = 0, used: int = 0, run_id: str = "a") -> Reading:
    return Reading(at, accepted, unsent, awaiting, applied, used, run_id)


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [(0, "0 s"), (42.4, "42 s"), (119, "119 s"), (120, "2 min"), (7199, "119 min"), (7200, "2 h 00 min"), (11_100, "3 h 05 min")]
    + [(47 * 3600 + 59 * 60, "47 h 59 min"), (48 * 3600, "2 d 00 h"), (51 * 3600, "2 d 03 h")],
)
def test_durations_are_short_and_precise_enough_to_act_on(seconds, shown):
    assert duration(seconds) == shown


def test_a_forecast_is_now_due_never_or_unknown_and_json_has_no_infinity():
    assert [Forecast(s, "why").state for s in (0.0, 11_100.0, math.inf, None)] == ["now", "due", "never", "unknown"]
    assert Forecast(11_100.0, "at 3/s").describe() == "3 h 05 min (at 3/s)"
    assert Forecast(math.inf, "nothing accepted").describe() == "never (nothing accepted)"
    assert Forecast(math.inf, "x").as_json() == {"seconds": None, "state": "never", "why": "x"}
    assert Forecast(5.0, "x").as_json()["seconds"] == 5.0


def test_a_reading_parses_as_the_script_writes_it_and_counts_what_waits_and_what_finished():
    r = Reading.parse(b"1700000000.250000 100 7 3 90 5000 9f3c")
    assert r == reading(1700000000.25, 100, unsent=7, awaiting=3, applied=90, used=5000, run_id="9f3c")
    assert (r.backlog, r.finished) == (10, 90)


def test_rates_start_after_the_last_reset_of_a_counter():
    readings = [reading(0, 50), reading(1, 60), reading(2, 5), reading(3, 9, applied=4), reading(4, 12, applied=1)]
    assert since_reset(readings) == readings[4:]  # the stream was reset at 2, the drain's figures at 4
    assert since_reset(readings[:2]) == readings[:2]


def test_bytes_per_transaction_count_only_intervals_in_which_nothing_left_the_same_redis():
    readings = [
        reading(0, 0, unsent=0, used=1000),
        reading(1, 10, unsent=10, used=11_000),  # 10 in, none out: 1,000 B each
        reading(2, 20, unsent=15, used=14_000),  # 5 drained meanwhile: not counted
        reading(3, 30, unsent=25, awaiting=0, used=16_000),  # 10 in, none out: 200 B each
        reading(4, 40, unsent=35, used=100, run_id="b"),  # Redis restarted: memory not comparable
    ]
    assert fill_bytes(readings) == (600.0, 20)
    assert fill_bytes(readings[:1]) == (None, 0)


def test_the_high_water_forecast_is_room_at_the_ingest_rate_by_whichever_mark_comes_first():
    before, now = reading(0, 0, unsent=0, used=10 * MIB), reading(100, 500, unsent=500, used=20 * MIB)
    by_entries = forecast([before, now], None, 0, 0, SETTINGS, min_span_s=10)
    assert by_entries.ingest_per_s == 5.0 and by_entries.room == 9_500
    assert by_entries.high_water.seconds == 1_900 and "the entries mark (10,000)" in by_entries.high_water.why

    by_memory = forecast([before, now], 1000.0, 2000, 40 * MIB, SETTINGS, min_span_s=10)  # 0 B free at 50% of 40 MiB
    assert (by_memory.high_water.state, by_memory.room) == ("now", 0)
    assert by_memory.high_water.why.startswith("at the high-water mark: site buffer uses 50% of Redis maxmemory")

    roomy = forecast([before, now], 1000.0, 2000, 60 * MIB, SETTINGS, min_span_s=10)  # 10 MiB free: 10,485 of 1,000 B
    assert roomy.room == 9_500  # the entries mark is nearer
    tight = forecast([before, now], 2000.0, 2000, 60 * MIB, SETTINGS, min_span_s=10)
    assert tight.room == 10 * MIB // 2000 and tight.high_water.seconds == pytest.approx(tight.room / 5)
    assert "the memory mark (50% of maxmemory, 2,000 bytes each, measured)" in tight.high_water.why
    benchmarked = forecast([before, now], None, 0, 60 * MIB, SETTINGS, min_span_s=10)
    assert benchmarked.room == 10 * MIB // sizing.BUFFERED_TXN_BYTES and "as benchmarked" in benchmarked.high_water.why


def test_without_two_readings_far_enough_apart_rates_and_forecasts_are_unknown_and_say_why():
    c = forecast([reading(0, 0), reading(2, 5, unsent=5)], None, 0, 0, SETTINGS, min_span_s=10)
    assert c.ingest_per_s is None and c.finished_per_s is None and c.applied_per_s is None
    assert c.high_water.state == "unknown" and c.high_water.why == "measuring: rates need readings at least 10 s apart (have 2.0 s)"
    assert c.drain_eta.state == "unknown" and c.room == 9_995


def test_the_drains_eta_is_the_backlog_at_the_rate_it_finishes_end_to_end():
    def eta(before: Reading, now: Reading) -> Forecast:
        return forecast([before, now], None, 0, 0, SETTINGS, min_span_s=10).drain_eta

    assert eta(reading(0, 100, unsent=100), reading(100, 100)).state == "now"
    draining = eta(reading(0, 100, unsent=100), reading(100, 100, unsent=40, awaiting=20, applied=60))
    assert draining.seconds == pytest.approx(60 / 0.4) and draining.why == "60 waiting, 0.4/s replicated or failed"
    committed_only = eta(reading(0, 100, unsent=100), reading(100, 100, unsent=0, awaiting=100, applied=100))
    assert committed_only.state == "never" and "nothing left the backlog (100) in the last 100 s" == committed_only.why
    idle = eta(reading(0, 100, unsent=100), reading(100, 100, unsent=100))
    assert idle.why.endswith("(no drain has applied anything yet)")
    nothing_in = forecast([reading(0, 100), reading(100, 100)], None, 0, 0, SETTINGS, min_span_s=10).high_water
    assert nothing_in.state == "never" and nothing_in.why == "nothing accepted in the last 100 s (10,000 transactions of room)"


def test_the_slot_tells_its_wal_reserve_as_a_share_of_what_the_primary_keeps():
    slot = Slot("observatory", exists=True, wal_status="reserved", safe_wal_size=3 * MIB, max_keep=4 * MIB, active=True, restart_lsn=None)
    assert slot.safe_fraction == 0.75
    assert slot.describe() == "reserved, 3,145,728 bytes of WAL before it is dropped (75% of max_slot_wal_keep_size)"
    past = Slot("observatory", True, "unreserved", -MIB, 4 * MIB, False, None)
    assert past.safe_fraction == 0.0
    assert Slot("observatory", True, "reserved", None, None, True, None).describe().endswith("(WAL kept without limit)")
    assert Slot("observatory", True, "lost", None, 4 * MIB, False, None).describe() == "lost: clone the replica again"
    assert Slot("observatory", True, None, None, 4 * MIB, False, None).describe() == "reserves no WAL yet"
    assert Slot("observatory", False, None, None, 4 * MIB, False, None).describe() == "missing on the primary"
