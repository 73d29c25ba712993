"""``GET /v1/events``: transaction state changes as server-sent events, so scripts follow without polling.

Each stream holds its own Redis pub/sub connection for as long as the client listens. Redis
going away never ends a stream with an error status: the stream says ``unavailable`` and
resubscribes, then sends fresh snapshots of the followed transactions (pub/sub kept nothing
for it meanwhile).
"""

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Annotated
from uuid import UUID

import anyio
import redis
import redis.asyncio as aioredis
from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from starlette.concurrency import run_in_threadpool

from ingest_api.deps import BufferDep, PrincipalDep, SettingsDep, documented
from opsync.buffer import Buffer
from opsync.events import followed, parse_event, snapshot_event

router = APIRouter(prefix="/v1", tags=["events"], responses=documented(401, 422, 503))

MAX_FOLLOWED = 1000
RECONNECT_S = 1.0

TxnIds = Annotated[
    list[UUID],
    Query(
        alias="txn_id", max_length=MAX_FOLLOWED,
        description="Follow only these transactions (repeat the parameter); none: follow all",
    ),
]


def sse(data: dict, event: str | None = None) -> str:
    """One SSE message; unnamed ones reach EventSource's ``onmessage``."""
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data)}\n\n"


@router.get(
    "/events",
    summary="Follow transaction state changes (server-sent events)",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {"example": 'data: {"txn_id": "…", "state": "committed"}\n\n'}}}},
)
async def events(settings: SettingsDep, buffer: BufferDep, who: PrincipalDep, txn_ids: TxnIds = []) -> StreamingResponse:  # noqa: B006
    """Unnamed events are state changes ``{"txn_id", "state", "at", ...}``; ``ready`` follows each
    (re)subscription and precedes a snapshot (``"snapshot": true``) of each followed transaction;
    ``unavailable`` means the site buffer is unreachable and the stream is retrying; comments keep
    idle connections open.
    """
    client = aioredis.Redis.from_url(
        settings.redis_url.get_secret_value(), retry=Retry(NoBackoff(), 0), socket_timeout=5, socket_connect_timeout=3
    )
    stream = follow(client, buffer, {str(t) for t in txn_ids}, settings.events_keepalive_s)
    return StreamingResponse(
        stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )


async def follow(client: aioredis.Redis, buffer: Buffer, txn_ids: set[str], keepalive_s: float) -> AsyncIterator[str]:
    """Subscriptions until the client goes away (the response cancels this generator)."""
    try:
        while True:
            try:
                async for message in subscription(client, buffer, txn_ids, keepalive_s):
                    yield message
            except redis.RedisError as exc:
                detail = f"site buffer unavailable: {exc.__class__.__name__}"
                yield sse({"detail": detail, "retry_in_s": RECONNECT_S}, "unavailable")
                await asyncio.sleep(RECONNECT_S)
    finally:
        with anyio.CancelScope(shield=True):  # the cancelled stream must still close its connection
            await client.aclose()


async def subscription(client: aioredis.Redis, buffer: Buffer, txn_ids: set[str], keepalive_s: float) -> AsyncIterator[str]:
    async with client.pubsub() as pubsub:
        await pubsub.subscribe(buffer.events)
        yield sse({"following": sorted(txn_ids) or "all"}, "ready")
        for snapshot in await snapshots(buffer, sorted(txn_ids)):
            yield sse(snapshot)
        while True:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=keepalive_s)
            if message is None:
                yield ": keep-alive\n\n"
            elif (event := parse_event(message["data"])) and followed(event, txn_ids):
                yield sse(event)


async def snapshots(buffer: Buffer, txn_ids: list[str]) -> list[dict]:
    """Read after subscribing, so a change between the two is seen (perhaps twice), never missed."""
    if not txn_ids:
        return []
    statuses = await run_in_threadpool(buffer.statuses, txn_ids)
    return [snapshot_event(txn_id, status) for txn_id, status in zip(txn_ids, statuses, strict=True)]
