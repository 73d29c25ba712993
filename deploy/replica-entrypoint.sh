#!/bin/sh
# The observatory replica: cloned from the primary through the WAN on first start, then streaming through
# the replication slot. The connection (PRIMARY_HOST, PRIMARY_PORT, PRIMARY_SSLMODE) and pg_hba.conf come
# from the environment at every start, so moving the primary takes a restart, not a new clone; the
# password stays in a passfile, out of the command line and the data directory. Arguments are extra
# server settings (-c name=value).
set -eu
umask 077
printf '*:*:*:replicator:%s\n' "$REPLICATION_PASSWORD" > "$HOME/.pgpass"
"$(dirname "$0")/pg-hba.sh" > "$HOME/pg_hba.conf"
conninfo="host=$PRIMARY_HOST port=$PRIMARY_PORT user=replicator passfile=$HOME/.pgpass sslmode=$PRIMARY_SSLMODE application_name=$REPLICA_SLOT"
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  until pg_isready -q -d "$conninfo"; do sleep 5; done
  pg_basebackup -d "$conninfo" -D "$PGDATA" -c fast -X stream -S "$REPLICA_SLOT"
  touch "$PGDATA/standby.signal"
  chmod 0700 "$PGDATA"
fi
exec postgres -D "$PGDATA" -c hba_file="$HOME/pg_hba.conf" -c listen_addresses='*' \
  -c primary_conninfo="$conninfo" -c primary_slot_name="$REPLICA_SLOT" \
  -c hot_standby=on -c hot_standby_feedback=on -c wal_receiver_status_interval=1s "$@"
