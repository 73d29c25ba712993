"""LSN arithmetic: LSNs compare as numbers, print as PostgreSQL prints them, and a replay position is real or an error."""

import pytest

from opsync.lsn import Lsn, NotReplaying, replay_position


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
