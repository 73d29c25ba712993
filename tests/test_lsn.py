"""A replica's position, read from real servers, is either real or an error, never "caught up" (the arithmetic: tests/unit/test_lsn.py)."""

import time

import pytest
from sqlalchemy import create_engine, text

from opsync.lsn import Lsn, NotReplaying, ReplicaUnreachable, current_position, replica_position
from tests.conftest import free_port


def test_replica_position_reaches_the_primary_commit(migrated):
    primary, replica = (create_engine(s.url()) for s in (migrated.primary, migrated.replica))
    try:
        with primary.begin() as conn:
            conn.execute(text("CREATE TABLE IF NOT EXISTS lsn_probe (n int)"))
            conn.execute(text("INSERT INTO lsn_probe VALUES (1)"))
        committed = current_position(primary)
        assert committed > Lsn.parse("0/0")
        deadline = time.monotonic() + 10
        while (position := replica_position(replica)) < committed:
            assert time.monotonic() < deadline, f"replica stuck at {position}, primary committed {committed}"
            time.sleep(0.02)
        with pytest.raises(NotReplaying):
            replica_position(primary)  # the primary is not in recovery: never "caught up"
    finally:
        primary.dispose()
        replica.dispose()


def test_an_unreachable_replica_is_an_error():
    nowhere = create_engine(f"postgresql+psycopg://x:y@127.0.0.1:{free_port()}/opsync", connect_args={"connect_timeout": 2})
    with pytest.raises(ReplicaUnreachable, match="replica unreachable"):
        replica_position(nowhere)
