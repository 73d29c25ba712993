"""Keys generated before insert, so later steps and transactions can reference a row at once."""

import uuid

from uuid6 import uuid7


def new_id() -> uuid.UUID:
    """A UUIDv7: time-ordered, so keys sort by creation and B-tree inserts stay local.

    Returned as a plain :class:`uuid.UUID` (not the ``uuid6`` subclass) so it compares, hashes
    and serialises like every other UUID in the code base.
    """
    return uuid.UUID(int=uuid7().int)
