#!/usr/bin/env bash
# Installs what a fresh Debian 12 machine lacks for opsync: system packages through apt, then a
# virtualenv with the dev lock (locks/dev.txt) and the project in editable mode. Idempotent and quick
# when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PG_BIN="${OPSYNC_PG_BIN:-/usr/lib/postgresql/15/bin}"
VENV="${OPSYNC_VENV:-.venv}"

missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
[ -x "$PG_BIN/postgres" ] || missing+=(postgresql-15)
python3 -c "import ensurepip" 2>/dev/null || missing+=(python3-venv)
command -v chromium >/dev/null || missing+=(chromium)  # headless browser tests (tests/test_browser.py)
command -v promtool >/dev/null || missing+=(prometheus)  # promtool: make lint and tests/test_metrics_rules.py check the alert rules
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "missing packages: ${missing[*]} (run as root or install sudo)" >&2; exit 1; }
    sudo="sudo"
  fi
  echo "installing system packages: ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "creating virtualenv $VENV"
  python3 -m venv "$VENV"
fi
stamp="$VENV/.opsync-installed"
want="$(cat locks/dev.txt pyproject.toml setup.cfg | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  [ -x "$VENV/bin/uv" ] || "$VENV/bin/python" -m pip install -q uv
  echo "installing pinned requirements into $VENV"
  # Compiled now: where PYTHONDONTWRITEBYTECODE is set, nothing else would cache bytecode, and every
  # process (each API worker, Airflow task, test) would compile every module it imports from source.
  "$VENV/bin/uv" pip install -q -p "$VENV/bin/python" --compile-bytecode -r locks/dev.txt
  rm -rf opsync.egg-info  # metadata now goes to scripts/ (setup.cfg says why); a copy left here doubles the plugins
  "$VENV/bin/uv" pip install -q -p "$VENV/bin/python" --no-deps -e .
  # The development tooling (devstack/) is in no wheel, so no image has it: this venv finds it in the checkout.
  pwd > "$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/opsync-checkout.pth"
  echo "$want" > "$stamp"
fi
