"""The production topology (docker-compose.yaml, Dockerfile, deploy/), checked without a Docker engine.

The file is validated against the Compose Specification schema vendored in tests/data (source and
checksum in tests/data/README.md), before and after interpolating each site's example env file the way
``docker compose --env-file`` does; then the deployment rules of README "Deploying across two sites".
The deploy scripts run for real: a primary set up by them admits only its owner and the observatory, a
replica started by its entrypoint clones and streams through the slot, the buffer Redis starts durable.
"""

import ast
import hashlib
import ipaddress
import json
import os
import pwd
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import distribution
from pathlib import Path

import jsonschema
import psycopg
import pytest
import redis
import yaml
from conftest import PG_BIN, PG_OS_USER, free_port

from devstack.process import is_root, make_owned_dir, run_as, write_private
from devstack.redis import BUFFER_REDIS_TUNING
from devstack.settings import REPO

COMPOSE_TEXT = (REPO / "docker-compose.yaml").read_text()
COMPOSE = yaml.safe_load(COMPOSE_TEXT)
SERVICES: dict[str, dict] = COMPOSE["services"]
SCHEMA_PATH = REPO / "tests/data/compose-spec.json"
SCHEMA_SHA256 = "0dc04bd346dcfee1b1419628fff79937bbf076925f298f272a2b490e2b112bac"  # docker-compose 1.29.2's copy
ENV_FILE = "deploy/opsync.env"
EXAMPLES = {"cologne": REPO / "deploy/cologne.env.example", "observatory": REPO / "deploy/observatory.env.example"}
# The profiles a profile needs beside it: Celery scales the observatory's Airflow, Flower watches Celery.
ENABLED_WITH = {
    "cologne": {"cologne"},
    "observatory": {"observatory"},
    "celery": {"observatory", "celery"},
    "flower": {"observatory", "celery", "flower"},
}
SITE_OF_PROFILE = {"cologne": "cologne", "observatory": "observatory", "celery": "observatory", "flower": "observatory"}
CONTAINER_VARS = {"HOME", "HOSTNAME", "PGDATA"}  # set by Docker or the image, not by the env file
PUBLISHING = {"primary", "ingest-api", "datasette", "airflow-api-server", "airflow-flower"}
PINNED_IMAGE = re.compile(r"^[a-z0-9][a-z0-9._/-]*:\d+\.\d+[A-Za-z0-9._-]*$")  # name:1.2[.3][-variant], never latest
VARIABLE = re.compile(r"\$(?:\$|\{(?P<braced>[A-Za-z_]\w*)(?P<op>:?[-?])?(?P<arg>[^}]*)\}|(?P<bare>[A-Za-z_]\w*))")
CONTAINER_VARIABLE = re.compile(r"\$\$\{?([A-Za-z_]\w*)")
SHELL_VARIABLE = re.compile(r"\$\{?([A-Za-z_]\w*)")
SHELL_ASSIGNMENT = re.compile(r"^\s*([A-Za-z_]\w*)=|\bfor ([A-Za-z_]\w*) in", re.MULTILINE)
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|FERNET|JWT|_KEY$")


def strings(node) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from strings(value)


def interpolate(node, env: dict[str, str]):
    """``docker compose`` interpolation of every string: ``$$``, ``$VAR``, ``${VAR}``, ``${VAR:-default}``, ``${VAR:?error}``.

    Stricter than Compose in one way: an unset variable without a default is an error, not an empty string.
    """
    if isinstance(node, dict):
        return {key: interpolate(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [interpolate(value, env) for value in node]
    if not isinstance(node, str):
        return node

    def replace(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match["braced"] or match["bare"], match["op"], match["arg"]
        value = env.get(name)
        if value is not None and not (value == "" and op and op.startswith(":")):
            return value
        if op in (":-", "-"):
            return arg
        raise KeyError(f"${{{name}}} is not set" + (f": {arg}" if arg else ""))

    return VARIABLE.sub(replace, node)


def read_env(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if line.strip() and not line.startswith("#"))
    return {key.strip(): value for key, value in pairs}


def profiles(name: str) -> list[str]:
    return SERVICES[name].get("profiles", [])


def site_services(site: str) -> list[str]:
    return [name for name in SERVICES if any(SITE_OF_PROFILE[p] == site for p in profiles(name))]


def interpolated_names(node) -> set[str]:
    return {m["braced"] or m["bare"] for text in strings(node) for m in VARIABLE.finditer(text) if m.group(0) != "$$"}


def bind_mounts(service: dict) -> list[tuple[str, str, str]]:
    """``(source, target, mode)`` of each host path mounted into the service."""
    mounts = []
    for volume in service.get("volumes", []):
        source, target, *mode = volume.split(":")
        if source.startswith("."):
            mounts.append((source, target, mode[0] if mode else "rw"))
    return mounts


def script_variables(path: Path) -> set[str]:
    """Environment variables a deploy script reads (its own assignments left out)."""
    text = path.read_text()
    return set(SHELL_VARIABLE.findall(text)) - {name for pair in SHELL_ASSIGNMENT.findall(text) for name in pair}


def variables_read(site: str) -> set[str]:
    """Every variable the site's services need: interpolated, expanded in the container, read by deploy scripts."""
    names: set[str] = set()
    for name in site_services(site):
        service = SERVICES[name]
        names |= interpolated_names(service)
        names |= {var for text in strings(service) for var in CONTAINER_VARIABLE.findall(text)}
        names |= {var for text in strings(service.get("entrypoint", [])) for var in re.findall(r"^[A-Z][A-Z0-9_]+$", text)}
        for source, _, _ in bind_mounts(service):
            if source.endswith(".sh"):
                names |= script_variables(REPO / source)
    return names - CONTAINER_VARS


def readme_section(title: str) -> str:
    text = (REPO / "README.md").read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else None]


def test_vendored_schema_is_the_published_one():
    assert hashlib.sha256(SCHEMA_PATH.read_bytes()).hexdigest() == SCHEMA_SHA256


@pytest.mark.parametrize("site", sorted(EXAMPLES))
def test_the_file_is_valid_compose_before_and_after_interpolation(site):
    validator = jsonschema.Draft4Validator(json.loads(SCHEMA_PATH.read_text()))  # as docker-compose 1.29.2 validates
    validator.validate(COMPOSE)
    validator.validate(interpolate(COMPOSE, read_env(EXAMPLES[site])))


def test_the_schema_check_can_fail():
    validator = jsonschema.Draft4Validator(json.loads(SCHEMA_PATH.read_text()))
    broken = json.loads(json.dumps(COMPOSE))
    broken["services"]["redis"]["healthcheck"]["intervall"] = "5s"
    assert not validator.is_valid(broken)


def test_every_variable_has_a_default_so_no_site_needs_the_others_settings():
    for text in strings(COMPOSE):
        for match in VARIABLE.finditer(text):
            if match.group(0) != "$$":
                assert match["op"] == ":-", f"{match.group(0)} has no default"
    interpolate(COMPOSE, {})


@pytest.mark.parametrize("site", sorted(EXAMPLES))
def test_every_image_is_pinned_to_an_exact_version(site):
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    env = read_env(EXAMPLES[site])
    assert env["OPSYNC_VERSION"] == version
    services = interpolate(COMPOSE, env)["services"]
    for name in site_services(site):
        image = services[name]["image"]
        assert PINNED_IMAGE.match(image), f"{name}: image {image} has no exact version tag"
        if "build" in services[name]:
            assert image.endswith(f":{version}"), f"{name}: built image {image} is not tagged with opsync {version}"


def test_the_images_are_built_from_pinned_bases_matching_the_pinned_airflow():
    dockerfile = (REPO / "Dockerfile").read_text()
    built_from = dict((stage, base) for base, stage in re.findall(r"^FROM (\S+) AS (\S+)$", dockerfile, re.MULTILINE))

    def image(stage: str) -> str:
        """The image a stage is built from, through the stages it builds on."""
        base = built_from[stage]
        return image(base) if base in built_from else base

    targets = {SERVICES[name]["build"]["target"] for name in SERVICES if "build" in SERVICES[name]}
    assert targets == {"api", "datasette", "airflow"} and targets <= set(built_from)
    bases = {target: image(target) for target in targets}
    for base in set(built_from.values()) - set(built_from):
        assert PINNED_IMAGE.match(base), base
    airflow = re.search(r"^apache-airflow==(\S+)$", (REPO / "locks/airflow.txt").read_text(), re.MULTILINE)[1]
    assert bases["airflow"] == f"apache/airflow:{airflow}-python3.11"
    assert bases["api"].startswith("python:3.11.") and bases["datasette"].startswith("python:3.11.")
    for target in bases:  # exactly its own lock, nothing resolved at build time
        assert re.search(rf"^RUN pip install --no-deps -r \S*locks/{target}\.txt$", dockerfile, re.MULTILINE), target
    assert "pip install --no-deps /opt/opsync/src" in dockerfile, "the triggerer imports triggers only from installed packages"


def test_profiles_separate_cologne_from_the_observatory():
    for name in SERVICES:
        assert profiles(name) and set(profiles(name)) <= set(ENABLED_WITH), f"{name}: profiles {profiles(name)}"
        assert len({SITE_OF_PROFILE[p] for p in profiles(name)}) == 1, f"{name} runs at both sites"
    assert set(site_services("cologne")) == {"primary", "migrate"}
    assert {
        "replica",
        "redis",
        "ingest-api",
        "datasette",
        "airflow-db",
        "airflow-init",
        "airflow-api-server",
        "airflow-scheduler",
        "airflow-dag-processor",
        "airflow-triggerer",
        "airflow-broker",
        "airflow-worker",
    } <= set(site_services("observatory"))
    for name, service in SERVICES.items():
        for dependency in service.get("depends_on", {}):
            for profile in profiles(name):
                assert set(profiles(dependency)) & ENABLED_WITH[profile], (
                    f"{name} ({profile}) depends on {dependency}, which that profile does not start"
                )


def test_celery_has_workers_and_a_broker_that_is_not_the_buffer():
    celery = {name for name in SERVICES if "celery" in profiles(name)}
    workers = [name for name in celery if SERVICES[name]["command"][-2:] == ["celery", "worker"]]
    assert workers
    broker = SERVICES["airflow-broker"]
    assert "airflow-broker" in celery and broker["image"] == SERVICES["redis"]["image"]
    assert set(broker["volumes"]).isdisjoint(SERVICES["redis"]["volumes"][:1])
    assert broker["entrypoint"][-1] == "AIRFLOW_BROKER_PASSWORD" != SERVICES["redis"]["entrypoint"][-1]
    env = read_env(EXAMPLES["observatory"])
    assert "@airflow-broker:" in env["AIRFLOW__CELERY__BROKER_URL"]
    for buffer_url in (env["OPSYNC_REDIS_URL"], env["AIRFLOW_CONN_OPSYNC_BUFFER"]):
        assert "@redis:" in buffer_url and buffer_url != env["AIRFLOW__CELERY__BROKER_URL"]
    assert SERVICES["airflow-scheduler"]["environment"]["AIRFLOW__CORE__EXECUTOR"] == "${OPSYNC_AIRFLOW_EXECUTOR:-LocalExecutor}"
    for name in workers:
        assert "airflow-broker" in SERVICES[name]["depends_on"]


def test_every_service_has_a_healthcheck_a_restart_policy_and_the_env_file():
    one_shot = {name for name, service in SERVICES.items() if service["restart"] == "no"}
    assert one_shot == {"migrate", "airflow-init"}
    for name, service in SERVICES.items():
        assert service["env_file"] == ENV_FILE, name
        assert service["logging"]["options"]["max-size"], f"{name}: unbounded logs"
        if name in one_shot:
            assert service["restart"] == "no" and "healthcheck" not in service, f"{name} is a one-shot job"
        else:
            assert service["restart"] in ("unless-stopped", "always"), name
            assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    deploying = readme_section("Deploying across two sites")
    for name in one_shot:
        assert f"`{name}`" in deploying


def test_state_is_in_named_volumes_and_mounted_files_exist_read_only():
    for name, service in SERVICES.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith("."):
                assert source in COMPOSE["volumes"], f"{name}: volume {source} not declared"
        for source, _, mode in bind_mounts(service):
            assert (REPO / source).is_file(), f"{name}: {source} missing"
            assert mode == "ro", f"{name}: {source} mounted writable"
            if source.endswith(".sh"):
                assert (REPO / source).stat().st_mode & 0o111, f"{source} is not executable"
    data_dirs = {
        "primary": "/var/lib/postgresql/data",
        "replica": "/var/lib/postgresql/data",
        "airflow-db": "/var/lib/postgresql/data",
        "redis": "/data",
        "airflow-broker": "/data",
        "datasette": "/data",
    }
    for name, path in data_dirs.items():
        assert any(v.split(":")[1] == path and not v.startswith(".") for v in SERVICES[name]["volumes"]), name


def test_buffer_redis_is_durable_private_and_password_protected():
    redis = SERVICES["redis"]
    options = " ".join(redis["command"])
    for setting in (
        "--appendonly yes",
        "--appendfsync always",
        "--no-appendfsync-on-rewrite no",
        "--maxmemory-policy noeviction",
        "--maxmemory ${REDIS_MAXMEMORY:-10gb}",
        "--protected-mode yes",
    ):
        assert setting in options
    for key, value in BUFFER_REDIS_TUNING.items():  # the buffer's layout is sized for these, as the test stack runs it
        assert f"--{key} {value}" in options, key
    assert redis["entrypoint"] == ["/opsync/redis-entrypoint.sh", "REDIS_PASSWORD"]
    assert "requirepass" in (REPO / "deploy/redis-entrypoint.sh").read_text()
    for name in ("redis", "airflow-broker", "airflow-db"):
        assert SERVICES[name]["networks"] == ["backend"], name
    assert COMPOSE["networks"]["backend"]["internal"] is True


@pytest.mark.parametrize("site", sorted(EXAMPLES))
def test_only_the_front_doors_publish_ports_each_on_a_configured_address(site):
    assert {name for name, service in SERVICES.items() if "ports" in service} == PUBLISHING
    services = interpolate(COMPOSE, read_env(EXAMPLES[site]))["services"]
    for name in PUBLISHING:
        for raw, port in zip(SERVICES[name]["ports"], services[name]["ports"], strict=True):
            assert re.match(r"^\$\{\w+_BIND:-127\.0\.0\.1\}:\$\{\w+:-\d+\}:\d+$", raw), f"{name}: {raw}"
            host, published, _ = port.split(":")
            ipaddress.ip_address(host)
            assert 0 < int(published) < 65536
    for name, service in SERVICES.items():
        assert "network_mode" not in service and "expose" not in service, name


def test_no_secret_is_written_in_the_compose_file():
    for name, service in SERVICES.items():
        for key in service.get("environment", {}):
            assert not SECRET_NAME.search(key), f"{name}: {key} belongs in {ENV_FILE}"
    assert not re.search(r"://[^/\s:@]*:[^/\s@]+@", COMPOSE_TEXT), "a URL with a password"
    assert "requirepass" not in COMPOSE_TEXT and "POSTGRES_PASSWORD:" not in COMPOSE_TEXT
    for ignore in (".gitignore", ".dockerignore"):
        assert ENV_FILE in (REPO / ignore).read_text().split(), f"{ENV_FILE} not in {ignore}"


@pytest.mark.parametrize("site", sorted(EXAMPLES))
def test_every_variable_a_site_reads_is_in_its_env_example(site):
    missing = variables_read(site) - set(read_env(EXAMPLES[site]))
    assert not missing, f"{EXAMPLES[site].name} lacks {sorted(missing)}"


def test_every_compose_variable_is_documented_in_the_readme():
    configuration = readme_section("Configuration")
    names = interpolated_names(COMPOSE) | set(read_env(EXAMPLES["cologne"])) | set(read_env(EXAMPLES["observatory"]))
    undocumented = {name for name in names if f"`{name}`" not in configuration}
    assert not undocumented, f"README Configuration lacks {sorted(undocumented)}"


def test_airflow_signs_in_with_github_through_fab_and_keeps_its_own_database():
    provider_info = distribution("apache-airflow-providers-fab").locate_file("airflow/providers/fab/get_provider_info.py")
    returned = next(node.value for node in ast.walk(ast.parse(Path(provider_info).read_text())) if isinstance(node, ast.Return))
    assert "config_file" in ast.literal_eval(returned)["config"]["fab"]["options"]  # read, not imported: Airflow is slow to import
    for name in site_services("observatory"):
        service = SERVICES[name]
        if service["image"].startswith("opsync-airflow:"):
            env = service["environment"]
            assert env["AIRFLOW__CORE__AUTH_MANAGER"] == "airflow.providers.fab.auth_manager.fab_auth_manager.FabAuthManager"
            mounts = {source: target for source, target, _ in bind_mounts(service)}
            assert mounts["./deploy/airflow/webserver_config.py"] == env["AIRFLOW__FAB__CONFIG_FILE"], name
    env = read_env(EXAMPLES["observatory"])
    for name in ("AIRFLOW_GITHUB_CLIENT_ID", "AIRFLOW_GITHUB_CLIENT_SECRET", "AIRFLOW_GITHUB_ORG", "AIRFLOW_GITHUB_TEAM_ROLES"):
        assert name in env
    for name in ("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "OPSYNC_AIRFLOW_METADATA_DB"):
        assert re.match(r"^postgresql\+psycopg2://airflow:[^@]+@airflow-db:5432/airflow$", env[name]), name


def test_the_replica_streams_through_the_wan_and_the_observatory_slot():
    cologne, observatory = read_env(EXAMPLES["cologne"]), read_env(EXAMPLES["observatory"])
    assert cologne["REPLICA_SLOT"] == observatory["REPLICA_SLOT"] == observatory["OPSYNC_SITE"] == "observatory"
    assert cologne["POSTGRES_DB"] == observatory["POSTGRES_DB"] and cologne["OPSYNC_DB_USER"] == observatory["OPSYNC_DB_USER"]
    assert f"@{observatory['PRIMARY_HOST']}:{observatory['PRIMARY_PORT']}/" in observatory["OPSYNC_PRIMARY_URL"]
    assert "PRIMARY_HOST" not in cologne and "POSTGRES_PASSWORD" not in observatory
    replica = (REPO / "deploy/replica-entrypoint.sh").read_text()
    assert "host=$PRIMARY_HOST port=$PRIMARY_PORT" in replica and '-S "$REPLICA_SLOT"' in replica
    assert "pg_create_physical_replication_slot(:'slot')" in (REPO / "deploy/primary-init.sh").read_text()


# ---------------------------------------------------------------- the deploy scripts, run for real
# PostgreSQL 15 and Redis 7.0 of this machine stand in for the images' (same major versions); the scripts
# are copied next to each other as the compose file mounts them under /opsync/, and every server listens
# on loopback only.


def compose_command(name: str, site: str) -> list[str]:
    return interpolate(SERVICES[name]["command"], read_env(EXAMPLES[site]))


def healthcheck(name: str, env: dict[str, str], user: str | None) -> subprocess.CompletedProcess:
    """The service's own health check command, run as Docker runs it (``$$`` is ``$`` in the container)."""
    kind, command = SERVICES[name]["healthcheck"]["test"]
    assert kind == "CMD-SHELL"
    return subprocess.run(
        ["sh", "-c", command.replace("$$", "$")],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        **({"user": user, "group": pwd.getpwnam(user).pw_gid, "extra_groups": []} if is_root() and user else {}),
    )


@dataclass
class Cologne:
    """A primary set up as the compose file's ``primary``: its settings, pg-hba.sh, primary-init.sh."""

    root: Path
    port: int
    env: dict[str, str]

    def write_hba(self, *networks: str) -> None:
        text = run_as(PG_OS_USER, [str(self.root / "opsync/pg-hba.sh"), *networks], env=self.env, cwd=self.root).stdout
        write_private(self.root / "pg_hba.conf", text, PG_OS_USER)

    def admit_this_machine(self) -> None:
        """Make this machine the observatory's network; returns once replication connections are let in."""
        self.write_hba("127.0.0.1/32")
        run_as(PG_OS_USER, ["pg_ctl", "-D", str(self.root / "data"), "reload"], env=self.env, cwd=self.root)
        deadline = time.monotonic() + 10
        while True:  # the postmaster rereads pg_hba.conf on SIGHUP, asynchronously
            try:
                self.connect("replicator", self.env["REPLICATION_PASSWORD"], replication="true").close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def connect(self, user: str, password: str, **kwargs) -> psycopg.Connection:
        return psycopg.connect(
            host="127.0.0.1",
            port=self.port,
            user=user,
            password=password,
            dbname=self.env["POSTGRES_DB"],
            connect_timeout=5,
            **kwargs,
        )

    def owner(self, **kwargs) -> psycopg.Connection:
        return self.connect(self.env["OPSYNC_DB_USER"], self.env["OPSYNC_DB_PASSWORD"], **kwargs)


def copy_scripts(root: Path) -> None:
    scripts = make_owned_dir(root / "opsync", PG_OS_USER, 0o755)
    for script in (REPO / "deploy").glob("*.sh"):
        shutil.copy2(script, scripts / script.name)


@pytest.fixture(scope="module")
def cologne(service_root):
    root = make_owned_dir(service_root / "compose-primary", PG_OS_USER, 0o755)
    copy_scripts(root)
    port = free_port()
    env = {
        **read_env(EXAMPLES["cologne"]),
        "POSTGRES_PASSWORD": secrets.token_urlsafe(16),
        "OPSYNC_DB_PASSWORD": secrets.token_urlsafe(16),
        "REPLICATION_PASSWORD": secrets.token_urlsafe(16),
        "PGHOST": str(root),
        "PGPORT": str(port),
        "PATH": f"{PG_BIN}:{os.environ['PATH']}",
    }
    write_private(root / "pw", env["POSTGRES_PASSWORD"] + "\n", PG_OS_USER)
    run_as(
        PG_OS_USER,
        [
            "initdb",
            "-D",
            str(root / "data"),
            "-U",
            env["POSTGRES_USER"],
            f"--pwfile={root / 'pw'}",
            "--auth-local=trust",
            "-E",
            "UTF8",
            "--locale=C.UTF-8",
        ],
        env=env,
        cwd=root,
    )
    primary = Cologne(root, port, env)
    settings = compose_command("primary", "cologne")[2::2]  # postgres -c a=1 -c b=2 ...
    assert "listen_addresses=*" in settings
    options = [
        *(f"-c{setting}" for setting in settings if setting != "listen_addresses=*"),
        "-c",
        "listen_addresses=127.0.0.1",
        "-c",
        f"port={port}",
        "-c",
        f"unix_socket_directories={root}",
        "-c",
        f"hba_file={root / 'pg_hba.conf'}",
    ]
    primary.write_hba("192.0.2.0/24")  # TEST-NET-1: an observatory network this machine is not on
    run_as(
        PG_OS_USER,
        ["pg_ctl", "-D", str(root / "data"), "-l", str(root / "log"), "-w", "-o", shlex.join(options), "start"],
        env=env,
        cwd=root,
    )
    try:
        run_as(PG_OS_USER, ["psql", "-d", "postgres", "-c", f'CREATE DATABASE "{env["POSTGRES_DB"]}"'], env=env, cwd=root)
        run_as(PG_OS_USER, [str(root / "opsync/primary-init.sh")], env=env, cwd=root)
        yield primary
    finally:
        run_as(PG_OS_USER, ["pg_ctl", "-D", str(root / "data"), "-m", "immediate", "stop"], env=env, cwd=root)


def test_the_primary_admits_its_owner_and_no_one_else_over_the_network(cologne):
    assert healthcheck("primary", cologne.env, PG_OS_USER).returncode == 0
    with cologne.owner() as conn:
        owner, monitor = conn.execute(
            "SELECT pg_get_userbyid(datdba), pg_has_role('pg_monitor', 'member') FROM pg_database WHERE datname = current_database()"
        ).fetchone()
        slot = conn.execute("SELECT slot_type FROM pg_replication_slots WHERE slot_name = %s", (cologne.env["REPLICA_SLOT"],)).fetchone()
    assert (owner, monitor, slot) == (cologne.env["OPSYNC_DB_USER"], True, ("physical",))
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        cologne.connect(cologne.env["OPSYNC_DB_USER"], "wrong")
    with pytest.raises(psycopg.OperationalError, match="no pg_hba.conf entry"):
        cologne.connect(cologne.env["POSTGRES_USER"], cologne.env["POSTGRES_PASSWORD"])
    with pytest.raises(psycopg.OperationalError, match="no pg_hba.conf entry for replication connection"):
        cologne.connect("replicator", cologne.env["REPLICATION_PASSWORD"], replication="true")


def test_the_replica_clones_through_the_slot_and_streams_as_the_observatory(cologne, service_root):
    from opsync.migrate import upgrade

    cologne.admit_this_machine()
    env = cologne.env
    upgrade(f"postgresql+psycopg://{env['OPSYNC_DB_USER']}:{env['OPSYNC_DB_PASSWORD']}@127.0.0.1:{cologne.port}/{env['POSTGRES_DB']}")
    root = make_owned_dir(service_root / "compose-replica", PG_OS_USER, 0o755)
    copy_scripts(root)
    port = free_port()
    replica_env = {
        **read_env(EXAMPLES["observatory"]),
        "PRIMARY_HOST": "127.0.0.1",
        "PRIMARY_PORT": str(cologne.port),
        "PRIMARY_SSLMODE": "disable",
        "REPLICATION_PASSWORD": env["REPLICATION_PASSWORD"],
        "HOME": str(make_owned_dir(root / "home", PG_OS_USER)),
        "PGDATA": str(root / "data"),
        "PATH": env["PATH"],
        "PGHOST": str(root),
        "PGPORT": str(port),
    }
    as_postgres = {"user": PG_OS_USER, "group": pwd.getpwnam(PG_OS_USER).pw_gid, "extra_groups": []} if is_root() else {}
    with open(root / "log", "w") as log:
        server = subprocess.Popen(
            [
                str(root / "opsync/replica-entrypoint.sh"),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                f"port={port}",
                "-c",
                f"unix_socket_directories={root}",
            ],
            env=replica_env,
            cwd=root,
            stdout=log,
            stderr=subprocess.STDOUT,
            **as_postgres,
        )
    try:
        deadline = time.monotonic() + 90
        while healthcheck("replica", replica_env, PG_OS_USER).returncode != 0:
            assert server.poll() is None, (root / "log").read_text()
            assert time.monotonic() < deadline, (root / "log").read_text()
            time.sleep(0.5)
        with cologne.owner(autocommit=True) as conn:
            conn.execute("CREATE TABLE deploy_probe (n int)")
            conn.execute("INSERT INTO deploy_probe VALUES (42)")
            lsn = conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
        replica = psycopg.connect(
            host="127.0.0.1",
            port=port,
            user=env["OPSYNC_DB_USER"],
            password=env["OPSYNC_DB_PASSWORD"],
            dbname=env["POSTGRES_DB"],
            autocommit=True,
            connect_timeout=5,
        )
        with replica:
            while not replica.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (lsn,)).fetchone()[0]:
                assert time.monotonic() < deadline
                time.sleep(0.1)
            assert replica.execute("SELECT n FROM deploy_probe").fetchall() == [(42,)]
            assert replica.execute("SELECT count(*) FROM alembic_version").fetchone() == (2,)  # the engine's head, the domain's
        with cologne.owner() as conn:
            streaming = conn.execute("SELECT application_name, state FROM pg_stat_replication").fetchall()
            active = conn.execute("SELECT active FROM pg_replication_slots WHERE slot_name = %s", (env["REPLICA_SLOT"],)).fetchone()
        assert (streaming, active) == ([(env["REPLICA_SLOT"], "streaming")], (True,))
        assert env["REPLICATION_PASSWORD"] not in Path(f"/proc/{server.pid}/cmdline").read_text()
    finally:
        server.send_signal(signal.SIGINT)  # PostgreSQL's fast shutdown, Docker's stop signal for the image
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def test_the_buffer_redis_starts_durable_with_its_password_off_the_command_line(tmp_path):
    password = secrets.token_urlsafe(16)
    port = free_port()
    options = compose_command("redis", "observatory")
    at = options.index("--dir")
    assert options[at + 1] == "/data"
    options[at + 1] = str(tmp_path)  # redis-server enters each --dir at once: /data must not be tried here
    log = tmp_path / "redis.log"
    with log.open("w") as out:
        server = subprocess.Popen(
            [str(REPO / "deploy/redis-entrypoint.sh"), "REDIS_PASSWORD", *options, "--bind", "127.0.0.1", "--port", str(port)],
            env={"REDIS_PASSWORD": password, "PATH": os.environ["PATH"], "TMPDIR": str(tmp_path)},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        client = redis.Redis(port=port, password=password, socket_timeout=5, decode_responses=True)
        deadline = time.monotonic() + 30
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert server.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port, socket_timeout=5).ping()
        config = {
            key: client.config_get(key)[key]
            for key in (
                "appendonly",
                "appendfsync",
                "no-appendfsync-on-rewrite",
                "maxmemory-policy",
                "protected-mode",
                "save",
                "bind",
            )
        }
        assert config == {
            "appendonly": "yes",
            "appendfsync": "always",
            "no-appendfsync-on-rewrite": "no",
            "maxmemory-policy": "noeviction",
            "protected-mode": "yes",
            "save": "",
            "bind": "127.0.0.1",
        }
        assert client.config_get("maxmemory")["maxmemory"] == "10737418240"
        assert password not in Path(f"/proc/{server.pid}/cmdline").read_text()
        assert Path(client.info("server")["config_file"]).stat().st_mode & 0o777 == 0o600
    finally:
        server.terminate()
        server.wait(30)
