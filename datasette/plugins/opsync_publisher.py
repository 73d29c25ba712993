"""Runs the read-model publisher inside Datasette, as a supervised background task.

Started from ``asgi_wrapper`` when the lifespan scope starts: in Datasette 0.65.5 a task created
in the ``startup`` hook never runs under ``datasette serve`` (it lands on a throwaway loop). The
publisher's blocking loop runs in a worker thread; if it ever dies it is restarted with backoff,
and on shutdown it is told to stop and awaited. Installed opsync registers it (a ``datasette`` entry
point); ``OPSYNC_DATASETTE_PUBLISHER=false`` leaves it out where the publisher runs as its own process
(settings from the ``OPSYNC_*`` environment, see ``opsync.config``).
"""

import asyncio
import logging
import threading

from datasette import hookimpl
from opsync.config import get_settings
from opsync.read_model.publisher import Publisher

log = logging.getLogger("opsync.publisher")
MAX_RESTART_DELAY_S = 60
SHUTDOWN_TIMEOUT_S = 15


class Supervisor:
    """Keeps one publisher running for the lifetime of the server."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        if not log.handlers:  # Datasette configures only uvicorn's loggers: the publisher's go to stderr
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            log.addHandler(handler)
            log.setLevel(logging.INFO)
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self.supervise())

    async def supervise(self) -> None:
        delay = 1
        while not self.stop.is_set():
            try:
                await asyncio.to_thread(run_publisher, self.stop)
            except Exception:
                log.exception("the read-model publisher died; restarting in %d s", delay)
                delay = min(delay * 2, MAX_RESTART_DELAY_S)
                await asyncio.sleep(delay)

    async def shutdown(self) -> None:
        self.stop.set()
        if self.task is not None:
            await asyncio.wait_for(self.task, SHUTDOWN_TIMEOUT_S)


def run_publisher(stop: threading.Event) -> None:
    Publisher.from_settings(get_settings()).run(stop)


@hookimpl
def asgi_wrapper(datasette):
    if not get_settings().datasette_publisher:
        return None
    supervisor = Supervisor()

    def wrap(app):
        async def with_publisher(scope, receive, send):
            if scope["type"] != "lifespan":
                return await app(scope, receive, send)

            async def watch(message_source=receive):
                message = await message_source()
                if message["type"] == "lifespan.startup":
                    supervisor.start()
                elif message["type"] == "lifespan.shutdown":
                    await supervisor.shutdown()
                return message

            return await app(scope, watch, send)

        return with_publisher

    return wrap
