"""``make demo``: :mod:`opsync_observatory.demo` against the site ``make up`` runs, with its URL and the demo token it issued."""

import json
import os
import sys
from pathlib import Path

from devstack.settings import StackSettings
from opsync_observatory import demo


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
    os.environ.update(demo_env(StackSettings()))
    return demo.main(argv)


if __name__ == "__main__":
    sys.exit(main())
