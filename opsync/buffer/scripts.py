"""The buffer's Lua scripts, kept as ``.lua`` files beside this module (shipped in the wheel as package data).

A script is its libraries (shared functions: ``state_of.lua``, ``remembered.lua``, ``indexes.lua``,
``release_rows.lua``, ``dead_entry.lua``, and ``envelope.lua``, the envelope codec's Lua half) followed by
its body; each file says its KEYS and ARGV.
"""

from importlib.resources import files


def lua(name: str, *libraries: str) -> str:
    """The text of script ``name`` with ``libraries`` before it, as Redis runs it."""
    folder = files(__package__).joinpath("lua")
    return "".join(folder.joinpath(f"{part}.lua").read_text(encoding="utf-8") for part in (*libraries, name))


ENQUEUE = lua("enqueue", "state_of", "remembered", "indexes")
SETTLE = lua("settle", "state_of")
CONFIRM = lua("confirm", "state_of", "indexes", "release_rows", "envelope")
REQUEUE = lua("requeue", "dead_entry")
DISCARD = lua("discard", "dead_entry", "indexes", "release_rows")
INDEX_RANGE = lua("index_range")
OVERLAY_EXISTS = lua("overlay_exists")
CAPACITY_READING = lua("capacity_reading")
