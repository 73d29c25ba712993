"""The unit layer's own guard: a test in ``tests/unit`` that asks for a service fixture fails at setup, before any service starts."""

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent


def test_a_unit_test_asking_for_a_service_fails_at_setup_naming_it(tmp_path):
    unit = tmp_path / "tests" / "unit"
    unit.mkdir(parents=True)
    shutil.copy(TESTS / "conftest.py", tmp_path / "tests" / "conftest.py")
    shutil.copy(TESTS / "unit" / "conftest.py", unit / "conftest.py")
    (unit / "__init__.py").touch()
    (unit / "test_asks.py").write_text(
        textwrap.dedent("""
            import pytest

            @pytest.fixture
            def through(primary_engine):
                return primary_engine

            def test_direct(site_env):
                pass

            def test_through_a_fixture(through):
                pass

            def test_pure(tmp_path, monkeypatch):
                pass
        """)
    )

    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path), "-c", "/dev/null", str(unit)],
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(TESTS.parent), "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"},  # no plugin needed: faster
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert run.returncode == 1, run.stdout + run.stderr
    assert "1 passed, 2 errors" in run.stdout, run.stdout
    assert "test_direct asks for migrated, pg, redis_server, service_root, site_env (tests/conftest.py)" in run.stdout
    assert "test_through_a_fixture asks for migrated, pg, primary_engine, redis_server, service_root, site_env" in run.stdout
