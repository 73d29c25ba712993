"""Hourly (``OPSYNC_READ_MODEL_CHECK_INTERVAL_S``): compare the read model Datasette serves with the replica,
table by table (counts and checksums per key range, then row by row where they differ), and repair
drift in place. The change table is purged by the publisher itself (hourly, on the primary).
"""

from datetime import datetime, timedelta

from airflow.sdk import dag

from opsync_airflow.operators import ReadModelCheckOperator
from opsync_airflow.settings import DagSettings


class CheckSettings(DagSettings):
    read_model_check_interval_s: float = 3600


settings = CheckSettings()


@dag(
    schedule=timedelta(seconds=settings.read_model_check_interval_s),
    start_date=datetime(2025, 1, 1),
    catchup=False,
    max_active_runs=1,
    is_paused_upon_creation=False,
    tags=["opsync", "read-model"],
    default_args={"owner": "opsync"},
    doc_md=__doc__,
)
def opsync_read_model_check():
    ReadModelCheckOperator(task_id="check_and_repair")


opsync_read_model_check()
