"""A small client for the ingest API, for the scripts that record observations at the site.

The site's network is unreliable: a request may time out after the API has already buffered it.
Every write therefore carries an ``Idempotency-Key`` (fresh per logical call, the same on each of
its retries), so retrying is always safe, and the client retries transient failures on its own
with exponential backoff and jitter. A 4xx means the request itself is wrong: it is raised at
once, never retried.
"""

import json
import random
import time
import uuid
from collections.abc import Callable
from datetime import date, datetime
from types import TracebackType
from typing import Any, Self
from uuid import UUID

import httpx

from opsync.envelope import Receipt

RETRY_STATUSES = frozenset({502, 503, 504})
TRANSIENT_ERRORS = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)

Row = dict[str, Any]


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


def encode(value: Any) -> str:
    """JSON with the types scripts naturally hold (UUIDs, aware datetimes) written as the API reads them."""

    def default(obj: Any) -> str:
        if isinstance(obj, (datetime, date)):
            return obj.isoformat()
        if isinstance(obj, UUID):
            return str(obj)
        raise TypeError(f"cannot encode {type(obj).__name__} as JSON")

    return json.dumps(value, default=default)


class OpsyncClient:
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
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._sleep = sleep
        self._jitter = random.Random()
        self._http = httpx.Client(
            base_url=base_url,
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            timeout=timeout,
            transport=transport,
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def records(self, table: str, rows: Row | list[Row], idempotency_key: str | None = None) -> Receipt:
        """Record one row or a list of rows of ``table`` in one transaction."""
        return self._write("POST", f"/v1/records/{table}", rows, idempotency_key)

    def transaction(self, steps: list[Row], idempotency_key: str | None = None) -> Receipt:
        """Several steps, all or nothing; a step's values may use ``{"$ref": name}`` for an earlier step's key."""
        return self._write("POST", "/v1/transactions", {"steps": steps}, idempotency_key)

    def update(self, table: str, id: UUID | str, values: Row, idempotency_key: str | None = None) -> Receipt:
        """Change fields of a row, whether it is still buffered at the site or already in the primary."""
        return self._write("PATCH", f"/v1/records/{table}/{id}", values, idempotency_key)

    def delete(self, table: str, id: UUID | str, idempotency_key: str | None = None) -> Receipt:
        return self._write("DELETE", f"/v1/records/{table}/{id}", None, idempotency_key)

    def status(self, txn_id: UUID | str) -> dict[str, str]:
        """Where a transaction is now: ``state`` (accepted, committed, replicated, failed) and its times."""
        return self._request("GET", f"/v1/transactions/{txn_id}", None, {}).json()

    def _write(self, method: str, path: str, body: Any, idempotency_key: str | None) -> Receipt:
        headers = {"Idempotency-Key": idempotency_key or str(uuid.uuid4())}
        return Receipt.model_validate(self._request(method, path, body, headers).json())

    def _request(self, method: str, path: str, body: Any, headers: dict[str, str]) -> httpx.Response:
        """Send, retrying transient failures; the same headers (and so the same key) on every attempt."""
        content = None if body is None else encode(body)
        failure = Unavailable(None, "no attempt made", method, path)
        for attempt in range(self.retries + 1):
            if attempt:
                self._sleep(self.delay(attempt - 1))
            try:
                response = self._http.request(method, path, content=content, headers=headers)
            except TRANSIENT_ERRORS as exc:
                failure = Unavailable(None, repr(exc), method, path)
                continue
            if response.status_code not in RETRY_STATUSES:
                return checked(response, method, path)
            failure = Unavailable(response.status_code, detail(response), method, path)
        raise failure

    def delay(self, attempt: int) -> float:
        """Full jitter: many scripts retrying after the same outage must not hit the API in lockstep."""
        return self._jitter.uniform(0, min(self.max_backoff, self.backoff * 2**attempt))


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
