"""What every fuzz and property test of the ingest API checks of the site buffer after a request."""

from opsync.buffer import Buffer
from opsync.buffer.codec import decode


def decoded(values: dict[bytes, bytes]) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in values.items()}


def assert_consistent(buffer: Buffer) -> None:
    """Whatever the request, the buffer's keys agree: nothing half-written.

    Each stream entry has its ``accepted`` status pointing back at it and counts in the depth; every
    status belongs to a stream entry or (direct tables) to a commit awaiting the replica; every
    overlay row was written by a buffered transaction that touches it, and the indexes point at
    rows that exist.
    """
    client = buffer.client
    entries = {sid.decode(): decode(fields[b"txn"]) for sid, fields in client.xrange(buffer.stream)}
    assert int(client.get(buffer.unsent) or 0) == len(entries)
    by_txn = {str(txn.txn_id): (sid, txn) for sid, txn in entries.items()}
    awaiting = {m.decode() for m in client.zrange(buffer.awaiting_replica, 0, -1)}
    known = sorted(set(by_txn) | awaiting)
    statuses = dict(zip(known, buffer.statuses(known), strict=True))
    stored = len(list(client.scan_iter(buffer.status_key("*")))) + sum(
        client.hlen(key) for key in client.scan_iter(f"{buffer.prefix}:on:*")
    )
    assert None not in statuses.values() and stored == len(known)
    for txn_id, (sid, _) in by_txn.items():
        assert statuses[txn_id]["state"] == "accepted" and statuses[txn_id]["stream_id"] == sid
    for txn_id in awaiting:
        assert statuses[txn_id]["state"] == "committed" and statuses[txn_id]["commit_lsn"]
    touched = {(step.table, step.key): str(txn.txn_id) for txn in entries.values() for step in txn.steps}
    rows = {}
    for key in client.scan_iter(buffer.row_key("*", "*").replace("*:*", "*")):
        _, _, table, row = key.decode().split(":", 3)
        rows[(table, row)] = decoded(client.hgetall(key))
    assert set(rows) == set(touched)
    for (table, row), fields in rows.items():
        assert fields["txn_id"] == touched[(table, row)]
        listed = buffer.index_contains(buffer.rows_index(table), [row]) == [True]
        assert listed == (fields.get("deleted") != "1")
    for key in client.scan_iter(f"{buffer.prefix}:b:*"):
        _, _, bucket, index = key.decode().split(":", 3)
        assert client.zscore(f"{buffer.prefix}:dir:{index}", bucket) is not None
        members = [m.decode() for m in client.zrange(key, 0, -1)]
        assert members and all(m.startswith(bucket) for m in members)
        kind, table, *filtered = index.split(":", 3)
        assert all((table, m) in rows for m in members)
        if kind == "idx":
            field, value = filtered
            assert all(rows[(table, m)].get(f"v:{field}") == value for m in members)
    for key in client.scan_iter(f"{buffer.prefix}:dir:*"):
        index = key.decode().split(":", 2)[2]
        assert all(client.exists(f"{buffer.prefix}:b:{b.decode()}:{index}") for b in client.zrange(key, 0, -1))
