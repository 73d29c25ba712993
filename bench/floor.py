"""The floor under the ingest API's latency: the least one durable HTTP write costs on this machine.

``make bench-ingest`` drives it at the same rate, right after the API, so the API's p99 can be
read against what the machine allowed in the same run: on two shared cores an idle process that
wakes for a request runs from cold caches, and that varies with the neighbours.

It is served exactly as the API is (``ingest_api.__main__``: uvicorn with httptools and uvloop,
one ``SO_REUSEPORT`` socket per worker, the same garbage-collector settings) and answers each
``POST`` after one ``EVALSHA`` that appends the body to a stream and sets a status hash, durable
under ``appendfsync always`` like the API's ENQUEUE. No validation, auth, idempotency, overlay,
metrics or FastAPI: what is left is HTTP, one Redis round trip and the fsync. Any ``GET``
answers 200, so the benchmark's readiness check passes.

Its Redis client is the API's (``get_enqueuer``): the same connection class and pool.

``python -m bench.floor --port N``, with the API's ``OPSYNC_*`` settings.
"""

import argparse
import uuid
from functools import cache

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from starlette.types import Receive, Scope, Send

from ingest_api.__main__ import serve
from ingest_api.deps import get_enqueuer

WRITE = "redis.call('XADD', KEYS[1], '*', 'txn', ARGV[1]); redis.call('HSET', KEYS[2], 'state', 'accepted'); return 1"
ANSWER = b'{"state":"accepted"}'


@cache
def write_script(client: aioredis.Redis) -> AsyncScript:
    return client.register_script(WRITE)


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    body, more = b"", True
    while more:
        message = await receive()
        body, more = body + message.get("body", b""), message.get("more_body", False)
    status = 200
    if scope["method"] == "POST":
        await write_script(get_enqueuer().client)(keys=["floor:stream", f"floor:status:{uuid.uuid4()}"], args=[body])
        status = 202
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(ANSWER)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": ANSWER})


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    raise SystemExit(serve(args.host, args.port, args.workers, app="bench.floor:app"))


if __name__ == "__main__":
    main()
