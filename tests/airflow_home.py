"""A throwaway Airflow site for tests, configured exactly like the local stack's.

Airflow reads its configuration once, when first imported: a test module calls
:func:`configure_airflow` at its top, before any ``import airflow``.
"""

import atexit
import os
import shutil
import sys
import tempfile
from functools import cache
from pathlib import Path

from devstack.airflow import airflow_env, migrate_metadata_db, new_airflow_secrets
from devstack.settings import REPO

UNUSED_API_PORT = 18080  # dag.test() serves the execution API in-process; nothing listens here


@cache
def configure_airflow() -> Path:
    """Point this process (and its children) at a fresh AIRFLOW_HOME, removed at exit; once per session."""
    if "airflow" in sys.modules:
        raise RuntimeError("Airflow was imported before configure_airflow(): it would keep its default config")
    home = Path(tempfile.mkdtemp(prefix="opsync-airflow-"))
    atexit.register(shutil.rmtree, home, ignore_errors=True)
    os.environ.update(airflow_env(home, UNUSED_API_PORT, new_airflow_secrets(), REPO))
    return home


@cache
def migrate() -> None:
    """Create the metadata DB once per session (2–5 s), through the same code path as ``make up``."""
    migrate_metadata_db(os.environ)
