#!/bin/sh
# pg_hba.conf on stdout, from the environment; the entrypoints write it at every start rather than once at
# initdb, so a change takes only a restart. Inside the container anyone (health checks, docker compose
# exec); over the network the opsync owner from the compose network, and from each network given as an
# argument (the primary's: the observatory's) the replication role and the opsync owner. Always with a
# scram-sha-256 password; the superuser never over the network.
set -eu
echo "local all all trust"
echo "host $POSTGRES_DB $OPSYNC_DB_USER samenet scram-sha-256"
for network in "$@"; do
  echo "host replication replicator $network scram-sha-256"
  echo "host $POSTGRES_DB $OPSYNC_DB_USER $network scram-sha-256"
done
