"""The production topology file is coherent (no Docker engine here: checked statically)."""

from pathlib import Path

import yaml

from opsync.stack.settings import REPO

COMPOSE = yaml.safe_load((REPO / "docker-compose.yaml").read_text())
SERVICES = COMPOSE["services"]


def test_every_part_of_the_site_is_deployed():
    assert {
        "primary", "replica", "redis", "migrate", "ingest-api", "datasette", "airflow-init",
        "airflow-api-server", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer",
    } <= set(SERVICES)


def test_named_volumes_are_declared_and_bind_mounts_exist():
    for name, service in SERVICES.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (REPO / source).exists(), f"{name}: {source} missing"
            else:
                assert source in COMPOSE["volumes"], f"{name}: volume {source} not declared"


def test_stateful_services_have_healthchecks_and_durable_redis():
    for name in ("primary", "replica", "redis", "ingest-api", "datasette", "airflow-api-server"):
        assert "healthcheck" in SERVICES[name], name
    redis_command = SERVICES["redis"]["command"]
    for setting in ("--appendonly yes", "--appendfsync always", "--maxmemory-policy noeviction", "--requirepass"):
        assert setting in redis_command


def test_dependencies_name_real_services():
    for name, service in SERVICES.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in SERVICES, f"{name} depends on unknown {dependency}"


def test_no_secret_is_written_in_the_file():
    text = (REPO / "docker-compose.yaml").read_text()
    assert "PASSWORD:" not in text.replace("$$", "")
    assert Path(REPO / "deploy/opsync.env.example").exists()
