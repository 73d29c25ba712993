"""Who may know of a transaction, and the state-change events its followers get (``opsync.auth.Principal``,
``opsync.events``), on constructed status records. Over the live stream: tests/test_auth_matrix.py."""

import hashlib
from datetime import UTC, datetime, timedelta

import pytest

from opsync.auth import Principal, ScopeError, hash_token
from opsync.events import followed, parse_event, shown, snapshot_event, visible
from opsync.tokens import InvalidScope, TokenInfo, check_scope

OBS, FILE = "executed_obs_unit", "raw_data_file"
TXN = "0190c0de-0000-7000-8000-000000000001"


def principal(*scopes: str) -> Principal:
    return Principal("script", frozenset(scopes))


def test_a_scope_is_required_unless_the_token_is_admin():
    principal(f"write:{OBS}").require(f"write:{OBS}")
    principal("admin").require(f"write:{OBS}")
    with pytest.raises(ScopeError, match=f"token 'script' lacks scope 'read:{OBS}'"):
        principal(f"write:{OBS}").require(f"read:{OBS}")


def test_a_transaction_is_visible_with_read_or_write_on_every_table_it_involves_and_to_admin_alone_when_none_is_known():
    both = {"state": "accepted", "tables": f"{OBS},{FILE}"}
    assert visible(principal(f"read:{OBS}", f"write:{FILE}"), both)
    assert not visible(principal(f"read:{OBS}"), both), "one table it may not see hides the whole transaction"
    old = {"state": "accepted"}  # written before statuses named their tables
    assert not visible(principal(f"read:{OBS}", f"read:{FILE}"), old) and visible(principal("admin"), old)
    assert not visible(principal("admin"), None)  # unknown


@pytest.mark.parametrize("data", [b"not json", b"[1]", b'{"state": "accepted"}', b'{"txn_id": 7, "state": "x"}', b'{"txn_id": "t"}', None])
def test_anything_that_is_not_an_event_is_none_never_an_error(data):
    assert parse_event(data) is None


def test_followers_get_events_without_the_buffers_own_fields_and_only_for_what_they_follow():
    event = parse_event(f'{{"txn_id": "{TXN}", "state": "committed", "at": "t1", "stream_id": "1-0", "tables": "{OBS}"}}'.encode())
    assert shown(event) == {"txn_id": TXN, "state": "committed", "at": "t1"}
    plain = {"txn_id": TXN, "state": "replicated"}
    assert shown(plain) is plain
    assert followed(event, []) and followed(event, {TXN}) and not followed(event, {"another"})


def test_a_snapshot_is_shaped_like_the_event_that_announced_the_state():
    status = {"state": "committed", "committed_at": "t2", "accepted_at": "t1", "commit_lsn": "0/16", "tables": OBS, "stream_id": "1-0"}
    assert snapshot_event(TXN, status) == {"txn_id": TXN, "state": "committed", "at": "t2", "accepted_at": "t1", "commit_lsn": "0/16"} | {
        "snapshot": True
    }
    assert snapshot_event(TXN, None) == {"txn_id": TXN, "state": "unknown", "at": None, "snapshot": True}


def test_scopes_are_admin_or_a_verb_on_a_registered_table_and_a_wrong_one_names_what_is_allowed():
    assert check_scope(f"read:{OBS}") == f"read:{OBS}" and check_scope("admin") == "admin"
    for wrong in (f"delete:{OBS}", "write:no_such_table", "write", "read:"):
        with pytest.raises(InvalidScope, match=f"'{wrong}' is not a scope: use admin, read:TABLE or write:TABLE with TABLE one of "):
            check_scope(wrong)


def test_tokens_are_stored_as_sha256_and_shown_with_their_state_never_their_hash():
    assert hash_token("opsync_secret") == hashlib.sha256(b"opsync_secret").hexdigest()
    now = datetime.now(UTC)
    info = TokenInfo("script", [f"write:{OBS}"], now, None, None, None)
    assert info.state == "active" and info.as_json() == {
        "name": "script",
        "scopes": [f"write:{OBS}"],
        "state": "active",
        "created_at": now.isoformat(),
        "expires_at": None,
        "revoked_at": None,
        "last_used_at": None,
    }
    assert TokenInfo("old", [], now, now - timedelta(seconds=1), None, None).state == "expired"
    assert TokenInfo("gone", [], now, now + timedelta(days=1), now, None).state == "revoked"
