"""A small client for the ingest API, for the scripts that record observations at the site.

The site's network is unreliable: a request may time out after the API has already buffered it.
Every write therefore carries an ``Idempotency-Key`` (fresh per logical call, the same on each of
its retries), so retrying is always safe, and the client retries transient failures on its own
with exponential backoff and jitter. A 4xx means the request itself is wrong: it is raised at
once, never retried.

The public API (``__all__``)::

    with OpsyncClient("http://127.0.0.1:8000", token) as client:   # or: async with AsyncOpsyncClient(...)
        receipt = client.records(table, {...})                       # one row or a list -> Receipt
        receipt.ids, receipt.accepted_at, receipt.status_url          # keys of the rows; when; where to follow it
        client.batches(table, rows)                                  # long lists -> [Receipt], one per chunk
        client.transaction(steps); client.update(table, id, values); client.delete(table, id)
        client.status(receipt.txn_id).state                          # -> TransactionStatus: State, commit_lsn, times
        client.wait(receipt.txn_id, "replicated", timeout=60)        # -> State, following /v1/events (await it: async)

Every write takes an optional ``idempotency_key`` (pass your own to make a re-run of a whole script
safe too). Errors: :class:`ApiError` (refused; do not retry as is) and :class:`Unavailable` (still
failing transiently after ``retries``), both :class:`OpsyncError` with ``status`` and ``detail``;
:class:`TransactionFailed` when a waited-for transaction failed (dead-lettered, with its ``reason``),
:class:`WaitTimeout` (a ``TimeoutError``) when the wait ran out, naming the last state seen.
"""

import asyncio
import json
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date, datetime
from types import TracebackType
from typing import Annotated, Any, Generic, Self, TypeVar
from uuid import UUID

import httpx
from pydantic import BaseModel, ConfigDict, Field, field_validator

from opsync.config import Settings
from opsync.envelope import State

__all__ = [
    "MAX_RECORDS_PER_REQUEST",
    "ApiError",
    "AsyncOpsyncClient",
    "Following",
    "OpsyncClient",
    "OpsyncError",
    "Receipt",
    "State",
    "TransactionFailed",
    "TransactionStatus",
    "Unavailable",
    "WaitTimeout",
]

RETRY_STATUSES = frozenset({502, 503, 504})
TRANSIENT_ERRORS = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)

MAX_RECORDS_PER_REQUEST = Settings.model_fields["max_records_per_request"].default  # the API's default limit

Row = dict[str, Any]
ReceiptT = TypeVar("ReceiptT")  # what a write returns: a Receipt, or an awaitable of one
ReceiptsT = TypeVar("ReceiptsT")
StatusT = TypeVar("StatusT")


class OpsyncError(Exception):
    """Base of what this client raises: ``status`` (None when no answer came) and the API's ``detail``."""

    def __init__(self, status: int | None, detail: Any, method: str, path: str):
        super().__init__(f"{method} {path} -> {status or 'no answer'}: {detail}")
        self.status = status
        self.detail = detail


class ApiError(OpsyncError):
    """The API refused the request (4xx, or a 5xx that retrying cannot fix): retrying the same request won't help."""


class Unavailable(OpsyncError):
    """Still failing transiently after every retry (no connection, timeouts, 502/503/504): safe to try again later."""


class TransactionFailed(OpsyncError):
    """The transaction a wait followed failed for good (it is in the dead-letter stream): ``reason`` says why,
    ``detail`` is the event or status that said so."""

    def __init__(self, txn_id: str, detail: dict[str, Any]):
        self.txn_id, self.reason, self.status, self.detail = txn_id, detail.get("reason"), None, detail
        Exception.__init__(self, f"transaction {txn_id} failed (dead-lettered): {self.reason or 'no reason given'}")


class WaitTimeout(TimeoutError):
    """A wait ran out: ``txn_id``, the ``wanted`` state and the ``last`` one seen (None if none was)."""

    def __init__(self, txn_id: str, wanted: State, last: str | None, timeout: float):
        super().__init__(f"transaction {txn_id} not {wanted} within {timeout} s (last state seen: {last or 'none'})")
        self.txn_id, self.wanted, self.last = txn_id, wanted, last


class Receipt(BaseModel):
    """The API's ``202`` answer to a write (the server's :class:`opsync.envelope.Receipt`), times as datetimes;
    fields a newer server adds are kept, not refused."""

    model_config = ConfigDict(extra="allow")

    txn_id: UUID
    state: State
    ids: list[Annotated[UUID | str, Field(union_mode="left_to_right")]]  # a natural key (text) where it is no UUID
    accepted_at: datetime
    commit_lsn: str | None = None
    status_url: str

    @property
    def id(self) -> UUID | str:
        """The key of the only row of a one-row write."""
        (only,) = self.ids
        return only


class TransactionStatus(BaseModel):
    """``GET /v1/transactions/{txn_id}``: where a transaction is and when it got there; fields a newer server
    adds are kept, not refused."""

    model_config = ConfigDict(extra="allow")

    txn_id: UUID
    state: State
    accepted_at: datetime | None = None
    committed_at: datetime | None = None
    commit_lsn: str | None = None
    replicated_at: datetime | None = None
    failed_at: datetime | None = None
    reason: str | None = None
    tables: list[str] = []

    @field_validator("tables", mode="before")
    @classmethod
    def split(cls, value: Any) -> Any:
        """The server sends the tables comma-separated, as its status record holds them."""
        return [t for t in value.split(",") if t] if isinstance(value, str) else value

    def reached(self, wanted: State | str) -> bool:
        """Whether this is ``wanted`` or a state past it (``replicated`` is past ``committed``)."""
        return passed(self.state, State(wanted))


PROGRESS = (State.accepted, State.committed, State.replicated)  # a later state implies every earlier one
EVENTS = "/v1/events"
RECONNECT_S = 1.0  # the least pause before reopening a stream that ended or broke


def passed(state: str | None, wanted: State) -> bool:
    return state in PROGRESS and PROGRESS.index(State(state)) >= PROGRESS.index(wanted)


class Following:
    """One wait's logic, free of I/O so that the sync and the async client share it.

    The client opens ``GET /v1/events?txn_id=...`` and feeds each line to :meth:`line`, which parses the
    server-sent events and answers the state once it is the wanted one or past it. The stream opens with a
    snapshot of the transaction, so opening it never misses a change; when it ended or broke, the client
    pauses (:meth:`pause`: at least ``Retry-After`` after a 503), and before reopening asks the status
    endpoint once (:meth:`polled`), so a wait still ends if the stream cannot be had. ``failed`` raises
    :class:`TransactionFailed`, the token's end ``ApiError`` (401), the deadline :class:`WaitTimeout`.
    """

    def __init__(self, txn_id: UUID | str, state: State | str, timeout: float, clock: Callable[[], float] = time.monotonic):
        self.txn_id, self.wanted, self.timeout = str(txn_id), State(state), timeout
        if self.wanted not in PROGRESS:
            raise ValueError(f"cannot wait for {self.wanted}: wait for one of {', '.join(PROGRESS)}")
        self.clock = clock
        self.deadline = clock() + timeout
        self.last: str | None = None  # the last state seen
        self.retry_after: float | None = None  # the server's Retry-After of the last 503
        self.params = {"txn_id": self.txn_id}
        self.status_path = f"/v1/transactions/{self.txn_id}"
        self._event: str | None = None
        self._data: str | None = None

    def __iter__(self) -> Iterator[int]:
        """The attempts: the first always, then as long as time is left; 0 opens the stream, the others poll first."""
        attempt = 0
        while attempt == 0 or self.left() > 0:
            yield attempt
            attempt += 1

    def left(self) -> float:
        return max(0.0, self.deadline - self.clock())

    def timeouts(self) -> httpx.Timeout:
        """A stream may stay quiet up to the deadline (keep-alives come far sooner); connecting may not."""
        return httpx.Timeout(min(10.0, self.left() or 0.001), read=self.left() or 0.001)

    def opened(self, answer: httpx.Response) -> bool:
        """Whether the stream's answer (its body read when it is an error) is a stream to follow; a transient
        failure (502/503/504) is False, anything else refused raises :class:`ApiError` (404: unknown to the token)."""
        return self.usable(answer, EVENTS)

    def polled(self, answer: httpx.Response) -> State | None:
        """The status endpoint's answer: the state once wanted or past it, None while not (or not answering)."""
        return self.saw(answer.json()) if self.usable(answer, self.status_path) else None

    def line(self, line: str) -> State | None:
        """One line of the stream: an event completes at its blank line (comments, the keep-alives, are skipped;
        several ``data`` lines are one value, as the SSE standard joins them)."""
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "event":
            self._event = value
        elif field == "data":
            self._data = value if self._data is None else f"{self._data}\n{value}"
        elif line == "":
            name, data, self._event, self._data = self._event, self._data, None, None
            if data is not None:
                return self.event(name, json.loads(data))
        return None

    def event(self, name: str | None, data: Any) -> State | None:
        """Unnamed events are state changes; ``closed`` ends the stream for good (its token was revoked or expired);
        ``ready`` and ``unavailable`` are the stream's own news (the server resubscribes and sends a snapshot)."""
        if name == "closed":
            raise ApiError(401, data.get("detail", data), "GET", EVENTS)
        if name is None and isinstance(data, dict) and data.get("txn_id") == self.txn_id:
            return self.saw(data)
        return None

    def saw(self, change: dict[str, Any]) -> State | None:
        """A state the transaction is in (an event, or a status); a state this client does not know is no answer."""
        self.last = change.get("state")
        if self.last == State.failed:
            raise TransactionFailed(self.txn_id, change)
        return State(self.last) if isinstance(self.last, str) and passed(self.last, self.wanted) else None

    def usable(self, answer: httpx.Response, path: str) -> bool:
        if answer.status_code in RETRY_STATUSES:
            self.retry_after = seconds(answer.headers.get("Retry-After"))
            return False
        checked(answer, "GET", path)
        return True

    def pause(self) -> float:
        """How long to wait before the next attempt: ``RECONNECT_S``, or the server's ``Retry-After``, within the deadline."""
        pause, self.retry_after = max(RECONNECT_S, self.retry_after or 0.0), None
        return min(pause, self.left())

    def timed_out(self) -> WaitTimeout:
        return WaitTimeout(self.txn_id, self.wanted, self.last, self.timeout)


def encode(value: Any) -> str:
    """JSON with the types scripts naturally hold (UUIDs, aware datetimes) written as the API reads them."""

    def default(obj: Any) -> str:
        if isinstance(obj, (datetime, date)):
            return obj.isoformat()
        if isinstance(obj, UUID):
            return str(obj)
        raise TypeError(f"cannot encode {type(obj).__name__} as JSON")

    return json.dumps(value, default=default)


@dataclass(frozen=True)
class Call:
    """One logical API call, built once into a request that every retry re-sends unchanged (same Idempotency-Key)."""

    method: str
    path: str
    parse: Callable[[Any], Any]
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)

    def request(self, http: httpx.Client | httpx.AsyncClient) -> httpx.Request:
        content = None if self.body is None else encode(self.body)
        return http.build_request(self.method, self.path, content=content, headers=self.headers)


def write(method: str, path: str, body: Any, idempotency_key: str | None) -> Call:
    """A write, keyed so that a retry after a lost answer replays the original instead of writing twice."""
    return Call(method, path, Receipt.model_validate, body, {"Idempotency-Key": idempotency_key or str(uuid.uuid4())})


def chunked(rows: list[Row], size: int) -> list[list[Row]]:
    if size < 1:
        raise ValueError(f"batch size must be at least 1, got {size}")
    return [rows[start : start + size] for start in range(0, len(rows), size)]


class Attempts:
    """One call's retry discipline, free of I/O so that the sync and the async client share it.

    Iterating numbers the attempts; ``guard`` swallows a transient failure (no answer, 502/503/504)
    while attempts remain, so the loop pauses and tries again, and raises it as :class:`Unavailable`
    after the last. Any other answer ends the loop: parsed on success, :class:`ApiError` otherwise.
    """

    def __init__(self, call: Call, retries: int):
        self.call = call
        self.retries = retries
        self.attempt = 0
        self.retry_after: float | None = None  # the server's Retry-After of the last transient answer

    def __iter__(self) -> Iterator[int]:
        for attempt in range(self.retries + 1):
            self.attempt = attempt
            yield attempt

    @contextmanager
    def guard(self) -> Iterator[None]:
        try:
            yield
        except TRANSIENT_ERRORS as exc:
            self.failed(Unavailable(None, repr(exc), self.call.method, self.call.path))
        except Unavailable as exc:
            self.failed(exc)

    def failed(self, failure: Unavailable) -> None:
        if self.attempt == self.retries:
            raise failure

    def settle(self, response: httpx.Response) -> Any:
        method, path = self.call.method, self.call.path
        if response.status_code in RETRY_STATUSES:
            self.retry_after = seconds(response.headers.get("Retry-After"))
            raise Unavailable(response.status_code, detail(response), method, path)
        return self.call.parse(checked(response, method, path).json())


class Endpoints(Generic[ReceiptT, ReceiptsT, StatusT]):
    """The API's calls, written once for both clients: each sends a :class:`Call` its own way (blocking or awaitable)."""

    def __init__(self, retries: int, backoff: float, max_backoff: float):
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._jitter = random.Random()

    def records(self, table: str, rows: Row | list[Row], idempotency_key: str | None = None) -> ReceiptT:
        """Record one row or a list of rows of ``table`` in one transaction."""
        return self._send(write("POST", f"/v1/records/{table}", rows, idempotency_key))

    def batches(self, table: str, rows: list[Row], size: int = MAX_RECORDS_PER_REQUEST, idempotency_key: str | None = None) -> ReceiptsT:
        """Record a long list as consecutive transactions of at most ``size`` rows (the API refuses longer lists).

        A failure leaves the chunks before it recorded; with ``idempotency_key`` (chunk *i* uses
        ``{key}/{i}``) running the same call again replays those chunks instead of duplicating them.
        """
        path = f"/v1/records/{table}"
        chunks = enumerate(chunked(rows, size))
        return self._send_all([write("POST", path, chunk, idempotency_key and f"{idempotency_key}/{i}") for i, chunk in chunks])

    def transaction(self, steps: list[Row], idempotency_key: str | None = None) -> ReceiptT:
        """Several steps, all or nothing; a step's values may use ``{"$ref": name}`` for an earlier step's key."""
        return self._send(write("POST", "/v1/transactions", {"steps": steps}, idempotency_key))

    def update(self, table: str, id: UUID | str, values: Row, idempotency_key: str | None = None) -> ReceiptT:
        """Change fields of a row, whether it is still buffered at the site or already in the primary."""
        return self._send(write("PATCH", f"/v1/records/{table}/{id}", values, idempotency_key))

    def delete(self, table: str, id: UUID | str, idempotency_key: str | None = None) -> ReceiptT:
        return self._send(write("DELETE", f"/v1/records/{table}/{id}", None, idempotency_key))

    def status(self, txn_id: UUID | str) -> StatusT:
        """Where a transaction is now: its :class:`State` (accepted, committed, replicated, failed), ``commit_lsn``,
        the time of each transition and, once failed, the ``reason``."""
        return self._send(Call("GET", f"/v1/transactions/{txn_id}", TransactionStatus.model_validate))

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Full jitter, so scripts retrying after the same outage do not hit the API in lockstep; never
        sooner than the server's ``Retry-After`` (capped at ``max_backoff``), which says when it expects room."""
        jittered = self._jitter.uniform(0, min(self.max_backoff, self.backoff * 2**attempt))
        return max(jittered, min(retry_after or 0.0, self.max_backoff))

    def _send(self, call: Call) -> Any:
        raise NotImplementedError

    def _send_all(self, calls: list[Call]) -> Any:
        raise NotImplementedError


def http_options(base_url: str, token: str, timeout: float) -> dict[str, Any]:
    return {
        "base_url": base_url,
        "headers": {"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        "timeout": timeout,
    }


class OpsyncClient(Endpoints[Receipt, list[Receipt], TransactionStatus]):
    """Writes records to the ingest API; ``with OpsyncClient(url, token) as client: ...``."""

    def __init__(
        self,
        base_url: str,
        token: str,
        timeout: float = 10.0,
        retries: int = 5,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ):
        super().__init__(retries, backoff, max_backoff)
        self._sleep = sleep
        self._http = httpx.Client(**http_options(base_url, token, timeout), transport=transport)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, call: Call) -> Any:
        request, attempts = call.request(self._http), Attempts(call, self.retries)
        for attempt in attempts:
            with attempts.guard():
                return attempts.settle(self._http.send(request))
            self._sleep(self.delay(attempt, attempts.retry_after))

    def _send_all(self, calls: list[Call]) -> list[Any]:
        return [self._send(call) for call in calls]

    def wait(self, txn_id: UUID | str, state: State | str = State.replicated, timeout: float = 60.0) -> State:
        """Block until the transaction is ``state`` or past it, and return where it is.

        Follows ``GET /v1/events`` rather than polling (see :class:`Following`) until ``timeout`` seconds have
        passed, then :class:`WaitTimeout`; :class:`TransactionFailed` if it failed. The deadline is checked at
        each line of the stream, so it may pass by up to the server's keep-alive interval (15 s by default)."""
        following = Following(txn_id, state, timeout)
        for attempt in following:
            try:
                if now := self._follow_once(following, attempt):
                    return now
            except TRANSIENT_ERRORS:
                pass
            self._sleep(following.pause())
        raise following.timed_out()

    def _follow_once(self, following: Following, attempt: int) -> State | None:
        """One attempt of :meth:`wait`: the status first when reopening, then the stream until it ends or time is up."""
        if attempt and (now := following.polled(self._http.get(following.status_path, timeout=following.timeouts()))):
            return now
        with self._http.stream("GET", EVENTS, params=following.params, timeout=following.timeouts()) as answer:
            if not answer.is_success:
                answer.read()
            if following.opened(answer):
                for line in answer.iter_lines():
                    if (now := following.line(line)) or not following.left():
                        return now
        return None


class AsyncOpsyncClient(Endpoints[Awaitable[Receipt], Awaitable[list[Receipt]], Awaitable[TransactionStatus]]):
    """The same calls for asyncio code, each awaited: ``async with AsyncOpsyncClient(url, token) as client: ...``."""

    def __init__(
        self,
        base_url: str,
        token: str,
        timeout: float = 10.0,
        retries: int = 5,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ):
        super().__init__(retries, backoff, max_backoff)
        self._sleep = sleep
        self._http = httpx.AsyncClient(**http_options(base_url, token, timeout), transport=transport)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, call: Call) -> Any:
        request, attempts = call.request(self._http), Attempts(call, self.retries)
        for attempt in attempts:
            with attempts.guard():
                return attempts.settle(await self._http.send(request))
            await self._sleep(self.delay(attempt, attempts.retry_after))

    async def _send_all(self, calls: list[Call]) -> list[Any]:
        """One after the other: the stream keeps the order of the chunks, as one long list would have."""
        return [await self._send(call) for call in calls]

    async def wait(self, txn_id: UUID | str, state: State | str = State.replicated, timeout: float = 60.0) -> State:
        """Until the transaction is ``state`` or past it, the state it is in, as :meth:`OpsyncClient.wait`
        (here the deadline is kept to the moment: a quiet stream is cancelled)."""
        following = Following(txn_id, state, timeout)
        for attempt in following:
            try:
                async with asyncio.timeout(following.left()):
                    if now := await self._follow_once(following, attempt):
                        return now
            except (*TRANSIENT_ERRORS, TimeoutError):
                pass
            await self._sleep(following.pause())
        raise following.timed_out()

    async def _follow_once(self, following: Following, attempt: int) -> State | None:
        """One attempt of :meth:`wait`: the status first when reopening, then the stream until it ends."""
        if attempt and (now := following.polled(await self._http.get(following.status_path, timeout=following.timeouts()))):
            return now
        async with self._http.stream("GET", EVENTS, params=following.params, timeout=following.timeouts()) as answer:
            if not answer.is_success:
                await answer.aread()
            if following.opened(answer):
                async for line in answer.aiter_lines():
                    if now := following.line(line):
                        return now
        return None


def seconds(retry_after: str | None) -> float | None:
    """A ``Retry-After`` in seconds (the API sends seconds; an HTTP date from a proxy is ignored)."""
    try:
        return max(0.0, float(retry_after)) if retry_after else None
    except ValueError:
        return None


def detail(response: httpx.Response) -> Any:
    """The API's ``detail`` (FastAPI's error shape), else whatever the body is (e.g. a proxy's error page)."""
    try:
        body = response.json()
    except ValueError:
        return response.text
    return body.get("detail", body) if isinstance(body, dict) else body


def checked(response: httpx.Response, method: str, path: str) -> httpx.Response:
    if response.is_success:
        return response
    raise ApiError(response.status_code, detail(response), method, path)
