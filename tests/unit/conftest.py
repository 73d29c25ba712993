"""The unit layer: pure functions, no service, so ``make test-unit`` runs in seconds.

pytest hands every conftest's fixtures down to the folders below it, so the service fixtures of
``tests/conftest.py`` are visible here too. Each test is checked before it is set up: one that asks
(itself or through another fixture) for a fixture of that conftest fails at once, naming it, before
anything is started. Its place is beside the service tests in ``tests/``.
"""

import inspect
from pathlib import Path

import pytest

SERVICES_CONFTEST = Path(__file__).resolve().parent.parent / "conftest.py"


def service_fixtures(item: pytest.Item) -> list[str]:
    """The fixtures of ``item`` (its whole closure) that the services' conftest defines."""
    info = getattr(item, "_fixtureinfo", None)  # a test function's; other items (doctests) take no fixtures
    definitions = info.name2fixturedefs if info else {}
    return sorted(
        name
        for name in getattr(item, "fixturenames", ())
        if name in definitions and Path(inspect.getfile(definitions[name][-1].func)).resolve() == SERVICES_CONFTEST
    )


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    if wanted := service_fixtures(item):
        pytest.fail(
            f"tests/unit starts no service, but {item.name} asks for {', '.join(wanted)} (tests/conftest.py): move it to tests/",
            pytrace=False,
        )
