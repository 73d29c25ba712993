"""The dead-letter queue from the operator's side: see what failed and why, requeue it once the cause
is fixed, or discard it.

The CLI and the Airflow UI call these functions with the person acting (``by``); every requeue and
discard is one atomic Redis step (:meth:`opsync.buffer.Buffer.requeue_dead`,
:meth:`~opsync.buffer.Buffer.discard_dead`) recorded in the audit stream. A requeued transaction
goes back into the buffer stream and the normal drain applies it, so the ledger keeps it exactly
once; a second or concurrent requeue finds the dead letter gone and changes nothing.
"""

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import NoReturn

from pydantic_core import to_jsonable_python

from opsync.apply import creates
from opsync.buffer import Buffer
from opsync.buffer.codec import Envelope, UnreadableEnvelope, decode

DEPENDS_ON = re.compile(r"depends on dead-lettered transaction (\S+)")  # the reason opsync.apply gives dependants


class UnknownTransaction(LookupError):
    """No dead letter has this txn_id (or entry ID)."""


class CannotRequeue(Exception):
    """The dead letter's envelope cannot be read, so there is nothing the drain could apply."""


@dataclass(frozen=True)
class DeadLetter:
    entry_id: str  # in the dead-letter stream; the handle for unreadable envelopes
    txn_id: str  # '' when the envelope could not be read
    failed_at: str
    reason: str
    txn: Envelope | None  # None when the envelope could not be read

    @property
    def tables(self) -> list[str]:
        return list(dict.fromkeys(step.table for step in self.txn.steps)) if self.txn else []

    @property
    def depends_on(self) -> str | None:
        """The dead-lettered transaction this one failed for, when that was its only fault."""
        match = DEPENDS_ON.fullmatch(self.reason)
        return match[1] if match else None

    def summary(self) -> dict:
        return {
            "txn_id": self.txn_id,
            "entry_id": self.entry_id,
            "failed_at": self.failed_at,
            "reason": self.reason,
            "tables": self.tables,
            "step_count": len(self.txn.steps) if self.txn else 0,
        }

    def details(self) -> dict:
        if self.txn is None:
            return self.summary() | {"site": None, "accepted_at": None, "steps": []}
        steps = [{"op": s.op.value, "table": s.table, "key": s.key, "values": s.values} for s in self.txn.steps]
        return self.summary() | {"site": self.txn.site, "accepted_at": to_jsonable_python(self.txn.accepted_at), "steps": steps}


@dataclass(frozen=True)
class Action:
    """One requeue or discard; ``changed`` is False when it had been done already (by someone else)."""

    action: str
    txn_id: str
    by: str
    at: str
    changed: bool

    def as_json(self) -> dict:
        return {"action": self.action, "txn_id": self.txn_id, "by": self.by, "at": self.at, "changed": self.changed}


def dead_letters(buffer: Buffer) -> list[DeadLetter]:
    """Every dead letter, oldest first (failures are rare: the stream stays small)."""
    return [parse(entry_id, fields) for entry_id, fields in buffer.dead_entries()]


def parse(entry_id: str, text: dict[str, str]) -> DeadLetter:
    try:
        txn: Envelope | None = decode(text.get("txn"))
    except UnreadableEnvelope:
        txn = None
    return DeadLetter(entry_id, text.get("txn_id", ""), text.get("failed_at", ""), text.get("reason", ""), txn)


def find(buffer: Buffer, txn: str) -> DeadLetter:
    """The dead letter of ``txn`` (a txn_id, or an entry ID for an unreadable envelope)."""
    found = next((d for d in dead_letters(buffer) if txn in (d.txn_id, d.entry_id)), None)
    if found is None:
        raise UnknownTransaction(f"no dead-lettered transaction {txn}")
    return found


def dependants(buffer: Buffer, txn_id: str) -> list[DeadLetter]:
    """Dead letters that failed only because ``txn_id`` (or, in turn, one of them) had failed; stream order."""
    names, found = {txn_id}, []
    for letter in dead_letters(buffer):  # a dependant always failed after what it depends on
        if letter.depends_on in names:
            names.add(letter.txn_id)
            found.append(letter)
    return found


def requeue(buffer: Buffer, txn: str, by: str, with_dependants: bool = True) -> list[Action]:
    """Requeue ``txn`` after its cause was fixed, then (by default) its dependants, in their stream order.

    Requeuing what is already requeued succeeds and changes nothing.
    """
    try:
        letter = find(buffer, txn)
    except UnknownTransaction:
        if discarded := previous(buffer, txn, "discarded"):
            raise UnknownTransaction(f"{txn} was discarded at {discarded.at} by {discarded.by}: nothing to requeue") from None
        done = previous(buffer, txn, "requeued")
        if done is None:
            raise
        actions = [done]
    else:
        actions = [requeue_one(buffer, letter, by)]
    if with_dependants:
        actions += [requeue_one(buffer, d, by) for d in dependants(buffer, actions[0].txn_id)]
    return actions


def requeue_one(buffer: Buffer, letter: DeadLetter, by: str) -> Action:
    if letter.txn is None:
        raise CannotRequeue(f"dead letter {letter.entry_id} has no readable envelope ({letter.reason}); discard it")
    at = now()
    if buffer.requeue_dead(letter.entry_id, letter.txn, created_rows(letter.txn), at, by) is not None:
        return Action("requeue", letter.txn_id, by, at, changed=True)
    return previous(buffer, letter.txn_id, "requeued") or gone(letter)


def discard(buffer: Buffer, txn: str, by: str) -> Action:
    """Give ``txn`` up: its overlay rows leave the merged view; its status stays ``failed``, marked discarded.

    Discarding what is already discarded succeeds and changes nothing.
    """
    try:
        letter = find(buffer, txn)
    except UnknownTransaction:
        done = previous(buffer, txn, "discarded")
        if done is None:
            raise
        return done
    at = now()
    if buffer.discard_dead(letter.entry_id, letter.txn, created_rows(letter.txn) if letter.txn else [], at, by):
        return Action("discard", letter.txn_id or letter.entry_id, by, at, changed=True)
    return previous(buffer, letter.txn_id, "discarded") or gone(letter)


def created_rows(txn: Envelope) -> list[str]:
    """The rows ``txn`` creates, as the dead-rows hash names them ('table:key')."""
    return [f"{table}:{key}" for table, key in sorted(creates(txn))]


def gone(letter: DeadLetter) -> NoReturn:
    """Someone else requeued or discarded it meanwhile, the other way round from what was asked."""
    raise UnknownTransaction(f"{letter.txn_id or letter.entry_id} is no longer dead-lettered (see opsync dlq history)")


def previous(buffer: Buffer, txn_id: str, done: str) -> Action | None:
    """The earlier requeue or discard of ``txn_id`` as its status records it, if that is where it stands."""
    status = buffer.status(txn_id) if txn_id else None
    if not status or f"{done}_at" not in status or (done == "requeued" and status.get("state") == "failed"):
        return None
    action = {"requeued": "requeue", "discarded": "discard"}[done]
    return Action(action, txn_id, status[f"{done}_by"], status[f"{done}_at"], changed=False)


def history(buffer: Buffer, count: int = 100) -> list[dict[str, str]]:
    """The latest requeues and discards, newest first: who did what, when, and why it had failed."""
    return buffer.dlq_history(count)


def now() -> str:
    return datetime.now(UTC).isoformat()
