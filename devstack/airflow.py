"""Airflow for the local site: its settings, its four processes and their health.

Imported by the launcher, which must stay free of Airflow imports: everything here is environment
variables, command lines and HTTP. All settings travel as ``AIRFLOW__*`` variables, so every
process started with :func:`airflow_env` sees the same site (and an ``airflow.cfg`` that Airflow
writes on first start changes nothing).
"""

import json
import os
import secrets
import sys
from collections.abc import Mapping
from pathlib import Path

import httpx
from cryptography.fernet import Fernet

from devstack.process import run_as, write_private
from opsync.health import Health
from opsync_airflow import METADATA_DB_ENV

VENV_BIN = Path(sys.prefix) / "bin"
AIRFLOW = str(VENV_BIN / "airflow")
ADMIN = "admin"
SECRET_KEYS = ("fernet_key", "jwt_secret", "secret_key")
HEALTH_COMPONENTS = ("metadatabase", "scheduler", "triggerer", "dag_processor")
SIMPLE_AUTH_MANAGER = "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
SCHEDULER_RECOVERY = {
    "AIRFLOW__SCHEDULER__ORPHANED_TASKS_CHECK_INTERVAL": "60",
    "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "120",
}


def new_airflow_secrets() -> dict[str, str]:
    """Keys every Airflow process must share: a task's JWT is signed by one process and checked by another.

    ``fernet_key`` encrypts connection passwords and variables in the metadata DB, ``jwt_secret``
    signs API and execution tokens, ``secret_key`` signs sessions and log-server requests.
    """
    return {
        "fernet_key": Fernet.generate_key().decode(),
        "jwt_secret": secrets.token_urlsafe(64),
        "secret_key": secrets.token_urlsafe(64),
    }


def metadata_db_url(home: Path) -> str:
    return f"sqlite:///{home / 'airflow.db'}"


def passwords_file(home: Path) -> Path:
    return home / "simple_auth_manager_passwords.json"


def airflow_env(home: Path, port: int, secrets: Mapping[str, str], repo: Path, host: str = "127.0.0.1") -> dict[str, str]:
    """Every setting of a one-machine Airflow site on 2 cores, as environment variables.

    ``secrets`` holds the keys of :func:`new_airflow_secrets`. The log servers of the scheduler
    and the triggerer listen on ``port + 1`` and ``port + 2``, so two sites on one machine (a
    developer's stack and a test stack) do not fight over Airflow's fixed defaults 8793/8794.
    The venv's ``bin`` comes first on ``PATH``: Airflow starts some children by name.
    ``OPSYNC_AIRFLOW_METADATA_DB`` repeats the DB URL for the maintenance DAG, because Airflow 3
    hides ``AIRFLOW__DATABASE__SQL_ALCHEMY_CONN`` from tasks.
    """
    missing = set(SECRET_KEYS) - set(secrets)
    if missing:
        raise ValueError(f"missing Airflow secrets: {sorted(missing)}")
    base_url = f"http://{host}:{port}"
    return {
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(repo / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__PARALLELISM": "4",
        "AIRFLOW__CORE__FERNET_KEY": secrets["fernet_key"],
        "AIRFLOW__CORE__AUTH_MANAGER": SIMPLE_AUTH_MANAGER,
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN}:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords_file(home)),
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{base_url}/execution/",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": metadata_db_url(home),
        METADATA_DB_ENV: metadata_db_url(home),
        "AIRFLOW__API__HOST": host,
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__API__BASE_URL": base_url,
        "AIRFLOW__API__WORKERS": "1",
        "AIRFLOW__API__SECRET_KEY": secrets["secret_key"],
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets["jwt_secret"],
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
        # A drain task orphaned by a scheduler crash is failed within ~3 minutes instead of ~10 (the 300 s
        # orphan check + 300 s heartbeat timeout of Airflow), so the drain (one run at a time) resumes
        # sooner; the soak shortens both further through the environment.
        **{name: os.environ.get(name, default) for name, default in SCHEDULER_RECOVERY.items()},
        "AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES": "1",
        "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(home / "logs"),
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(port + 1),
        "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(port + 2),
    }


def airflow_programs(port: int) -> dict[str, list[str]]:
    """The four long-running processes of the site, by name (as ``airflow standalone`` runs them)."""
    return {
        "api-server": [AIRFLOW, "api-server", "--port", str(port)],
        "scheduler": [AIRFLOW, "scheduler"],
        "dag-processor": [AIRFLOW, "dag-processor"],
        "triggerer": [AIRFLOW, "triggerer"],
    }


def migrate_metadata_db(env: Mapping[str, str]) -> None:
    """Create or upgrade the metadata DB; a no-op when it is current, so every ``make up`` runs it."""
    run_as(None, [AIRFLOW, "db", "migrate"], env=dict(env))


def write_admin_password(home: Path, password: str) -> None:
    """Fix the admin password, so Airflow does not generate one and print it to a log.

    The simple auth manager reads ``{"user": "password"}`` JSON and only adds users missing from it.
    """
    write_private(passwords_file(home), json.dumps({ADMIN: password}) + "\n")


def airflow_health_url(port: int, host: str = "127.0.0.1") -> str:
    return f"http://{host}:{port}/api/v2/monitor/health"


def health_from_json(body: Mapping) -> Health:
    """Healthy only when the metadata DB and all three job processes report healthy (heartbeats fresh)."""
    states = {name: (body.get(name) or {}).get("status") for name in HEALTH_COMPONENTS}
    bad = {name: state for name, state in states.items() if state != "healthy"}
    if bad:
        return Health(False, ", ".join(f"{name} {state or 'absent'}" for name, state in bad.items()))
    return Health(True, "metadatabase, scheduler, triggerer, dag_processor healthy")


def airflow_health(port: int, host: str = "127.0.0.1") -> Health:
    try:
        response = httpx.get(airflow_health_url(port, host), timeout=3)
        response.raise_for_status()
        return health_from_json(response.json())
    except (httpx.HTTPError, ValueError) as exc:
        return Health(False, f"unreachable: {exc}")
