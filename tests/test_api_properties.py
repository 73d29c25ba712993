"""Property-based tests of the ingest API over raw bytes, JSON shapes and headers, for every route.

Whatever a client sends, the answer is never a 5xx (a 503 only as documented, with Retry-After),
every refusal is JSON in the documented error model (``{"detail": str | [{"loc", "msg", "type"}]}``),
a refused request leaves the site buffer byte for byte as it was, and an accepted one leaves it
consistent (``tests/buffer_checks.py``). Requests go in-process through the ASGI app where httpx
can say them, and as raw bytes through uvicorn (``live_api``) for what it cannot: invalid UTF-8
and control characters in the request line, bad percent-encoding, odd ``Content-Length`` and
``Host``. Real Redis (a fresh one per test) and PostgreSQL. ``OPSYNC_PROPERTY_EXAMPLES`` sets the
examples per test (default 60).
"""

import json
import os
import socket
import uuid
from collections import Counter
from urllib.parse import quote, urlsplit

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest_api.deps import ErrorBody
from opsync import registry
from tests.buffer_checks import assert_consistent
from tests.conftest import wait_for

EXAMPLES = int(os.environ.get("OPSYNC_PROPERTY_EXAMPLES", "60"))
BUDGET = settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
TABLES = sorted(map(str, registry.REGISTRY))
UVICORN_REFUSAL = b"Invalid HTTP request received."  # uvicorn's own 400 for what is not HTTP: the app never sees it

# --- strategies ---------------------------------------------------------------------------------

ODD_CHARACTERS = st.sampled_from(["\x00", "\x01", "\x1f", "\x7f", "\ud800", "\udfff", "\u202e", "\ufeff", "\U0001f52d", "%", "/", "\\"])
TEXT = st.text(st.characters(exclude_categories=()) | ODD_CHARACTERS, max_size=12)
NUMBERS = st.integers() | st.integers(min_value=2**63 - 2, max_value=2**64) | st.floats()  # floats include NaN and ±Infinity
SCALARS = st.none() | st.booleans() | NUMBERS | TEXT
JSON_VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=12,
)
REFS = st.builds(lambda name: {"$ref": name}, JSON_VALUES)
UUIDS = st.uuids().map(str)
TIMES = st.sampled_from(
    [
        "2026-11-21T02:10:00Z",
        "2026-11-21T02:10:00+14:00",
        "0001-01-01T00:00:00Z",
        "9999-12-31T23:59:59-05:00",
        "2026-11-21T02:10:00",
        "2026-02-30T00:00:00Z",
        "infinity",
    ]
)


def valid_records() -> dict[str, st.SearchStrategy[dict]]:
    """A valid row of each buffered table (its references need not exist: the primary checks them)."""
    sha = "ab" * 32
    return {
        "executed_obs_unit": st.fixed_dictionaries(
            {
                "obs_unit_id": UUIDS,
                "instrument_module_id": UUIDS,
                "start_time": st.just("2026-11-21T02:10:00Z"),
            }
        ),
        "raw_data_file": st.fixed_dictionaries(
            {
                "executed_obs_unit_id": UUIDS,
                "path": UUIDS.map(lambda u: f"/data/{u}.fits"),
                "size_bytes": st.integers(0, 2**63 - 1),
                "checksum_sha256": st.just(sha),
                "file_type": st.just("fits"),
            }
        ),
        "raw_data_package": st.fixed_dictionaries({"name": UUIDS, "executed_obs_unit_id": UUIDS}),
        "housekeeping_sample": st.fixed_dictionaries(
            {
                "instrument_module_id": UUIDS,
                "sensor": st.just("t"),
                "sampled_at": st.just("2026-11-21T03:00:00Z"),
                "value": st.floats(allow_nan=False, allow_infinity=False),
            }
        ),
    }


VALID = valid_records()


@st.composite
def records(draw, table: str | None = None) -> tuple[str, dict]:
    """A table and a row for it: valid, or valid with some fields dropped, replaced or added."""
    table = table or draw(st.sampled_from(sorted(VALID)))
    row = dict(draw(VALID[table]))
    if draw(st.booleans()):
        for field in draw(st.sets(st.sampled_from(sorted(row)), max_size=2)):
            del row[field]
        fields = st.sampled_from([c.name for c in registry.get_table(table).table.columns]) | TEXT
        row |= draw(st.dictionaries(fields, JSON_VALUES | REFS | TIMES, max_size=2))
    return table, row


def deep(depth: int, kind: str) -> bytes:
    """JSON nested ``depth`` levels, as bytes: built as an object, it would be too deep for ``json.dumps``."""
    if kind == "list":
        return b"[" * depth + b"]" * depth
    return b'{"a":' * depth + b"1" + b"}" * depth


DEPTHS = st.builds(
    deep, st.integers(0, 20) | st.integers(25, 40) | st.integers(200, 1200) | st.just(100_000), st.sampled_from(["list", "dict"])
)


def dumps(value) -> bytes:
    """JSON as a careless client writes it: NaN and Infinity as bare words, lone surrogates as ``\\ud800`` escapes."""
    return json.dumps(value).encode()


@st.composite
def bodies(draw, shape: st.SearchStrategy) -> bytes:
    """Bytes of a body: ``shape`` as JSON, any JSON, deep JSON, a shape with undecodable bytes in it, or any bytes."""
    kind = draw(st.sampled_from(["shape", "shape", "shape", "json", "deep", "deep inside", "not utf-8", "utf-16", "bytes"]))
    if kind == "shape":
        return dumps(draw(shape))
    if kind == "json":
        return dumps(draw(JSON_VALUES))
    if kind == "deep":
        return draw(DEPTHS)
    if kind == "deep inside":
        return b'{"metadata": ' + draw(DEPTHS) + b', "steps": [{"table": "raw_data_file", "values": {"path": ' + draw(DEPTHS) + b"}}]}"
    if kind == "not utf-8":
        return b'{"path": "' + draw(st.binary(min_size=1, max_size=8)) + b'", "status": "completed"}'
    if kind == "utf-16":
        return json.dumps(draw(shape)).encode("utf-16")
    return draw(st.binary(max_size=64))


CONTENT_TYPES = st.sampled_from(
    [
        "application/json",
        "application/json; charset=utf-8",
        "application/merge-patch+json",
        "application/json; charset=latin-1",
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/",
        "*/*",
        "",
    ]
) | st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=20)
HEADER_TEXT = st.binary(max_size=40).map(lambda b: bytes(c for c in b if c >= 0x20 and c != 0x7F))  # what HTTP lets through


def authorizations(token: str) -> st.SearchStrategy[bytes | None]:
    good = token.encode()
    return st.sampled_from(
        [
            b"Bearer " + good,
            b"bearer " + good,
            b"Bearer  " + good + b" ",
            None,
            b"",
            b"Bearer",
            b"Bearer ",
            b"Basic " + good,
            good,
            b"Bearer " + good + b"x",
        ]
    ) | HEADER_TEXT.map(lambda b: b"Bearer " + b)


@st.composite
def write_headers(draw, token: str) -> dict[str, bytes]:
    """Mostly a good token and JSON; any of the headers a write route reads may be odd."""
    headers = {"Authorization": b"Bearer " + token.encode(), "Content-Type": b"application/json"}
    if draw(st.booleans()):
        headers["Authorization"] = draw(authorizations(token))
    if draw(st.booleans()):
        headers["Content-Type"] = draw(CONTENT_TYPES).encode()
    if draw(st.booleans()):
        headers["Idempotency-Key"] = draw(HEADER_TEXT | st.integers(190, 260).map(lambda n: b"k" * n))
    if draw(st.integers(0, 5)) == 0:
        headers["Host"] = draw(HEADER_TEXT | st.sampled_from([b"[", b"[::1", b"a b", b"host:99999", b"host:-1", b"::::"]))
    return {name: value for name, value in headers.items() if value is not None}


def segment(text: str) -> str:
    """A path segment as a client would encode it, whatever it holds (slashes and surrogates too)."""
    return quote(text.encode("utf-8", "surrogatepass"), safe="")


def query(pairs: list[tuple[str, str]]) -> str:
    return "&".join(f"{segment(k)}={segment(v)}" for k, v in pairs)


TABLE_NAMES = st.sampled_from(TABLES) | st.sampled_from(["sync_ledger", "api_token", "..", "%2e%2e", "pg_catalog.pg_user"]) | TEXT
ROW_IDS = UUIDS | TEXT | st.sampled_from(["..", "00000000-0000-0000-0000-000000000000", "{12345678-1234-5678-1234-567812345678}"])

# --- checks ------------------------------------------------------------------------------------


def snapshot(client) -> dict[bytes, bytes]:
    """Every key of the (test's own) Redis with its serialised value."""
    keys = sorted(client.scan_iter(count=1000))
    with client.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.dump(key)
        return dict(zip(keys, pipe.execute(), strict=True))


def assert_answered(status: int, headers, body: bytes, request: str) -> None:
    """Never a 5xx but a 503 that says when to retry; every refusal in the documented error model."""
    assert status < 500 or (status == 503 and "retry-after" in headers), f"{status} for {request}: {body[:300]!r}"
    if status >= 400 and not request.startswith("HEAD "):  # the answer to a HEAD has no body
        assert headers.get("content-type", "").startswith("application/json"), f"{status} for {request}: {body[:300]!r}"
        ErrorBody.model_validate_json(body)


@pytest.fixture
def app(own_redis, ingest_app):
    """The app on a Redis of its own, so the buffer's every key belongs to this test."""
    return ingest_app


@pytest.fixture
def token(issue_token) -> str:
    return issue_token(["admin"])


@pytest.fixture
def call(app, own_redis):
    """``call(method, url, headers, body)``: the answer, checked, and the buffer after it."""
    from fastapi.testclient import TestClient

    from ingest_api.deps import get_buffer

    redis_client = own_redis.client()
    with TestClient(app, raise_server_exceptions=False) as client:

        def request(method: str, url: str, headers: dict | None = None, body: bytes | None = None) -> httpx.Response:
            before = snapshot(redis_client)
            response = client.request(method, url, headers=headers, content=body)
            assert_answered(response.status_code, response.headers, response.content, f"{method} {url} {body!r:.200}")
            if response.status_code >= 300:
                assert snapshot(redis_client) == before, f"{method} {url} was refused ({response.status_code}) yet changed the buffer"
            else:
                assert_consistent(get_buffer())
            return response

        yield request
    redis_client.close()


# --- every route, in-process --------------------------------------------------------------------


@BUDGET
@given(data=st.data())
def test_post_records_answers_any_body(call, token, data):
    table, row = data.draw(records())
    table = data.draw(st.just(table) | TABLE_NAMES)
    shape = st.just(row) | st.lists(records(table if table in VALID else None).map(lambda r: r[1]), max_size=3)
    call("POST", f"/v1/records/{segment(table)}", data.draw(write_headers(token)), data.draw(bodies(shape)))


@st.composite
def steps(draw) -> dict:
    """One step as a client may write it: an insert of a row as :func:`records` makes, or with every key
    optional and any of them odd."""
    table, row = draw(records())
    if draw(st.booleans()):
        return {"table": table, "values": row}
    step = {"table": draw(st.just(table) | TABLE_NAMES), "values": draw(st.just(row) | JSON_VALUES)}
    optional = {
        "op": st.sampled_from(["insert", "upsert", "update", "delete"]) | JSON_VALUES,
        "id": UUIDS | JSON_VALUES,
        "ref": st.sampled_from(["a", "b"]) | JSON_VALUES,
        "extra": JSON_VALUES,
    }
    for key in draw(st.sets(st.sampled_from(sorted(optional)), max_size=3)):
        step[key] = draw(optional[key])
    if draw(st.booleans()) and isinstance(step["values"], dict):
        step["values"] = {**step["values"], "executed_obs_unit_id": draw(REFS | st.just({"$ref": "a"}))}
    return step


@BUDGET
@given(data=st.data())
def test_post_transactions_answers_any_body(call, token, data):
    listed = st.fixed_dictionaries({"steps": st.lists(steps(), min_size=1, max_size=3)})
    shape = listed | listed | st.fixed_dictionaries({"steps": st.lists(steps(), max_size=4) | JSON_VALUES})
    call("POST", "/v1/transactions", data.draw(write_headers(token)), data.draw(bodies(shape)))


@BUDGET
@given(data=st.data())
def test_patch_and_delete_answer_any_input(call, token, data):
    table, row = data.draw(records())
    url = f"/v1/records/{segment(data.draw(st.just(table) | TABLE_NAMES))}/{segment(data.draw(ROW_IDS))}"
    partial = {k: v for k, v in row.items() if data.draw(st.booleans())}
    if data.draw(st.booleans()):
        call("DELETE", url, data.draw(write_headers(token)), data.draw(st.none() | bodies(st.just(partial))))
    else:
        call("PATCH", url, data.draw(write_headers(token)), data.draw(bodies(st.just(partial) | JSON_VALUES)))


@BUDGET
@given(data=st.data())
def test_reads_answer_any_query(call, token, data):
    table = data.draw(st.sampled_from(TABLES) | TABLE_NAMES)
    known = registry.REGISTRY.get(table)
    names = st.sampled_from([*(known.filterable if known else ()), "limit", "after"]) | TEXT
    values = TEXT | UUIDS | st.integers().map(str) | st.sampled_from(["", "1e3", "running", "%zz", "\x00"])
    pairs = data.draw(st.lists(st.tuples(names, values), max_size=3))
    authorization = data.draw(st.sampled_from([f"Bearer {token}".encode()] * 2) | authorizations(token))
    headers = {"Authorization": authorization} if authorization is not None else {}
    route = data.draw(st.sampled_from(["list", "row", "txn", "txns"]))
    if route == "list":
        url = f"/v1/records/{segment(table)}?{query(pairs)}"
    elif route == "row":
        url = f"/v1/records/{segment(table)}/{segment(data.draw(ROW_IDS))}?{query(pairs)}"
    elif route == "txn":
        url = f"/v1/transactions/{segment(data.draw(ROW_IDS))}"
    else:
        ids = st.lists(UUIDS | TEXT, max_size=4).map(",".join)
        url = f"/v1/transactions?{query([('ids', v) for v in data.draw(st.lists(ids, max_size=2))])}"
    call("GET", url, headers)


@BUDGET
@given(data=st.data())
def test_health_metrics_and_unknown_routes_answer_anything(call, token, data):
    path = data.draw(
        st.sampled_from(["/healthz", "/readyz", "/metrics", "/openapi.json", "/v1", "/v1/records", "/v1/events/x"])
        | TEXT.map(lambda t: "/" + segment(t))
    )
    method = data.draw(st.sampled_from(["GET", "HEAD", "OPTIONS", "POST", "PUT", "DELETE", "TRACE"]))
    pairs = data.draw(st.lists(st.tuples(TEXT, TEXT), max_size=2))
    response = call(method, f"{path}?{query(pairs)}", data.draw(write_headers(token)), data.draw(st.none() | st.binary(max_size=32)))
    if path == "/readyz" and method == "GET":
        assert response.status_code == 200, response.text  # the test's Redis is durable and empty


def test_each_shape_once_found_answering_500(call, token):
    """The shapes found answering 500, one of each class (the properties above find the others)."""
    json_headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    text_headers = json_headers | {"Content-Type": "text/plain"}
    row = f"/v1/records/executed_obs_unit/{uuid.uuid4()}"
    cases = [
        ("PATCH", row, json_headers, b'"\\ud800"', 422),  # a lone surrogate echoed back in an error
        ("POST", "/v1/records/raw_data_file", json_headers, b"NaN", 422),  # NaN echoed back
        ("PATCH", row, text_headers, b"\xff\xfe", 422),  # bytes that are not UTF-8, echoed back
        (
            "POST",
            "/v1/transactions",
            json_headers,
            b'{"steps": [{"table": "raw_data_file", "values": {"path": ' + deep(300, "list") + b"}}]}",
            422,
        ),  # deep JSON the serialiser gave up on
        ("POST", "/v1/transactions", json_headers, b'{"steps": [{"table": "raw_data_file", "values": {"x": {"$ref": []}}}]}', 422),
        (
            "POST",
            "/v1/transactions",
            json_headers,
            json.dumps({"steps": [{"op": "delete", "table": "raw_data_file", "id": str(uuid.uuid4()), "values": {"x": 1}}]}).encode(),
            422,
        ),
        ("GET", "/v1/records/raw_data_file?path=a%00b", json_headers, None, 400),  # NUL sent to PostgreSQL
        ("POST", "/v1/records/raw_data_file", json_headers, b'{"size_bytes": ' + b"9" * 5000 + b"}", 422),
    ]
    for method, url, headers, body, status in cases:
        assert call(method, url, headers, body).status_code == status, (method, url, body)


# --- raw bytes through a real HTTP server --------------------------------------------------------


def raw_request(base: str, data: bytes, timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
    """Send ``data`` as is on a new connection and read the answer until the server closes it."""
    address = urlsplit(base)
    with socket.create_connection((address.hostname, address.port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, body


RAW_BYTES = st.binary(max_size=12) | st.sampled_from(
    [b"%", b"%zz", b"%f", b"%ff%fe", b"%ed%a0%80", b"%00", b"\xff", b"\x00", b"\x01", b"\x7f", b" ", b"\t", b"%2F", b"%2e%2e", b"\xc3\x28"]
)


@st.composite
def raw_requests(draw, token: str) -> bytes:
    """A request on the wire: any route, with raw bytes in its path segments, query and headers."""
    method = draw(st.sampled_from([b"GET", b"POST", b"PATCH", b"DELETE", b"PUT", b"G\xffT"]))
    template = draw(
        st.sampled_from(
            [
                [b"v1", b"records", b"{table}"],
                [b"v1", b"records", b"{table}", b"{id}"],
                [b"v1", b"transactions"],
                [b"v1", b"transactions", b"{id}"],
                [b"healthz"],
                [b"readyz"],
                [b"metrics"],  # events: an open stream never ends
            ]
        )
    )
    parts = [
        draw(st.sampled_from([t.encode() for t in TABLES]) | RAW_BYTES)
        if part == b"{table}"
        else draw(st.just(str(uuid.uuid4()).encode()) | RAW_BYTES)
        if part == b"{id}"
        else part
        for part in template
    ]
    target = b"/" + b"/".join(parts)
    if draw(st.booleans()):
        target += b"?" + b"&".join(k + b"=" + v for k, v in draw(st.lists(st.tuples(RAW_BYTES, RAW_BYTES), max_size=3)))
    body = draw(st.just(b"") | bodies(records().map(lambda r: r[1])).filter(lambda b: len(b) < 65536))  # sent before any answer
    headers = [(b"Authorization", draw(st.just(b"Bearer " + token.encode()) | HEADER_TEXT))]
    headers += [(b"Content-Type", draw(st.just(b"application/json") | HEADER_TEXT)), (b"Connection", b"close")]
    if draw(st.integers(0, 3)):
        headers.append((b"Host", draw(st.just(b"127.0.0.1") | HEADER_TEXT)))
    if draw(st.booleans()):
        headers.append((b"Idempotency-Key", draw(HEADER_TEXT)))
    odd_length = st.sampled_from([b"-1", b"1e3", b"", b"0x10", b" 5", b"9" * 20]) | st.integers(0, len(body)).map(b"%d".__mod__)
    length = draw(st.just(b"%d" % len(body)) | st.just(b"%d" % len(body)) | odd_length)
    headers.append((b"Content-Length", length))
    return method + b" " + target + b" HTTP/1.1\r\n" + b"".join(k + b": " + v + b"\r\n" for k, v in headers) + b"\r\n" + body


@BUDGET
@given(data=st.data())
def test_raw_requests_on_the_wire(own_redis, live_api, token, data):
    """What uvicorn refuses as not HTTP is its own plain 400; what reaches the app is answered as documented."""
    request = data.draw(raw_requests(token))
    redis_client = own_redis.client()
    try:
        before = snapshot(redis_client)
        status, headers, body = raw_request(live_api, request)
        if status >= 300:
            assert snapshot(redis_client) == before, f"refused ({status}) yet changed the buffer: {request[:300]!r}"
    finally:
        redis_client.close()
    if status == 400 and body == UVICORN_REFUSAL:
        return
    assert_answered(status, headers, body, repr(request[:300]))


@settings(BUDGET, max_examples=max(EXAMPLES // 3, 1))  # each stream holds a Redis subscription while it opens and closes
@given(data=st.data())
def test_event_streams_open_or_are_refused(own_redis, live_api, token, data):
    values = st.just(str(uuid.uuid4())) | TEXT | st.sampled_from(["", "%00", ",".join(str(uuid.uuid4()) for _ in range(3))])
    pairs = data.draw(st.lists(st.tuples(st.sampled_from(["txn_id", "x"]), values), max_size=3))
    authorization = data.draw(authorizations(token))
    headers = {"Authorization": authorization.strip()} if authorization is not None else {}  # h11 sends no edge spaces
    with httpx.stream("GET", f"{live_api}/v1/events?{query(pairs)}", headers=headers, timeout=10) as response:
        if response.status_code == 200:
            assert response.headers["content-type"].startswith("text/event-stream")
            assert next(response.iter_lines()).startswith("event: ready")
            return
        body = response.read()
    assert_answered(response.status_code, response.headers, body, f"GET /v1/events?{query(pairs)}")


def test_a_client_that_hangs_up_mid_body_is_no_error(own_redis, live_api, token, caplog):
    """No answer can reach it, so none is an error: counted as 499, never logged as an internal error or a 500."""
    from prometheus_client.parser import text_string_to_metric_families

    def counted() -> Counter:
        families = text_string_to_metric_families(httpx.get(f"{live_api}/metrics").text)
        return Counter(
            {
                (s.labels["route"], s.labels["status"]): s.value
                for family in families
                if family.name == "opsync_http_requests"
                for s in family.samples
                if s.name.endswith("_total") and s.labels["method"] == "POST"
            }
        )

    before = counted()
    address = urlsplit(live_api)
    routes = ["/v1/records/{table}", "/v1/transactions"]
    for path in (b"/v1/records/raw_data_file", b"/v1/transactions"):
        with socket.create_connection((address.hostname, address.port), timeout=10) as sock:
            sock.sendall(
                b"POST "
                + path
                + b" HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                + token.encode()
                + b'\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"path": '
            )
    expected = Counter({(route, "499"): 1 for route in routes})
    wait_for(lambda: counted() - before == expected, what=f"{expected} counted")
    assert "internal error" not in caplog.text


def test_rows_python_cannot_hold_are_served(call, token, primary_engine, replica_engine, planning):
    """Rows written at the main site may hold what PostgreSQL has and Python has not (``infinity``, years
    past 9999, NaN): reading them, or a page that holds them, is answered, not a 500 for everyone."""
    from sqlalchemy import text

    ids = [uuid.uuid4() for _ in range(3)]
    with primary_engine.begin() as conn:
        for key, when in zip(ids[:2], ["infinity", "12026-01-01T00:00:00Z"], strict=True):
            conn.execute(
                text("INSERT INTO executed_obs_unit (id, obs_unit_id, instrument_module_id, start_time) VALUES (:i, :o, :m, :t)"),
                {"i": key, "o": planning["obs_unit"], "m": planning["module"], "t": when},
            )
        conn.execute(
            text(
                "INSERT INTO housekeeping_sample (id, instrument_module_id, sensor, sampled_at, value) VALUES (:i, :m, 't', now(), 'NaN')"
            ),
            {"i": ids[2], "m": planning["module"]},
        )
    try:

        def replicated() -> bool:
            with replica_engine.connect() as conn:
                return conn.execute(text("SELECT 1 FROM housekeeping_sample WHERE id = :i"), {"i": ids[2]}).first() is not None

        wait_for(replicated, what="the replica")
        headers = {"Authorization": f"Bearer {token}"}
        starts = [call("GET", f"/v1/records/executed_obs_unit/{key}", headers).json()["start_time"] for key in ids[:2]]
        assert starts[0] == "infinity" and starts[1].startswith("12026-01-01")
        listed = call("GET", f"/v1/records/executed_obs_unit?obs_unit_id={planning['obs_unit']}", headers)
        assert {row["id"] for row in listed.json()["rows"]} == set(map(str, ids[:2]))
        assert call("GET", f"/v1/records/housekeeping_sample/{ids[2]}", headers).status_code == 200
    finally:
        with primary_engine.begin() as conn:  # other tests read these tables
            conn.execute(text("DELETE FROM executed_obs_unit WHERE id = ANY(:i)"), {"i": ids[:2]})
            conn.execute(text("DELETE FROM housekeeping_sample WHERE id = :i"), {"i": ids[2]})
