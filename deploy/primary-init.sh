#!/bin/sh
# First start of the primary: the replication role and the slot the observatory replica streams through.
set -eu
psql -v ON_ERROR_STOP=1 -v pw="$REPLICATION_PASSWORD" --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<'SQL'
CREATE ROLE replicator WITH REPLICATION LOGIN PASSWORD :'pw';
SELECT pg_create_physical_replication_slot('observatory');
SQL
echo "host replication replicator all scram-sha-256" >> "$PGDATA/pg_hba.conf"
