#!/bin/sh
# The observatory replica: cloned from the primary through the WAN on first start, then streams.
set -eu
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  until pg_isready -h "$PRIMARY_HOST" -p "$PRIMARY_PORT"; do sleep 2; done
  PGPASSWORD="$REPLICATION_PASSWORD" pg_basebackup -h "$PRIMARY_HOST" -p "$PRIMARY_PORT" -U replicator \
    -D "$PGDATA" -R -c fast -X stream -S observatory
  chmod 0700 "$PGDATA"
fi
exec postgres -c hot_standby=on -c hot_standby_feedback=on -c wal_receiver_status_interval=1s
