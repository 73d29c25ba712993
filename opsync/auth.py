"""Bearer tokens for scripts: random, stored only as SHA-256 hashes, scoped, revocable.

Scopes are ``write:<table>``, ``read:<table>`` and ``admin``, which implies every scope.

Tokens are issued on the primary and validated at the site against the local replica (the token
table replicates), so a script can authenticate while the link to Cologne is down. A short
in-process cache keeps the replica off the hot path; revocation takes effect within its TTL once
the replica has replayed it. While the replica itself cannot be read (a restart), tokens already
known good keep working from the cache, re-checked once per TTL; unknown tokens are refused with
:class:`AuthUnavailable` (503), never cached. Tokens themselves are never logged, only their names.
"""

import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Collection
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import TypeGuard

from sqlalchemy import Engine, insert, select, update
from sqlalchemy.exc import OperationalError

from opsync.schema import ApiToken

TOKEN_PREFIX = "ops_"
ADMIN = "admin"

log = logging.getLogger(__name__)


class AuthError(Exception):
    """Missing, unknown, expired or revoked token (401)."""


class ScopeError(Exception):
    """A valid token without the scope an action needs (403)."""


class AuthUnavailable(Exception):
    """The token table cannot be read and the token is not known good from the cache (503, not 401)."""


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(primary: Engine, name: str, scopes: list[str], expires_at: datetime | None = None) -> str:
    """Issue a token (256 random bits); the plaintext is returned once and never stored."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    with primary.begin() as conn:
        conn.execute(insert(ApiToken).values(name=name, token_sha256=hash_token(token), scopes=scopes, expires_at=expires_at))
    return token


def revoke_token(primary: Engine, name: str) -> bool:
    with primary.begin() as conn:
        result = conn.execute(
            update(ApiToken).where(ApiToken.name == name, ApiToken.revoked_at.is_(None)).values(revoked_at=datetime.now(UTC))
        )
    return result.rowcount > 0


@dataclass(frozen=True)
class Principal:
    name: str
    scopes: frozenset[str]

    def require(self, scope: str) -> None:
        if ADMIN not in self.scopes and scope not in self.scopes:
            raise ScopeError(f"token {self.name!r} lacks scope {scope!r}")

    def may_see(self, tables: Collection[str]) -> bool:
        """A transaction's status, failure reason and events: ``admin``, or ``read:`` or ``write:`` on each
        table it involves (a reason quotes row values). No tables known (a status written before they
        were recorded) is ``admin`` only."""
        if ADMIN in self.scopes:
            return True
        return bool(tables) and all(f"read:{t}" in self.scopes or f"write:{t}" in self.scopes for t in tables)


@dataclass(frozen=True)
class _Cached:
    principal: Principal
    expires_at: datetime | None
    revoked: bool
    fetched: float


class TokenVerifier:
    """Checks bearer tokens against a (replica) database, with a short cache per token hash."""

    def __init__(self, engine: Engine, ttl_s: float = 30):
        self.engine = engine
        self.ttl_s = ttl_s
        self._cache: dict[str, _Cached] = {}

    def connect(self) -> None:
        """Open a pooled connection now: an engine's first one also sets up its dialect, tens of milliseconds."""
        with self.engine.connect():
            pass

    def verify_cached(self, token: str) -> tuple[Principal | None, bool]:
        """:meth:`verify` when the cache can answer without the database (no I/O), None when it cannot;
        and whether the entry is past half its TTL: time to re-read the row, so none waits when it expires."""
        entry = self._cache.get(hash_token(token))
        if not self._fresh(entry):
            return None, False
        return self._checked(entry), time.monotonic() - entry.fetched > self.ttl_s / 2

    def verify(self, token: str | None) -> Principal:
        if not token:
            raise AuthError("missing bearer token")
        digest = hash_token(token)
        entry = self._cache.get(digest)
        if not self._fresh(entry):
            entry = self._refresh(digest, entry)
        return self._checked(entry)

    def reread(self, token: str) -> Principal:
        """:meth:`verify` from the token's row even while its cache entry is fresh."""
        digest = hash_token(token)
        return self._checked(self._refresh(digest, self._cache.get(digest)))

    def _fresh(self, entry: _Cached | None) -> TypeGuard[_Cached]:
        return entry is not None and time.monotonic() - entry.fetched <= self.ttl_s

    @staticmethod
    def _checked(entry: _Cached) -> Principal:
        if entry.revoked:
            raise AuthError("token revoked")
        if entry.expires_at is not None and entry.expires_at <= datetime.now(UTC):
            raise AuthError("token expired")
        return entry.principal

    def _refresh(self, digest: str, cached: _Cached | None) -> _Cached:
        """The token's current row; the cached one (trusted for one more TTL) while the replica is unreadable."""
        try:
            entry = self._fetch(digest)
        except OperationalError as exc:
            if cached is None:
                raise AuthUnavailable(f"cannot check tokens now ({exc.orig.__class__.__name__}); retry") from None
            log.warning("token store unreadable (%s): trusting cached token %r", exc.orig.__class__.__name__, cached.principal.name)
            entry = replace(cached, fetched=time.monotonic())  # not a connect attempt per request meanwhile
        if entry is None:
            self._cache.pop(digest, None)
            raise AuthError("unknown token")  # not cached: random guesses must not grow memory
        self._cache[digest] = entry
        return entry

    def _fetch(self, digest: str) -> _Cached | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                select(ApiToken.name, ApiToken.token_sha256, ApiToken.scopes, ApiToken.expires_at, ApiToken.revoked_at).where(
                    ApiToken.token_sha256 == digest
                )
            ).first()
        if row is None or not hmac.compare_digest(row.token_sha256, digest):
            return None
        principal = Principal(row.name, frozenset(row.scopes))
        return _Cached(principal, row.expires_at, row.revoked_at is not None, time.monotonic())
