"""``make bench-buffer-memory``: what the site buffer costs in Redis per transaction, next to a raw XADD.

It starts its own durable Redis (the site's configuration: ``appendfsync always``, AOF with an RDB
preamble, :class:`devstack.redis.RedisServer`) in a temporary directory and measures, in one run:

- Baseline: the same envelopes written by raw pipelined ``XADD`` into a stream of their own:
  bytes of Redis memory (``used_memory``) per entry, and the time from ``kill -9`` of Redis holding
  them to its first accepted write.
- Buffered: ``txns`` single-record housekeeping transactions with idempotency keys, as the ingest
  API buffers one POST of ``opsync.client`` (:func:`opsync.ingest.build_transaction`, the API's
  answer, a SHA-256 body hash, :meth:`opsync.buffer.Buffer.enqueue_call`'s script; pipelined here
  only to fill faster): bytes of memory and of AOF per transaction, and the restart time with
  the buffer full.
- Settled and confirmed: the entries claimed and settled as committed (:meth:`Buffer.settle`, with
  increasing commit LSNs, no PostgreSQL: this measures Redis), then confirmed in bulk by the real
  :func:`opsync.drain.confirm` against the last LSN: its rate in transactions per second, and the
  bytes each transaction still holds afterwards (its status and idempotency record, kept for their
  TTL) as a share of the peak. The idempotency records fill their bucket hashes as at the README's peak
  (:func:`peak_buckets`: ~190 records each), not as thinly as a few thousand records in 8,192 buckets would.

``--size smoke`` runs it on a few thousand transactions in well under a minute (figures mean
little); ``full`` on 1,000,000 (the issue's third of a 48 h outage; ~2 GB of Redis). ``--txns``
overrides the size's count. Prints progress to stderr, then one JSON line with every figure, last.
"""

import argparse
import hashlib
import json
import secrets
import socket
import sys
import tempfile
import time
import uuid
from pathlib import Path

import redis

from devstack.redis import RedisServer
from opsync.buffer import ENQUEUE, IDEMPOTENCY_BUCKETS, IDEMPOTENCY_WINDOWS, Buffer, Settlement
from opsync.buffer.codec import decode, encode
from opsync.drain import confirm
from opsync.envelope import State
from opsync.ingest import StepIn, answer, build_transaction
from opsync.lsn import Lsn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ingest as ingest_bench  # noqa: E402  (bench/ingest.py: the logger's sample records)

SIZES = {"smoke": 5_000, "full": 1_000_000}
PIPELINE = 200  # scripts per pipeline while filling
CLAIM = 1000  # entries per claim and settle while settling
RATE = 20  # transactions per second at the README's peak: what the txn_ids' times are spaced by
CLIENT = "logger"  # the token name the idempotency keys are scoped to

FIGURES = (
    "txns",
    "xadd_bytes_per_entry",
    "buffered_bytes_per_txn",
    "buffered_vs_xadd",
    "aof_bytes_per_txn",
    "held_bytes_per_txn",
    "held_share_of_peak",
    "confirm_txns_per_s",
    "settle_txns_per_s",
    "xadd_restart_s",
    "buffered_restart_s",
    "envelope_bytes",
)


def peak_buckets(count: int, ttl_s: int = 7 * 86400) -> int:
    """Idempotency buckets for ``count`` records (all in one window here) that fill each as at the README's
    peak: ``RATE`` a second over a window (an eighth of the TTL) in :data:`IDEMPOTENCY_BUCKETS` buckets."""
    return max(1, round(count * IDEMPOTENCY_BUCKETS * IDEMPOTENCY_WINDOWS / (RATE * ttl_s)))


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def txn_id_at(millis: int) -> uuid.UUID:
    """A UUIDv7 of that millisecond, as :func:`opsync.ids.new_id` makes one then."""
    rand = secrets.randbits(74)
    return uuid.UUID(int=(millis << 80) | (0x7 << 76) | ((rand >> 62) << 64) | (0b10 << 62) | (rand & (2**62 - 1)))


def transactions(count: int, samples: ingest_bench.Samples, rate: float = RATE):
    """(txn, response, idempotency, body hash) of one single-record POST each, as the API builds them, their
    txn_ids and row keys stamped ``rate`` per second (as an outage at that peak would stamp them: both are
    UUIDv7s generated at ingest), not at the fill's speed."""
    start = int(time.time() * 1000)
    for i in range(count):
        record = samples.record()
        key = str(uuid.uuid4())
        millis = start + int(i * 1000 / rate)
        txn = build_transaction([StepIn(table=ingest_bench.TABLE, values=record, id=txn_id_at(millis))], "observatory", key)
        txn = txn.model_copy(update={"txn_id": txn_id_at(millis)})
        canonical = json.dumps(["POST", f"/v1/records/{ingest_bench.TABLE}", record], sort_keys=True)
        yield txn, answer(txn, State.accepted), (CLIENT, key), hashlib.sha256(canonical.encode()).hexdigest()


def used(client: redis.Redis) -> int:
    return client.info("memory")["used_memory"]


def aof_bytes(server: RedisServer) -> int:
    return sum(p.stat().st_size for p in (server.root / "data").rglob("*.aof"))


def restart_s(server: RedisServer, write) -> float:
    """``kill -9``, start again, then retry ``write`` until Redis accepts it (it answers LOADING meanwhile)."""
    server.kill()
    start = time.perf_counter()
    server.start(timeout=600)
    with server.client() as client:
        while True:
            try:
                write(client)
                return time.perf_counter() - start
            except redis.BusyLoadingError:
                time.sleep(0.01)


def fill_xadd(client: redis.Redis, envelopes: list[str]) -> None:
    for first in range(0, len(envelopes), PIPELINE):
        pipe = client.pipeline(transaction=False)
        for envelope in envelopes[first : first + PIPELINE]:
            pipe.xadd("bench:xadd", {"txn": envelope})
        pipe.execute()


def fill_buffer(buffer: Buffer, txns: list) -> None:
    script = buffer.client.register_script(ENQUEUE)
    for first in range(0, len(txns), PIPELINE):
        pipe = buffer.client.pipeline(transaction=False)
        for txn, response, idempotency, body_hash in txns[first : first + PIPELINE]:
            script(**buffer.enqueue_call(txn, response, idempotency, body_hash, in_replica=()), client=pipe)
        for result in pipe.execute():
            assert result[0] == b"created", result


def settle_all(buffer: Buffer) -> Lsn:
    """Claim every entry and settle it committed, a batch per LSN step, as the drain would after each commit."""
    lsn = 0x1000000
    while entries := buffer.claim("bench", CLAIM):
        lsn += 0x10000
        settlements = [Settlement("committed", e.stream_id, str(decode(e.envelope).txn_id)) for e in entries]
        buffer.settle(settlements, Lsn(lsn), "2026-12-07T00:00:00+00:00")
    return Lsn(lsn)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=SIZES, default="full")
    parser.add_argument("--txns", type=int, help="transactions to buffer (default: by size)")
    args = parser.parse_args()
    count = args.txns or SIZES[args.size]
    samples = ingest_bench.Samples(uuid.uuid4())
    with tempfile.TemporaryDirectory(prefix="bench-buffer-memory-") as tmp:
        log(f"building {count} transactions")
        txns = list(transactions(count, samples))
        envelopes = [encode(txn) for txn, *_ in txns]

        baseline = RedisServer(Path(tmp) / "xadd", free_port(), secrets.token_hex(16), maxmemory="0")
        baseline.start()
        with baseline.client() as client:
            empty = used(client)
            fill_xadd(client, envelopes)
            xadd_bytes = (used(client) - empty) / count
        xadd_restart = restart_s(baseline, lambda c: c.xadd("bench:xadd", {"txn": envelopes[0]}))
        baseline.kill()
        log(f"raw XADD: {xadd_bytes:.0f} B/entry, restart {xadd_restart:.2f} s")

        server = RedisServer(Path(tmp) / "buffer", free_port(), secrets.token_hex(16), maxmemory="0")
        server.start()
        client = server.client()
        buffer = Buffer(client, idempotency_buckets=peak_buckets(count))
        buffer.ensure_group()
        empty = used(client)
        aof_empty = aof_bytes(server)
        start = time.perf_counter()
        fill_buffer(buffer, txns)
        log(f"buffered {count} in {time.perf_counter() - start:.1f} s")
        peak = used(client) - empty
        aof = aof_bytes(server) - aof_empty
        spare = list(transactions(1, samples))[0]
        buffered_restart = restart_s(server, lambda c: Buffer(c).enqueue(*spare[:2], spare[2], spare[3], in_replica=()))
        client = server.client()
        buffer = Buffer(client, idempotency_buckets=peak_buckets(count))
        log(f"buffer: {peak / count:.0f} B/txn, AOF {aof / count:.0f} B/txn, restart {buffered_restart:.2f} s")

        start = time.perf_counter()
        upto = settle_all(buffer)
        settle_s = time.perf_counter() - start
        start = time.perf_counter()
        confirmed = confirm(buffer, upto).confirmed
        confirm_s = time.perf_counter() - start
        assert confirmed == count + 1, (confirmed, count)
        held = used(client) - empty
        server.kill()
        log(f"settled at {count / settle_s:.0f}/s, confirmed at {confirmed / confirm_s:.0f}/s, held {held / count:.0f} B/txn")

    figures = {
        "txns": count,
        "xadd_bytes_per_entry": round(xadd_bytes, 1),
        "buffered_bytes_per_txn": round(peak / count, 1),
        "buffered_vs_xadd": round(peak / count / xadd_bytes, 2),
        "aof_bytes_per_txn": round(aof / count, 1),
        "held_bytes_per_txn": round(held / count, 1),
        "held_share_of_peak": round(held / peak, 3),
        "confirm_txns_per_s": round(confirmed / confirm_s),
        "settle_txns_per_s": round(count / settle_s),
        "xadd_restart_s": round(xadd_restart, 2),
        "buffered_restart_s": round(buffered_restart, 2),
        "envelope_bytes": round(sum(map(len, envelopes)) / count, 1),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
