"""Retention for Airflow's own state, so a site that runs a DAG every 10 s stays small.

Each run adds rows to the metadata DB (dag_run, task_instance, job, log, xcom, ...) and a log file
per task try: 8,640 runs a day. Everything older than the retention goes, through Airflow's own
``airflow db clean`` for the DB and by file age for the logs.
"""

import logging
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from airflow.sdk import Variable, conf

from opsync_airflow import METADATA_DB_ENV

log = logging.getLogger(__name__)

RETENTION_VARIABLE = "opsync_airflow_retention_days"
RETENTION_ENV = "OPSYNC_AIRFLOW_RETENTION_DAYS"
DEFAULT_RETENTION_DAYS = 7
CLEAN_TIMEOUT = timedelta(minutes=20)
CLEAN_BATCH_ROWS = 5000


def retention_days() -> float:
    """The Variable (editable in the UI, no restart) wins over the environment, which wins over 7."""
    value = Variable.get(RETENTION_VARIABLE, default=None) or os.environ.get(RETENTION_ENV) or DEFAULT_RETENTION_DAYS
    days = float(value)
    if days <= 0:
        raise ValueError(f"retention must be a positive number of days, got {value!r}")
    return days


def retention_cutoff() -> datetime:
    return datetime.now(UTC) - timedelta(days=retention_days())


def base_log_folder() -> Path:
    return Path(conf.get("logging", "base_log_folder"))


def purge_metadata(before: datetime) -> dict[str, int]:
    """Delete metadata rows older than ``before``; returns the rows found per table.

    Airflow 3 blocks the ORM inside tasks (it even rewrites the DB URL in the task's environment),
    so ``airflow db clean`` runs as a child process given the real URL from ``OPSYNC_AIRFLOW_METADATA_DB``.
    Batches keep each SQLite write lock short, so the scheduler is never locked out for long.
    """
    url = os.environ.get(METADATA_DB_ENV)
    if not url:
        raise RuntimeError(f"{METADATA_DB_ENV} is not set: this task cannot reach Airflow's metadata DB")
    env = {**os.environ, "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": url}
    env.pop("AIRFLOW__CORE__SQL_ALCHEMY_CONN", None)
    command = [
        sys.executable,
        "-m",
        "airflow",
        "db",
        "clean",
        "--clean-before-timestamp",
        before.isoformat(),
        "--batch-size",
        str(CLEAN_BATCH_ROWS),
        "--skip-archive",
        "--yes",
        "--error-on-cleanup-failure",
    ]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=CLEAN_TIMEOUT.total_seconds())
    if proc.returncode != 0:
        raise RuntimeError(f"airflow db clean failed ({proc.returncode}):\n{proc.stdout[-4000:]}{proc.stderr[-4000:]}")
    purged = rows_found(proc.stdout)
    removed = {table: rows for table, rows in purged.items() if rows}
    log.info("purged metadata older than %s: %s", before.isoformat(), _describe(removed) or "nothing to purge")
    return purged


def rows_found(clean_output: str) -> dict[str, int]:
    """Rows per table from ``airflow db clean`` output ("Checking table t" then "Found n rows ...")."""
    pairs = re.findall(r"^Checking table (\S+)\s*\nFound (\d+) rows", clean_output, re.MULTILINE)
    return {table: int(rows) for table, rows in pairs}


def _describe(counts: dict[str, int]) -> str:
    return ", ".join(f"{table} {rows}" for table, rows in sorted(counts.items()))


@dataclass(frozen=True)
class LogPurge:
    files: int
    bytes: int
    dirs: int


def purge_logs(base: Path, before: datetime) -> LogPurge:
    """Delete log files last written before ``before``, then the directories that were already old and are now empty.

    A directory's age is taken before any file goes (removing files makes it look new); a directory
    a running task has just created is young and stays. ``rmdir`` refuses non-empty directories,
    so a task writing a new log meanwhile keeps its directory. ``base`` itself always stays.
    """
    limit = before.timestamp()
    old_dirs = [Path(root) for root, _, _ in os.walk(base) if Path(root) != base and os.stat(root).st_mtime < limit]
    files = size = 0
    for root, _, names in os.walk(base):
        for name in names:
            path = Path(root, name)
            stat = path.lstat()
            if stat.st_mtime < limit:
                path.unlink(missing_ok=True)
                files += 1
                size += stat.st_size
    dirs = sum(_remove_if_empty(path) for path in sorted(old_dirs, key=lambda p: len(p.parts), reverse=True))
    result = LogPurge(files, size, dirs)
    log.info(
        "removed %d log files (%.1f MiB) and %d empty directories last written before %s under %s",
        files,
        size / 2**20,
        dirs,
        before.isoformat(),
        base,
    )
    return result


def _remove_if_empty(path: Path) -> bool:
    try:
        path.rmdir()
    except OSError:
        return False
    return True
