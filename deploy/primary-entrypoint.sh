#!/bin/sh
# The Cologne primary: the official image's entrypoint, with the pg_hba.conf of deploy/pg-hba.sh admitting
# the observatory's network.
set -eu
: "${OBSERVATORY_NETWORK:?set OBSERVATORY_NETWORK (the CIDR the observatory connects from) in deploy/opsync.env}"
"$(dirname "$0")/pg-hba.sh" "$OBSERVATORY_NETWORK" > /etc/opsync-pg_hba.conf
exec docker-entrypoint.sh "$@" -c hba_file=/etc/opsync-pg_hba.conf
