"""Airflow side of opsync: hooks, operators, sensors, triggers and maintenance tasks.

An installed package (not only a file in the plugins folder) so that the triggerer can import
the triggers.
"""

METADATA_DB_ENV = "OPSYNC_AIRFLOW_METADATA_DB"
"""Airflow's metadata DB URL again, for the maintenance task (Airflow 3 hides its own from tasks): set by whoever
deploys Airflow (docker-compose.yaml, ``make up``), read by :mod:`opsync_airflow.maintenance`. Here, in a module free
of Airflow imports, so the launcher of ``make up`` can name it without importing Airflow."""
