"""``opsync dlq``: list, show, requeue and discard dead-lettered transactions, and their history."""

import getpass
import json
from datetime import datetime

import click
from rich.table import Column, Table

from opsync import dlq
from opsync.buffer import Buffer
from opsync.cli.common import NotFound, console, echo_json, json_option, say, when
from opsync.cli.services import buffer_or_exit


@click.group("dlq")
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
