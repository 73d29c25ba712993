"""The "Sync status" page in Airflow's UI: a FastAPI app the API server mounts at ``/opsync``.

``access`` decides who may read and who may act (Airflow's own sign-in and roles), ``site`` measures
the site through the DAGs' connections, ``app`` serves the page and its JSON; the figures, the
thresholds and the dead-letter actions are the core's (:mod:`opsync.monitoring.status`, :mod:`opsync.monitoring.alerts`,
:mod:`opsync.dlq`). ``plugin`` registers it with Airflow (the package's ``airflow.plugins`` entry point).
"""
