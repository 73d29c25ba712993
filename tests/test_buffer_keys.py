"""The buffer is one owned boundary: no production code outside :mod:`opsync.buffer` spells a key of the site's
Redis, so the key layout changes in one place (``opsync/buffer/keys.py``) without a reader elsewhere going stale.
"""

import re
from pathlib import Path

from opsync.buffer import Buffer
from opsync.buffer.keys import Keys

REPO = Path(__file__).resolve().parents[1]
PRODUCTION = ("opsync", "ingest_api", "plugins", "dags", "datasette")
OWNER = REPO / "opsync" / "buffer"
SENTINEL = "PREFIX"


def segments() -> set[str]:
    """The first segment after the prefix of every key :class:`Keys` names (``buffer``, ``row``, ``idem``, ...)."""
    keys = Keys()
    keys.prefix, keys.idempotency_ttl_s, keys.idempotency_buckets_per_window = SENTINEL, 86400, 1
    names = [getattr(keys, name) for name, value in vars(Keys).items() if isinstance(value, property)]
    names += [
        keys.status_key("t"),
        keys.idempotency_key("c", "k"),
        keys.row_key("t", "k"),
        keys.final_key("0" * 8 + "-0000-0000-0000-" + "0" * 12)[0],
    ]
    names += [keys.travel_key("0" * 8 + "-0000-0000-0000-" + "0" * 12)[0], keys.index_bucket("i", "k"), keys.index_directory("i")]
    names += keys.idempotency_buckets(("c", "k"))[0]
    return {name.split(":")[1].lstrip("#") for name in names if name.startswith(SENTINEL + ":")} - {"", SENTINEL}


def spelled(text: str, known: set[str]) -> list[str]:
    """Where ``text`` builds a key of the site's Redis: after a prefix (``{prefix}:``, ``prefix .. ':'``) or as a
    ``:segment:`` / ``:segment"`` literal of a known key."""
    alternatives = "|".join(sorted(map(re.escape, known)))
    patterns = (
        r"prefix\}:",
        r"prefix\s*(\.\.|\+)\s*['\"]:",
        rf":({alternatives}):",
        rf":({alternatives})['\"]",
    )
    return [m.group(0) for pattern in patterns for m in re.finditer(pattern, text)]


def production_files() -> list[Path]:
    return [
        path
        for top in PRODUCTION
        for path in sorted((REPO / top).rglob("*"))
        if path.suffix in (".py", ".lua", ".yml", ".yaml", ".html", ".js") and OWNER not in path.parents
    ]


def test_the_key_segments_are_found():
    """The scan looks for what the keys module names (a renamed key keeps the test meaningful)."""
    found = segments()
    assert {"buffer", "row", "txn", "idem", "on", "done", "dead", "awaiting", "unsent", "events", "b", "dir"} <= found


def test_no_code_outside_the_buffer_package_spells_a_key():
    known = segments()
    offenders = {str(p.relative_to(REPO)): hits for p in production_files() if (hits := spelled(p.read_text(encoding="utf-8"), known))}
    assert offenders == {}, "build keys with opsync.buffer.keys (Buffer's key names), not by hand"


def test_the_scan_sees_a_key_spelled_by_hand():
    known = segments()
    assert spelled('channel = f"{prefix}:events"', known)
    assert spelled('return f"{buffer.prefix}:alerts:sent"', known)
    assert spelled("redis.call('HGET', prefix .. ':row:' .. name)", known)
    assert spelled("client.hgetall('site:row:' + key)", known)
    assert not spelled('log.info("row %s: done", key)', known)


def test_the_key_names_stay_those_a_buffer_filled_before_the_split_holds():
    """Callers name keys through the buffer they hold (``buffer.stream``); the names are what Redis already
    holds, so moving them into ``keys.py`` must not rename one (a buffer filled before would be stranded)."""
    buffer = Buffer.__new__(Buffer)
    buffer.prefix = "site7"
    assert (buffer.stream, buffer.events, buffer.dead_letters, buffer.unsent, buffer.awaiting_replica) == (
        "site7:buffer",
        "site7:events",
        "site7:dead",
        "site7:unsent",
        "site7:awaiting",
    )
    assert (buffer.row_key("t", "k"), buffer.status_key("x"), buffer.idempotency_key("c", "k")) == (
        "site7:row:t:k",
        "site7:txn:x",
        "site7:idem:c:k",
    )
