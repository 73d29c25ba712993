"""Managing API tokens: which scopes exist, and what an operator may see of issued tokens.

Issuing, revoking and what ``admin`` implies are in :mod:`opsync.auth`. A scope is ``admin``
(every scope) or ``read:<table>`` / ``write:<table>`` for an ingestible table; anything else is
refused when the token is made, because a misspelt scope would silently grant nothing. Listings
never include the token's hash.
"""

from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Engine, select

from opsync import registry
from opsync.auth import ADMIN
from opsync.schema import ApiToken

VERBS = ("read", "write")


class InvalidScope(ValueError):
    """Not a scope the API checks for."""


def all_scopes() -> list[str]:
    return [ADMIN, *(f"{verb}:{name}" for name in registry.REGISTRY for verb in VERBS)]


def check_scope(scope: str) -> str:
    """``scope`` itself if the API knows it, else :class:`InvalidScope` naming what is allowed."""
    verb, _, table = scope.partition(":")
    if scope == ADMIN or (verb in VERBS and table in registry.REGISTRY):
        return scope
    tables = ", ".join(sorted(registry.REGISTRY))
    raise InvalidScope(f"{scope!r} is not a scope: use {ADMIN}, read:TABLE or write:TABLE with TABLE one of {tables}")


@dataclass(frozen=True)
class TokenInfo:
    """What an operator may know of a token: everything but its hash."""

    name: str
    scopes: list[str]
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None

    @property
    def state(self) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= datetime.now(UTC):
            return "expired"
        return "active"

    def as_json(self) -> dict:
        times = {key: getattr(self, key) for key in ("created_at", "expires_at", "revoked_at", "last_used_at")}
        return {
            "name": self.name,
            "scopes": self.scopes,
            "state": self.state,
            **{key: moment and moment.isoformat() for key, moment in times.items()},
        }


VISIBLE = (ApiToken.name, ApiToken.scopes, ApiToken.created_at, ApiToken.expires_at, ApiToken.revoked_at, ApiToken.last_used_at)


def list_tokens(engine: Engine) -> list[TokenInfo]:
    """Every token ever issued, oldest first (revoked ones too: names are never reused)."""
    with engine.connect() as conn:
        rows = conn.execute(select(*VISIBLE).order_by(ApiToken.created_at, ApiToken.name))
        return [TokenInfo(*row) for row in rows]


def find_token(engine: Engine, name: str) -> TokenInfo | None:
    with engine.connect() as conn:
        row = conn.execute(select(*VISIBLE).where(ApiToken.name == name)).first()
    return TokenInfo(*row) if row else None
