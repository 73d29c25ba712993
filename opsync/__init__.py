"""opsync core: recording observatory operations data that never blocks and is never lost.

No web-framework or Airflow imports here: the ingest API, the DAGs, the Datasette plugin and the
CLI are thin faces over these modules.
"""
