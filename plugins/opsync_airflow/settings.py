"""Settings of the drain and reconcile DAGs, from the environment (prefix ``OPSYNC_``), read when the DAGs are parsed."""

from datetime import datetime

from pydantic_settings import BaseSettings, SettingsConfigDict

from opsync.drain import BATCH_BYTES, BATCH_RECORDS, BATCH_SIZE

UNATTENDED = {
    "start_date": datetime(2025, 1, 1),
    "catchup": False,  # after an outage, one run catches up; replaying every missed interval would not
    "max_active_runs": 1,
    "is_paused_upon_creation": False,  # a site runs unattended: a new DAG must not wait for a click
}
"""How every opsync DAG is declared, whatever its schedule."""


class DagSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OPSYNC_", extra="ignore")

    drain_interval_s: float = 10  # the time schedule; records also wake the drain at once
    drain_budget_s: float = 60  # one drain task stops starting batches after this
    drain_batch_size: int = BATCH_SIZE  # transactions per batch (one DB transaction, one round trip)
    drain_batch_records: int = BATCH_RECORDS  # a batch ends before the transaction that would pass this...
    drain_batch_bytes: int = BATCH_BYTES  # ...or this (envelope bytes); a larger transaction goes alone, whole
    drain_retries: int = 5  # with exponential backoff from 10 s up to drain_max_retry_delay_s
    drain_max_retry_delay_s: float = 300
    replica_wait_timeout_s: float = 300  # then the run fails and opsync_reconcile confirms later
    replica_poke_interval_s: float = 2
    reconcile_interval_s: float = 60
    stuck_after_s: float = 600  # buffered, or committed and not replicated, longer than this fails reconcile
    reclaim_idle_s: float = 60  # entries a drainer left claimed this long are taken over
