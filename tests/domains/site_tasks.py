"""What a site runs besides its servers, as the separate processes a site runs them in, for tests that
select another domain (``OPSYNC_DOMAIN``): a test process has loaded the default domain once for good.

``python -m tests.domains.site_tasks prepare``: migrate the primary (engine and domain branches) and
create the read model file, as ``make up`` does. ``... drain-dag``: one run of the ``opsync_drain`` DAG
(``dag.test()``, in a throwaway Airflow home; its connections from the ``AIRFLOW_CONN_OPSYNC_*``
environment). ``... check``: the read-model check DAG's work (compare with the replica, repair),
printing each table's drift as JSON.
"""

import json
import sys

from devstack.settings import REPO
from opsync.config import get_settings
from opsync.migrate import upgrade
from opsync.read_model.check import ReadModelCheck
from opsync.read_model.publisher import Publisher
from opsync.read_model.store import ensure_read_model
from tests.airflow_home import configure_airflow, migrate


def prepare() -> dict:
    settings = get_settings()
    upgrade(settings.primary_url.get_secret_value())
    ensure_read_model(settings.read_model_path)
    return {"read_model": str(settings.read_model_path)}


def drain_dag() -> dict:
    configure_airflow()
    migrate()
    from airflow.dag_processing.dagbag import DagBag  # only now: Airflow reads its configuration when imported

    run = DagBag(dag_folder=REPO / "dags", safe_mode=False).get_dag("opsync_drain").test()
    return {"state": run.state, "tasks": {ti.task_id: ti.state for ti in run.get_task_instances()}}


def check() -> dict:
    publisher = Publisher.from_settings(get_settings())
    try:
        report = ReadModelCheck(publisher).run()
    finally:
        publisher.close()
    return {t.table: {"drift": sorted(t.drift), "repaired": t.repaired, "replica_rows": t.replica_rows} for t in report.tables}


if __name__ == "__main__":
    sys.stdout.write(json.dumps({"prepare": prepare, "drain-dag": drain_dag, "check": check}[sys.argv[1]]()) + "\n")
