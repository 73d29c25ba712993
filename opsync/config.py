"""Runtime settings shared by every face of opsync (API, DAGs, Datasette plugin, CLI).

Everything comes from the environment (prefix ``OPSYNC_``) or a ``.env`` file, so the same code
runs under ``make up``, under the tests and in the compose deployment. Secrets are ``SecretStr``
so they never end up in a repr or a log line.
"""

from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class SiteType(StrEnum):
    secondary = "secondary"  # the observatory: local buffer, local streaming replica
    main = "main"  # Cologne: the primary is local, confirmation is immediate


SslMode = Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"]
"""libpq's ``sslmode`` values."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OPSYNC_", env_file=".env", extra="ignore")

    site: str = Field("observatory", description="Name of this site, recorded with every transaction")
    site_type: SiteType = SiteType.secondary
    primary_url: SecretStr = Field(
        SecretStr("postgresql+psycopg://opsync@127.0.0.1:15432/opsync"),
        description="SQLAlchemy URL of the writable primary (Cologne)",
    )
    replica_url: SecretStr = Field(
        SecretStr("postgresql+psycopg://opsync@127.0.0.1:15433/opsync"),
        description="SQLAlchemy URL of the local read-only streaming replica",
    )
    redis_url: SecretStr = Field(SecretStr("redis://127.0.0.1:16379/0"), description="The site buffer (rediss:// for TLS)")
    primary_sslmode: SslMode | None = Field(
        None, description="libpq sslmode to the primary, across the WAN: verify-full in production; unset: the URL's, else prefer"
    )
    primary_sslrootcert: Path | None = Field(None, description="CA the primary's certificate must chain to (verify-ca, verify-full)")
    replica_sslmode: SslMode | None = Field(None, description="libpq sslmode to the replica; unset: the URL's, else prefer")
    replica_sslrootcert: Path | None = Field(None, description="CA the replica's certificate must chain to")
    redis_ssl_ca_certs: Path | None = Field(None, description="CA the buffer Redis' certificate must chain to (a rediss:// URL)")
    connect_timeout_s: int = Field(
        10, ge=2, description="Connect timeout to PostgreSQL of the drain, CLI, publisher and triggers: a cut link never refuses"
    )
    replica_timeout_s: int = Field(3, ge=1, description="Connect/statement timeout of the API's token checks and reads on the replica")
    redis_timeout_s: float = Field(5, gt=0, description="Connect and answer timeout of the buffer Redis (local: longer means it is stuck)")
    read_model_path: Path = Field(Path(".run/datasette/opsync.db"), description="SQLite file Datasette serves")
    datasette_publisher: bool = Field(
        True, description="Run the read-model publisher inside Datasette; off where it runs as python -m opsync.read_model.publisher"
    )
    domain: str = Field("observatory", description="The domain the engine runs: a name of the opsync.domains entry points")
    timezone: str = Field("America/Santiago", description="Site time zone; defines the observing night")
    allow_non_durable: bool = Field(False, description="Start the API even if Redis is not fsync-durable (tests only)")
    max_records_per_request: int = Field(500, description="Largest list POST /v1/records accepts (each record is a step)")
    max_steps_per_transaction: int = Field(
        500, description="Most steps one write may carry, so its enqueue script stays within 50 ms (README 'Limits')"
    )
    token_cache_ttl_s: float = Field(
        30, description="How long a validated token is trusted before re-checking; one in use is re-read after half of it"
    )
    direct_timeout_s: int = Field(3, description="Connect/statement timeout of direct writes to the primary")
    idempotency_ttl_s: int = Field(7 * 86400, description="How long Idempotency-Key answers are kept")
    status_ttl_s: int = Field(7 * 86400, description="How long a transaction's status is kept once final (replicated or failed)")
    high_water_entries: int = Field(
        3_628_800,
        description="Buffered (unacknowledged) transactions above which writes get 503 + Retry-After: "
        "48 h at 21 transactions/s (48 x 3600 x 21), 5% above the peak of 20; see README 'Backpressure'",
    )
    high_water_memory_fraction: float = Field(
        0.9,
        gt=0,
        le=1,
        description="Fraction of Redis maxmemory (when set) above which writes get 503; the rest is room for the drainer",
    )
    capacity_window_s: float = Field(
        300, gt=0, description="Rates behind the high-water and drain forecasts are measured over this many seconds"
    )
    retry_after_s: int = Field(30, description="Retry-After of a 503 for backpressure")
    backpressure_cache_s: float = Field(
        0.5, description="How often the buffer is re-measured for the high-water check (the last verdict answers meanwhile)"
    )
    max_body_bytes: int = Field(512 * 1024, description="Largest request body; larger ones get 413 before being read (README 'Limits')")
    max_json_depth: int = Field(32, description="Deepest nesting of JSON values a record may have")
    events_keepalive_s: float = Field(15, description="Interval of SSE keep-alive comments on GET /v1/events")

    @field_validator("redis_ssl_ca_certs")
    @classmethod
    def _tls_needs_rediss(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        """A CA for a plain redis:// URL would be ignored, leaving the buffer in clear text unnoticed. A field
        validator: its error shows this field's value alone, never the URL (and its password)."""
        url = info.data.get("redis_url")
        if value is not None and url is not None and not url.get_secret_value().startswith("rediss://"):
            raise ValueError("needs a rediss:// OPSYNC_REDIS_URL (TLS)")
        return value


@lru_cache
def get_settings() -> Settings:
    return Settings()
