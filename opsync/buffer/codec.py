"""The one envelope codec: how a transaction is written into the buffer stream (:func:`encode`, by the API's
enqueue) and read back (:func:`decode`) by every reader: the drain (:class:`opsync.apply.Pending`), the read
model's publisher, the dead letters (:mod:`opsync.dlq`); the CONFIRM script reads the same format with
``lua/envelope.lua``.

The format is compact (issue 17: the envelope is most of a buffered transaction's memory): a JSON array
``[1, txn_id, site, accepted_at, idempotency_key, [[op, table, key, values], ...]]``, no field names; ``1``
is the format's tag. Values are JSON exactly as sent. Envelopes of the format before it (a JSON object
with named fields) are still read, so a buffer filled before an upgrade drains after it.

Decoded with msgspec, without the ingest model's validation: the API validated each envelope before
buffering it, and the primary's constraints still judge every row.
"""

from datetime import datetime
from typing import Any
from uuid import UUID

import msgspec

from opsync.envelope import Op, Transaction

FORMAT = 1  # the tag of the compact format, its first element


class Change(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """A step as the buffer's readers see it: the key stays text, as it goes into SQL and into row references.

    Untracked by the garbage collector (``gc=False``: JSON data cannot form a cycle), whose passes
    over a batch's many objects otherwise cost more than decoding them.
    """

    op: Op
    table: str
    key: str
    values: dict[str, Any] = {}


class Envelope(msgspec.Struct, array_like=True, gc=False, tag=FORMAT):  # untracked, as Change
    """A buffered transaction as read back from the stream or the dead letters."""

    txn_id: UUID  # canonical text by str(): an envelope's spelling must not make it a duplicate in the ledger
    site: str
    accepted_at: datetime
    idempotency_key: str | None
    steps: list[Change]

    def row_keys(self) -> list[tuple[str, str]]:
        return [(step.table, step.key) for step in self.steps]


class NamedChange(msgspec.Struct, frozen=True, gc=False):
    """A step of the format before the compact one."""

    op: Op
    table: str
    key: str
    values: dict[str, Any] = {}


class Named(msgspec.Struct, gc=False):
    """An envelope of the format before the compact one: a JSON object of named fields."""

    txn_id: UUID
    site: str
    accepted_at: datetime
    steps: list[NamedChange]
    idempotency_key: str | None = None

    def current(self) -> Envelope:
        steps = [Change(s.op, s.table, s.key, s.values) for s in self.steps]
        return Envelope(self.txn_id, self.site, self.accepted_at, self.idempotency_key, steps)


class UnreadableEnvelope(ValueError):
    """A stream entry's envelope that is not one :func:`encode` wrote (or wrote in an earlier format)."""


ENCODER = msgspec.json.Encoder()
DECODER = msgspec.json.Decoder(Envelope)
NAMED = msgspec.json.Decoder(Named)


def encode(txn: Transaction) -> bytes:
    """The envelope of ``txn`` as the stream keeps it (msgspec writes UUIDs, times, enums and values of any size
    itself, faster than pydantic's ``model_dump_json`` on the hot path)."""
    steps = [[step.op, step.table, step.key, step.values] for step in txn.steps]
    return ENCODER.encode([FORMAT, txn.txn_id, txn.site, txn.accepted_at, txn.idempotency_key, steps])


def decode(raw: bytes | str | None) -> Envelope:
    """The envelope an entry holds, in either format; :class:`UnreadableEnvelope` when it holds none that can be read."""
    if not raw:
        raise UnreadableEnvelope("no envelope")
    try:
        if raw[:1] in (b"{", "{"):  # the format before the compact one
            return NAMED.decode(raw).current()
        return DECODER.decode(raw)
    except msgspec.DecodeError as exc:  # a ValidationError too
        raise UnreadableEnvelope(str(exc)) from None
