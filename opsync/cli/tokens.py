"""``opsync tokens``: create, list and revoke the ingest API's bearer tokens (on the primary)."""

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import click
from psycopg.errors import UniqueViolation
from rich.table import Column, Table
from sqlalchemy.exc import IntegrityError

from opsync import auth, tokens
from opsync.cli.common import AlreadyExists, ExpiryType, NotFound, console, echo_json, json_option, say, when
from opsync.cli.services import database
from opsync.config import get_settings


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


@click.group("tokens")
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
