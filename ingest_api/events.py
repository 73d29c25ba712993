"""``GET /v1/events``: transaction state changes as server-sent events, so scripts follow without polling.

Each stream holds its own Redis pub/sub connection for as long as the client listens. Redis
going away never ends a stream with an error status: the stream says ``unavailable`` and
resubscribes, then sends fresh snapshots of the followed transactions (pub/sub kept nothing
for it meanwhile).

A stream carries only transactions its token may see (as ``GET /v1/transactions/{txn_id}``), and
only while the token holds: it is re-checked a few times per token-cache TTL and the stream ends
with ``closed`` once it is revoked or expired.
"""

import asyncio
import time
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from typing import Annotated
from uuid import UUID

import anyio
import redis
import redis.asyncio as aioredis
from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.sse import EventSourceResponse, ServerSentEvent
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from starlette.concurrency import run_in_threadpool

from ingest_api.deps import BufferDep, PrincipalDep, SettingsDep, bearer, checked, documented, get_verifier
from ingest_api.reads import unknown_transaction
from opsync.auth import AuthError, AuthUnavailable, Principal
from opsync.buffer import Buffer, involved_tables, tables_of
from opsync.connections import async_redis_client
from opsync.events import followed, parse_event, shown, snapshot_event, visible

router = APIRouter(prefix="/v1", tags=["events"], responses=documented(401, 404, 422, 503))

MAX_FOLLOWED = 1000
RECONNECT_S = 1.0
CHECKS_PER_TTL = 4  # a revoked token's stream ends within the token cache's TTL (see Watch.check)
MIN_CHECK_S = 0.1
MAX_REMEMBERED = 10_000  # transactions whose tables a stream keeps, so it looks each up once

TxnIds = Annotated[
    list[UUID],
    Query(
        alias="txn_id",
        max_length=MAX_FOLLOWED,
        description="Follow only these transactions (repeat the parameter); none: follow all",
    ),
]


KEEP_ALIVE = ServerSentEvent(comment="keep-alive")


def sse(data: dict, event: str | None = None) -> ServerSentEvent:
    """One SSE message; unnamed ones reach EventSource's ``onmessage``."""
    return ServerSentEvent(data=data, event=event)


@dataclass(frozen=True)
class Stream:
    """What one stream follows, for whom, on which Redis connection and how often it keeps alive."""

    client: aioredis.Redis
    buffer: Buffer
    txn_ids: set[str]
    keepalive_s: float
    watch: "Watch"


async def opened(
    request: Request,
    settings: SettingsDep,
    buffer: BufferDep,
    who: PrincipalDep,
    txn_ids: TxnIds = [],  # noqa: B006
) -> AsyncIterator[Stream]:
    """The stream's checks and its own Redis connection, as a dependency: a refusal (404, 503) is answered
    before the stream begins, and the connection closes once the stream has ended, however it ended."""
    followed_ids = sorted({str(t) for t in txn_ids})
    if followed_ids:
        for txn_id, status in zip(followed_ids, await run_in_threadpool(buffer.statuses, followed_ids), strict=True):
            if not visible(who, status):
                raise HTTPException(404, unknown_transaction(txn_id))
    client = async_redis_client(settings, retry=Retry(NoBackoff(), 0))
    try:
        watch = Watch(who, bearer(request.headers["authorization"]), client, buffer)
        yield Stream(client, buffer, set(followed_ids), settings.events_keepalive_s, watch)
    finally:
        with anyio.CancelScope(shield=True):  # the cancelled stream must still close its connection
            await client.aclose()


@router.get(
    "/events",
    summary="Follow transaction state changes (server-sent events)",
    response_class=EventSourceResponse,
    responses={200: {"content": {"text/event-stream": {"example": 'data: {"txn_id": "…", "state": "committed"}\n\n'}}}},
)
async def events(stream: Annotated[Stream, Depends(opened)]) -> AsyncIterable[ServerSentEvent]:
    """Unnamed events are state changes ``{"txn_id", "state", "at", ...}`` of the transactions the token
    may see (``read:`` or ``write:`` on each table involved; ``admin`` all); ``ready`` follows each
    (re)subscription and precedes a snapshot (``"snapshot": true``) of each followed transaction;
    ``unavailable`` means the site buffer is unreachable and the stream is retrying; ``closed`` ends
    the stream when its token is revoked or expires; comments keep idle connections open. Following
    a transaction the token may not see is 404, as for an unknown one.
    """
    async for event in follow(stream):
        yield event


class Closed(Exception):
    """The stream's token no longer holds: why, for the final event."""


class Watch:
    """One stream's caller: whether its token still holds, and which transactions it may see."""

    def __init__(self, who: Principal, token: str, client: aioredis.Redis, buffer: Buffer):
        self.who, self.token, self.client, self.buffer = who, token, client, buffer
        self.every_s = max(get_verifier().ttl_s / CHECKS_PER_TTL, MIN_CHECK_S)
        self.due = time.monotonic() + self.every_s
        self.tables: dict[str, frozenset[str]] = {}

    async def check(self) -> None:
        """Re-validate the token once per period, as a request would: from the verifier's cache, whose
        entry is re-read in the background past half its TTL, so a revocation replayed by the replica
        ends the stream within about half a TTL plus two periods (one TTL). Raises :class:`Closed`."""
        if time.monotonic() < self.due:
            return
        self.due = time.monotonic() + self.every_s
        try:
            now = await checked(self.token)
        except AuthError as exc:
            raise Closed(str(exc)) from None
        except AuthUnavailable:
            return  # unknown to the cache and the token store unreadable: as for requests, not a refusal
        if now != self.who:
            raise Closed("the token's scopes changed; reconnect")

    async def sees(self, event: dict) -> bool:
        """Whether the event's transaction is one the caller may see; its tables come with its first
        event (ENQUEUE's), else from its status record, once per transaction."""
        if self.who.may_see(()):
            return True  # admin
        txn_id = event["txn_id"]
        tables = self.tables.get(txn_id)
        if tables is None:
            field = event.get("tables")
            if len(self.tables) >= MAX_REMEMBERED:
                self.tables.clear()
            tables = involved_tables(field) if isinstance(field, str) else await tables_of(self.client, self.buffer, txn_id)
            self.tables[txn_id] = tables
        return self.who.may_see(tables)


async def follow(stream: Stream) -> AsyncIterator[ServerSentEvent]:
    """Subscriptions until the client goes away (the response cancels this generator) or the token ends."""
    try:
        while True:
            try:
                async for message in subscription(stream):
                    yield message
            except redis.RedisError as exc:
                detail = f"site buffer unavailable: {exc.__class__.__name__}"
                yield sse({"detail": detail, "retry_in_s": RECONNECT_S}, "unavailable")
                await asyncio.sleep(RECONNECT_S)
                await stream.watch.check()
    except Closed as exc:
        yield sse({"detail": str(exc)}, "closed")


async def subscription(stream: Stream) -> AsyncIterator[ServerSentEvent]:
    """Events of the followed transactions (all the caller may see when none is named: those named
    were checked before the stream began), a keep-alive each ``keepalive_s`` of quiet (FastAPI's own,
    every 15 s, never comes while it is shorter)."""
    client, buffer, txn_ids, keepalive_s, watch = stream.client, stream.buffer, stream.txn_ids, stream.keepalive_s, stream.watch
    async with client.pubsub() as pubsub:
        await pubsub.subscribe(buffer.events)
        yield sse({"following": sorted(txn_ids) or "all"}, "ready")
        for snapshot in await snapshots(buffer, sorted(txn_ids)):
            yield sse(snapshot)
        quiet_until = time.monotonic() + keepalive_s
        while True:
            wait = max(0.0, min(quiet_until, watch.due) - time.monotonic())
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=wait)
            await watch.check()
            event = message and parse_event(message["data"])
            if event and followed(event, txn_ids) and (txn_ids or await watch.sees(event)):
                yield sse(shown(event))
                quiet_until = time.monotonic() + keepalive_s
            elif time.monotonic() >= quiet_until:
                yield KEEP_ALIVE
                quiet_until = time.monotonic() + keepalive_s


async def snapshots(buffer: Buffer, txn_ids: list[str]) -> list[dict]:
    """Read after subscribing, so a change between the two is seen (perhaps twice), never missed."""
    if not txn_ids:
        return []
    statuses = await run_in_threadpool(buffer.statuses, txn_ids)
    return [snapshot_event(txn_id, status) for txn_id, status in zip(txn_ids, statuses, strict=True)]
