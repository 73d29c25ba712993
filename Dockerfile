# Three images from one checkout, all tagged with the opsync version in docker-compose.yaml; each
# installs exactly its lock (locks/<extra>.txt, resolved from that extra of pyproject.toml) and opsync:
#   target `api`       the ingest API and the Alembic migrations (extra `api`);
#   target `datasette` Datasette with opsync's plugins, the read-model publisher among them (extra `datasette`);
#   target `airflow`   the official Airflow image with opsync installed (extra `airflow`), because the
#                      triggerer imports triggers only from installed packages, never from the DAGs folder;
#                      the Sync status page registers through opsync's `airflow.plugins` entry point.
# Base images carry exact version tags (tests/test_compose.py checks them; the Airflow one must match
# the apache-airflow pin in locks/airflow.txt).

# The two Python images share one stage (base image, user, data directory); each then installs its own lock.
FROM python:3.11.13-slim-bookworm AS python-app
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN useradd --create-home --uid 10001 opsync && mkdir -p /data && chown opsync /data
WORKDIR /app

FROM python-app AS api
COPY locks/api.txt locks/
RUN pip install --no-deps -r locks/api.txt
COPY . .
RUN pip install --no-deps . && pip check
USER opsync

FROM python-app AS datasette
COPY locks/datasette.txt locks/
RUN pip install --no-deps -r locks/datasette.txt
COPY . .
RUN pip install --no-deps . && pip check
USER opsync

FROM apache/airflow:3.3.2-python3.11 AS airflow
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --chown=airflow:0 locks/airflow.txt /opt/opsync/locks/airflow.txt
RUN pip install --no-deps -r /opt/opsync/locks/airflow.txt
COPY --chown=airflow:0 . /opt/opsync/src
RUN pip install --no-deps /opt/opsync/src
COPY --chown=airflow:0 dags /opt/airflow/dags
