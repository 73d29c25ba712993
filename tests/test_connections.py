"""``opsync.connections``: what each connection hands libpq and redis-py (timeouts, TLS), and that no secret
shows in a repr, an error or a log line. Mostly without services: what reaches the driver is read
at its door (SQLAlchemy's ``do_connect``, redis-py's pool); the TLS test talks to the real replica.
"""

import asyncio
import logging
import socket

import pytest
import redis
import redis.asyncio as aioredis
from pydantic import ValidationError
from sqlalchemy import event, text
from sqlalchemy.exc import OperationalError

from ingest_api import deps
from opsync import connections
from opsync.config import Settings, SiteType, get_settings
from opsync.connections import Database, Timeouts
from tests.tls import tls_redis

PASSWORD = "s3cret-Pa55word-never-shown"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once closed: every connect is refused at once


def settings(**given) -> Settings:
    port = closed_port()
    urls = {
        "primary_url": f"postgresql+psycopg://opsync:{PASSWORD}@127.0.0.1:{port}/opsync",
        "replica_url": f"postgresql+psycopg://opsync:{PASSWORD}@127.0.0.1:{port}/opsync?sslmode=require",
        "redis_url": f"redis://:{PASSWORD}@127.0.0.1:{port}/0",
    }
    return Settings(_env_file=None, **(urls | given))


class Reached(Exception):
    """Raised at the driver's door, with the parameters it would have been given."""


def driver_params(engine) -> dict:
    """What the engine's next connection would hand psycopg, without connecting."""

    def stop(dialect, record, cargs, cparams):
        raise Reached(cparams)

    event.listen(engine, "do_connect", stop)
    with pytest.raises(Reached) as reached:
        engine.connect()
    engine.dispose()
    return reached.value.args[0]


def test_an_api_engine_bounds_connect_and_statements_and_takes_tls_from_the_settings():
    s = settings(direct_timeout_s=4, primary_sslmode="verify-full", primary_sslrootcert="/etc/opsync/primary-ca.pem")
    params = driver_params(connections.engine(s, Database.primary, connections.request_timeouts(s, Database.primary)))
    assert params["connect_timeout"] == 4 and params["options"] == "-c statement_timeout=4000"
    assert params["sslmode"] == "verify-full" and params["sslrootcert"] == "/etc/opsync/primary-ca.pem"
    assert params["gssencmode"] == "disable"


def test_tls_in_the_url_holds_unless_the_settings_say_otherwise():
    replica = connections.request_timeouts(settings(), Database.replica)
    assert driver_params(connections.engine(settings(), Database.replica, replica))["sslmode"] == "require"
    s = settings(replica_sslmode="verify-ca")
    assert driver_params(connections.engine(s, Database.replica, replica))["sslmode"] == "verify-ca"


def test_background_engines_bound_connecting_only_and_keep_their_session_options():
    s = settings(connect_timeout_s=12)
    params = driver_params(connections.engine(s, Database.primary, connections.background_timeouts(s), options="-c timezone=UTC"))
    assert params["connect_timeout"] == 12 and params["options"] == "-c timezone=UTC"  # no statement_timeout


def test_the_main_site_reads_its_primary_and_a_secondary_its_replica():
    assert connections.readable(settings(site_type=SiteType.main)) is Database.primary
    assert connections.readable(settings(site_type=SiteType.secondary)) is Database.replica


def test_buffer_clients_take_the_timeouts_and_the_ca_of_the_settings():
    port = closed_port()
    s = settings(redis_url=f"rediss://:{PASSWORD}@127.0.0.1:{port}/0", redis_ssl_ca_certs="/etc/opsync/redis-ca.pem", redis_timeout_s=2)
    sync = connections.redis_client(s)
    assert issubclass(sync.connection_pool.connection_class, redis.SSLConnection)
    kwargs = sync.connection_pool.connection_kwargs
    assert kwargs["ssl_ca_certs"] == "/etc/opsync/redis-ca.pem" and kwargs["socket_timeout"] == kwargs["socket_connect_timeout"] == 2
    asynchronous = connections.async_redis_client(s, Timeouts(2))  # as the enqueuer's: no per-answer timeout
    assert issubclass(asynchronous.connection_pool.connection_class, aioredis.SSLConnection)
    assert asynchronous.connection_pool.connection_kwargs["socket_timeout"] is None
    assert asynchronous.connection_pool.connection_kwargs["ssl_ca_certs"] == "/etc/opsync/redis-ca.pem"


def test_a_redis_ca_without_a_rediss_url_is_refused_naming_the_field_not_the_url():
    with pytest.raises(ValidationError) as refused:
        settings(redis_ssl_ca_certs="/etc/opsync/redis-ca.pem")
    assert "redis_ssl_ca_certs" in str(refused.value) and "rediss://" in str(refused.value)
    assert PASSWORD not in str(refused.value)


def test_no_secret_in_reprs_errors_or_logs(caplog):
    s = settings()
    caplog.set_level(logging.DEBUG)
    engine = connections.engine(s, Database.primary, Timeouts(2))
    client = connections.redis_client(s, Timeouts(1, 1))
    shown = [repr(s), repr(engine), repr(client), repr(client.connection_pool), repr(connections.async_redis_client(s))]
    with pytest.raises(OperationalError) as pg_error, engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    with pytest.raises(redis.ConnectionError) as redis_error:
        client.ping()

    async def ping_async():
        async_client = connections.async_redis_client(s, Timeouts(1, 1))
        try:
            await async_client.ping()
        finally:
            await async_client.aclose()

    with pytest.raises(redis.ConnectionError) as async_error:
        asyncio.run(ping_async())
    shown += [str(e.value) for e in (pg_error, redis_error, async_error)] + [caplog.text]
    assert "127.0.0.1" in shown[-4] and "127.0.0.1" in shown[-3]  # the errors say where
    assert [text for text in shown if PASSWORD in text] == []


def test_the_sslmode_of_the_settings_reaches_libpq(pg):
    """The test servers have no TLS: sslmode=require must make the connection fail for that reason."""
    url = pg.replica.url()
    for sslmode, works in (("require", False), ("prefer", True)):
        s = settings(replica_url=url, replica_sslmode=sslmode)
        engine = connections.engine(s, Database.replica, connections.request_timeouts(s, Database.replica))
        try:
            with engine.connect() as conn:
                assert works and conn.execute(text("SELECT pg_is_in_recovery()")).scalar() is True
        except OperationalError as exc:
            assert not works and "server does not support SSL, but SSL was required" in str(exc)
        finally:
            engine.dispose()


def test_a_rediss_url_talks_tls_to_the_buffer_with_the_ca_of_the_settings_and_refuses_another(tmp_path, monkeypatch):
    with tls_redis(tmp_path) as server:
        s = settings(redis_url=server.url(), redis_ssl_ca_certs=server.ca)
        assert connections.redis_client(s).ping()
        monkeypatch.setenv("OPSYNC_REDIS_URL", server.url())
        monkeypatch.setenv("OPSYNC_REDIS_SSL_CA_CERTS", str(server.ca))
        for cached in (get_settings, deps.get_redis, deps.get_buffer):
            cached.cache_clear()

        async def enqueuer_path() -> bool:  # the API's enqueuer, whose own connection class must not lose the TLS
            enqueuer = deps.get_enqueuer()
            try:
                await enqueuer.prepare()  # loads the enqueue script
                return await enqueuer.client.script_exists(enqueuer._enqueue.sha) == [True]
            finally:
                await enqueuer.client.aclose()

        try:
            assert asyncio.run(enqueuer_path())
        finally:
            for cached in (get_settings, deps.get_redis, deps.get_buffer):
                cached.cache_clear()
        wrong = settings(redis_url=server.url(), redis_ssl_ca_certs=server.wrong_ca)
        with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
            connections.redis_client(wrong, retry=None).ping()
