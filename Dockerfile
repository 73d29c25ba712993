# Two images from one checkout, both tagged with the opsync version in docker-compose.yaml:
#   target `app`     the ingest API, Datasette with the read-model publisher, the Alembic migrations;
#   target `airflow` the official Airflow image with opsync installed, because the triggerer imports
#                    triggers only from installed packages, never from the DAGs folder.
# Base images carry exact version tags (tests/test_compose.py checks them; the Airflow one must match
# the apache-airflow pin in requirements.txt).

FROM python:3.11.13-slim-bookworm AS app
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN useradd --create-home --uid 10001 opsync
WORKDIR /app
COPY requirements.txt .
RUN pip install -r requirements.txt
COPY . .
RUN pip install --no-deps . && mkdir -p /data && chown opsync /data
USER opsync

FROM apache/airflow:3.3.2-python3.11 AS airflow
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --chown=airflow:0 requirements.txt /opt/opsync/requirements.txt
RUN pip install "apache-airflow==3.3.2" -r /opt/opsync/requirements.txt
COPY --chown=airflow:0 . /opt/opsync/src
RUN pip install --no-deps /opt/opsync/src
COPY --chown=airflow:0 dags /opt/airflow/dags
