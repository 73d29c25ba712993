"""LSNs compare as numbers, and a replica's position is either real or an error, never "caught up"."""

import time

import pytest
from sqlalchemy import create_engine, text

from opsync.lsn import Lsn, NotReplaying, ReplicaUnreachable, current_position, replay_position, replica_position
from tests.conftest import free_port


def test_lsns_compare_numerically_not_as_strings():
    assert Lsn.parse("9/0") < Lsn.parse("10/0")  # as strings "10/0" < "9/0"
    assert Lsn.parse("0/FFFFFFFF") < Lsn.parse("1/0")
    assert Lsn.parse("16/B374D848") == (0x16 << 32) | 0xB374D848
    assert Lsn.parse("0/a") == Lsn.parse("0/A") == 10


@pytest.mark.parametrize("lsn", ["0/0", "0/1", "16/B374D848", "FFFFFFFF/FFFFFFFF"])
def test_lsn_prints_as_postgresql_does(lsn):
    assert str(Lsn.parse(lsn)) == lsn
    assert repr(Lsn.parse(lsn)) == f"Lsn('{lsn}')"


@pytest.mark.parametrize("bad", ["", "16", "/1", "1/", "x/1", "1/2/3"])
def test_malformed_lsns_are_refused(bad):
    with pytest.raises(ValueError):
        Lsn.parse(bad)


def test_a_null_replay_position_or_a_server_not_in_recovery_is_an_error():
    with pytest.raises(NotReplaying, match="not in recovery"):
        replay_position(False, "5/0")
    with pytest.raises(NotReplaying, match="NULL"):
        replay_position(True, None)
    assert replay_position(True, "5/10") == Lsn.parse("5/10")


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
