"""A second domain proves the engine generic: the data-transfer tables of ``tests/domains/transfer`` (a client-given
key in a column not called ``id``, direct planning tables, critical ones, a deletable one, no observing night)
run through the unchanged engine on real services.

The domain is selected as a site selects its own: published under the ``opsync.domains`` entry-point group
(a ``.dist-info`` on ``PYTHONPATH``, what installing its package would leave) and named by ``OPSYNC_DOMAIN``.
A process loads its domain once, and this one runs the observatory, so every part of the transfer site runs
as its own process, as at a site: the migration, the ingest API (``python -m ingest_api``), the token and drain
commands (``opsync tokens create``, ``opsync backlog drain --follow``), the ``opsync_drain`` DAG (``dag.test()``),
a real ``datasette serve`` with the domain's metadata and the publisher inside, and the read-model check. Its database is a fresh one on the
session's primary (replicated to the session's replica), its buffer a Redis of its own.
"""

import json
import os
import re
import secrets
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import CheckConstraint, create_engine, text

from devstack.local import VENV_BIN, datasette_command
from devstack.redis import RedisServer
from opsync import registry, schema
from opsync.read_model import metadata as served_metadata
from opsync.read_model.store import SYNC_COLUMNS, Layout
from tests.conftest import free_port, wait_for
from tests.domains import transfer

REPO = Path(__file__).resolve().parents[1]
TABLES = ("site", "route", "data_transfer_package", "data_transfer", "physical_copy", "volume")
DB = "opsync"  # the read model file's name, as Datasette names the database
ENTRY_POINTS = "[opsync.domains]\ntransfer = tests.domains.transfer:DOMAIN\n"


@dataclass
class TransferSite:
    """The transfer site's processes, and what a test does with them."""

    env: dict[str, str]  # every process's environment: OPSYNC_DOMAIN=transfer, its database, Redis, read model
    primary_url: str
    model_path: Path
    script: dict[str, str]  # Datasette's script token
    headers: dict[str, str] = field(default_factory=dict)  # the API's bearer token (every table, read and write)
    api: str = ""
    datasette: str = ""

    def run(self, *argv: str) -> str:
        done = subprocess.run(argv, env=self.env, cwd=REPO, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"{argv}: {done.stdout}{done.stderr}"
        return done.stdout

    def post(self, path: str, body) -> dict:
        response = httpx.post(f"{self.api}/v1{path}", json=body, headers=self.headers, timeout=10)
        assert response.status_code == 202, response.text
        return response.json()

    def get(self, table: str, key) -> dict:
        response = httpx.get(f"{self.api}/v1/records/{table}/{key}", headers=self.headers, timeout=10)
        assert response.status_code == 200, response.text
        return response.json()

    def listed(self, table: str, **filters) -> list[dict]:
        """The merged list (replica rows overlaid with the buffer), filtered by column values."""
        response = httpx.get(f"{self.api}/v1/records/{table}", params=filters, headers=self.headers, timeout=10)
        assert response.status_code == 200, response.text
        return response.json()["rows"]

    def drain(self) -> dict:
        """``opsync backlog drain --follow``: until nothing is buffered or awaits the replica."""
        return json.loads(self.run(str(VENV_BIN / "opsync"), "backlog", "drain", "--follow", "--json").splitlines()[-1])

    def served(self, path: str, **params) -> dict | list:
        response = httpx.get(f"{self.datasette}/{path}", params=params, headers=self.script, timeout=10)
        assert response.status_code == 200, response.text
        return response.json()

    def rows(self, table: str, **filters) -> list[dict]:
        return self.served(f"{DB}/{table}.json", _shape="array", **{k: str(v) for k, v in filters.items()})

    def shown(self, table: str, key_column: str, key, **expected) -> dict:
        """Polls Datasette until the row shows with the ``expected`` values."""

        def matches() -> dict | None:
            found = self.rows(table, **{key_column: key})
            return found[0] if found and all(found[0][c] == v for c, v in expected.items()) else None

        return wait_for(matches, timeout=15, interval=0.05, what=f"{table} {key} with {expected} in Datasette")


def published_domain(directory: Path) -> Path:
    """The ``.dist-info`` an installed package publishing the transfer domain would leave, in ``directory``."""
    info = directory / "opsync_transfer_domain-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: opsync-transfer-domain\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(ENTRY_POINTS)
    return directory


@pytest.fixture(scope="module")
def site(pg, tmp_path_factory) -> Iterator[TransferSite]:
    root = tmp_path_factory.mktemp("transfer-site")
    root.chmod(0o755)
    name = f"transfer_{uuid.uuid4().hex[:12]}"
    primary_url = pg.primary.create_database(name)
    redis = RedisServer(root / "redis", free_port(), secrets.token_urlsafe(16))
    redis.start()
    datasette_token = secrets.token_urlsafe(32)
    model_path = root / "read-model" / f"{DB}.db"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("OPSYNC_")},
        "OPSYNC_DOMAIN": "transfer",
        "OPSYNC_PRIMARY_URL": primary_url,
        "OPSYNC_REPLICA_URL": pg.replica.url(name),
        "OPSYNC_REDIS_URL": redis.url,
        "OPSYNC_READ_MODEL_PATH": str(model_path),
        "OPSYNC_DATASETTE_TOKEN": datasette_token,
        "AIRFLOW_CONN_OPSYNC_BUFFER": redis.url,
        "AIRFLOW_CONN_OPSYNC_PRIMARY": pg.primary.url(name, driver="postgresql"),
        "AIRFLOW_CONN_OPSYNC_REPLICA": pg.replica.url(name, driver="postgresql"),
        "PYTHONPATH": f"{published_domain(root / 'site-packages')}{os.pathsep}{REPO}",
    }
    processes: list[subprocess.Popen] = []
    log = open(root / "services.log", "ab")
    try:
        runner = TransferSite(env, primary_url, model_path, {"Authorization": f"Bearer {datasette_token}"})
        runner.run(sys.executable, "-m", "tests.domains.site_tasks", "prepare")
        token = runner.run(
            str(VENV_BIN / "opsync"), "tokens", "create", "transfer-test", *(f"--scope={v}:{t}" for t in TABLES for v in ("read", "write"))
        )
        runner.headers = {"Authorization": f"Bearer {token.strip()}"}
        # what the compose datasette command serves: the configured domain's metadata merged with the engine's
        metadata = Path(runner.run(sys.executable, "-m", "opsync.read_model.metadata", str(root / "served-metadata.json")).strip())
        api_port, datasette_port = free_port(), free_port()
        for argv in (
            [sys.executable, "-m", "ingest_api", "--port", str(api_port), "--workers", "1", "--metrics-dir", str(root / "metrics")],
            datasette_command(runner.model_path, "127.0.0.1", datasette_port, metadata=metadata),
        ):
            processes.append(subprocess.Popen(argv, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT))
        runner.api, runner.datasette = f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{datasette_port}"

        def answering() -> bool:
            assert all(p.poll() is None for p in processes), f"a server exited; see {log.name}"
            try:
                api = httpx.get(f"{runner.api}/v1/records/site", headers=runner.headers, timeout=2).status_code
                served = httpx.get(f"{runner.datasette}/{DB}.json", headers=runner.script, timeout=2).status_code
            except httpx.HTTPError:
                return False
            return api == 200 and served == 200  # the API knows the token once the replica has it

        wait_for(answering, timeout=40, interval=0.2, what=f"the transfer site's API and Datasette (log: {log.name})")
        yield runner
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(30)
        log.close()
        redis.stop()


@pytest.fixture(scope="module")
def planning(site) -> dict[str, str]:
    """Three sites (keyed by the codes their operators give) and two routes, written through the API's direct mode."""
    ids = {}
    for kind in ("observatory", "archive", "mirror"):
        code = f"{kind[:3].upper()}-{uuid.uuid4().hex[:6]}"
        ids[kind] = site.post("/records/site", {"id": code, "name": f"{kind}-{code}", "kind": kind})["ids"][0]
        assert ids[kind] == code
    for role, destination, method in (("network", "archive", "network"), ("shipment", "mirror", "shipment")):
        route = {"origin_site_id": ids["observatory"], "destination_site_id": ids[destination], "method": method, "bandwidth_mbps": 10.0}
        ids[role] = site.post("/records/route", route)["ids"][0]
    return ids


def package(origin: str) -> dict:
    return {
        "id": str(uuid.uuid4()),  # the key (package_uuid) is the step's id: the packaging system's own, not a UUIDv7
        "label": f"pkg-{uuid.uuid4().hex[:8]}.tar",
        "origin_site_id": origin,
        "size_bytes": 5_000_000_000,
        "checksum_sha256": "ab" * 32,
    }


def test_the_domain_registers_unlike_the_first():
    entries = registry.registrations(transfer.DOMAIN.base)
    assert list(entries) == ["site", "data_transfer_package", "route", "volume", "data_transfer", "physical_copy"]  # FK order
    given = entries["data_transfer_package"]
    assert (given.key.name, given.key_source, given.mode) == ("package_uuid", registry.Key.client, registry.Mode.critical)
    assert {e.name for e in entries.values() if e.mode is registry.Mode.direct} == {"site", "route"}
    assert {e.name for e in entries.values() if e.deletable} == {"site", "route", "physical_copy", "volume"}
    natural = entries["site"]
    assert (natural.key.name, natural.key_source, natural.uuid_key, natural.key_sql) == ("code", registry.Key.client, False, "text")
    assert all(e.night_of is None and "night" not in Layout(e, "UTC").columns for e in entries.values())


def test_its_datasette_metadata_describes_every_published_column_and_facets_on_the_registered_ones():
    tables = served_metadata.merged(transfer.DOMAIN.datasette_metadata)["databases"][DB]["tables"]  # as Datasette gets it
    for name, entry in registry.registrations(transfer.DOMAIN.base).items():
        assert sorted(f for f in tables[name]["facets"] if f not in SYNC_COLUMNS) == sorted(entry.facets), name
        assert sorted(tables[name]["columns"]) == sorted(Layout(entry, "UTC").columns), name


def test_its_migrations_create_exactly_its_models_with_change_capture_on_each(site):
    metadata = [schema.Base.metadata, transfer.DOMAIN.base.metadata]
    engine = create_engine(site.primary_url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": True})
            assert compare_metadata(context, metadata) == []
            checks = set(conn.scalars(text("SELECT conname FROM pg_constraint WHERE contype = 'c' AND conrelid <> 0")))
            captured = conn.execute(
                text(
                    "SELECT c.relname, count(*) FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid"
                    " JOIN pg_proc p ON p.oid = t.tgfoid WHERE p.proname = 'opsync_capture_changes' GROUP BY c.relname"
                )
            ).all()
            versions = set(conn.scalars(text("SELECT version_num FROM alembic_version")))
    finally:
        engine.dispose()
    declared = {c.name for m in metadata for t in m.tables.values() for c in t.constraints if isinstance(c, CheckConstraint)}
    assert declared == checks
    assert dict(captured) == {table: 3 for table in TABLES}
    assert versions == {"transfer_0001"}  # it depends on engine_0003 (text keys in change capture): one head


def test_the_api_and_the_cli_serve_the_domain(site):
    openapi = httpx.get(f"{site.api}/openapi.json", timeout=10).text  # its examples are the domain's
    assert transfer.PACKAGE in openapi and not {"executed_obs_unit", "raw_data_file"} & set(re.findall(r"\w+", openapi))
    status = json.loads(site.run(str(VENV_BIN / "opsync"), "status", "--json"))
    assert status["buffer"]["depth"] == 0, status


def test_direct_tables_are_written_straight_to_the_primary(site, planning):
    code = f"MIR-{uuid.uuid4().hex[:6]}"
    receipt = site.post("/records/site", {"id": code, "name": f"mirror-{code}", "kind": "mirror"})
    assert receipt["state"] == "committed" and receipt["commit_lsn"] and receipt["ids"] == [code], receipt
    primary = create_engine(site.primary_url)
    try:
        with primary.connect() as conn:
            assert conn.scalar(text("SELECT kind FROM site WHERE code = :k"), {"k": code}) == "mirror"
    finally:
        primary.dispose()
    assert site.get("site", code)["kind"] == "mirror"
    site.shown("site", "code", code, _sync_state="replicated", kind="mirror")  # through change capture


def test_its_registration_decides_what_may_be_deleted(site, planning):
    route = {"origin_site_id": planning["archive"], "destination_site_id": planning["mirror"], "method": "network"}
    key = site.post("/records/route", route)["ids"][0]
    site.shown("route", "id", key, _sync_state="replicated")
    retired = httpx.delete(f"{site.api}/v1/records/route/{key}", headers=site.headers, timeout=10)
    assert retired.status_code == 202 and retired.json()["state"] == "committed", retired.text  # direct: at once
    wait_for(lambda: site.rows("route", id=key) == [], timeout=15, what="the deleted route, gone from Datasette")
    kept = httpx.delete(f"{site.api}/v1/records/data_transfer/{uuid.uuid4()}", headers=site.headers, timeout=10)
    assert kept.status_code == 422 and "rows of data_transfer cannot be deleted" in kept.text, kept.text


def test_a_client_given_key_must_be_sent_as_the_steps_id(site, planning):
    values = package(planning["observatory"])
    key = values.pop("id")
    url = f"{site.api}/v1/records/data_transfer_package"
    missing = httpx.post(url, json=values, headers=site.headers, timeout=10)
    assert missing.status_code == 422, missing.text
    (error,) = missing.json()["detail"]
    assert error["loc"][-1] == "id" and "need their key (package_uuid): the client gives it" in error["msg"]
    by_column = httpx.post(url, json=values | {"package_uuid": key}, headers=site.headers, timeout=10)
    assert [e["loc"][-1] for e in by_column.json()["detail"]] == ["id"], by_column.text
    both = httpx.post(url, json=values | {"id": key, "package_uuid": key}, headers=site.headers, timeout=10)
    assert [(e["loc"][-1], e["msg"]) for e in both.json()["detail"]] == [
        ("package_uuid", "extra inputs are not permitted: the key is the step's id")
    ], both.text


def test_rows_travel_from_buffered_to_replicated_and_datasette_serves_them_with_the_domains_metadata(site, planning):
    values = package(planning["observatory"])
    key = values.pop("id")
    receipt = site.post(
        "/transactions",
        {
            "steps": [
                {"table": "data_transfer_package", "id": key, "ref": "pkg", "values": values},
                {"table": "data_transfer", "values": {"package_uuid": {"$ref": "pkg"}, "route_id": planning["network"]}},
                {
                    "table": "physical_copy",
                    "values": {"package_uuid": key, "site_id": planning["observatory"], "medium": "disk", "location": "/pkg"},
                },
            ]
        },
    )
    assert receipt["ids"][0] == key  # kept as the client sent it
    moved, copy = receipt["ids"][1], receipt["ids"][2]
    buffered = site.get("data_transfer_package", key)
    assert (buffered["package_uuid"], buffered["_sync_state"]) == (key, "buffered")
    merged = site.get("data_transfer", moved)
    assert (merged["_sync_state"], merged["state"], merged["bytes_moved"]) == ("buffered", "queued", 0)  # literal defaults shown at once
    assert site.shown("data_transfer", "id", moved, _sync_state="buffered")["_txn_id"] == receipt["txn_id"]
    assert [(r["id"], r["_sync_state"]) for r in site.listed("physical_copy", package_uuid=key)] == [(copy, "buffered")]

    run = json.loads(site.run(sys.executable, "-m", "tests.domains.site_tasks", "drain-dag").splitlines()[-1])
    assert run["state"] == "success", run  # the opsync_drain DAG: drain, wait for the replica, confirm
    status = httpx.get(f"{site.api}/v1/transactions/{receipt['txn_id']}", headers=site.headers, timeout=10).json()
    assert status["state"] == "replicated", status
    assert site.get("data_transfer_package", key)["_sync_state"] == "replicated"
    assert [(r["id"], r["_sync_state"]) for r in site.listed("physical_copy", package_uuid=key)] == [(copy, "replicated")]
    site.shown("data_transfer_package", "package_uuid", key, _sync_state="replicated", label=values["label"])
    first = site.shown("data_transfer", "id", moved, _sync_state="replicated")

    update = httpx.patch(
        f"{site.api}/v1/records/data_transfer/{moved}", json={"state": "moving", "bytes_moved": 10**9}, headers=site.headers
    )
    assert update.status_code == 202, update.text
    wiped = httpx.delete(f"{site.api}/v1/records/physical_copy/{copy}", headers=site.headers)
    assert wiped.status_code == 202, wiped.text
    assert site.get("data_transfer", moved)["state"] == "moving"
    assert site.listed("physical_copy", package_uuid=key) == []  # a buffered delete hides the row at once
    assert [r["state"] for r in site.listed("data_transfer", route_id=planning["network"], state="moving")] == ["moving"]
    site.shown("data_transfer", "id", moved, _sync_state="buffered", state="moving")
    wait_for(lambda: site.rows("physical_copy", id=copy) == [], timeout=15, what="the buffered delete, in Datasette")
    site.drain()
    moving = site.shown("data_transfer", "id", moved, _sync_state="replicated", state="moving", bytes_moved=10**9)
    assert moving["changed_at"] > first["changed_at"]  # the model's onupdate column, stamped by the drain's update
    assert site.rows("physical_copy", id=copy) == []
    response = httpx.get(f"{site.api}/v1/records/physical_copy/{copy}", headers=site.headers, timeout=10)
    assert response.status_code == 404

    page = site.served(f"{DB}/data_transfer.json", route_id=planning["network"])
    assert page["table"] == "data_transfer" and {f for f in page["facet_results"]} == {"state", "route_id", "_sync_state"}
    metadata = site.served("-/metadata.json")
    assert metadata["title"] == "Data transfers" and metadata["databases"][DB]["tables"]["route"]["units"] == {"bandwidth_mbps": "Mbit/s"}
    canned = site.served(f"{DB}/transfers_on_route.json", route_id=planning["network"], _shape="array")
    assert [(r["id"], r["label"], r["state"]) for r in canned] == [(moved, values["label"], "moving")]
    table_page = httpx.get(f"{site.datasette}/{DB}/data_transfer", headers=site.script, timeout=10).text
    assert "Transfers" in table_page and "One package moving along one route" in table_page
    row_page = httpx.get(f"{site.datasette}/{DB}/data_transfer_package/{key}", headers=site.script, timeout=10)
    assert row_page.status_code == 200 and f"data_transfer?package_uuid={key}" in row_page.text  # links by its key column


def by_hand(site: TransferSite, origin: str, size_bytes: int) -> str:
    """A package inserted with plain SQL on the primary, as someone at the main site might; its key."""
    key = str(uuid.uuid4())
    primary = create_engine(site.primary_url)
    try:
        with primary.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO data_transfer_package (package_uuid, label, origin_site_id, size_bytes, checksum_sha256)"
                    " VALUES (:k, :l, :o, :s, :c)"
                ),
                {"k": key, "l": f"by-hand-{key[:8]}.tar", "o": origin, "s": size_bytes, "c": "cd" * 32},
            )
            captured = conn.execute(text("SELECT table_name, row_id::text, op FROM row_change WHERE row_id = :k"), {"k": key}).all()
    finally:
        primary.dispose()
    assert captured == [("data_transfer_package", key, "INSERT")]  # by its key column, package_uuid
    return key


def test_change_capture_publishes_plain_sql_on_the_primary(site, planning):
    key = by_hand(site, planning["archive"], 42)
    site.shown("data_transfer_package", "package_uuid", key, _sync_state="replicated", size_bytes=42)
    primary = create_engine(site.primary_url)
    try:
        with primary.begin() as conn:
            conn.execute(text("UPDATE data_transfer_package SET size_bytes = 43 WHERE package_uuid = :k"), {"k": key})
    finally:
        primary.dispose()
    site.shown("data_transfer_package", "package_uuid", key, size_bytes=43)


def test_the_read_model_check_finds_and_repairs_drifted_rows(site, planning):
    """Rows whose only event (their change capture) has reached the publisher: nothing of theirs is on its way."""
    mirror, shipment, package_key = planning["mirror"], planning["shipment"], by_hand(site, planning["mirror"], 7)
    kind = site.shown("site", "code", mirror, _sync_state="replicated")["kind"]
    site.shown("route", "id", shipment, _sync_state="replicated")
    site.shown("data_transfer_package", "package_uuid", package_key, _sync_state="replicated")
    with sqlite3.connect(site.model_path) as conn:  # edits by hand, behind the publisher's back
        conn.execute("UPDATE site SET kind = 'archive' WHERE code = ?", (mirror,))
        conn.execute("DELETE FROM route WHERE id = ?", (shipment,))
        conn.execute("UPDATE data_transfer_package SET size_bytes = 8 WHERE package_uuid = ?", (package_key,))
    assert site.rows("site", code=mirror)[0]["kind"] == "archive" and site.rows("route", id=shipment) == []
    report = json.loads(site.run(sys.executable, "-m", "tests.domains.site_tasks", "check"))
    assert set(report) == set(TABLES)
    drifted = {"site": [mirror], "route": [shipment], "data_transfer_package": [package_key]}
    assert {name: t["drift"] for name, t in report.items() if t["drift"]} == drifted, report
    assert all(report[name]["repaired"] == 1 for name in drifted), report
    assert site.rows("site", code=mirror)[0]["kind"] == kind and site.rows("route", id=shipment)[0]["method"] == "shipment"
    assert site.rows("data_transfer_package", package_uuid=package_key)[0]["size_bytes"] == 7


def test_a_natural_key_travels_end_to_end_as_the_client_gave_it(site, planning):
    """Sites are keyed by the text code their operators give: written, read, paged, updated and deleted by it."""
    tag = uuid.uuid4().hex[:6]
    codes = [f"a,{tag}", f"B {tag}", f"Z{tag}"]  # a comma, a space, mixed case: byte order, not the collation's
    receipts = [site.post("/records/site", {"id": code, "name": f"n-{code}", "kind": "mirror"}) for code in codes]
    assert [r["ids"] for r in receipts] == [[code] for code in codes]
    for code in codes:
        assert site.get("site", code)["code"] == code
        site.shown("site", "code", code, _sync_state="replicated")  # captured by its text key, published
    walked, after = [], None
    while True:  # the merged list pages in key order by the cursor
        params = {"kind": "mirror", "limit": 1} | ({"after": after} if after else {})
        response = httpx.get(f"{site.api}/v1/records/site", params=params, headers=site.headers, timeout=10).json()
        walked += [row["code"] for row in response["rows"]]
        if (after := response["next"]) is None:
            break
    assert [c for c in walked if tag in c] == sorted(codes)

    renamed = httpx.patch(f"{site.api}/v1/records/site/{codes[1]}", json={"name": f"renamed-{tag}"}, headers=site.headers)
    assert renamed.status_code == 202 and renamed.json()["state"] == "committed", renamed.text
    site.shown("site", "code", codes[1], name=f"renamed-{tag}")
    primary = create_engine(site.primary_url)
    try:
        with primary.connect() as conn:
            captured = conn.execute(
                text("SELECT op FROM row_change WHERE table_name = 'site' AND row_id = :k ORDER BY seq"), {"k": codes[1]}
            )
            assert [op for (op,) in captured] == ["INSERT", "UPDATE"]
    finally:
        primary.dispose()
    gone = httpx.delete(f"{site.api}/v1/records/site/{codes[2]}", headers=site.headers, timeout=10)
    assert gone.status_code == 202, gone.text
    wait_for(lambda: site.rows("site", code=codes[2]) == [], timeout=15, what="the deleted site, gone from Datasette")
    assert httpx.get(f"{site.api}/v1/records/site/{codes[2]}", headers=site.headers, timeout=10).status_code == 404

    copy = {"package_uuid": by_hand(site, codes[0], 1), "site_id": codes[0], "medium": "tape", "location": "/v"}
    buffered = site.post("/records/physical_copy", copy)  # a buffered row referring to a natural key
    assert [r["site_id"] for r in site.listed("physical_copy", site_id=codes[0])] == [codes[0]]
    site.drain()
    site.shown("physical_copy", "id", buffered["ids"][0], _sync_state="replicated", site_id=codes[0])
    report = json.loads(site.run(sys.executable, "-m", "tests.domains.site_tasks", "check"))
    assert report["site"]["drift"] == [] and report["physical_copy"]["drift"] == [], report


@pytest.mark.parametrize(
    ("code", "why"),
    [("", "a key cannot be empty"), ("X" * 17, "at most 16 characters, got 17"), (17, "a text key: send it as a JSON string")],
)
def test_a_bad_natural_key_is_refused_naming_the_field(site, code, why):
    response = httpx.post(f"{site.api}/v1/records/site", json={"id": code, "name": "n", "kind": "mirror"}, headers=site.headers)
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    assert error["loc"][-1] == "id" and error["msg"] == f"code: {why}", error
    too_long = httpx.get(f"{site.api}/v1/records/site/{'X' * 17}", headers=site.headers, timeout=10)
    assert too_long.status_code == 422 and too_long.json()["detail"][0]["loc"] == ["path", "row_id"], too_long.text


def test_a_buffered_natural_key_is_overlaid_drained_updated_and_deleted_by_it(site, planning):
    """Volumes (critical: buffered at the site) keyed by their labels: the buffer's rows and index buckets, the
    merged view, the drain, the existence check of an update against the replica, and change capture, by text keys."""
    tag = uuid.uuid4().hex[:6]
    labels = [f"TAPE-{tag}-ü", f"TAPE-{tag}-a", f"DISK,{tag}"]
    values = {"site_id": planning["archive"], "capacity_bytes": 10**12}
    receipt = site.post("/transactions", {"steps": [{"table": "volume", "id": label, "values": values} for label in labels]})
    assert receipt["ids"] == labels and receipt["state"] == "accepted", receipt
    assert [site.get("volume", label)["_sync_state"] for label in labels] == ["buffered"] * 3
    assert [r["label"] for r in site.listed("volume", site_id=planning["archive"]) if tag in r["label"]] == sorted(labels)
    site.shown("volume", "label", labels[0], _sync_state="buffered")
    site.drain()
    site.shown("volume", "label", labels[0], _sync_state="replicated")

    grown = httpx.patch(f"{site.api}/v1/records/volume/{labels[0]}", json={"capacity_bytes": 2 * 10**12}, headers=site.headers)
    assert grown.status_code == 202 and grown.json()["state"] == "accepted", grown.text  # the replica's row, found by its label
    nowhere = httpx.patch(f"{site.api}/v1/records/volume/NONE-{tag}", json={"capacity_bytes": 1}, headers=site.headers)
    assert nowhere.status_code == 404, nowhere.text
    wiped = httpx.delete(f"{site.api}/v1/records/volume/{labels[2]}", headers=site.headers, timeout=10)
    assert wiped.status_code == 202, wiped.text
    assert site.get("volume", labels[0])["capacity_bytes"] == 2 * 10**12
    assert [r["label"] for r in site.listed("volume", site_id=planning["archive"]) if tag in r["label"]] == sorted(labels[:2])
    site.drain()
    site.shown("volume", "label", labels[0], _sync_state="replicated", capacity_bytes=2 * 10**12)
    wait_for(lambda: site.rows("volume", label=labels[2]) == [], timeout=15, what="the deleted volume, gone from Datasette")
    primary = create_engine(site.primary_url)
    try:
        with primary.connect() as conn:
            ops = conn.execute(
                text("SELECT row_id, op FROM row_change WHERE table_name = 'volume' AND row_id LIKE :t ORDER BY seq"), {"t": f"%{tag}%"}
            )
            assert sorted(ops) == sorted([*((label, "INSERT") for label in labels), (labels[0], "UPDATE"), (labels[2], "DELETE")])
    finally:
        primary.dispose()
