"""``opsync``: the operators' command line, one group of subcommands per area (``tokens``, ``dlq``,
``backlog``) plus ``status`` and ``replay``.

Output is for people by default (tables, messages, a progress bar) and for scripts with ``--json``;
either way data goes to stdout and messages to stderr. Every command exits with one of
:data:`EXIT_CODES`, so a script can tell "try again later" (5) from "fix something" (1, 2) from
"look at the site" (3).
"""

import getpass
import json
import os
import re
import signal
import socket
import sys
import threading
import time as clock
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

import click
import redis
from psycopg.errors import UniqueViolation
from pydantic import ValidationError
from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Column, Table
from rich.text import Text
from sqlalchemy import Engine, create_engine, make_url
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.pool import NullPool

from opsync import alert_rules, auth, dlq, tokens
from opsync.alerts import Thresholds
from opsync.apply import Transient, engine_options
from opsync.buffer import Buffer
from opsync.config import SiteType, get_settings
from opsync.drain import BatchLimits, BatchSettings, Confirmation, DrainSummary, confirm, confirm_replica, drain
from opsync.lsn import ReplicaError, current_position
from opsync.publisher import Publisher
from opsync.read_model import ReadModel
from opsync.registry import ingestible_tables
from opsync.stats import buffer_stats
from opsync.status import SiteStatus, site_status

CONNECT_TIMEOUT_S = 10  # the primary is across the WAN: slow is normal, but never hang
AGO = re.compile(r"(\d+)([mhd])")
IN_DAYS = re.compile(r"(\d+)d")
UNITS = {"m": "minutes", "h": "hours", "d": "days"}
A_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
PIPE_WIDTH = 1000  # piped to grep or a file there is no terminal to fit: keep each token on one line
REDIS_TIMEOUT_S = 5  # Redis is local to the site: an answer takes milliseconds
DRAIN_SLICE_S = 1.0  # budget of each drain run of `backlog drain`: progress shows, and Ctrl-C is honoured, this often
IDLE_WAIT_S = 0.2  # `backlog drain --follow` with nothing to claim: what is left awaits the replica or another drainer

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


def first_line(exc: BaseException) -> str:
    return (str(getattr(exc, "orig", None) or exc).strip().splitlines() or [type(exc).__name__])[0]


@contextmanager
def database(role: str, **options: Any) -> Iterator[Engine]:
    """The primary or the replica (``role``), with failures turned into one clear line instead of a traceback:
    unreachable exits 5, refused exits 1; the URL shown never has the password. Nest the primary inside the
    replica: an unknown replay position (:class:`ReplicaError`) is the replica's alone."""
    url = make_url(getattr(get_settings(), f"{role}_url").get_secret_value())
    engine = create_engine(url, **({"connect_args": {"connect_timeout": CONNECT_TIMEOUT_S}} | options))
    unreachable = (OperationalError, ReplicaError) if role == "replica" else OperationalError
    try:
        yield engine
    except unreachable as exc:
        where = url.render_as_string(hide_password=True)
        raise Unavailable(f"cannot reach the {role} ({where}): {first_line(exc)}") from None
    except DBAPIError as exc:
        raise click.ClickException(f"the {role} refused: {first_line(exc)}") from None
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


EPILOG = "\b\nExit codes:\n" + "\n".join(f"  {code:<3} {meaning}" for code, meaning in EXIT_CODES.items())


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, epilog=EPILOG)
@click.version_option(package_name="opsync", prog_name="opsync", message="%(prog)s %(version)s")
def main() -> None:
    """Operate an opsync site: its buffer, dead letters, tokens and read model."""


@main.group("tokens")
def tokens_group() -> None:
    """Bearer tokens of the ingest API's scripts: issued on the primary, checked at the site."""


@tokens_group.command()
@click.argument("name")
@click.option(
    "--scope",
    "scopes",
    type=ScopeType(),
    multiple=True,
    required=True,
    help=f"{auth.ADMIN}, read:TABLE or write:TABLE; repeat for several.",
)
@click.option("--expires", type=ExpiryType(), help="90d from now, a date (00:00 UTC) or an ISO time; default never.")
@json_option
def create(name: str, scopes: Sequence[str], expires: datetime | None, as_json: bool) -> None:
    """Issue a token NAME; it is printed once, to stdout, and never stored (only its hash is)."""
    scopes = list(dict.fromkeys(scopes))
    with database("primary") as engine:
        try:
            token = auth.create_token(engine, name, list(scopes), expires)
        except IntegrityError as exc:
            if not isinstance(exc.orig, UniqueViolation):
                raise
            raise AlreadyExists(f"a token named {name!r} exists already (names are never reused, even revoked)") from None
    if as_json:
        echo_json({"name": name, "token": token, "scopes": scopes, "expires_at": expires and expires.isoformat()})
    else:
        click.echo(token)
    say(
        f"Token {name!r} ({', '.join(scopes)}; expires {when(expires, 'never')}) is shown this once: "
        "opsync keeps only its hash, so store it now."
    )


@tokens_group.command("list")
@json_option
def list_(as_json: bool) -> None:
    """Every token issued (revoked ones too), without its hash."""
    with database("primary") as engine:
        found = tokens.list_tokens(engine)
    if as_json:
        echo_json([info.as_json() for info in found])
        return
    fold: dict[str, Any] = {"overflow": "fold"}  # never "…": the name is what `revoke` needs, the scopes what it grants
    table = Table(Column("name", **fold), "state", Column("scopes", **fold), "created", "expires", "revoked", "last used")
    for info in found:
        table.add_row(
            info.name,
            info.state,
            " ".join(info.scopes),
            when(info.created_at),
            when(info.expires_at, "never"),
            when(info.revoked_at),
            when(info.last_used_at, "never"),
        )
    console().print(table)


@tokens_group.command()
@click.argument("name")
@json_option
def revoke(name: str, as_json: bool) -> None:
    """Revoke the token NAME; revoking one already revoked changes nothing and succeeds."""
    with database("primary") as engine:
        changed = auth.revoke_token(engine, name)
        info = tokens.find_token(engine, name)
    if info is None:
        raise NotFound(f"no token named {name!r}")
    if as_json:
        echo_json(info.as_json() | {"changed": changed})
    state = "revoked" if changed else "was already revoked"
    say(
        f"Token {name!r} {state} at {when(info.revoked_at)}; sites refuse it once their replica has replayed "
        f"this and their token cache ({get_settings().token_cache_ttl_s:g} s) has expired."
    )


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
    """The site buffer, with Redis failures turned into one clear line: unreachable exits 5, refused exits 1."""
    buffer = site_buffer()
    try:
        yield buffer
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise Unavailable(f"cannot reach the site buffer (Redis): {exc}") from None
    except redis.RedisError as exc:
        raise click.ClickException(f"the site buffer (Redis) refused: {exc}") from None
    finally:
        buffer.client.close()


def measuring_engine(url: str) -> Engine:
    """A fresh connection per measurement (no pool): a link that died between two refreshes cannot hang one."""
    return create_engine(url, poolclass=NullPool, connect_args={"connect_timeout": CONNECT_TIMEOUT_S})


@dataclass(frozen=True)
class Limits:
    """``status --max-*``: figures past which the site counts as degraded (exit 3), for monitoring scripts."""

    depth: int | None = None
    age: float | None = None
    lag: float | None = None
    dead_letters: int | None = None

    def passed(self, report: SiteStatus) -> list[str]:
        """Each limit passed, in words; a figure that could not be measured is reported as unavailable instead."""
        b = report.buffer
        found = [
            (b and b.depth, self.depth, "transactions buffered", "--max-depth"),
            (b and b.oldest_age_s, self.age, "s the oldest has been buffered", "--max-age"),
            (report.lag_s, self.lag, "s replica lag", "--max-lag"),
            (b and b.dead_letters, self.dead_letters, "dead letters", "--max-dead-letters"),
        ]
        return [
            f"{value:g} {what} (over {option} {limit:g})"
            for value, limit, what, option in found
            if value is not None and limit is not None and value > limit
        ]


@main.command()
@click.option("--watch", is_flag=True, help="Redraw until Ctrl-C (or --count refreshes).")
@click.option(
    "--interval",
    type=click.FloatRange(min=0.1),
    default=2.0,
    show_default=True,
    metavar="SECONDS",
    help="Seconds between refreshes of --watch.",
)
@click.option("--count", type=click.IntRange(min=1), metavar="N", help="Stop --watch after N refreshes (implies --watch).")
@click.option("--max-depth", type=click.IntRange(min=0), help="Degraded when more transactions are buffered.")
@click.option("--max-age", type=click.FloatRange(min=0), metavar="SECONDS", help="Degraded when the oldest buffered transaction is older.")
@click.option("--max-lag", type=click.FloatRange(min=0), metavar="SECONDS", help="Degraded when the replica lags more.")
@click.option("--max-dead-letters", type=click.IntRange(min=0), help="Degraded when more are dead-lettered.")
@json_option
def status(watch: bool, interval: float, count: int | None, as_json: bool, **limits: Any) -> None:
    """Buffer depth, oldest buffered age, committed-not-replicated, replica lag, dead letters.

    Exits 3 (degraded) when Redis, the primary or the replica cannot be reached (shown as
    unavailable) or a --max-* limit is passed; with --watch, as of the last refresh. With --watch
    --json, one JSON object per line per refresh.
    """
    settings = get_settings()
    watching, limit = watch or count is not None, Limits(**{k.removeprefix("max_"): v for k, v in limits.items()})
    buffer = site_buffer()
    primary_db = measuring_engine(settings.primary_url.get_secret_value())
    replica_db = measuring_engine(settings.replica_url.get_secret_value())
    degraded, shown = None, 0
    try:
        with Live(console=console(), auto_refresh=False) if watching and not as_json else nullcontext() as live:
            while True:
                report = site_status(buffer, primary_db, replica_db, slot=settings.site)
                passed = limit.passed(report)
                show_status(report, passed, as_json, live, one_line=watching)
                degraded, shown = report.degraded or bool(passed), shown + 1
                if not watching or shown == count:
                    break
                clock.sleep(interval)
    except KeyboardInterrupt:  # the way out of --watch
        if degraded is None:
            raise click.Abort() from None
    finally:
        buffer.client.close()
    if degraded:
        click.get_current_context().exit(DEGRADED)


def show_status(report: SiteStatus, passed: list[str], as_json: bool, live: Live | None, one_line: bool) -> None:
    if as_json:
        click.echo(json.dumps(report.as_json() | {"limits_passed": passed}, indent=None if one_line else 2))
        return
    table = Table("", "", show_header=False, box=None, title=f"opsync status at {datetime.fromisoformat(report.at):%Y-%m-%d %H:%M:%S} UTC")
    for figure, value in status_rows(report) + [("limit passed", f"[red]{what}[/]") for what in passed]:
        table.add_row(figure, value)
    if live is None:
        console().print(table)
    else:
        live.update(table, refresh=True)


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
    if report.slot is not None:
        rows.append(("replica slot", f"{report.slot.name}: {report.slot.describe()}"))
    rows += capacity_rows(report)
    rows += read_model_rows(report)
    rows += [(part, f"[red]unavailable[/]: {why}") for part, why in report.unavailable.items()]
    return rows


def capacity_rows(report: SiteStatus) -> list[tuple[str, str]]:
    """The forecasts: when the high-water mark comes at this ingest rate, when the backlog is replicated."""
    c = report.capacity
    if c is None:
        return []
    rate = "unknown" if c.ingest_per_s is None else f"{c.ingest_per_s:.3g} transactions/s"
    if c.bytes_per_txn is not None:
        rate += f", {c.bytes_per_txn:,.0f} bytes each (measured over {c.bytes_measured_over:,})"
    return [
        ("ingest", rate),
        ("high-water in", escape(c.high_water.describe())),
        ("room", f"{c.room:,} transactions before the high-water mark"),
        ("drain ETA", escape(c.drain_eta.describe())),
    ]


def read_model_rows(report: SiteStatus) -> list[tuple[str, str]]:
    """Freshness, and the rows the publisher skips with the latest few keys and reasons."""
    rm = report.read_model
    fresh = "unknown" if rm.freshness_s is None else f"{rm.freshness_s:.1f} s behind"
    rows = [("read model", fresh + "".join(f" ({part}: {why})" for part, why in rm.unavailable.items()))]
    if rm.poison_rows is not None:
        skipped = f"{rm.poison_rows} now ({rm.poison_skipped} since counting began)"
        rows.append(("poison rows skipped", f"[red]{skipped}[/]" if rm.poison_rows else skipped))
    rows += [("  skipped", escape(f"{p.table} {p.key} ({p.duty}, {p.at[:19]}Z): {p.reason}")) for p in rm.recent]
    return rows


@main.group("dlq")
def dlq_group() -> None:
    """Dead-lettered transactions: see why they failed, requeue them once fixed, or discard them."""


def by_option(func):
    return click.option("--by", default=getpass.getuser, show_default="your OS user", help="Who acts, for the audit.")(func)


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
        table.add_row(
            letter.txn_id or letter.entry_id,
            when(parse_time(letter.failed_at)),
            " ".join(letter.tables),
            str(len(letter.txn.steps) if letter.txn else 0),
            letter.reason,
        )
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


# --- the backlog: drain the site buffer now, from this terminal ---------------------------------------


@main.group("backlog")
def backlog_group() -> None:
    """The site buffer's backlog, drained from this terminal beside the Airflow DAG's drainer."""


@dataclass
class Drained:
    """What a `backlog drain` did, and what is left: its progress lines and final summary (``--json``)."""

    buffered: int = 0
    awaiting_replica: int = 0
    applied: int = 0
    duplicates: int = 0  # in the primary's ledger already: skipped
    dead_lettered: int = 0
    confirmed: int = 0  # marked replicated
    batches: int = 0

    @property
    def remaining(self) -> int:
        """Transactions not done yet: buffered, or committed and not yet readable from the replica."""
        return self.buffered + self.awaiting_replica

    def measure(self, buffer: Buffer) -> None:
        stats = buffer_stats(buffer.client, buffer)
        self.buffered, self.awaiting_replica = stats.depth, stats.awaiting_replica

    def add(self, run: DrainSummary) -> None:
        self.applied += run.applied
        self.duplicates += run.duplicates
        self.dead_lettered += run.dead_lettered
        self.batches += run.batches

    def as_json(self, event: str, rate: float | None, eta: float | None, elapsed: float) -> dict:
        return {
            "event": event,
            "remaining": self.remaining,
            "buffered": self.buffered,
            "awaiting_replica": self.awaiting_replica,
            "applied": self.applied,
            "duplicates": self.duplicates,
            "dead_lettered": self.dead_lettered,
            "confirmed": self.confirmed,
            "batches": self.batches,
            "rate_per_s": rate and round(rate, 1),
            "eta_s": eta,
            "elapsed_s": round(elapsed, 2),
        }

    def describe(self) -> str:
        return (
            f"{self.applied} applied, {self.duplicates} already applied (skipped), {self.dead_lettered} dead-lettered,"
            f" {self.confirmed} confirmed replicated in {self.batches} batches; {self.buffered} still buffered,"
            f" {self.awaiting_replica} await the replica"
        )


class RateColumn(ProgressColumn):
    """Transactions per second (rich's own speed column counts bytes)."""

    def render(self, task: Task) -> Text:
        return Text("? txn/s" if task.speed is None else f"{task.speed:,.0f} txn/s", style="progress.data.speed")


@dataclass
class Meter:
    """A backlog drain's progress: rich's bar on stderr, or JSON lines on stdout; the rate and ETA are rich's either way."""

    progress: Progress
    as_json: bool
    started: float = field(default_factory=clock.monotonic)
    task: TaskID | None = None

    def show(self, done: Drained, event: str) -> None:
        if self.task is None:
            self.task = self.progress.add_task("draining", total=done.remaining, remaining=done.remaining)
        state = self.progress.tasks[self.task]
        if done.remaining > state.total - state.completed:  # type: ignore[operator]  # add_task set it; arriving faster than draining: the total grows
            self.progress.update(self.task, total=state.completed + done.remaining, remaining=done.remaining)
        else:
            self.progress.update(self.task, completed=state.total - done.remaining, remaining=done.remaining)  # type: ignore[operator]  # as above
        if self.as_json:
            click.echo(json.dumps(done.as_json(event, state.speed, state.time_remaining, clock.monotonic() - self.started)))


@contextmanager
def backlog_meter(as_json: bool, bar: bool) -> Iterator[Meter]:
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[remaining]} remaining"),
        RateColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), disable=not bar) as progress:  # stderr: stdout is for data
        yield Meter(progress, as_json)


@contextmanager
def stop_on_ctrl_c() -> Iterator[threading.Event]:
    """The first Ctrl-C sets the event, so the loop stops between drain runs, never inside a batch; a second one
    interrupts at once (a batch cut short is redelivered, and the ledger skips what it had committed)."""
    stop = threading.Event()

    def first(*_) -> None:
        stop.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    previous = signal.signal(signal.SIGINT, first)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


@backlog_group.command("drain")
@click.option(
    "--follow", is_flag=True, help="Keep draining, and confirming against the replica, until nothing is buffered or awaits the replica."
)
@click.option(
    "--batch",
    type=click.IntRange(1, 100_000),
    help="Transactions per batch: one DB transaction each. [default: OPSYNC_DRAIN_BATCH_SIZE, as the DAG's]",
)
@click.option(
    "--batch-records",
    type=click.IntRange(min=1),
    help="A batch ends before the transaction that would pass this many records. [default: OPSYNC_DRAIN_BATCH_RECORDS, as the DAG's]",
)
@click.option(
    "--batch-bytes",
    type=click.IntRange(min=1),
    help="A batch ends before the transaction that would pass this many envelope bytes (a larger one goes"
    " alone, whole). [default: OPSYNC_DRAIN_BATCH_BYTES, as the DAG's]",
)
@json_option
def backlog_drain(follow: bool, batch: int | None, batch_records: int | None, batch_bytes: int | None, as_json: bool) -> None:
    """Drain the site buffer into the primary now, with the functions the opsync_drain DAG runs.

    Without --follow: until a batch comes back less than full (the buffer was empty). With
    --follow: until nothing is buffered or awaits the replica, showing what remains, the rate and
    the ETA (--json: a start line, a progress line a second, then a summary line). Ctrl-C stops
    between batches, exit 130: nothing is half-applied.
    """
    limits = batch_limits(batch, batch_records, batch_bytes)
    consumer = f"cli-{socket.gethostname()}-{os.getpid()}"  # its own claims: never re-read another drainer's
    done = Drained()
    with (
        buffer_or_exit() as buffer,
        database("replica") as replica_db,
        database("primary", **engine_options(CONNECT_TIMEOUT_S, autocommit=True)) as primary_db,  # apply_batch's alone
        stop_on_ctrl_c() as stop,
        backlog_meter(as_json, bar=follow and not as_json) as meter,
    ):
        buffer.ensure_group()  # a new site may drain before its first DAG run
        done.measure(buffer)
        try:
            if follow:
                meter.show(done, "start")
                follow_backlog(buffer, primary_db, replica_db, limits, consumer, stop, done, meter)
            else:
                drain_backlog(buffer, primary_db, limits, consumer, stop, done)
        finally:
            buffer.forget_consumer(consumer)
        done.measure(buffer)
        meter.show(done, "interrupted" if stop.is_set() else "done")
    say(("Interrupted between batches: " if stop.is_set() else "") + done.describe())
    if stop.is_set():
        click.get_current_context().exit(INTERRUPTED)


def batch_limits(batch: int | None, records: int | None, size: int | None) -> BatchLimits:
    """The options given, the rest as the DAG has them (``OPSYNC_DRAIN_BATCH_*``, else the defaults); a bad variable
    is a usage error naming it."""
    try:
        configured = BatchSettings().limits()
    except ValidationError as exc:
        wrong = "; ".join(f"OPSYNC_DRAIN_{str(e['loc'][0]).upper()}: {e['msg']}" for e in exc.errors())
        raise click.UsageError(wrong) from None
    return BatchLimits(batch or configured.transactions, records or configured.records, size or configured.bytes)


def drain_backlog(buffer: Buffer, primary_db: Engine, limits: BatchLimits, consumer: str, stop: threading.Event, done: Drained) -> None:
    """Drain runs until one ends at a batch less than full (the buffer was empty), or Ctrl-C."""
    while not stop.is_set():
        if not drain_slice(buffer, primary_db, limits, consumer, done).budget_spent:
            return


def follow_backlog(
    buffer: Buffer,
    primary_db: Engine,
    replica_db: Engine,
    limits: BatchLimits,
    consumer: str,
    stop: threading.Event,
    done: Drained,
    meter: Meter,
) -> None:
    """Drain and confirm, showing progress after each drain run, until nothing remains or Ctrl-C."""
    while not stop.is_set():
        run = drain_slice(buffer, primary_db, limits, consumer, done)
        if done.awaiting_replica or run.batches:
            done.confirmed += readable(buffer, primary_db, replica_db).confirmed
        done.measure(buffer)
        if not done.remaining:
            return
        meter.show(done, "progress")
        if not run.batches:  # what is left awaits the replica, or is claimed by the DAG's drainer
            stop.wait(IDLE_WAIT_S)


def drain_slice(buffer: Buffer, primary_db: Engine, limits: BatchLimits, consumer: str, done: Drained) -> DrainSummary:
    """One drain run of about a second; a primary that cannot take a batch ends the command, losing nothing."""
    try:
        run = drain(
            buffer,
            primary_db,
            budget_s=DRAIN_SLICE_S,
            batch_size=limits.transactions,
            consumer=consumer,
            batch_records=limits.records,
            batch_bytes=limits.bytes,
        )
    except Transient as exc:
        depth = buffer_stats(buffer.client, buffer).depth
        raise Unavailable(f"{exc}; nothing lost: {depth} transactions stay buffered, run it again later") from None
    done.add(run)
    return run


def readable(buffer: Buffer, primary_db: Engine, replica_db: Engine) -> Confirmation:
    """Confirm what this site can read now: its replica's replay position; on the main site, the primary's own."""
    if get_settings().site_type is SiteType.main:
        return confirm(buffer, current_position(primary_db))
    return confirm_replica(buffer, replica_db)


# --- replay: repair the read model from the change capture ------------------------------------------


@main.command()
@click.option("--since", type=MomentType(), required=True, help="Start: 6h or 3d ago, a date (00:00 UTC) or an ISO time.")
@click.option("--until", type=MomentType(), help="End, excluded; default now.")
@click.option(
    "--table",
    "tables",
    multiple=True,
    type=click.Choice([t.name for t in ingestible_tables()]),
    metavar="TABLE",
    help="Only this table; repeat for several; default all.",
)
@json_option
def replay(since: datetime, until: datetime | None, tables: tuple[str, ...], as_json: bool) -> None:
    """Re-publish into the read model (the SQLite file Datasette serves) the rows changed in a time range.

    The repair after restoring the file from a backup, or after a publisher bug: the keys come from
    the primary's change capture (read on the local replica), each row as the publisher would show it
    now. Replaying twice changes nothing more. Exits 3 when changes of the range were purged already
    (older than the change table keeps): the opsync_read_model_check DAG repairs every row instead.
    """
    settings = get_settings()
    since, until = since.astimezone(UTC), (until or datetime.now(UTC)).astimezone(UTC)
    if since >= until:
        raise click.UsageError(f"--since {since.isoformat()} is not before --until {until.isoformat()}")
    path = settings.read_model_path
    if not path.exists():
        raise NotFound(f"no read model at {path} (the publisher creates it; check OPSYNC_READ_MODEL_PATH)")
    names = list(tables) or [t.name for t in ingestible_tables()]
    with buffer_or_exit() as buffer, database("replica") as replica_db:
        publisher = Publisher(ReadModel(path, settings.timezone), buffer, replica_db)
        try:
            done = publisher.replay(since, until, names)
        finally:
            publisher.close()
    if as_json:
        echo_json(
            {
                "since": since.isoformat(),
                "until": until.isoformat(),
                "read_model": str(path),
                "complete": done.complete,
                "tables": {
                    name: {"changed": done.keys[name], "written": done.written[name], "skipped": done.skipped[name]} for name in names
                },
            }
        )
    else:
        table = Table(
            "table",
            "changed in range",
            "rewritten",
            "skipped (poison)",
            title=f"replayed {since:%Y-%m-%d %H:%M} – {until:%Y-%m-%d %H:%M} UTC",
        )
        for name in names:
            table.add_row(name, str(done.keys[name]), str(done.written[name]), str(done.skipped[name]))
        console().print(table)
    if not done.complete:
        say(
            "Warning: changes of this range were purged from the change table already, so rows changed before the"
            " oldest change kept were not replayed; the opsync_read_model_check DAG compares and repairs every row."
        )
        click.get_current_context().exit(DEGRADED)


@main.command("alert-rules")
@click.option("--job", default="opsync", show_default=True, help="Prometheus' scrape job of the ingest API's /metrics.")
def alert_rules_command(job: str) -> None:
    """Print Prometheus alerting rules (YAML) at this site's OPSYNC_ALERT_* thresholds.

    The same rules as the opsync_alerts DAG's; deploy/prometheus/opsync-rules.yml is this at the defaults."""
    click.echo(alert_rules.render(Thresholds(), job), nl=False)
