"""Drain the site buffer into the primary, wait (deferred) until the replica has replayed it, confirm.

Runs every ``OPSYNC_DRAIN_INTERVAL_S`` (10 s) and as soon as records are accepted (a wake-up on the
buffer's events channel, which may be lost: the stream is the source of truth, the time schedule the
fallback). One run at a time. Settings: ``opsync_airflow.settings.DagSettings``; connections
``opsync_buffer``, ``opsync_primary``, ``opsync_replica``. A failed drain attempt (each retry counts)
announces ``drain_failed_runs`` once it reaches ``OPSYNC_ALERT_DRAIN_FAILED_RUNS_WARN`` (see ``opsync_alerts``).
"""

from datetime import timedelta

from airflow.sdk import Asset, AssetOrTimeSchedule, AssetWatcher, DeltaTriggerTimetable, dag

from opsync_airflow.notifiers import SiteAlertNotifier
from opsync_airflow.operators import ConfirmOperator, DrainOperator
from opsync_airflow.sensors import ReplicaLsnSensor
from opsync_airflow.settings import UNATTENDED, DagSettings
from opsync_airflow.triggers import BufferWakeTrigger

settings = DagSettings()
records_accepted = Asset(
    "opsync_site_buffer",
    uri="opsync://site-buffer",
    watchers=[AssetWatcher(name="opsync_records_accepted", trigger=BufferWakeTrigger())],
)


@dag(
    schedule=AssetOrTimeSchedule(timetable=DeltaTriggerTimetable(timedelta(seconds=settings.drain_interval_s)), assets=records_accepted),
    **UNATTENDED,
    tags=["opsync", "drain"],
    default_args={"owner": "opsync"},
    doc_md=__doc__,
)
def opsync_drain():
    failing = SiteAlertNotifier(figures=["drain_failed_runs"])
    drain = DrainOperator(
        task_id="drain",
        budget_s=settings.drain_budget_s,
        batch_size=settings.drain_batch_size,
        batch_records=settings.drain_batch_records,
        batch_bytes=settings.drain_batch_bytes,
        reclaim_idle_s=settings.reclaim_idle_s,
        retries=settings.drain_retries,
        retry_delay=timedelta(seconds=10),
        retry_exponential_backoff=2.0,
        max_retry_delay=timedelta(seconds=settings.drain_max_retry_delay_s),
        on_retry_callback=failing,
        on_failure_callback=failing,
    )
    wait = ReplicaLsnSensor(
        task_id="wait_for_replica",
        target_lsn=drain.output,
        poke_interval=settings.replica_poke_interval_s,
        timeout=settings.replica_wait_timeout_s,
    )
    drain >> wait >> ConfirmOperator(task_id="confirm")


opsync_drain()
