"""The transaction envelope: the unit that travels from the site buffer to the primary.

Everything in it is concrete by the time it is buffered: row keys are generated at ingest and
references between steps are resolved, so the drainer applies it without asking anyone anything.
"""

from datetime import datetime
from enum import StrEnum
from functools import cached_property
from typing import Any
from uuid import UUID

from pydantic import BaseModel, Field


class Op(StrEnum):
    insert = "insert"
    update = "update"
    upsert = "upsert"
    delete = "delete"


class State(StrEnum):
    accepted = "accepted"  # durable in the site buffer
    committed = "committed"  # in the primary, with its commit LSN
    replicated = "replicated"  # the local replica has replayed past the commit LSN
    failed = "failed"  # permanent error; in the dead-letter stream with its reason


class Step(BaseModel):
    op: Op
    table: str
    key: UUID | str = Field(description="Primary key of the row the step writes: a UUID, or a natural key (text)")
    values: dict[str, Any] = Field(default_factory=dict, description="Column values, JSON-encoded, exactly as sent")

    @cached_property
    def shown(self) -> dict[str, Any]:
        """What readers of the buffer see: the values as the primary will store them (see :meth:`admitted`)."""
        return self.values

    @classmethod
    def admitted(cls, shown: dict[str, Any], **fields: Any) -> "Step":
        """A step with the values as sent and, in :attr:`shown`, as the primary will store them (``12`` for ``"12"``).

        ``shown`` is a cached property, not a field: never serialised (the envelope keeps what was sent)
        and not compared (a step read back from the buffer equals the one admitted).
        """
        step = cls(**fields)
        step.__dict__["shown"] = shown
        return step


class Transaction(BaseModel):
    txn_id: UUID
    site: str
    accepted_at: datetime
    idempotency_key: str | None = None
    steps: list[Step]

    def row_keys(self) -> list[tuple[str, UUID | str]]:
        return [(step.table, step.key) for step in self.steps]


class Receipt(BaseModel):
    """The API's answer to a write: where the transaction is and the keys of its rows."""

    txn_id: UUID
    state: State
    ids: list[UUID | str]
    accepted_at: str
    commit_lsn: str | None = None
    status_url: str

    @property
    def id(self) -> UUID | str:
        """The key of the only row of a one-row write."""
        (only,) = self.ids
        return only
