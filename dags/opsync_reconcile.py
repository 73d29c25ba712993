"""Every minute: confirm whatever the replica has passed, take over entries a crashed drain left
claimed, and fail when something has been stuck longer than ``OPSYNC_STUCK_AFTER_S`` (600 s).
"""

from datetime import timedelta

from airflow.sdk import dag

from opsync_airflow.operators import ReconcileOperator
from opsync_airflow.settings import UNATTENDED, DagSettings

settings = DagSettings()


@dag(
    schedule=timedelta(seconds=settings.reconcile_interval_s),
    **UNATTENDED,
    tags=["opsync", "drain"],
    default_args={"owner": "opsync"},
    doc_md=__doc__,
)
def opsync_reconcile():
    ReconcileOperator(task_id="reconcile", stuck_after_s=settings.stuck_after_s, reclaim_idle_s=settings.reclaim_idle_s)


opsync_reconcile()
