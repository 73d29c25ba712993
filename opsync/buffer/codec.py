"""The one envelope codec: how a transaction is written into the buffer stream (:func:`encode`, by the API's
enqueue) and read back (:func:`decode`) by every reader: the drain (:class:`opsync.apply.Pending`), the read
model's publisher, the dead letters (:mod:`opsync.dlq`); the CONFIRM script reads the same format with
``lua/envelope.lua``.

Decoded with msgspec, without the ingest model's validation: the API validated each envelope before
buffering it, and the primary's constraints still judge every row.
"""

from datetime import datetime
from typing import Any
from uuid import UUID

import msgspec

from opsync.envelope import Op, Transaction


class Change(msgspec.Struct, frozen=True, gc=False):
    """A step as the buffer's readers see it: the key stays text, as it goes into SQL and into row references.

    Untracked by the garbage collector (``gc=False``: JSON data cannot form a cycle), whose passes
    over a batch's many objects otherwise cost more than decoding them.
    """

    op: Op
    table: str
    key: str
    values: dict[str, Any] = {}


class Envelope(msgspec.Struct, gc=False):  # untracked, as Change
    """A buffered transaction as read back from the stream or the dead letters."""

    txn_id: UUID  # canonical text by str(): an envelope's spelling must not make it a duplicate in the ledger
    site: str
    accepted_at: datetime
    steps: list[Change]
    idempotency_key: str | None = None

    def row_keys(self) -> list[tuple[str, str]]:
        return [(step.table, step.key) for step in self.steps]


class UnreadableEnvelope(ValueError):
    """A stream entry's envelope that is not one :func:`encode` wrote (or wrote in an earlier format)."""


DECODER = msgspec.json.Decoder(Envelope)


def encode(txn: Transaction) -> bytes:
    """The envelope of ``txn`` as the stream keeps it."""
    return txn.model_dump_json().encode()


def decode(raw: bytes | str | None) -> Envelope:
    """The envelope an entry holds; :class:`UnreadableEnvelope` when it holds none that can be read."""
    if not raw:
        raise UnreadableEnvelope("no envelope")
    try:
        return DECODER.decode(raw)
    except msgspec.DecodeError as exc:  # a ValidationError too
        raise UnreadableEnvelope(str(exc)) from None
