"""Triggers, run by the triggerer (which imports them from this installed package, never from the DAGs folder).

Their connections come through the provider hooks (:mod:`opsync_airflow.hooks`), so the TLS extras
of an Airflow connection hold here as in the tasks.

:class:`ReplicaLsnTrigger` waits, without a worker slot, until the replica has replayed past a
commit. :class:`BufferWakeTrigger` is the asset watcher that wakes ``opsync_drain`` when records
are accepted; pub/sub drops messages, so it only shortens the wait for the time schedule.
"""

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import psycopg
from airflow.triggers.base import BaseEventTrigger, BaseTrigger, TriggerEvent

from opsync.buffer.keys import events_channel
from opsync.config import get_settings
from opsync.connections import Timeouts
from opsync.lsn import REPLAY_SQL, Lsn, ReplicaError, ReplicaUnreachable, replay_position
from opsync_airflow.hooks import BUFFER_CONN_ID, BUFFER_PREFIX, REPLICA_CONN_ID, SiteBufferHook, SiteDatabaseHook

WAKE_READ_TIMEOUT_S = 10  # each read returns within this; the client's socket timeout is well above it


class ReplicaLsnTrigger(BaseTrigger):
    """Fires once ``pg_last_wal_replay_lsn()`` on the replica is at or past ``target_lsn``.

    A replica that is unreachable, not in recovery or reports no replay position is an error state:
    logged (when it changes) and waited through, never taken for "caught up".
    """

    def __init__(self, target_lsn: str, replica_conn_id: str = REPLICA_CONN_ID, poke_interval: float = 2.0) -> None:
        super().__init__()
        self.target_lsn = target_lsn
        self.replica_conn_id = replica_conn_id
        self.poke_interval = poke_interval

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            "opsync_airflow.triggers.ReplicaLsnTrigger",
            {"target_lsn": self.target_lsn, "replica_conn_id": self.replica_conn_id, "poke_interval": self.poke_interval},
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        target = Lsn.parse(self.target_lsn)
        conn: psycopg.AsyncConnection | None = None
        last_problem = None
        try:
            while True:
                try:
                    if conn is None or conn.closed:
                        conn = await self.connect()
                    position = await self.position(conn)
                except ReplicaError as exc:
                    if str(exc) != last_problem:
                        self.log.warning("still waiting for the replica to replay %s: %s", target, exc)
                    last_problem = str(exc)
                else:
                    if position >= target:
                        yield TriggerEvent({"target_lsn": str(target), "replay_lsn": str(position)})
                        return
                    if last_problem is not None:
                        self.log.info("replica replaying again, at %s; waiting for %s", position, target)
                    last_problem = None
                await asyncio.sleep(self.poke_interval)
        finally:
            if conn is not None:
                await conn.close()

    async def connect(self) -> psycopg.AsyncConnection:
        try:
            return await SiteDatabaseHook(self.replica_conn_id).aget_conn()
        except psycopg.Error as exc:
            raise ReplicaUnreachable(f"replica unreachable: {exc}".strip()) from exc

    @staticmethod
    async def position(conn: psycopg.AsyncConnection) -> Lsn:
        try:
            cursor = await conn.execute(REPLAY_SQL)
            row = await cursor.fetchone()
        except psycopg.Error as exc:
            await conn.close()
            raise ReplicaUnreachable(f"replica unreachable: {exc}".strip()) from exc
        return replay_position(*row)


class BufferWakeTrigger(BaseEventTrigger):
    """Fires when the site buffer announces a newly accepted transaction on its events channel."""

    def __init__(self, redis_conn_id: str = BUFFER_CONN_ID, prefix: str = BUFFER_PREFIX) -> None:
        super().__init__()
        self.redis_conn_id = redis_conn_id
        self.prefix = prefix
        self.channel = events_channel(prefix)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return ("opsync_airflow.triggers.BufferWakeTrigger", {"redis_conn_id": self.redis_conn_id, "prefix": self.prefix})

    async def run(self) -> AsyncIterator[TriggerEvent]:
        timeouts = Timeouts(get_settings().redis_timeout_s, WAKE_READ_TIMEOUT_S * 3)
        client = await SiteBufferHook(self.redis_conn_id).aget_client(timeouts)
        try:
            async with client.pubsub(ignore_subscribe_messages=True) as pubsub:
                await pubsub.subscribe(self.channel)
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=WAKE_READ_TIMEOUT_S)
                    event = json.loads(message["data"]) if message else {}
                    # state changes of the drain's own making (committed, replicated) must not wake it again
                    if event.get("state") == "accepted":
                        yield TriggerEvent({"channel": self.channel, "txn_id": event.get("txn_id")})  # which one woke it
                        return
        finally:
            await client.aclose()
