"""``make bench-ingest``'s capacity search (``bench.ingest.Search``) against synthetic servers: it
finds the highest rate with p99 <= 10 ms to within its resolution, a single missed try does not
end it, and a server that sustains nothing is reported as 0. No service: the search's logic only."""

from bench.ingest import CAPACITY_P99_MS, SEARCH_MIN, SEARCH_RESOLUTION, SEARCH_START, Run, Search


def step(p99_ms: float, errors: int = 0) -> Run:
    return Run(latencies=[p99_ms / 1000] * 100, errors=errors)


def search(sustains, max_steps: int = 30) -> tuple[Search, list[int]]:
    """Run a search against a server for which ``sustains(rate, try_number)`` says whether that try keeps p99 in bounds."""
    found, tried = Search(max_steps), []
    while (rate := found.next_rate()) is not None:
        tried.append(rate)
        found.record(rate, step(CAPACITY_P99_MS / 2 if sustains(rate, tried.count(rate)) else CAPACITY_P99_MS * 3))
    return found, tried


def test_the_search_finds_the_highest_sustained_rate_within_its_resolution():
    found, tried = search(lambda rate, _: rate <= 1234)
    assert found.passed <= 1234 < found.failed
    assert found.failed - found.passed <= SEARCH_RESOLUTION * found.failed
    assert found.best is not None and found.best.ms(0.99) <= CAPACITY_P99_MS
    assert tried[:4] == [SEARCH_START, 2 * SEARCH_START, 4 * SEARCH_START, 8 * SEARCH_START]


def test_one_missed_try_is_tried_again_and_does_not_end_the_doubling():
    found, tried = search(lambda rate, attempt: rate <= 3000 and (rate != 1000 or attempt > 1))
    assert tried.count(1000) == 2
    assert found.passed > 2000


def test_errors_fail_a_step_whatever_its_latency():
    found = Search(2)
    found.record(SEARCH_START, step(1.0, errors=1))
    found.record(SEARCH_START, step(1.0, errors=1))
    assert found.passed == 0 and found.failed == SEARCH_START


def test_a_server_that_sustains_nothing_is_reported_as_zero_and_the_search_ends_at_its_lowest_rate():
    found, tried = search(lambda rate, _: False)
    assert found.passed == 0 and found.best is None
    assert min(tried) >= SEARCH_MIN and len(tried) < 30


def test_the_search_stops_at_its_step_budget():
    found, tried = search(lambda rate, _: True, max_steps=5)
    assert len(tried) == 5 and found.passed == 16 * SEARCH_START
