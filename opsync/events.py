"""Transaction state-change events as followers see them (the API's event stream, later the CLI).

The buffer and the drainer publish ``{"txn_id", "state", "at", ...}`` on the events channel.
Pub/sub keeps nothing for a follower that was not listening, so a follower starts from (and
after a reconnect, resumes from) a snapshot of each followed transaction's status record.
"""

import json
from collections.abc import Collection

from opsync.auth import Principal
from opsync.buffer import involved_tables

INTERNAL_FIELDS = {"stream_id", "tables"}  # where the entry sits in the buffer, whom it concerns: no concern of a follower


def parse_event(data: bytes | str) -> dict | None:
    """A published event, or None for anything that is not one (a follower must not die of it)."""
    try:
        event = json.loads(data)
    except (ValueError, TypeError):
        return None
    if not isinstance(event, dict) or not isinstance(event.get("txn_id"), str) or "state" not in event:
        return None
    return event


def visible(who: Principal, status: dict[str, str] | None) -> bool:
    """Whether ``who`` may know of the transaction of ``status`` at all: callers answer a hidden one
    exactly as an unknown one (None), so that nobody learns what exists in tables it may not see."""
    return status is not None and who.may_see(involved_tables(status.get("tables")))


def shown(event: dict) -> dict:
    """The event as a follower gets it."""
    return {k: v for k, v in event.items() if k not in INTERNAL_FIELDS} if INTERNAL_FIELDS & event.keys() else event


def followed(event: dict, txn_ids: Collection[str]) -> bool:
    """No filter follows every transaction."""
    return not txn_ids or event["txn_id"] in txn_ids


def snapshot_event(txn_id: str, status: dict[str, str] | None) -> dict:
    """The current state of a transaction, shaped like the event that announced it."""
    if status is None:
        return {"txn_id": txn_id, "state": "unknown", "at": None, "snapshot": True}
    state = status["state"]
    rest = {k: v for k, v in status.items() if k not in INTERNAL_FIELDS | {"state", f"{state}_at"}}
    return {"txn_id": txn_id, "state": state, "at": status.get(f"{state}_at"), **rest, "snapshot": True}
