"""Error answers that cannot fail to serialise, whatever input they echo.

An error often quotes the request (a validation problem's ``input``, a key in its ``loc``), and
the request may hold what JSON cannot carry: an unpaired UTF-16 surrogate, NaN or Infinity,
bytes that are not UTF-8, nesting deeper than any encoder recurses. Rendering such an answer
used to raise, so the client got a ``500`` for its own bad input; here each is made printable.
"""

import math
from typing import Any

from fastapi.responses import JSONResponse

from opsync.config import get_settings

MAX_ECHO_DEPTH = 40  # past the deepest value a record may hold (settings.max_json_depth), so a refusal still shows where it is
DEEPER = "…"


def printable(value: Any, depth: int = 0) -> Any:
    """``value`` as JSON can carry it: surrogates and undecodable bytes escaped as text, non-finite
    numbers as their names, other objects as ``str``, containers cut at ``MAX_ECHO_DEPTH`` levels."""
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode() if not value.isascii() else value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, bytes | bytearray):
        return value.decode("utf-8", "backslashreplace")
    if isinstance(value, dict | list | tuple):
        if depth >= MAX_ECHO_DEPTH:
            return DEEPER
        if isinstance(value, dict):
            return {str(printable(k)): printable(v, depth + 1) for k, v in value.items()}
        return [printable(item, depth + 1) for item in value]
    return printable(str(value))


class ErrorResponse(JSONResponse):
    """A JSON error answer whose content is made :func:`printable` first."""

    def render(self, content: Any) -> bytes:
        return super().render(printable(content))


def error(status: int, detail: Any, headers: dict | None = None) -> ErrorResponse:
    """The documented error model, ``{"detail": ...}``; a ``503`` always says when to retry."""
    if status == 503:
        headers = {"Retry-After": str(get_settings().retry_after_s)} | (headers or {})
    return ErrorResponse({"detail": detail}, status_code=status, headers=headers)
