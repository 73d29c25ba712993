"""The read model: the SQLite file Datasette serves, the replica's rows overlaid with the buffer's, each with its
sync state.

:mod:`.store` lays out each table and writes the file, :mod:`.publisher` (its one writer) decides which keys to
re-read, :mod:`.changes` reads the primary's change capture on the replica, :mod:`.check` compares the file with
the replica and repairs drift, and :mod:`.figures` keeps the publisher's poison rows and freshness in Redis.
"""
