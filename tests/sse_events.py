"""Reading a server-sent event stream in tests, with deadlines so no test can hang on a quiet stream."""

import json
import time

import httpx


class Events:
    """The events of one open stream as ``(name, data)``, comments (keep-alives) skipped."""

    def __init__(self, response: httpx.Response):
        assert response.status_code == 200, response.read()
        self.lines = response.iter_lines()

    def next(self, timeout: float = 15) -> tuple[str | None, dict] | None:
        """The next event; None once the server ended the stream."""
        deadline = time.monotonic() + timeout
        name, data = None, None
        for line in self.lines:  # the tests' keep-alives (every second) bound each wait
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                data = json.loads(line.removeprefix("data: "))
            elif line == "" and data is not None:
                return name, data
            assert time.monotonic() < deadline, "no event in time"
        return None

    def until(self, predicate, timeout: float = 10) -> tuple[str | None, dict]:
        """The first event ``predicate(name, data)`` accepts."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            event = self.next(deadline - time.monotonic())
            assert event is not None, "the stream ended"
            if predicate(*event):
                return event
        raise AssertionError("no matching event in time")
