"""Where ``make up`` puts things and which ports it uses; every value overridable by environment."""

import json
import secrets
from functools import cached_property
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from devstack.airflow import new_airflow_secrets
from devstack.process import write_private

REPO = Path(__file__).resolve().parents[1]


class StackSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OPSYNC_", extra="ignore")

    run_dir: Path = Field(REPO / ".run", description="All state, logs and secrets of the local stack")
    host: str = "127.0.0.1"
    primary_port: int = 15432
    replica_port: int = 15433
    redis_port: int = 16379
    api_port: int = 8000
    datasette_port: int = 8001
    airflow_port: int = 8080
    datasette_public: bool = Field(
        True, description="Anyone who reaches Datasette may read (role `local`); false: GitHub sign-in or token only"
    )
    api_workers: int = Field(2, ge=1, description="uvicorn worker processes of the ingest API")
    primary_link_port: int | None = Field(
        None,
        description="Port of a link (a WanProxy) in front of the primary: the site and the replica reach it only"
        " through there (the soak test); unset: directly, as in make up",
    )
    pg_bin: Path = Path("/usr/lib/postgresql/15/bin")
    pg_os_user: str = Field("postgres", description="Unprivileged user PostgreSQL runs as when started by root")
    redis_bin: str = "redis-server"
    redis_maxmemory: str = "10gb"
    health_timeout: float = 240

    @property
    def logs(self) -> Path:
        return self.run_dir / "logs"

    @property
    def secrets_path(self) -> Path:
        return self.run_dir / "secrets.json"

    def save_secret(self, name: str, value: str) -> None:
        self.secrets[name] = value
        write_private(self.secrets_path, json.dumps(self.secrets, indent=2))

    @cached_property
    def secrets(self) -> dict:
        """Generated once per run dir, kept in a 0600 file; never in code or logs."""
        path = self.secrets_path
        if path.exists():
            return json.loads(path.read_text())
        values = {
            "pg_password": secrets.token_urlsafe(24),
            "replication_password": secrets.token_urlsafe(24),
            "redis_password": secrets.token_urlsafe(24),
            "airflow_admin_password": secrets.token_urlsafe(12),
            "airflow": new_airflow_secrets(),
            "datasette_secret": secrets.token_urlsafe(32),
            "datasette_token": secrets.token_urlsafe(32),
        }
        write_private(path, json.dumps(values, indent=2))
        return values

    def ensure_secret(self, name: str) -> str:
        """A random secret kept in secrets.json, added there if a run dir made before it lacks it."""
        if name not in self.secrets:
            self.save_secret(name, secrets.token_urlsafe(32))
        return self.secrets[name]
