#!/bin/sh
# redis-server with its password taken from the environment variable named by the first argument, through a
# private config file rather than --requirepass, where `ps` and the container's command line would show it.
# The remaining arguments are redis-server options (docker-compose.yaml).
set -eu
password=$(printenv "$1") || { echo "$1 is not set (deploy/opsync.env)" >&2; exit 1; }
shift
conf=$(mktemp)
printf 'requirepass "%s"\n' "$password" > "$conf"
exec redis-server "$conf" "$@"
