"""``opsync``: the operators' command line, one group of subcommands per area (``tokens`` so far).

Output is for people by default (tables, messages) and for scripts with ``--json``; either way
data goes to stdout and messages to stderr. Exit codes scripts can rely on: 0 ok, 1 error (such
as the primary being unreachable), 2 usage (a bad option, scope or date), 4 not found, 5 already
exists.
"""

import json
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

import click
from psycopg.errors import UniqueViolation
from rich.console import Console
from rich.table import Column, Table
from sqlalchemy import Engine, create_engine, make_url
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from opsync import auth, tokens
from opsync.config import get_settings

CONNECT_TIMEOUT_S = 10  # the primary is across the WAN: slow is normal, but never hang
IN_DAYS = re.compile(r"(\d+)d")
A_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
PIPE_WIDTH = 1000  # piped to grep or a file there is no terminal to fit: keep each token on one line


class NotFound(click.ClickException):
    exit_code = 4


class AlreadyExists(click.ClickException):
    exit_code = 5


class ScopeType(click.ParamType):
    """Refuses a misspelt scope at once (exit 2): it would otherwise grant nothing, silently."""

    name = "SCOPE"

    def convert(self, value: str, param, ctx) -> str:
        try:
            return tokens.check_scope(value)
        except tokens.InvalidScope as exc:
            self.fail(str(exc), param, ctx)

    def shell_complete(self, ctx, param, incomplete: str) -> list:
        return [click.shell_completion.CompletionItem(s) for s in tokens.all_scopes() if s.startswith(incomplete)]


def parse_expiry(text: str, now: datetime) -> datetime:
    """``90d`` from now, a date (00:00 UTC that day) or an ISO time with its UTC offset (a naive one is ambiguous)."""
    if match := IN_DAYS.fullmatch(text):
        try:
            return now + timedelta(days=int(match[1]))
        except OverflowError:  # past year 9999: a usage error, not a traceback
            raise ValueError(f"{text!r} is too far in the future") from None
    if A_DATE.fullmatch(text):
        return datetime.combine(date.fromisoformat(text), time(), UTC)
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        raise ValueError(f"{text!r} has no UTC offset; add one, e.g. {text}Z")
    return moment


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


def first_line(exc: DBAPIError) -> str:
    return str(exc.orig).strip().splitlines()[0]


@contextmanager
def primary() -> Iterator[Engine]:
    """The primary, with database failures turned into one clear line and exit 1 instead of a traceback."""
    url = make_url(get_settings().primary_url.get_secret_value())
    engine = create_engine(url, connect_args={"connect_timeout": CONNECT_TIMEOUT_S})
    try:
        yield engine
    except OperationalError as exc:
        where = url.render_as_string(hide_password=True)
        raise click.ClickException(f"cannot reach the primary ({where}): {first_line(exc)}") from None
    except DBAPIError as exc:
        raise click.ClickException(f"the primary refused: {first_line(exc)}") from None
    finally:
        engine.dispose()


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts instead of text.")


def echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2))


def say(message: str) -> None:
    """A message for the person at the terminal; stderr, so it never mixes with the data a script reads."""
    click.echo(message, err=True)


def when(moment: datetime | None, absent: str = "") -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC") if moment else absent


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Operate an opsync site. Exit codes: 0 ok, 1 error, 2 usage, 4 not found, 5 already exists."""


@main.group("tokens")
def tokens_group() -> None:
    """Bearer tokens of the ingest API's scripts: issued on the primary, checked at the site."""


@tokens_group.command()
@click.argument("name")
@click.option("--scope", "scopes", type=ScopeType(), multiple=True, required=True,
              help=f"{tokens.ADMIN}, read:TABLE or write:TABLE; repeat for several.")
@click.option("--expires", type=ExpiryType(), help="90d from now, a date (00:00 UTC) or an ISO time; default never.")
@json_option
def create(name: str, scopes: tuple[str, ...], expires: datetime | None, as_json: bool) -> None:
    """Issue a token NAME; it is printed once, to stdout, and never stored (only its hash is)."""
    scopes = list(dict.fromkeys(scopes))
    with primary() as engine:
        try:
            token = auth.create_token(engine, name, scopes, expires)
        except IntegrityError as exc:
            if not isinstance(exc.orig, UniqueViolation):
                raise
            raise AlreadyExists(f"a token named {name!r} exists already (names are never reused, even revoked)") from None
    if as_json:
        echo_json({"name": name, "token": token, "scopes": scopes, "expires_at": expires and expires.isoformat()})
    else:
        click.echo(token)
    say(f"Token {name!r} ({', '.join(scopes)}; expires {when(expires, 'never')}) is shown this once: "
        "opsync keeps only its hash, so store it now.")


@tokens_group.command("list")
@json_option
def list_(as_json: bool) -> None:
    """Every token issued (revoked ones too), without its hash."""
    with primary() as engine:
        found = tokens.list_tokens(engine)
    if as_json:
        echo_json([info.as_json() for info in found])
        return
    fold = {"overflow": "fold"}  # never "…": the name is what `revoke` needs, the scopes what it grants
    table = Table(Column("name", **fold), "state", Column("scopes", **fold), "created", "expires", "revoked", "last used")
    for info in found:
        table.add_row(
            info.name, info.state, " ".join(info.scopes), when(info.created_at),
            when(info.expires_at, "never"), when(info.revoked_at), when(info.last_used_at, "never"),
        )
    Console(soft_wrap=True, width=None if sys.stdout.isatty() else PIPE_WIDTH).print(table)


@tokens_group.command()
@click.argument("name")
@json_option
def revoke(name: str, as_json: bool) -> None:
    """Revoke the token NAME; revoking one already revoked changes nothing and succeeds."""
    with primary() as engine:
        changed = auth.revoke_token(engine, name)
        info = tokens.find_token(engine, name)
    if info is None:
        raise NotFound(f"no token named {name!r}")
    if as_json:
        echo_json(info.as_json() | {"changed": changed})
    state = "revoked" if changed else "was already revoked"
    say(f"Token {name!r} {state} at {when(info.revoked_at)}; sites refuse it once their replica has replayed "
        f"this and their token cache ({get_settings().token_cache_ttl_s:g} s) has expired.")
