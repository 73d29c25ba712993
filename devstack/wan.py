"""A userspace TCP proxy that behaves like the intercontinental link (this kernel has no netem).

Each chunk is stamped when it arrives and delivered ``delay_s`` later, in order, per direction:
a round trip costs ``2 × delay_s`` while throughput stays high, because many chunks are in flight
at once, as on a long fat pipe. A new connection pays the TCP handshake's round trip before its
first byte moves. The link can be cut at runtime:

- ``blackhole()``: packets vanish. Open connections fall silent and new ones are accepted but get
  no answer; nobody sees an error. Bytes already sent are held, not dropped (TCP retransmits), so
  ``restore()`` lets them through, as a link that comes back before TCP gives up.
- ``reset_connections()``: every open connection is killed with an RST (SO_LINGER 0 close), as a
  middlebox that loses its state does; both ends get "connection reset".

    with WanProxy("127.0.0.1", 15432, delay_s=0.125) as proxy:  # 250 ms round trips
        psycopg.connect(host="127.0.0.1", port=proxy.port, ...)

CLI (SIGUSR1 toggles the blackhole, SIGUSR2 resets open connections)::

    python -m devstack.wan --listen 15500 --target 127.0.0.1:15432 --rtt-ms 250
"""

import argparse
import asyncio
import signal
import socket
import struct
import threading
from types import TracebackType
from typing import Self

CHUNK = 64 * 1024
WINDOW = 16 * 1024 * 1024  # bytes in flight per direction: ≥ 128 MB/s at 250 ms RTT, bounded memory while cut
EOF = b""  # the sender closed its side cleanly
RESET = None  # the sender's connection died: pass the RST on
CONTROL_TIMEOUT_S = 10


class InFlight:
    """Bytes on their way in one direction, in order, each with the time it reaches the other end.

    Bounded like a TCP window: when full, the proxy stops reading and the sender's buffers fill.
    """

    def __init__(self) -> None:
        self._items: asyncio.Queue[tuple[float, bytes | None]] = asyncio.Queue()
        self._bytes = 0
        self._room = asyncio.Event()
        self._room.set()

    async def put(self, due: float, data: bytes | None) -> None:
        await self._room.wait()
        self._bytes += len(data or EOF)
        if self._bytes >= WINDOW:
            self._room.clear()
        self._items.put_nowait((due, data))

    async def get(self) -> tuple[float, bytes | None]:
        due, data = await self._items.get()
        self._bytes -= len(data or EOF)
        if self._bytes < WINDOW:
            self._room.set()
        return due, data


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with an RST instead of a FIN: the peer's next read or write fails at once."""
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.fileno() >= 0:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class Link:
    """One proxied connection: the client's end, the target's end, and a pump and a delivery per direction."""

    def __init__(self, proxy: "WanProxy", client: asyncio.StreamWriter) -> None:
        self.proxy = proxy
        self.writers = [client]
        self.tasks: set[asyncio.Task] = set()

    async def run(self, client_reader: asyncio.StreamReader) -> None:
        await asyncio.sleep(2 * self.proxy.delay_s)  # SYN and SYN-ACK cross the link before the first byte can
        self.proxy.held += not self.proxy.up()
        await self.proxy.link_up()
        try:
            target_reader, target = await asyncio.open_connection(*self.proxy.target, limit=2 * CHUNK)
        except OSError:
            return self.reset()  # the far end refused: the client sees its connection reset
        self.writers.append(target)
        client = self.writers[0]
        to_target, to_client = InFlight(), InFlight()
        self.spawn(self.pump(client_reader, to_target), self.pump(target_reader, to_client))
        deliveries = self.spawn(self.deliver(to_target, target), self.deliver(to_client, client))
        await asyncio.gather(*deliveries, return_exceptions=True)
        for writer in self.writers:
            writer.close()

    def spawn(self, *coros) -> list[asyncio.Task]:
        tasks = [asyncio.create_task(coro) for coro in coros]
        self.tasks.update(tasks)
        return tasks

    async def pump(self, reader: asyncio.StreamReader, flight: InFlight) -> None:
        """Read as fast as the sender writes, stamping each chunk with its arrival time at the far end."""
        loop = asyncio.get_running_loop()
        try:
            while data := await reader.read(CHUNK):
                await flight.put(loop.time() + self.proxy.delay_s, data)
            last = EOF
        except OSError:
            last = RESET
        await flight.put(loop.time() + self.proxy.delay_s, last)

    async def deliver(self, flight: InFlight, writer: asyncio.StreamWriter) -> None:
        while True:
            due, data = await flight.get()
            await self.proxy.until(due)
            try:
                if data is RESET:
                    return self.reset()
                if data is EOF:
                    return writer.write_eof()
                writer.write(data)
                await writer.drain()
            except OSError:
                return self.reset()

    def reset(self) -> None:
        """Kill both ends with RSTs and stop moving bytes."""
        for writer in self.writers:
            reset(writer)
        current = asyncio.current_task()
        for task in self.tasks:
            if task is not current:
                task.cancel()


class WanProxy:
    """The link between the observatory and Cologne, on a local port; runs its own event loop in a thread."""

    def __init__(
        self, target_host: str, target_port: int, delay_s: float = 0.125, listen_host: str = "127.0.0.1", listen_port: int = 0
    ) -> None:
        self.target = (target_host, target_port)
        self.delay_s = delay_s  # one way; read when each chunk arrives, so set_delay applies to later chunks
        self.listen = (listen_host, listen_port)
        self.port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._up: asyncio.Event | None = None
        self._links: dict[Link, asyncio.Task] = {}
        self.held = 0  # chunks and new connections that met the link cut: shows a blackhole held live traffic

    def start(self) -> int:
        """Listen (on a free port unless one was given) and return the port."""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="wan-proxy", daemon=True)
        self._thread.start()
        self.port = self._call(self._listen())
        return self.port

    def set_delay(self, delay_s: float) -> None:
        """One-way delay (RTT = 2 × delay_s) for chunks arriving from now on; earlier ones keep their time."""
        self.delay_s = delay_s

    def blackhole(self) -> None:
        """Cut the link: hold every byte and every new connection until ``restore()``."""
        self._call(self._set_up(False))

    def restore(self) -> None:
        """Bring the link back: held bytes flow in order, held connections reach the target."""
        self._call(self._set_up(True))

    def reset_connections(self) -> int:
        """RST every open connection (held ones too); returns how many. New connections work as before."""
        return self._call(self._reset_all())

    def stop(self) -> None:
        """Stop listening and reset every connection, as if the cable were cut and the far side gone."""
        if self._loop is None:
            return
        self._call(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(CONTROL_TIMEOUT_S)
        self._loop.close()
        self._loop = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(CONTROL_TIMEOUT_S)

    async def _listen(self) -> int:
        self._up = asyncio.Event()
        self._up.set()
        self._server = await asyncio.start_server(self._serve, *self.listen, limit=2 * CHUNK)
        return self._server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        link = Link(self, writer)
        self._links[link] = asyncio.current_task()
        try:
            await link.run(reader)
        except asyncio.CancelledError:
            pass  # reset or stopped: the sockets are already closed
        finally:
            del self._links[link]

    async def _set_up(self, up: bool) -> None:
        (self._up.set if up else self._up.clear)()

    async def _reset_all(self) -> int:
        links = dict(self._links)
        for link, task in links.items():
            link.reset()
            task.cancel()
        pumps = [task for link in links for task in link.tasks]
        await asyncio.gather(*links.values(), *pumps, return_exceptions=True)
        return len(links)

    async def _shutdown(self) -> None:
        self._server.close()
        await self._reset_all()
        await self._server.wait_closed()

    def up(self) -> bool:
        return self._up.is_set()

    async def link_up(self) -> None:
        await self._up.wait()

    async def until(self, due: float) -> None:
        """Wait until ``due`` has come with the link up; re-checked after each wait, as the link may be cut meanwhile."""
        loop = asyncio.get_running_loop()
        self.held += not self._up.is_set()
        while not self._up.is_set() or loop.time() < due:
            await self._up.wait()
            await asyncio.sleep(max(0.0, due - loop.time()))


def address(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host or "127.0.0.1", int(port)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", type=int, required=True, help="local port to listen on")
    parser.add_argument("--host", default="127.0.0.1", help="local address to listen on")
    parser.add_argument("--target", type=address, required=True, help="HOST:PORT to forward to")
    parser.add_argument("--rtt-ms", type=float, default=250, help="round-trip time to add (default 250)")
    args = parser.parse_args(argv)

    controls = {signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2}
    signal.pthread_sigmask(signal.SIG_BLOCK, controls)  # before the loop thread starts: it inherits the mask
    proxy = WanProxy(*args.target, delay_s=args.rtt_ms / 2000, listen_host=args.host, listen_port=args.listen)
    with proxy:
        print(f"{args.host}:{proxy.port} -> {args.target[0]}:{args.target[1]}, RTT {args.rtt_ms:g} ms", flush=True)
        cut = False
        while (received := signal.sigwait(controls)) not in (signal.SIGINT, signal.SIGTERM):
            if received == signal.SIGUSR2:
                print(f"reset {proxy.reset_connections()} connections", flush=True)
                continue
            cut = not cut
            (proxy.blackhole if cut else proxy.restore)()
            print("blackhole" if cut else "restored", flush=True)


if __name__ == "__main__":
    main()
