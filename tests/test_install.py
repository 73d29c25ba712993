"""What production installs is what the tests install: the wheel, built here, in a fresh uv virtualenv per
deployable with that extra and its lock, as each image installs it.

A venv takes the extra's requirements constrained by the lock, so what lands in it equals the lock exactly when
the lock is the extra's closure: nothing missing, nothing left over. The venvs link from uv's cache (filled by
``make bootstrap``), so each costs seconds; they run from a directory outside the checkout, so what is tested is
the wheel, never the sources.
"""

import ast
import json
import re
import subprocess
import sys
import tomllib
import zipfile
from functools import cache
from importlib.metadata import packages_distributions
from pathlib import Path

import httpx
import pytest

from devstack.airflow import airflow_env, new_airflow_secrets, passwords_file
from devstack.process import write_private
from devstack.settings import REPO
from tests.conftest import free_port
from tests.test_airflow_ui_browser import START_TIMEOUT_S, ready, stop_group, wait_until

UV = str(Path(sys.prefix) / "bin" / "uv")
IMAGES = ("client", "api", "datasette", "airflow")  # the deployables; dev is this checkout's .venv
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
SERVER_SIDE = ("fastapi", "starlette", "uvicorn", "redis", "sqlalchemy", "psycopg", "airflow", "datasette")
OUR_DATASETTE_HOOKS = [  # one entry per plugin module of datasette/plugins
    ("actor_from_request", "asgi_wrapper", "cookie_actor", "startup"),
    ("extra_template_vars", "render_cell"),
    ("asgi_wrapper",),
    ("asgi_wrapper",),
    ("asgi_wrapper", "handle_exception", "prepare_connection", "startup"),
]


IMPORTED_BY = {  # what each extra's code is
    "client": ("opsync/client.py", "opsync/config.py", "opsync/envelope.py"),
    "server": ("opsync", "opsync_observatory"),
    "api": ("ingest_api",),
    "datasette": ("datasette/plugins",),
    "airflow": ("plugins", "dags"),
    "dev": ("devstack",),  # the development tooling, in no wheel
}
PRODUCTION = ("opsync", "opsync_observatory", "ingest_api", "plugins", "dags", "datasette", "migrations", "deploy")  # what the images run
FIRST_PARTY = {"devstack", "opsync", "opsync_observatory", "ingest_api", "opsync_airflow", "opsync_datasette"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(text: str) -> set[str]:
    """``name==version`` of every pinned line of a lock or of ``uv pip freeze``, names normalised."""
    found = (re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line) for line in text.splitlines())
    return {f"{canonical(m[1])}=={m[2]}" for m in found if m}


def uv(*args: str, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([UV, *args], capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"uv {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result


def declared(extra: str) -> set[str]:
    """The distributions an extra names, through the extras it includes (``opsync[server]``)."""
    names = set()
    for requirement in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"][extra]:
        name = re.match(r"[A-Za-z0-9._-]+", requirement)[0]
        if name == "opsync":
            names |= {n for included in re.search(r"\[(.*)\]", requirement)[1].split(",") for n in declared(included)}
        else:
            names.add(canonical(name))
    return names


def python_files(paths: tuple[str, ...]) -> list[Path]:
    return [f for p in paths for f in ([REPO / p] if p.endswith(".py") else (REPO / p).rglob("*.py"))]


def top_level_imports(file: Path) -> set[str]:
    """Every module ``file`` imports absolutely, at its top or inside a function, by its first name."""
    found = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def imported(paths: tuple[str, ...]) -> set[str]:
    """Top-level modules the code under ``paths`` imports, but the standard library's and ours."""
    found = set().union(*map(top_level_imports, python_files(paths)))
    return found - set(sys.stdlib_module_names) - FIRST_PARTY


@pytest.mark.parametrize("extra", IMPORTED_BY)
def test_every_direct_import_is_declared_by_its_extra(extra):
    owners = packages_distributions()
    undeclared = {m for m in imported(IMPORTED_BY[extra]) if not {canonical(d) for d in owners.get(m, [])} & declared(extra)}
    assert undeclared == set(), f"imported by the {extra} code but not declared in its extra"


def test_no_production_code_imports_the_development_tooling():
    """devstack imports opsync, never the reverse: what an image runs must not need what no wheel has."""
    files = python_files(PRODUCTION)
    assert len(files) > 50
    assert [str(f.relative_to(REPO)) for f in files if "devstack" in top_level_imports(f)] == []


def test_the_import_check_sees_an_import_inside_a_function(tmp_path):
    (tmp_path / "late.py").write_text("def up():\n    from devstack.local import LocalStack\n")
    assert "devstack" in top_level_imports(tmp_path / "late.py")


@pytest.fixture(scope="module")
def outside(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("install")


@pytest.fixture(scope="module")
def wheel(outside) -> Path:
    uv("build", "--wheel", "--quiet", "--out-dir", str(outside / "dist"), str(REPO))
    (built,) = (outside / "dist").glob("opsync-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(outside, wheel):
    """``venv(extra)``: a virtualenv with the wheel, that extra and its lock (made once per module)."""

    @cache
    def make(extra: str) -> Path:
        path = outside / extra
        uv("venv", "--quiet", "--python", sys.executable, str(path))
        uv(
            "pip",
            "install",
            "--quiet",
            "-p",
            str(path / "bin/python"),
            "-c",
            str(REPO / f"locks/{extra}.txt"),
            f"{wheel}[{extra}]",
            cwd=outside,
        )
        return path

    return make


def test_the_dev_lock_is_what_make_locks_makes_from_pyproject(outside):
    """A changed requirement in pyproject.toml with a stale dev lock fails here (run ``make locks``). The images'
    locks need no such resolution: their venvs below show each is exactly its extra's closure."""
    fresh = outside / "fresh-dev.txt"
    fresh.write_text((REPO / "locks/dev.txt").read_text())  # its pins are uv's preferences, as in make locks
    uv(
        "pip",
        "compile",
        "--quiet",
        str(REPO / "pyproject.toml"),
        "--extra",
        "dev",
        "--python-version",
        "3.11.13",
        "--python-platform",
        "x86_64-manylinux_2_28",
        "-o",
        str(fresh),
    )
    assert pins(fresh.read_text()) == pins((REPO / "locks/dev.txt").read_text())


def test_the_wheel_holds_no_development_tooling(wheel):
    with zipfile.ZipFile(wheel) as built:
        names = built.namelist()
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        scripts = built.read(entry_points).decode()
    assert {n.split("/")[0] for n in names} >= {"opsync", "opsync_observatory", "ingest_api", "opsync_airflow", "opsync_datasette"}
    assert {"opsync_observatory/datasette.yml", "opsync_observatory/migrations/observatory_0001_schema.py"} <= set(names)
    assert "opsync/read_model/datasette.yml" in names  # the engine's part of the Datasette metadata, merged at every start
    assert [n for n in names if n.startswith(("devstack/", "opsync/stack/"))] == []
    assert "opsync = opsync.cli:main" in scripts and "devstack" not in scripts


def test_the_wheel_ships_the_buffer_scripts(wheel):
    """The Lua scripts are package data, read with importlib.resources: a wheel without them imports no buffer."""
    with zipfile.ZipFile(wheel) as built:
        names = set(built.namelist())
    scripts = {f"opsync/buffer/lua/{path.name}" for path in (REPO / "opsync/buffer/lua").glob("*.lua")}
    assert len(scripts) > 5 and scripts <= names


@pytest.mark.parametrize("extra", IMAGES)
def test_each_image_extra_installs_exactly_its_lock_and_pip_check_passes(extra, venv):
    path = venv(extra)
    installed = pins(uv("pip", "freeze", "-p", str(path / "bin/python")).stdout)
    lock = pins((REPO / f"locks/{extra}.txt").read_text())
    assert installed - lock == set(), "installed but not in the lock: the lock misses part of the extra"
    assert lock - installed == set(), "in the lock but not needed by the extra: drop it (make locks)"
    uv("pip", "check", "-p", str(path / "bin/python"))


def run_in(path: Path, *command: str, env: dict[str, str] | None = None, timeout: float = 120) -> str:
    result = subprocess.run(
        [str(path / "bin" / command[0]), *command[1:]],
        capture_output=True,
        text=True,
        cwd=path,
        env=env or {"PATH": f"{path / 'bin'}:/usr/bin:/bin", "HOME": str(path)},
        timeout=timeout,
    )
    assert result.returncode == 0, f"{command}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def test_the_client_imports_with_no_server_side_installed(venv):
    path = venv("client")
    probe = f"import importlib.util, json, opsync.client; print(json.dumps([m for m in {SERVER_SIDE!r} if importlib.util.find_spec(m)]))"
    assert json.loads(run_in(path, "python", "-c", probe)) == []
    typed = "import importlib.resources as r; print(r.files('opsync').joinpath('py.typed').is_file())"
    assert run_in(path, "python", "-c", typed).strip() == "True"  # type checkers read the client's annotations
    for example in ("record_and_wait.py", "record_each_async.py"):
        assert "--wait" in run_in(path, "python", str(REPO / "examples" / example), "--help")


def test_opsync_version_comes_from_the_package_metadata(venv):
    assert run_in(venv("api"), "opsync", "--version").strip() == f"opsync {VERSION}"


def test_the_api_image_builds_the_ingest_app_with_its_own_fastapi(venv):
    """The api lock is resolved without Airflow, whose cap would hold FastAPI back: the app must build on it."""
    probe = "import fastapi; from ingest_api.app import app; print(fastapi.__version__, len(app.openapi()['paths']))"
    fastapi, paths = run_in(venv("api"), "python", "-c", probe).split()
    assert f"fastapi=={fastapi}" in pins((REPO / "locks/api.txt").read_text())
    assert int(paths) > 5


def test_datasette_lists_our_plugins_with_their_version(venv):
    plugins = json.loads(run_in(venv("datasette"), "datasette", "plugins"))
    ours = [p for p in plugins if p["name"] == "opsync"]
    assert {p["version"] for p in ours} == {VERSION}
    assert sorted(tuple(sorted(p["hooks"])) for p in ours) == sorted(OUR_DATASETTE_HOOKS)


@pytest.fixture
def airflow_site(venv, tmp_path):
    """The airflow venv's environment: a fresh AIRFLOW_HOME, no plugins folder set, its own ``bin`` first on PATH."""
    path = venv("airflow")
    home = tmp_path / "airflow"
    home.mkdir()
    port = free_port()
    (tmp_path / "dags").mkdir()
    env = {
        "HOME": str(tmp_path),
        "LANG": "C.UTF-8",
        **airflow_env(home, port, new_airflow_secrets(), REPO),
        "PATH": f"{path / 'bin'}:/usr/bin:/bin",
        "AIRFLOW__CORE__DAGS_FOLDER": str(tmp_path / "dags"),
    }
    assert not any("PLUGINS_FOLDER" in name for name in env)
    return path, home, port, env


def test_airflow_lists_the_sync_status_page_and_serves_it_with_no_plugins_folder(airflow_site, migrated, own_redis, tmp_path):
    path, home, port, env = airflow_site
    listed = json.loads(run_in(path, "airflow", "plugins", "--output", "json", env=env))
    (plugin,) = [p for p in listed if p["name"] == "opsync_sync_status"]
    assert f"opsync=={VERSION}" in plugin["source"]

    env |= {
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "otto:admin",
        "AIRFLOW_CONN_OPSYNC_BUFFER": own_redis.url,
        "AIRFLOW_CONN_OPSYNC_PRIMARY": migrated.primary.url(driver="postgresql"),
        "AIRFLOW_CONN_OPSYNC_REPLICA": migrated.replica.url(driver="postgresql"),
    }
    write_private(passwords_file(home), json.dumps({"otto": "otto-password"}))
    run_in(path, "airflow", "db", "migrate", env=env, timeout=START_TIMEOUT_S)
    with open(tmp_path / "api-server.log", "wb") as log:
        server = subprocess.Popen(
            [str(path / "bin/airflow"), "api-server", "--port", str(port)],
            env=env,
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: ready(base), START_TIMEOUT_S, lambda: (tmp_path / "api-server.log").read_text()[-3000:])
        token = httpx.post(f"{base}/auth/token", json={"username": "otto", "password": "otto-password"}).json()["access_token"]
        page = httpx.get(f"{base}/opsync/", headers={"Authorization": f"Bearer {token}"}, timeout=30)
        assert page.status_code == 200, page.text[:2000]
        assert "Sync status" in page.text
        status = httpx.get(f"{base}/opsync/api/status", headers={"Authorization": f"Bearer {token}"}, timeout=30)
        assert status.status_code == 200, status.text[:2000]
        icon = httpx.get(f"{base}/opsync/static/icon.svg")  # package data shipped in the wheel
        assert icon.status_code == 200 and icon.headers["content-type"].startswith("image/svg")
    finally:
        stop_group(server)
