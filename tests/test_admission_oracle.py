"""Differential test of admission, whose oracle is PostgreSQL: the site answers 422 exactly when the primary
would refuse, and shows readers exactly what the primary stores.

Hypothesis draws a column of an ingestible table and a value for it, from the column's SQL type (every
registered input column of every ingestible table, from the schema), with the edge families: dates and
offsets at and past PostgreSQL's limits and malformed ones, numbers as strings, non-finite and
unrepresentable numbers, huge integers, integral floats for integers, NUL and lone surrogates, long
strings, deep JSON, wrong JSON types. Each record goes through the real API, and the same JSON value goes
into the real primary through the drainer's own statement (:func:`opsync.apply.run_statement`) in a
transaction that is rolled back. A 422 where the primary accepts would block an observation; a 202 where
it refuses would lose one; both fail the test, as does an accepted value that readers see differently
from what the primary stored.

Excluded, explicitly, are the documented divergences (see :mod:`opsync.admission`), each of which must be
answered 422 naming it, and refusals that depend on rows outside the transaction (foreign and unique keys).

Examples per column: ``OPSYNC_ORACLE_EXAMPLES`` (default 20: about 700 in all, under a minute).
"""

import json
import os
import uuid
from dataclasses import dataclass

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg.types.json import Jsonb
from pydantic_core import to_json
from sqlalchemy import Boolean, DateTime, Float, Integer, String, Uuid
from sqlalchemy.sql.sqltypes import JSON

from opsync import admission, apply, registry
from opsync.envelope import Op

EXAMPLES = int(os.environ.get("OPSYNC_ORACLE_EXAMPLES", "20"))  # per column
SHA = "ab" * 32
OUTSIDE = ("23503", "23505")  # foreign and unique keys: rows outside the transaction decide
COLUMNS = [
    (entry.name, column)
    for entry in registry.ingestible_tables()
    for column in registry.input_columns(entry.table)
    if not column.primary_key
]


@dataclass(frozen=True)
class Raw:
    """JSON text put into the body as it is: numbers Python's parser would not keep apart (1e400, 1e-400)."""

    text: str


RAW_NUMBERS = ["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1e-400", "-1e-400", "2.4e-324", "1e99999"]
WS = st.sampled_from(["", " ", "  ", "\t", "\n", "\r\n", "\v", "\f", "\u00a0", "\u2003"])
TEXT = st.text(st.characters(codec="utf-8") | st.sampled_from(["\x00", "\ud800", "\udfff", "é", "🔭", " ", "\n"]), max_size=20)


def weighted(*choices: st.SearchStrategy) -> st.SearchStrategy:
    """One of ``choices``, each equally likely (repeat one to weight it): ``one_of`` favours its first branches."""
    return st.sampled_from(choices).flatmap(lambda chosen: chosen)


def json_values(max_leaves: int = 8) -> st.SearchStrategy:
    scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | TEXT
    return st.recursive(
        scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3), max_leaves=max_leaves
    )


def deep(depth: int) -> dict:
    value: dict = {"leaf": 1}
    for _ in range(depth - 1):
        value = {"d": value}
    return value


def junk() -> st.SearchStrategy:
    """Any column's wrong-type and edge values."""
    return st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**70), 2**70),
        st.floats(allow_nan=False, allow_infinity=False),
        st.sampled_from(RAW_NUMBERS).map(Raw),
        TEXT,
        json_values(),
        st.integers(10, 40).map(deep),
        st.sampled_from([[], {}, "", "null", "true"]),
    )


def spelled_int() -> st.SearchStrategy:
    edges = st.sampled_from([0, 1, -1, 2**15 - 1, 2**15, -(2**15) - 1, 2**31 - 1, 2**31, 2**63 - 1, 2**63, -(2**63), -(2**63) - 1])
    number = st.integers() | edges
    spelled = st.builds(lambda a, s, n, b: f"{a}{s}{n}{b}", WS, st.sampled_from(["", "+", "-"]), number.map(abs), WS)
    return weighted(
        number,
        spelled,
        spelled,
        edges.map(float),
        st.sampled_from([1.0, 1e16, 1e20, 1.5, -0.0, 1e-7, 1.5e300]),
        st.sampled_from(["1_000", "0x10", "1.0", "1e3", "١٢", "12 3", "+", "-", " ", "12a", "0012"]),
    )


def spelled_float() -> st.SearchStrategy:
    spelled = st.builds(lambda a, f, b: f"{a}{f!r}{b}", WS, st.floats(allow_nan=False, allow_infinity=False), WS)
    return weighted(
        st.floats(allow_nan=False, allow_infinity=False),
        st.integers(-(10**320), 10**320),
        st.sampled_from([10**308 * 2, 10**309]),
        spelled,
        spelled,
        st.sampled_from(
            [
                "nan",
                "NaN",
                "-nan",
                " inf ",
                "+Infinity",
                "-infinity",
                "infinit",
                "INF",
                "1e",
                "1e+",
                ".5",
                "5.",
                "0x1p3",
                "0x1.8",
                "0x",
                "nan(123)",
                "1e400",
                "1e-400",
                "-1e-400",
                "2.5e-324",
                "1e-310",
                "1.0e2",
                "1,5",
                "1_0",
                "",
                "  ",
                "e5",
                "--1",
            ]
        ),
    )


def spelled_bool() -> st.SearchStrategy:
    words = [
        "t",
        "tr",
        "true",
        "TRUE",
        "True",
        "truex",
        "f",
        "fa",
        "false",
        "y",
        "ye",
        "yes",
        "n",
        "no",
        "nope",
        "on",
        "ON",
        "o",
        "of",
        "off",
        "offf",
        "1",
        "0",
        "01",
        "2",
        "",
        " t ",
        "\tyes\n",
        "\u00a0t",
    ]
    return st.sampled_from(words) | st.sampled_from([0, 1, 2, -1, 1.0, 0.0]) | st.booleans()


def spelled_uuid(key: str) -> st.SearchStrategy:
    bare = key.replace("-", "")
    return st.sampled_from(
        [
            key,
            key.upper(),
            f"{{{key}}}",
            bare,
            f"{{{bare}}}",
            "-".join(bare[i : i + 4] for i in range(0, 32, 4)),
            f"urn:uuid:{key}",
            f" {key}",
            f"{key} ",
            f"{{{key}",
            key[:-1],
            key + "0",
            bare[:8] + "-" + bare[8:],
            "-" + key,
            key.replace("-", "--", 1),
            "not-a-uuid",
            "",
        ]
    )


def spelled_string(length: int | None) -> st.SearchStrategy:
    n = length or 300
    return weighted(
        TEXT,
        st.sampled_from([n - 1, n, n + 1]).flatmap(lambda k: st.sampled_from(["a", "é", "🔭", " "]).map(lambda c: c * k)),
        st.sampled_from([n, n - 1]).map(lambda k: "a" * k + "   "),
        st.sampled_from([n]).map(lambda k: "a" * k + " x"),
        st.integers(),
        st.floats(allow_nan=False, allow_infinity=False),
        json_values(4),
        st.just("0" * 64),
        st.just(SHA),
        st.just(SHA.upper()),
        st.just(SHA + "\n"),
        st.sampled_from(["running", "completed", "open", "sealed", "running ", "Running"]),
    )


TIME_PARTS = {  # an RFC 3339 time's fields: valid values, and the edges one of them takes at a time
    "year": (st.sampled_from([1, 2, 1969, 1970, 2026, 9998, 9999]) | st.integers(1, 9999), [0]),
    "month": (st.integers(1, 12), [0, 13]),
    "day": (st.integers(1, 28), [0, 29, 30, 31, 32]),
    "sep": (st.sampled_from(["T", " "]), ["t", "  ", "_"]),
    "hour": (st.integers(0, 23), [24, 25]),
    "minute": (st.integers(0, 59), [60]),
    "second": (st.integers(0, 59), [60, 61]),
    "fraction": (st.sampled_from(["", ".5", ".123456", ".000001"]), [".1234567", ".9999995", ".9999999", ".", ".12345678901"]),
    "offset": (
        st.just("Z")
        | st.builds(lambda s, h, m: f"{s}{h:02d}:{m:02d}", st.sampled_from("+-"), st.integers(0, 15), st.sampled_from([0, 30, 45, 59])),
        [
            "+16:00",
            "-16:00",
            "+23:59",
            "-23:59",
            "+15:60",
            "+24:00",
            "z",
            "",
            " UTC",
            " Europe/Berlin",
            " PST",
            "+00",
            "+0530",
            "+05:30:15",
            "+15:59:59",
            "-15:59:60",
        ],
    ),
}


def rfc3339(parts: dict) -> str:
    return ("{year:04d}-{month:02d}-{day:02d}{sep}{hour:02d}:{minute:02d}:{second:02d}{fraction}{offset}").format(**parts)


def spelled_time() -> st.SearchStrategy:
    """RFC 3339 times, valid but for at most one field at or past a limit, and other spellings PostgreSQL reads."""
    rfc = (
        st.sampled_from([None, *TIME_PARTS])
        .flatmap(
            lambda edge: st.fixed_dictionaries(
                {name: st.sampled_from(edges) if name == edge else valid for name, (valid, edges) in TIME_PARTS.items()}
            )
        )
        .map(rfc3339)
    )
    return weighted(
        rfc,
        rfc,
        rfc,
        rfc,
        st.builds(lambda y: f"{y}-06-01T00:00:00Z", st.sampled_from([10000, 99999, 294276, 294277])),
        st.sampled_from(
            [
                "now",
                "today",
                "tomorrow",
                "yesterday",
                "Now",
                " today ",
                "today 12:00+00",
                "epoch",
                "infinity",
                "-infinity",
                "allballs",
                "2026-11-21",
                "Nov 21 2026 02:10 PST",
                "2026-11-21 02:10:00 Europe/Berlin",
                "J2461000",
                "0044-03-15 12:00:00+00 BC",
                "4714-11-24 00:00:00+00 BC",
                "4714-11-23 00:00:00+00 BC",
                "0001-01-01T00:30:00+01:00",
                "9999-12-31T23:59:59-05:00",
                "2024-02-29T00:00:00Z",
                "2026-11-21T24:00:00Z",
                "2026-11-21T23:59:60Z",
                "20261121T021000Z",
                "2026-11-21T02:10Z",
                "1763690400",
                "garbage",
                "",
            ]
        ),
        st.integers(0, 2**40),
    )


def values_for(column, parents: dict) -> st.SearchStrategy:
    """The edge values of a column, from its SQL type and constraints."""
    sql_type = column.type
    if isinstance(sql_type, JSON):
        specific = json_values() | st.integers(1, 40).map(deep)
    elif isinstance(sql_type, Uuid):
        referred = next(iter(column.foreign_keys)).column.table.name if column.foreign_keys else None
        specific = spelled_uuid(str(parents[referred]) if referred else str(uuid.uuid4()))
    elif isinstance(sql_type, Boolean):
        specific = spelled_bool()
    elif isinstance(sql_type, Integer):
        specific = spelled_int()
    elif isinstance(sql_type, Float):
        specific = spelled_float()
    elif isinstance(sql_type, DateTime):
        specific = spelled_time()
    elif isinstance(sql_type, String):
        specific = spelled_string(sql_type.length)
    else:
        raise AssertionError(f"no strategy for {column} ({sql_type}): add one")
    return weighted(specific, specific, specific, specific, junk())


def valid_value(column, parents: dict, tag: str):
    """A value the primary takes for a required column (keys of existing parents, tagged unique strings)."""
    if column.foreign_keys:
        return str(parents[next(iter(column.foreign_keys)).column.table.name])
    rule = column.info.get("rule")
    if rule is not None and rule.pattern:
        return SHA
    if isinstance(column.type, Float | Integer):
        return rule.ge if rule is not None and rule.ge is not None else 1
    if isinstance(column.type, DateTime):
        return "2026-11-21T03:00:00Z"
    return f"{column.key[:4]}-{tag}"


def base_row(table: str, parents: dict, tag: str) -> dict:
    rules = admission.rules_of(table)
    return {name: valid_value(registry.get_table(table).table.c[name], parents, tag) for name in rules.required}


def body_text(row: dict) -> bytes:
    """The record as JSON text, :class:`Raw` values spliced in as written, lone surrogates as escapes."""
    raws = {f"__raw_{i}__": value.text for i, value in enumerate(v for v in row.values() if isinstance(v, Raw))}
    names = iter(raws)
    plain = {k: (next(names) if isinstance(v, Raw) else v) for k, v in row.items()}
    text = json.dumps(plain)
    for name, raw in raws.items():
        text = text.replace(json.dumps(name), raw)
    return text.encode()


@dataclass
class Stored:
    refused: str | None = None  # SQLSTATE
    message: str = ""
    value: object = None  # as a reader of the API sees it (psycopg, then the API's JSON)
    unloadable: bool = False  # psycopg cannot load what was stored
    zoned: bool = False  # the stored value moves with the session time zone: the input had no offset


def primary_verdict(conn: psycopg.Connection, table: str, column: str, row: dict, key: str) -> Stored:
    """Insert ``row`` through the drainer's statement, in a transaction rolled back, under two time zones."""
    statement, params = apply.run_statement([apply.Change(Op.insert, table, key, {k: None for k in row})])
    params[1] = Jsonb(None, dumps=lambda _: "[" + body_text(row).decode() + "]")
    seen = []
    result = Stored()
    shown = "extract(epoch FROM {})" if isinstance(registry.get_table(table).table.c[column].type, DateTime) else "{}"
    shown = shown.format(f'"{column}"')
    with conn.transaction(force_rollback=True):
        for zone in ("UTC", "<+14>-14"):
            try:
                with conn.transaction():
                    conn.execute("SELECT set_config('TimeZone', %s, true)", (zone,))
                    conn.execute(statement, params, prepare=False)
                    text = conn.execute(f'SELECT ({shown})::text FROM "{table}" WHERE id = %s', (key,)).fetchone()[0]
                    seen.append(text)
                    if zone == "UTC":
                        try:
                            loaded = conn.execute(f'SELECT "{column}" FROM "{table}" WHERE id = %s', (key,)).fetchone()[0]
                            result.value = json.loads(to_json(loaded, inf_nan_mode="null"))  # as the API serialises a replica row
                        except psycopg.DataError:
                            result.unloadable = True
                    conn.execute(f'DELETE FROM "{table}" WHERE id = %s', (key,))
            except psycopg.Error as exc:
                return Stored(refused=exc.sqlstate, message=str(exc).splitlines()[0])
    result.zoned = len(set(seen)) > 1
    return result


def divergence(column, value, stored: Stored, depth_limit: int) -> str | None:
    """Which documented divergence covers a value the primary accepts, if any: the API must refuse it, naming it."""
    if isinstance(value, Raw) and isinstance(admission.json_float(value.text), admission.Unrepresentable):
        return "double"
    if isinstance(value, dict | list) and json_depth(value) > depth_limit:
        return "nested too deeply"
    if isinstance(column.type, DateTime):
        if isinstance(value, str) and admission.RELATIVE_WORDS.intersection(admission.WORD.findall(value.lower())):
            return "relative time"
        if stored.zoned:
            return "UTC offset"
        if stored.unloadable:
            return "years 1 to 9999"
    return None


def json_depth(value) -> int:
    if isinstance(value, dict | list):
        items = value.values() if isinstance(value, dict) else value
        return 1 + max((json_depth(v) for v in items), default=0)
    return 0


@pytest.fixture
def parents(primary_engine, planning):
    """An existing row of every table a column refers to."""
    from sqlalchemy import text

    obs, package = uuid.uuid4(), uuid.uuid4()
    with primary_engine.begin() as conn:
        conn.execute(
            text("INSERT INTO executed_obs_unit (id, obs_unit_id, instrument_module_id, start_time) VALUES (:e, :o, :m, now())"),
            {"e": obs, "o": planning["obs_unit"], "m": planning["module"]},
        )
        conn.execute(
            text("INSERT INTO raw_data_package (id, name, executed_obs_unit_id) VALUES (:p, :n, :e)"),
            {"p": package, "n": f"pkg-{package}", "e": obs},
        )
    return {
        "instrument": planning["instrument"],
        "instrument_module": planning["module"],
        "obs_unit": planning["obs_unit"],
        "executed_obs_unit": obs,
        "raw_data_package": package,
    }


@pytest.fixture
def writer(auth_headers):
    return auth_headers(*registry.REGISTRY)


@pytest.fixture
def primary_conn(site_env):
    with psycopg.connect(site_env.primary_url.get_secret_value().replace("postgresql+psycopg", "postgresql"), autocommit=True) as conn:
        yield conn


def test_every_registered_column_is_covered():
    tables = {table for table, _ in COLUMNS}
    assert tables == {entry.name for entry in registry.ingestible_tables()}
    assert len(COLUMNS) >= 30


@pytest.mark.parametrize("table, column", COLUMNS, ids=[f"{t}.{c.key}" for t, c in COLUMNS])
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=False,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_the_site_refuses_exactly_what_the_primary_refuses(table, column, data, api_client, writer, parents, primary_conn, site_env):
    value = data.draw(values_for(column, parents), label="value")
    tag, key = uuid.uuid4().hex[:12], str(uuid.uuid4())
    row = base_row(table, parents, tag) | {column.key: value}
    headers = writer | {"Content-Type": "application/json"}
    response = api_client.post(f"/v1/records/{table}", content=body_text(row | {"id": key}), headers=headers)
    assert response.status_code in (202, 409, 422), response.text
    if response.status_code == 202 and registry.get_table(table).mode is registry.Mode.direct:
        primary_conn.execute(f'DELETE FROM "{table}" WHERE id = %s', (key,))
    stored = primary_verdict(primary_conn, table, column.key, row, key)
    if stored.refused in OUTSIDE:
        return
    admitted = response.status_code != 422
    named = divergence(column, value, stored, site_env.max_json_depth)
    if named is not None and stored.refused is None:
        assert not admitted and named in response.text, f"divergence {named!r} not refused naming it: {response.text}"
        return
    if stored.refused is not None:
        assert not admitted, f"202 for what the primary refuses ({stored.message}): the observation would be lost"
        return
    assert admitted, f"422 for what the primary accepts: the observation would be blocked: {response.text}"
    if response.status_code == 202 and registry.get_table(table).mode is registry.Mode.critical:
        shown = api_client.get(f"/v1/records/{table}/{key}", headers=headers).json()
        assert shown[column.key] == stored.value, f"readers see {shown[column.key]!r}, the primary stores {stored.value!r}"
