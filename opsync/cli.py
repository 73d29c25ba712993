"""``opsync``: the operators' command line, one group of subcommands per area (``tokens``, ``dlq``)
plus ``status``.

Output is for people by default (tables, messages) and for scripts with ``--json``; either way
data goes to stdout and messages to stderr. Exit codes scripts can rely on: 0 ok, 1 error (such
as the primary being unreachable), 2 usage (a bad option, scope or date), 3 degraded (``status``:
some part unreachable), 4 not found, 5 already exists.
"""

import getpass
import json
import re
import sys
import time as clock
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

import click
import redis
from psycopg.errors import UniqueViolation
from rich.console import Console
from rich.table import Column, Table
from sqlalchemy import Engine, create_engine, make_url
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.pool import NullPool

from opsync import auth, dlq, tokens
from opsync.buffer import Buffer
from opsync.config import get_settings
from opsync.status import SiteStatus, site_status

CONNECT_TIMEOUT_S = 10  # the primary is across the WAN: slow is normal, but never hang
IN_DAYS = re.compile(r"(\d+)d")
A_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
PIPE_WIDTH = 1000  # piped to grep or a file there is no terminal to fit: keep each token on one line
DEGRADED = 3  # exit code of `status` when a part is unreachable
REDIS_TIMEOUT_S = 5  # Redis is local to the site: an answer takes milliseconds


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


def console() -> Console:
    """Rich output sized to the terminal, or unwrapped when piped (to grep or a file)."""
    return Console(soft_wrap=True, width=None if sys.stdout.isatty() else PIPE_WIDTH)


def when(moment: datetime | None, absent: str = "") -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC") if moment else absent


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Operate an opsync site.

    Exit codes: 0 ok, 1 error, 2 usage, 3 degraded (status: a part is unreachable), 4 not found,
    5 already exists.
    """


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
    console().print(table)


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


# --- the site's state: `status` and the dead-letter queue -------------------------------------------


def site_buffer() -> Buffer:
    """The site buffer with short timeouts: an unreachable Redis must end in a message, not a hang."""
    settings = get_settings()
    client = redis.Redis.from_url(
        settings.redis_url.get_secret_value(), socket_connect_timeout=REDIS_TIMEOUT_S, socket_timeout=REDIS_TIMEOUT_S
    )
    return Buffer(client, idempotency_ttl_s=settings.idempotency_ttl_s, status_ttl_s=settings.status_ttl_s)


@contextmanager
def buffer_or_exit() -> Iterator[Buffer]:
    """The site buffer, with Redis failures turned into one clear line and exit 1."""
    buffer = site_buffer()
    try:
        yield buffer
    except redis.RedisError as exc:
        raise click.ClickException(f"cannot use the site buffer (Redis): {exc}") from None
    finally:
        buffer.client.close()


def database(url: str) -> Engine:
    """A fresh connection per measurement (no pool): a link that died between two refreshes cannot hang one."""
    return create_engine(url, poolclass=NullPool, connect_args={"connect_timeout": CONNECT_TIMEOUT_S})


@main.command()
@click.option("--watch", type=float, is_flag=False, flag_value=2.0, metavar="[SECONDS]",
              help="Refresh every SECONDS (2 if omitted) until Ctrl-C.")
@json_option
def status(watch: float | None, as_json: bool) -> None:
    """Buffer depth, oldest buffered age, committed-not-replicated, replica lag, dead letters.

    Exits 3 when Redis, the primary or the replica cannot be reached (shown as unavailable).
    """
    settings = get_settings()
    buffer = site_buffer()
    primary_db, replica_db = database(settings.primary_url.get_secret_value()), database(settings.replica_url.get_secret_value())
    report = None
    try:
        while True:
            report = site_status(buffer, primary_db, replica_db, slot=settings.site)
            show_status(report, as_json, refresh=watch is not None)
            if watch is None:
                break
            clock.sleep(watch)
    except KeyboardInterrupt:  # the way out of --watch
        if report is None:
            raise click.Abort() from None
    finally:
        buffer.client.close()
    if report.degraded:
        click.get_current_context().exit(DEGRADED)


def show_status(report: SiteStatus, as_json: bool, refresh: bool) -> None:
    if as_json:
        click.echo(json.dumps(report.as_json(), indent=None if refresh else 2))  # --watch: one JSON line per refresh
        return
    if refresh and sys.stdout.isatty():
        click.clear()
    table = Table("", "", show_header=False, box=None, title=f"opsync status at {datetime.fromisoformat(report.at):%Y-%m-%d %H:%M:%S} UTC")
    for figure, value in status_rows(report):
        table.add_row(figure, value)
    console().print(table)


def ago(seconds: float | None) -> str:
    return "never" if seconds is None else f"{seconds:.0f} s ago"


def status_rows(report: SiteStatus) -> list[tuple[str, str]]:
    b, rows = report.buffer, []
    if b is not None:
        rows += [
            ("buffered", f"{b.depth} ({b.pending} claimed by a drainer)"),
            ("oldest buffered", f"{b.oldest_age_s:.0f} s"),
            ("committed, not replicated", str(b.awaiting_replica)),
            ("dead letters", str(b.dead_letters) + (" (see opsync dlq list)" if b.dead_letters else "")),
            ("last drain", ago(b.last_drain_s)),
            ("last confirm", ago(b.last_confirm_s)),
        ]
    lag = "unknown" if report.lag_bytes is None else f"{report.lag_bytes} bytes"
    if report.lag_s is not None:
        lag += f", {report.lag_s:.1f} s"
    if report.lag_from == "slot":
        lag += " (from the replication slot: the replica is down)"
    rows.append(("replica lag", lag))
    rows += [(part, f"[red]unavailable[/]: {why}") for part, why in report.unavailable.items()]
    return rows


@main.group("dlq")
def dlq_group() -> None:
    """Dead-lettered transactions: see why they failed, requeue them once fixed, or discard them."""


def by_option(func):
    return click.option("--by", default=getpass.getuser, show_default="your OS user",
                        help="Who acts, for the audit.")(func)


yes_option = click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")


def find_dead(buffer: Buffer, txn: str) -> dlq.DeadLetter:
    try:
        return dlq.find(buffer, txn)
    except dlq.UnknownTransaction as exc:
        raise NotFound(str(exc)) from None


@dlq_group.command("list")
@json_option
def dlq_list(as_json: bool) -> None:
    """Every dead-lettered transaction, oldest first, with the database's reason."""
    with buffer_or_exit() as buffer:
        letters = dlq.dead_letters(buffer)
    if as_json:
        echo_json([letter.summary() for letter in letters])
        return
    table = Table("txn_id", "failed", "tables", "steps", Column("reason", overflow="fold"))
    for letter in letters:
        table.add_row(letter.txn_id or letter.entry_id, when(parse_time(letter.failed_at)), " ".join(letter.tables),
                      str(len(letter.txn.steps) if letter.txn else 0), letter.reason)
    console().print(table)
    say(f"{len(letters)} dead-lettered")


@dlq_group.command("show")
@click.argument("txn")
@json_option
def dlq_show(txn: str, as_json: bool) -> None:
    """One dead-lettered transaction TXN: why it failed, its steps, and what failed because of it."""
    with buffer_or_exit() as buffer:
        letter = find_dead(buffer, txn)
        blocked = dlq.dependants(buffer, letter.txn_id) if letter.txn_id else []
    details = letter.details() | {"dependants": [d.txn_id for d in blocked]}
    if as_json:
        echo_json(details)
        return
    for name in ("txn_id", "entry_id", "site", "accepted_at", "failed_at", "reason"):
        click.echo(f"{name + ':':13} {details[name] or ''}")
    table = Table("op", "table", "key", Column("values", overflow="fold"))
    for step in details["steps"]:
        table.add_row(step["op"], step["table"], step["key"], json.dumps(step["values"]))
    console().print(table)
    if blocked:
        click.echo("dependants:   " + " ".join(details["dependants"]) + " (requeued with it)")


@dlq_group.command("requeue")
@click.argument("txn")
@click.option("--no-dependants", is_flag=True, help="Requeue TXN alone, not what failed because of it.")
@yes_option
@by_option
@json_option
def dlq_requeue(txn: str, no_dependants: bool, yes: bool, by: str, as_json: bool) -> None:
    """Requeue TXN once its cause is fixed, then its dependants: the next drain applies them, exactly once."""
    with buffer_or_exit() as buffer:
        if not yes:
            confirm_action(buffer, txn, "Requeue it into the buffer" + ("" if no_dependants else ", with its dependants") + "?")
        try:
            actions = dlq.requeue(buffer, txn, by, with_dependants=not no_dependants)
        except dlq.UnknownTransaction as exc:
            raise NotFound(str(exc)) from None
        except dlq.CannotRequeue as exc:
            raise click.ClickException(str(exc)) from None
    report(actions, as_json, "requeued (the next drain applies it)", "was requeued already")


@dlq_group.command("discard")
@click.argument("txn")
@yes_option
@by_option
@json_option
def dlq_discard(txn: str, yes: bool, by: str, as_json: bool) -> None:
    """Give TXN up for good: it is never applied, and its rows leave the merged view."""
    with buffer_or_exit() as buffer:
        if not yes:
            confirm_action(buffer, txn, "Discard it for good?")
        try:
            action = dlq.discard(buffer, txn, by)
        except dlq.UnknownTransaction as exc:
            raise NotFound(str(exc)) from None
        blocked = dlq.dependants(buffer, action.txn_id)
    report([action], as_json, "discarded", "was discarded already")
    if blocked:
        say(f"{len(blocked)} dead-lettered transactions depended on it and stay dead-lettered.")


@dlq_group.command("history")
@click.option("--limit", default=100, show_default=True, help="How many of the latest actions.")
@json_option
def dlq_history(limit: int, as_json: bool) -> None:
    """The latest requeues and discards, newest first: who, when, and why the transaction had failed."""
    with buffer_or_exit() as buffer:
        entries = dlq.history(buffer, limit)
    if as_json:
        echo_json(entries)
        return
    table = Table("at", "action", "by", "txn_id", Column("reason", overflow="fold"))
    for entry in entries:
        table.add_row(when(parse_time(entry["at"])), entry["action"], entry["by"], entry["txn_id"], entry["reason"])
    console().print(table)


def confirm_action(buffer: Buffer, txn: str, question: str) -> None:
    """Show what is about to change, and what failed because of it, then ask (on stderr)."""
    try:
        letter = dlq.find(buffer, txn)
    except dlq.UnknownTransaction:
        return  # requeued or discarded already, or unknown: the action itself says which, changing nothing
    say(f"{letter.txn_id or letter.entry_id}: {' '.join(letter.tables) or 'unreadable'}, failed {letter.failed_at}: {letter.reason}")
    if blocked := dlq.dependants(buffer, letter.txn_id) if letter.txn_id else []:
        say(f"{len(blocked)} dead-lettered transactions failed because of it: {' '.join(d.txn_id for d in blocked)}")
    click.confirm(question, abort=True, err=True)


def report(actions: list[dlq.Action], as_json: bool, done: str, already: str) -> None:
    if as_json:
        echo_json([action.as_json() for action in actions])
    for action in actions:
        say(f"{action.txn_id} {done if action.changed else already} by {action.by} at {action.at}")


def parse_time(text: str) -> datetime | None:
    return datetime.fromisoformat(text) if text else None
