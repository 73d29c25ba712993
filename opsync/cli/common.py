"""What every ``opsync`` command shares: the exit codes and the errors that carry them, ``--json``, output for
people (stderr) and for scripts (stdout), and the times an option takes.
"""

import json
import re
import sys
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

import click
from rich.console import Console

AGO = re.compile(r"(\d+)([mhd])")
IN_DAYS = re.compile(r"(\d+)d")
UNITS = {"m": "minutes", "h": "hours", "d": "days"}
A_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
PIPE_WIDTH = 1000  # piped to grep or a file there is no terminal to fit: keep each token on one line


ERROR, USAGE, DEGRADED, NOT_FOUND, UNAVAILABLE, EXISTS, INTERRUPTED = 1, 2, 3, 4, 5, 6, 130
EXIT_CODES = {
    0: "ok",
    ERROR: "error: the primary or Redis refused, or a confirmation was declined",
    USAGE: "usage: a bad option or argument (a misspelt scope, a date without UTC offset)",
    DEGRADED: "degraded: status found a part unreachable or a --max-* limit passed; replay found changes of its range purged",
    NOT_FOUND: "not found: no such token, dead-lettered transaction or read model",
    UNAVAILABLE: "unavailable: Redis, the primary or the replica cannot be reached; nothing was changed half-way, run it again later",
    EXISTS: "already exists: a token name (names are never reused)",
    INTERRUPTED: "interrupted: Ctrl-C stopped backlog drain between batches",
}


class NotFound(click.ClickException):
    exit_code = NOT_FOUND


class Unavailable(click.ClickException):
    exit_code = UNAVAILABLE


class AlreadyExists(click.ClickException):
    exit_code = EXISTS


def shifted(now: datetime, text: str, **delta: int) -> datetime:
    try:
        return now + timedelta(**delta)
    except OverflowError:  # past year 1 or 9999: a usage error, not a traceback
        raise ValueError(f"{text!r} is too far in the {'future' if sum(delta.values()) > 0 else 'past'}") from None


def parse_absolute(text: str) -> datetime:
    """A date (00:00 UTC that day) or an ISO time with its UTC offset (a naive one is ambiguous)."""
    if A_DATE.fullmatch(text):
        return datetime.combine(date.fromisoformat(text), time(), UTC)
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        raise ValueError(f"{text!r} has no UTC offset; add one, e.g. {text}Z")
    return moment


def parse_expiry(text: str, now: datetime) -> datetime:
    """``90d`` from now, or :func:`parse_absolute`."""
    if match := IN_DAYS.fullmatch(text):
        return shifted(now, text, days=int(match[1]))
    return parse_absolute(text)


def parse_moment(text: str, now: datetime) -> datetime:
    """``90m``, ``6h`` or ``3d`` ago, or :func:`parse_absolute`."""
    if match := AGO.fullmatch(text):
        return shifted(now, text, **{UNITS[match[2]]: -int(match[1])})
    return parse_absolute(text)


class ExpiryType(click.ParamType):
    name = "expiry"

    def convert(self, value: str, param, ctx) -> datetime:
        now = datetime.now(UTC)
        try:
            moment = parse_expiry(value, now)
        except ValueError as exc:
            self.fail(f"{exc} (expected e.g. 90d, 2027-03-31 or 2027-03-31T12:00Z)", param, ctx)
        if moment <= now:
            self.fail(f"{value} is not in the future", param, ctx)
        return moment


class MomentType(click.ParamType):
    name = "time"

    def convert(self, value: str, param, ctx) -> datetime:
        try:
            return parse_moment(value, datetime.now(UTC))
        except ValueError as exc:
            self.fail(f"{exc} (expected e.g. 6h, 3d, 2026-11-21 or 2026-11-21T03:00Z)", param, ctx)


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts instead of text.")


def echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2))


def say(message: str) -> None:
    """A message for the person at the terminal; stderr, so it never mixes with the data a script reads."""
    click.echo(message, err=True)


def console() -> Console:
    """Rich output sized to the terminal, or unwrapped when piped (to grep or a file)."""
    return Console(soft_wrap=True, width=None if sys.stdout.isatty() else PIPE_WIDTH)


def when(moment: datetime | None, absent: str = "") -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC") if moment else absent
