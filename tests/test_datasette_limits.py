"""Datasette under hostile SQL (``datasette/plugins/opsync_sql_limits.py``): a real ``datasette serve`` with the
repository's metadata, settings and plugins (but the publisher), anonymous visitors allowed SQL as under `make up`.

Refused functions and statements, the allowed ones, value/result/memory limits answered 400 (never 500), the
slot cap answered 503 with Retry-After, table pages and dashboard charts answering while slow SQL runs.
Timing figures are ``make bench-datasette-load``'s; the bounds here are generous.
"""

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import yaml

from devstack.local import DATASETTE_SETTINGS
from opsync.read_model import metadata as served_metadata
from tests.test_datasette_views import DB, METADATA, datasette_site, fill_read_model, serve_datasette

REPO = Path(__file__).resolve().parents[1]
SLOW_SQL = "with recursive c(x) as (select 1 union all select x + 1 from c) select count(*) from c"  # runs to the time limit
REFUSED = {  # SQL -> what the error names
    "select hex(fts3_tokenizer('simple'))": "fts3_tokenizer",
    "select load_extension('/tmp/x.so')": "load_extension",
    "select sqlite_compileoption_used('ENABLE_FTS3_TOKENIZER')": "sqlite_compileoption_used",
    "select sqlite_compileoption_get(0)": "sqlite_compileoption_get",
    "select sqlite_log(1, 'x')": "sqlite_log",
    "select changes(), total_changes()": "changes",
    "select last_insert_rowid()": "last_insert_rowid",
    "select rtreenode(2, x'00')": "rtreenode",
    "select fts5(null)": "fts5",
    "select name, pgsize from dbstat": "dbstat",
    "select sql from sqlite_stmt": "sqlite_stmt",
}


def sql(base: str, query: str, path: str = f"/{DB}.json", **params) -> httpx.Response:
    return httpx.get(f"{base}{path}", params={"sql": query, "_shape": "array", **params}, timeout=60)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("datasette-limits")
    with datasette_site(workdir) as (base, rows, _):
        yield base, rows, workdir / "datasette.log"


@pytest.fixture(scope="module")
def base(site) -> str:
    return site[0]


@pytest.mark.parametrize("query", REFUSED)
def test_functions_and_tables_outside_the_allow_list_are_refused_by_name(base, query):
    response = sql(base, query)
    error = response.json()["error"]
    assert response.status_code == 400 and REFUSED[query] in error, response.text
    assert error.startswith(("not authorized to use function", "access to")), error


def test_a_refused_function_in_a_table_filter_is_refused_too(base):
    response = httpx.get(f"{base}/{DB}/instrument.json", params={"_where": "fts3_tokenizer('simple') is not null"}, timeout=10)
    assert response.status_code == 400
    assert "not authorized to use function: fts3_tokenizer" in response.json()["error"]


def test_reading_functions_still_work(base):
    query = """
        with recursive n(i) as (select 1 union all select i + 1 from n where i < 5)
        select count(*) as n_rows, sum(i) as total, group_concat(i, '-') as joined, max(i) as top,
               json_extract('{"a": [1, 2]}', '$.a[1]') as extracted, '{"b": 3}' ->> '$.b' as arrow,
               strftime('%Y', '2024-05-01T02:00:00') as year, date('2024-05-01', '+1 day') as next_day,
               printf('%05.1f', 3.14159) as printed, upper(substr('observatory', 1, 3)) as prefix,
               round(sqrt(16) + pow(2, 3) + ln(1), 1) as math, typeof(randomblob(4)) as blob,
               length(zeroblob(1000)) as zeros, coalesce(nullif('', ''), 'x') as fallback,
               (select count(*) from pragma_table_info('instrument')) as columns,
               (select value from json_each('[7]')) as each_value
        from n
    """
    response = sql(base, query)
    assert response.status_code == 200, response.text
    assert response.json() == [
        {
            "n_rows": 5,
            "total": 15,
            "joined": "1-2-3-4-5",
            "top": 5,
            "extracted": 2,
            "arrow": 3,
            "year": "2024",
            "next_day": "2024-05-02",
            "printed": "003.1",
            "prefix": "OBS",
            "math": 12.0,
            "blob": "blob",
            "zeros": 1000,
            "fallback": "x",
            "columns": 10,
            "each_value": 7,
        }
    ]
    window = sql(
        base,
        "select sensor, row_number() over (partition by sensor order by sampled_at) as n, "
        "lag(value) over (order by sampled_at) as previous from housekeeping_sample order by sensor, n",
    )
    assert window.status_code == 200 and len(window.json()) == 10


def test_writes_attach_and_pragma_writes_stay_refused(base):
    for query in (
        "attach database '/tmp/other.db' as other",
        "pragma query_only = 0",
        "select * from pragma_max_page_count(1)",
        "delete from instrument",
    ):
        assert sql(base, query).status_code == 400, query


@pytest.mark.parametrize(
    "query, message",
    [
        ("select length(zeroblob(1000000000))", "string or blob too big"),
        (
            "with recursive s(x, n) as (select 'x', 0 union all select x || x, n + 1 from s where n < 25) select max(length(x)) from s",
            "string or blob too big",
        ),  # 32 MiB
        (
            "with recursive c(x) as (select 1 union all select x + 1 from c limit 100) select printf('%.*c', 1000000, 'x') from c",
            "query result too large",
        ),
    ],
)
def test_values_and_results_over_the_limits_are_refused(base, query, message):
    response = sql(base, query)
    assert response.status_code == 400 and message in response.json()["error"], response.text


def test_a_value_over_the_limit_in_a_table_filter_is_a_400_not_a_500(base):
    response = httpx.get(f"{base}/{DB}/instrument.json", params={"_where": "length(zeroblob(1000000000)) > 0"}, timeout=10)
    assert response.status_code == 400
    assert "string or blob too big" in response.json()["error"] and "16 MiB" in response.json()["error"]


def test_a_query_past_sqlites_heap_limit_fails_alone(base):
    """40 columns of 16 MB blobs: 640 MB of SQLite heap, over the 512 MiB process limit; the server lives on."""
    columns = ", ".join(f"zeroblob(16000000) || x'00' as c{n}" for n in range(40))
    response = sql(base, f"select {columns}")
    assert response.status_code == 400, response.text[:300]
    assert "more memory than SQL may use here (512 MiB" in response.json()["error"]
    assert sql(base, "select count(*) as n from instrument").json() == [{"n": 1}]


def test_a_failed_query_is_logged_without_the_requests_cookies(tmp_path):
    secret = "s3cr3t-c00kie-4711"  # short: rich wraps long values over lines
    with datasette_site(tmp_path) as (base, _, _):
        response = httpx.get(f"{base}/{DB}.json", params={"sql": SLOW_SQL}, cookies={"ds_actor": secret}, timeout=10)
        assert response.status_code == 400 and "SQL query took too long" in response.json()["error"]
    log = (tmp_path / "datasette.log").read_text()  # complete once the server has stopped
    assert "Finished server process" in log and secret not in log


def run_slow_queries(base: str, clients: int, seconds: float) -> list[threading.Thread]:
    until = time.monotonic() + seconds

    def loop():
        with httpx.Client(timeout=60) as client:
            while time.monotonic() < until:
                client.get(f"{base}/{DB}.json", params={"sql": SLOW_SQL})

    threads = [threading.Thread(target=loop) for _ in range(clients)]
    for thread in threads:
        thread.start()
    return threads


def test_table_pages_answer_while_slow_queries_run(base):
    threads = run_slow_queries(base, clients=8, seconds=6)
    try:
        time.sleep(1)
        for table in ("executed_obs_unit", "raw_data_file", "housekeeping_sample", "instrument"):
            started = time.monotonic()
            response = httpx.get(f"{base}/{DB}/{table}.json", timeout=30)
            assert response.status_code == 200 and time.monotonic() - started < 3, (table, time.monotonic() - started)
        canned = httpx.get(f"{base}/{DB}/files_not_replicated.json", timeout=30)
        assert canned.status_code == 200 and len(canned.json()["rows"]) == 3
    finally:
        for thread in threads:
            thread.join()


@pytest.fixture(scope="module")
def one_slot(tmp_path_factory):
    """A Datasette with one SQL slot and a short wait, so that one slow query fills it."""
    workdir = tmp_path_factory.mktemp("datasette-one-slot")
    metadata = served_metadata.merged(METADATA)  # the engine's settings win over a domain's: changed after the merge
    metadata["plugins"]["opsync-sql-limits"] = {"sql_slots": 1, "sql_wait_s": 0.3}
    path = workdir / "one-slot.yml"
    path.write_text(yaml.safe_dump(metadata))
    fill_read_model(workdir / "opsync.db")
    with serve_datasette(workdir, workdir / "opsync.db", metadata=path, merge=False) as base:
        yield base


@contextmanager
def slot_taken(base: str) -> Iterator[None]:
    """One slow query (1 s, the time limit) holds the only slot; the caller's requests time out waiting (0.3 s)."""
    thread = threading.Thread(target=lambda: httpx.get(f"{base}/{DB}.json", params={"sql": SLOW_SQL}, timeout=30))
    thread.start()
    time.sleep(0.2)
    try:
        yield
    finally:
        thread.join()


def test_sql_beyond_the_slots_gets_503_with_retry_after_and_pages_and_charts_still_answer(one_slot):
    base = one_slot
    with slot_taken(base):
        busy = sql(base, "select 1 as one")
        assert busy.status_code == 503 and busy.headers["retry-after"] == "2"
        assert busy.json()["ok"] is False and "at most 1 at once" in busy.json()["error"]
    with slot_taken(base):
        page = httpx.get(f"{base}/{DB}", params={"sql": "select 1"}, timeout=10)
        assert page.status_code == 503 and "text/html" in page.headers["content-type"] and "SQL busy" in page.text
    for params in (
        {"_where": "1 = 1"},
        {"_facet": "file_type"},
        {"path__contains": "x"},
        {"_sort": "size_bytes"},
        {"file_type__not": "fits"},
        {"_stream": "1"},
    ):  # SQL of the client's choosing, scanning every row
        with slot_taken(base):
            assert httpx.get(f"{base}/{DB}/raw_data_file.json", params=params, timeout=10).status_code == 503, params
    with slot_taken(base):  # the default view, equality filters and sorts on indexed columns, a row: never queued
        for params in ({}, {"_sync_state__exact": "buffered"}, {"file_type__exact": "fits", "_sort_desc": "id", "_size": "5"}):
            assert httpx.get(f"{base}/{DB}/raw_data_file.json", params=params, timeout=10).status_code == 200, params
        row = httpx.get(f"{base}/{DB}/raw_data_file/{one_slot_rows(base)}.json", timeout=10)
        assert row.status_code == 200
    with slot_taken(base):
        chart = served_metadata.merged(METADATA)["plugins"]["datasette-dashboards"]["observatory"]["charts"]["not-replicated"]
        assert sql(base, chart["query"], _shape="objects").status_code == 200  # the dashboards' own SQL is not queued
        assert httpx.get(f"{base}/{DB}/instrument.json", timeout=10).status_code == 200
    assert sql(base, "select 1 as one").json() == [{"one": 1}]  # the slot is free again


def one_slot_rows(base: str) -> str:
    return httpx.get(f"{base}/{DB}/raw_data_file.json", params={"_shape": "array", "_size": "1"}, timeout=10).json()[0]["id"]


def test_a_time_limit_that_is_not_a_number_is_a_400(base):
    for path in (f"/{DB}.json?sql=select+1&_timelimit=abc", f"/{DB}/instrument.json?_timelimit=1.5"):
        response = httpx.get(f"{base}{path}", timeout=10)
        assert response.status_code == 400 and "_timelimit must be a whole number" in response.json()["error"], path
    assert httpx.get(f"{base}/{DB}/instrument.json?_timelimit=500", timeout=10).status_code == 200


def test_datasette_refuses_to_start_when_sql_slots_would_take_every_thread(tmp_path):
    fill_read_model(tmp_path / "opsync.db")
    done = subprocess.run(
        [
            str(Path(sys.executable).parent / "datasette"),
            "serve",
            str(tmp_path / "opsync.db"),
            "--port",
            "0",
            "--metadata",
            str(served_metadata.write(tmp_path / "metadata.json", METADATA)),
            "--plugins-dir",
            str(REPO / "datasette/plugins"),
            "--setting",
            "num_sql_threads",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        cwd=tmp_path,
    )
    assert done.returncode != 0
    assert "num_sql_threads (2) must exceed opsync-sql-limits sql_slots (2)" in done.stderr


def test_make_up_and_the_compose_deployment_give_datasette_the_same_settings():
    compose = yaml.safe_load((REPO / "docker-compose.yaml").read_text())
    words = " ".join(compose["services"]["datasette"]["command"]).split()
    settings = {words[i + 1]: words[i + 2] for i, word in enumerate(words) if word == "--setting"}
    ours = dict(zip(DATASETTE_SETTINGS[1::3], DATASETTE_SETTINGS[2::3], strict=True))
    assert settings == ours and int(ours["num_sql_threads"]) > 2
