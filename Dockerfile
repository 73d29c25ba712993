# One image for every opsync process: ingest API, Airflow components, Datasette, migrations.
FROM python:3.11-slim-bookworm
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 AIRFLOW_HOME=/opt/airflow
RUN useradd --create-home --uid 50000 opsync
WORKDIR /app
COPY requirements.txt .
RUN pip install uv && uv pip install --system -r requirements.txt
COPY . .
RUN uv pip install --system --no-deps -e . && mkdir -p /opt/airflow /data && chown -R opsync /opt/airflow /data
USER opsync
