#!/bin/sh
# First start of the primary (docker-entrypoint-initdb.d): the opsync owner role, the replication role and
# the slot the observatory replica streams through, so WAL it has not received is kept while the WAN is down.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
  -v owner="$OPSYNC_DB_USER" -v owner_pw="$OPSYNC_DB_PASSWORD" -v db="$POSTGRES_DB" \
  -v repl_pw="$REPLICATION_PASSWORD" -v slot="$REPLICA_SLOT" <<'SQL'
CREATE ROLE :"owner" LOGIN PASSWORD :'owner_pw';
ALTER DATABASE :"db" OWNER TO :"owner";
GRANT pg_monitor TO :"owner";
CREATE ROLE replicator WITH REPLICATION LOGIN PASSWORD :'repl_pw';
SELECT pg_create_physical_replication_slot(:'slot');
SQL
