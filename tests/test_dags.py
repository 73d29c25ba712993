"""Every DAG file imports cleanly and is declared so it runs unattended; the maintenance DAG really purges."""

from tests.airflow_home import configure_airflow, migrate

AIRFLOW_HOME = configure_airflow()

import os  # noqa: E402
from datetime import UTC, datetime, timedelta  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from airflow.dag_processing.dagbag import DagBag  # noqa: E402
from airflow.models.log import Log  # noqa: E402
from airflow.utils.session import create_session  # noqa: E402

from devstack.settings import REPO  # noqa: E402

DAGS = REPO / "dags"


@pytest.fixture(scope="module")
def dagbag() -> DagBag:
    """Only our folder (examples are a separate bundle in Airflow 3.3); every file parsed, not only likely ones."""
    return DagBag(dag_folder=DAGS, safe_mode=False)


@pytest.fixture(scope="module")
def airflow_db() -> None:
    migrate()


def test_every_dag_file_imports_without_error_and_defines_a_dag(dagbag):
    assert dagbag.import_errors == {}
    assert {Path(dag.fileloc).name for dag in dagbag.dags.values()} == {p.name for p in DAGS.glob("*.py")}


def test_every_dag_has_tags_an_owner_and_starts_unpaused(dagbag):
    problems = []
    for dag_id, dag in dagbag.dags.items():
        if not dag.tags:
            problems.append(f"{dag_id}: no tags")
        if dag.is_paused_upon_creation is not False:
            problems.append(f"{dag_id}: would be created paused on a site with Airflow's defaults")
        if dag.catchup:
            problems.append(f"{dag_id}: catchup would replay every missed interval after an outage")
        problems += [f"{dag_id}.{t.task_id}: default owner" for t in dag.tasks if t.owner == "airflow"]
    assert problems == []


def days_ago(days: float) -> datetime:
    return datetime.now(UTC) - timedelta(days=days)


def backdate(path: Path, when: datetime) -> Path:
    os.utime(path, (when.timestamp(), when.timestamp()))
    return path


def write_log(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("a task log line\n")
    return path


def audit_row(event: str, when: datetime) -> None:
    with create_session() as session:
        row = Log(event=event)
        row.dttm = when
        session.add(row)


def audit_events() -> set[str]:
    with create_session() as session:
        return {row.event for row in session.query(Log).filter(Log.event.like("opsync-test-%"))}


def test_maintenance_dag_removes_what_is_older_than_retention_and_keeps_the_rest(airflow_db, dagbag, monkeypatch):
    monkeypatch.setenv("OPSYNC_AIRFLOW_RETENTION_DAYS", "7")
    base = AIRFLOW_HOME / "logs"
    old_log = write_log(base / "dag_id=x/run_id=old/task_id=t/attempt=1.log")
    recent_log = write_log(base / "dag_id=x/run_id=recent/task_id=t/attempt=1.log")
    (base / "dag_id=y/run_id=gone/task_id=t").mkdir(parents=True)
    backdate(old_log, days_ago(8))
    backdate(recent_log, days_ago(6))
    old_dirs = [
        base / "dag_id=x",
        base / "dag_id=x/run_id=old",
        base / "dag_id=x/run_id=old/task_id=t",
        base / "dag_id=y",
        base / "dag_id=y/run_id=gone",
        base / "dag_id=y/run_id=gone/task_id=t",
    ]
    for path in old_dirs:
        backdate(path, days_ago(8))
    audit_row("opsync-test-old", days_ago(8))
    audit_row("opsync-test-recent", days_ago(6))

    run = dagbag.get_dag("opsync_maintenance").test()

    assert run.state == "success"
    assert not old_log.exists() and not (base / "dag_id=x/run_id=old").exists()
    assert not (base / "dag_id=y").exists()
    assert recent_log.exists() and base.is_dir()
    assert audit_events() == {"opsync-test-recent"}
