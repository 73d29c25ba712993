"""``make demo``: the configured domain's demo workload (:mod:`opsync_observatory.demo` by default) against the site
``make up`` runs, with its URL and the demo token it issued."""

import json
import os
import sys
from pathlib import Path
from pkgutil import resolve_name

from devstack.settings import StackSettings
from opsync import domain


def demo_env(settings: StackSettings) -> dict[str, str]:
    """``OPSYNC_API_URL`` and ``OPSYNC_API_TOKEN`` as set, else this site's API and the token kept with its secrets."""
    url = os.environ.get("OPSYNC_API_URL") or f"http://{settings.host}:{settings.api_port}"
    return {"OPSYNC_API_URL": url, "OPSYNC_API_TOKEN": os.environ.get("OPSYNC_API_TOKEN") or demo_token(settings.secrets_path)}


def demo_token(path: Path) -> str:
    try:
        return json.loads(path.read_text())["demo_token"]
    except (FileNotFoundError, KeyError):
        raise SystemExit(f"no API token: set OPSYNC_API_TOKEN or run `make up` (writes demo_token to {path})") from None


def main(argv: list[str] | None = None) -> int:
    current = domain.current()
    if current.demo is None:
        raise SystemExit(f"domain {current.name!r} has no demo workload")
    os.environ.update(demo_env(StackSettings()))
    return resolve_name(current.demo)(argv)


if __name__ == "__main__":
    sys.exit(main())
