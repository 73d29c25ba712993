"""Hourly retention of Airflow's own metadata and task logs (logic in ``opsync_airflow.maintenance``).

Retention: Variable ``opsync_airflow_retention_days``, else env ``OPSYNC_AIRFLOW_RETENTION_DAYS``, else 7 days.
"""

from datetime import timedelta

from airflow.sdk import dag, task

from opsync_airflow import maintenance
from opsync_airflow.settings import UNATTENDED


@task
def purge_metadata() -> None:
    maintenance.purge_metadata(maintenance.retention_cutoff())


@task
def purge_logs() -> None:
    maintenance.purge_logs(maintenance.base_log_folder(), maintenance.retention_cutoff())


@dag(
    schedule=timedelta(hours=1),
    **UNATTENDED,
    tags=["opsync", "maintenance"],
    default_args={"owner": "opsync", "retries": 2, "retry_delay": timedelta(minutes=5)},
    doc_md=__doc__,
)
def opsync_maintenance():
    purge_metadata()
    purge_logs()


opsync_maintenance()
