"""Transaction state-change events as followers see them (the API's event stream, later the CLI).

The buffer and the drainer publish ``{"txn_id", "state", "at", ...}`` on the events channel.
Pub/sub keeps nothing for a follower that was not listening, so a follower starts from (and
after a reconnect, resumes from) a snapshot of each followed transaction's status record.
"""

import json
from collections.abc import Collection

INTERNAL_FIELDS = {"stream_id"}  # where the entry sits in the buffer: no concern of a follower


def parse_event(data: bytes | str) -> dict | None:
    """A published event, or None for anything that is not one (a follower must not die of it)."""
    try:
        event = json.loads(data)
    except (ValueError, TypeError):
        return None
    if not isinstance(event, dict) or not isinstance(event.get("txn_id"), str) or "state" not in event:
        return None
    return event


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
