"""What the buffer keeps besides the envelope, compactly: idempotency records (the body hash and the answer)
and statuses in bucket fields, plus the one JSON encoding of overlay values.

The Lua scripts write the same formats (``remembered.lua``, ``enqueue.lua``, ``settle.lua``, ``confirm.lua``);
these functions read them back.
"""

import json
import uuid
from datetime import UTC, datetime, timedelta

from pydantic_core import to_json

from opsync.envelope import State


def digest(body_hash: str) -> bytes:
    """A body hash as an idempotency record keeps it: a SHA-256 hex digest as its first 16 bytes (128 bits:
    only the client itself could look for a collision, at 2**64 tries), anything else as given."""
    if len(body_hash) == 64:
        try:
            return bytes.fromhex(body_hash)[:16]
        except ValueError:
            pass
    return body_hash.encode()


IDEMPOTENCY_WINDOWS = 8  # windows per TTL: a record lives at most an eighth of the TTL longer; a lookup reads 9 buckets
# Bucket hashes per window, by a hash of the key: at the README's peak (21 txns/s, a 7-day TTL: 1.6M records a
# window) ~190 records each, listpacks under hash-max-listpack-entries 512 up to 2.6 times that rate.
IDEMPOTENCY_BUCKETS = 8192
OWN_KEY_RECORD_BYTES = 200  # a larger record (field and value) keeps a key of its own: buckets stay listpacks


def idempotency_field(client_id: str, key: str) -> str:
    """A record's field in its bucket: the client and its key, apart (no header value holds a NUL)."""
    return f"{client_id}\0{key}"


def record(hashed: bytes, packed: bytes) -> bytes:
    """An idempotency record as the ENQUEUE script's ``record_of`` writes it."""
    if len(hashed) == 16 and packed.startswith(BINARY):
        return BINARY + hashed + packed[1:]
    return bytes([len(hashed)]) + hashed + packed


def split_record(value: bytes) -> tuple[bytes, bytes]:
    """(body hash, packed answer) of a record :func:`record` wrote."""
    if value.startswith(BINARY):
        return value[1:17], BINARY + value[17:]
    return value[1 : value[0] + 1], value[value[0] + 1 :]


def compact_json(value) -> str:
    return json.dumps(value, separators=(",", ":"))


ACCEPTED_ANSWER = ("txn_id", "ids", "state", "accepted_at")


BINARY = b"\xff"  # the first byte of a binary answer: no text answer (JSON, or a txn_id's hex digit) starts with it
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def pack_response(response: dict) -> bytes:
    """An answer as its idempotency record keeps it: the usual ``202`` (:func:`opsync.ingest.answer`) in
    binary (:func:`binary_answer`, 41 bytes for one row, a third of its text); else ``|``-separated values
    (state ``accepted`` as nothing, a UTC time without its ``+00:00``); any other answer as compact JSON."""
    if tuple(response) == ACCEPTED_ANSWER:
        if (packed := binary_answer(response)) is not None:
            return packed
        state = "" if response["state"] == State.accepted else response["state"]
        values = [response["txn_id"], state, utc_short(response["accepted_at"]), ",".join(response["ids"])]
        if all(isinstance(v, str) and "|" not in v for v in values) and all("," not in i for i in response["ids"]):
            return "|".join(values).encode()
    return compact_json(response).encode()


def binary_answer(response: dict) -> bytes | None:
    """An ``accepted`` answer as :data:`BINARY`, its txn_id's 16 bytes, its UTC ``accepted_at`` in µs since
    the epoch (8 bytes), each id's 16 bytes; None unless that gives back exactly the same text."""
    try:
        uuids = [uuid.UUID(response["txn_id"]), *map(uuid.UUID, response["ids"])]
        moment = datetime.fromisoformat(response["accepted_at"])
    except (TypeError, ValueError, AttributeError):
        return None
    if response["state"] != State.accepted or moment.utcoffset() != timedelta(0):
        return None
    micros = (moment - EPOCH) // timedelta(microseconds=1)
    packed = BINARY + uuids[0].bytes + micros.to_bytes(8, "big", signed=True) + b"".join(u.bytes for u in uuids[1:])
    return packed if unpack_response(packed) == response else None


def unpack_response(packed: bytes | str) -> dict:
    """The answer :func:`pack_response` packed (or JSON, as records of the earlier layout hold it)."""
    if isinstance(packed, bytes) and packed.startswith(BINARY):
        ids = [str(uuid.UUID(bytes=packed[i : i + 16])) for i in range(25, len(packed), 16)]
        moment = EPOCH + timedelta(microseconds=int.from_bytes(packed[17:25], "big", signed=True))
        return {
            "txn_id": str(uuid.UUID(bytes=packed[1:17])),
            "ids": ids,
            "state": State.accepted.value,
            "accepted_at": moment.isoformat(),
        }
    text = packed.decode() if isinstance(packed, bytes) else packed
    if text.startswith("{"):
        return json.loads(text)
    txn_id, state, accepted_at, joined = text.split("|")
    return {
        "txn_id": txn_id,
        "ids": joined.split(",") if joined else [],
        "state": state or State.accepted.value,
        "accepted_at": utc_long(accepted_at),
    }


def utc_short(moment: str) -> str:
    """An ISO time as the compact records keep it: a UTC one without its ``+00:00`` (:func:`utc_long` adds it)."""
    return moment.removesuffix("+00:00")


def utc_long(moment: str) -> str:
    has_offset = moment.endswith("Z") or (len(moment) > 6 and moment[-6] in "+-" and moment[-3] == ":")
    return moment if has_offset or not moment else moment + "+00:00"


FINAL_FIELDS = ("accepted_at", "committed_at", "commit_lsn", "tables", "replicated_at")


def final_status(value: bytes | None) -> dict[str, str] | None:
    """A replicated transaction's status from its bucket field (CONFIRM's compact form: timestamps in UTC
    without their ``+00:00``, which comes back here)."""
    if value is None:
        return None
    parts = value.decode().split("|")
    for i in (1, 4):  # committed_at, replicated_at: 'n~rest' shares its first n characters with accepted_at
        shared, sep, rest = parts[i].partition("~")
        if sep:
            parts[i] = parts[0][: int(shared)] + rest
    status = {name: v for name, v in zip(FINAL_FIELDS, parts, strict=True) if v}
    for name in ("accepted_at", "committed_at", "replicated_at"):
        if name in status:
            status[name] = utc_long(status[name])
    return {"state": State.replicated.value} | status


TRAVELLING_FIELDS = ("stream_id", "accepted_at", "tables", "committed_at", "commit_lsn")


def travelling_status(value: bytes | None) -> dict[str, str] | None:
    """A status on its way from its bucket field (ENQUEUE's and SETTLE's): ``a`` (accepted) or ``c`` (committed),
    then the stream_id, accepted_at and tables, and for a committed one committed_at and commit_lsn."""
    if value is None:
        return None
    state, *parts = value.decode().split("|")
    return {"state": (State.committed if state == "c" else State.accepted).value} | dict(zip(TRAVELLING_FIELDS, parts, strict=False))


def encode(value) -> str:
    """The one JSON encoding of overlay values and of the filter values compared with them.

    pydantic-core's encoder: five times faster than ``json.dumps`` on the batch path; NaN stays NaN.
    """
    return to_json(value, inf_nan_mode="constants").decode()
