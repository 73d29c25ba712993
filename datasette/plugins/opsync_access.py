"""Who may read the read model: GitHub sign-in restricted to one organisation or team, script tokens,
and, on a scientist's own machine only, anonymous reading.

The rules (which role sees which database, table and SQL) are ``allow`` blocks on ``role`` in
the engine's Datasette metadata (``opsync/read_model/datasette.yml``, merged with every domain's); this plugin
only decides each request's role, from the environment (``plugins.opsync-access`` there):

- ``member``: a GitHub actor (``ds_actor`` cookie set by datasette-auth-github) who belongs to
  ``OPSYNC_GITHUB_TEAM`` (``org/team-slug``) if set, else to ``OPSYNC_GITHUB_ORG``. Membership is
  read from the signed cookie (recorded by GitHub's API at sign-in; the cookie lasts
  ``login_max_age``) and compared with the settings on every request, so changing them takes effect
  at once. A GitHub user outside them gets no cookie at all (see the callback below), and a cookie
  from before a change gets no role. No org and no team set: nobody signs in with GitHub.
- ``script``: the token actor of datasette-auth-tokens (``Authorization: Bearer``, the token from
  ``OPSYNC_DATASETTE_TOKEN``). A Bearer token that is not a configured token of at least
  ``MIN_TOKEN_CHARS`` characters is answered 401 here, so a script with a wrong or stale token fails
  loudly instead of quietly reading as anonymous (and an empty or unset token can never match).
- ``local``: anyone without credentials, only when ``OPSYNC_DATASETTE_PUBLIC`` is true (``make up``
  on one's own machine, bound to 127.0.0.1). Default false: anonymous then has no role.

OAuth ``state`` (login CSRF): datasette-auth-github 1.0 sends none, so a page elsewhere could make a
browser complete the callback with the attacker's own ``code`` and sign that browser in as the
attacker. This plugin wraps the plugin's two routes: ``/-/github-auth-start`` gets a random nonce
(256 bits) added to GitHub's authorize URL as ``state`` and kept in a signed, HttpOnly,
SameSite=Lax cookie valid for ``STATE_MAX_AGE_S`` on the callback path only; the callback runs only
when its ``state`` equals the cookie's nonce (constant-time compare) and answers 403 otherwise,
before any call to GitHub. The nonce is single-use: the callback always clears the cookie.
After a successful callback the new actor is checked against the org/team: a non-member gets 403
and no cookie.
"""

import json
import logging
import secrets
import time
from dataclasses import dataclass
from http.cookies import SimpleCookie
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

from datasette.actor_auth_cookie import actor_from_request as cookie_actor
from itsdangerous import BadSignature

from datasette import hookimpl

log = logging.getLogger("opsync.access")

START_PATH = "/-/github-auth-start"
CALLBACK_PATH = "/-/github-auth-callback"
STATE_COOKIE = "opsync_gh_state"
STATE_NAMESPACE = "opsync-github-state"
STATE_MAX_AGE_S = 600  # from the redirect to GitHub to the callback
MIN_TOKEN_CHARS = 32
LOCAL_ACTOR = {"id": "local", "display": "local (public mode)", "role": "local"}
TRUE, FALSE = {"1", "true", "yes", "on"}, {"", "0", "false", "no", "off"}


@dataclass(frozen=True)
class Access:
    public: bool
    org: str | None
    team: str | None
    github_ready: bool  # client id and secret set, and an org or team to restrict to
    tokens: tuple[str, ...]  # usable script tokens


def parse_bool(value, name: str) -> bool:
    text = "" if value is None else str(value).strip().lower()
    if text not in TRUE | FALSE:
        raise ValueError(f"{name} must be true or false, not {value!r}")
    return text in TRUE


def access(datasette) -> Access:
    """The access settings, read from the plugin configs (their ``$env`` values resolved now)."""
    own = datasette.plugin_config("opsync-access") or {}
    github = datasette.plugin_config("datasette-auth-github") or {}
    tokens = (datasette.plugin_config("datasette-auth-tokens") or {}).get("tokens") or []
    org = (own.get("github_org") or "").strip() or None
    team = (own.get("github_team") or "").strip() or None
    return Access(
        public=parse_bool(own.get("public"), "OPSYNC_DATASETTE_PUBLIC"),
        org=org,
        team=team,
        github_ready=bool(github.get("client_id") and github.get("client_secret") and (org or team)),
        tokens=tuple(t["token"] for t in tokens if isinstance(t.get("token"), str) and len(t["token"]) >= MIN_TOKEN_CHARS),
    )


def is_member(actor: dict | None, settings: Access) -> bool:
    """A GitHub actor in the configured team (if one is set) or else the configured organisation."""
    if not actor or not str(actor.get("id", "")).startswith("github:"):
        return False
    if settings.team:
        return settings.team in (actor.get("gh_teams") or [])
    if settings.org:
        return settings.org in (actor.get("gh_orgs") or [])
    return False


@hookimpl
def startup(datasette):
    """Refuse to start on settings that would silently weaken access."""
    settings = access(datasette)  # raises on an unreadable OPSYNC_DATASETTE_PUBLIC
    if len(getattr(datasette, "_secret", "") or "") < MIN_TOKEN_CHARS:  # it signs the sign-in cookies
        raise ValueError(f"DATASETTE_SECRET must be at least {MIN_TOKEN_CHARS} random characters (or unset: random)")
    configured = (datasette.plugin_config("datasette-auth-tokens") or {}).get("tokens") or []
    for entry in configured:
        token = entry.get("token")
        if token is not None and (not isinstance(token, str) or len(token) < MIN_TOKEN_CHARS):
            raise ValueError(f"OPSYNC_DATASETTE_TOKEN must be at least {MIN_TOKEN_CHARS} random characters")
    github = datasette.plugin_config("datasette-auth-github") or {}
    if github.get("client_id") and not (settings.org or settings.team):
        raise ValueError("GitHub sign-in needs OPSYNC_GITHUB_ORG or OPSYNC_GITHUB_TEAM (org/team-slug)")
    if github.get("client_id") and not github.get("client_secret"):
        raise ValueError("GitHub sign-in needs OPSYNC_GITHUB_CLIENT_SECRET")


@hookimpl(tryfirst=True)
def actor_from_request(datasette, request):
    """Give the request its role (see the module docstring); Bearer tokens are left to datasette-auth-tokens."""
    if request.headers.get("authorization", "").lower().startswith("bearer "):
        return None  # the asgi_wrapper let it through: a configured token
    settings = access(datasette)
    actor = cookie_actor(datasette, request)
    if actor:
        actor = {key: value for key, value in actor.items() if key != "role"}
        if is_member(actor, settings):
            actor["role"] = "member"
        return actor
    if settings.public:
        return dict(LOCAL_ACTOR)
    return None


# --- the ASGI side: token check, OAuth state ---------------------------------------------------


async def respond(send, status: int, body: str, headers: list[tuple[bytes, bytes]] = ()) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"text/plain; charset=utf-8"), *headers]})
    await send({"type": "http.response.body", "body": body.encode()})


async def captured(app, scope, receive) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """Run ``app`` and return its whole (small) response."""
    start, chunks = {}, []

    async def keep(message):
        if message["type"] == "http.response.start":
            start.update(message)
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope, receive, keep)
    return start["status"], list(start.get("headers", [])), b"".join(chunks)


async def replay(send, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def request_cookies(scope) -> dict[str, str]:
    jar = SimpleCookie()
    for name, value in scope.get("headers", []):
        if name == b"cookie":
            try:
                jar.load(value.decode("latin-1"))
            except Exception:  # a malformed cookie header carries no state
                continue
    return {key: morsel.value for key, morsel in jar.items()}


def set_cookie(name: str, value: str, max_age: int, secure: bool) -> tuple[bytes, bytes]:
    parts = [f"{name}={value}", f"Path={CALLBACK_PATH}", f"Max-Age={max_age}", "HttpOnly", "SameSite=Lax"]
    if secure:
        parts.append("Secure")
    return b"set-cookie", "; ".join(parts).encode("latin-1")


def with_state(location: str, nonce: str) -> str:
    parts = urlsplit(location)
    query = f"{parts.query}&{urlencode({'state': nonce})}" if parts.query else urlencode({"state": nonce})
    return urlunsplit(parts._replace(query=query))


def state_matches(datasette, scope) -> bool:
    sent = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("state", [""])[0]
    kept = request_cookies(scope).get(STATE_COOKIE)
    if not sent or not kept:
        return False
    try:
        decoded = datasette.unsign(kept, STATE_NAMESPACE)
    except BadSignature:
        return False
    if not isinstance(decoded, dict) or time.time() - decoded.get("t", 0) > STATE_MAX_AGE_S:
        return False
    return secrets.compare_digest(str(decoded.get("n", "")), sent)


def new_actor(datasette, headers: list[tuple[bytes, bytes]]) -> dict | None:
    """The actor in the ``ds_actor`` cookie a response sets, if any."""
    for name, value in headers:
        if name.lower() != b"set-cookie":
            continue
        jar = SimpleCookie()
        jar.load(value.decode("latin-1"))
        if "ds_actor" in jar and jar["ds_actor"].value:
            try:
                decoded = datasette.unsign(jar["ds_actor"].value, "actor")
            except BadSignature:
                return None
            return decoded.get("a") if isinstance(decoded, dict) else None
    return None


async def github_start(datasette, app, scope, receive, send) -> None:
    status, headers, body = await captured(app, scope, receive)
    location = next((value for name, value in headers if name.lower() == b"location"), None)
    if status not in (301, 302, 303, 307) or location is None:
        return await replay(send, status, headers, body)
    nonce = secrets.token_urlsafe(32)
    cookie = datasette.sign({"n": nonce, "t": int(time.time())}, STATE_NAMESPACE)
    headers = [(name, value) for name, value in headers if name.lower() != b"location"]
    headers.append((b"location", with_state(location.decode("latin-1"), nonce).encode("latin-1")))
    headers.append(set_cookie(STATE_COOKIE, cookie, STATE_MAX_AGE_S, scope.get("scheme") == "https"))
    await replay(send, status, headers, body)


async def github_callback(datasette, settings: Access, app, scope, receive, send) -> None:
    clear = set_cookie(STATE_COOKIE, "", 0, scope.get("scheme") == "https")
    if not state_matches(datasette, scope):
        log.warning("GitHub sign-in refused: missing or mismatched OAuth state")
        return await respond(send, 403, f"Forbidden: sign-in state missing or mismatched; start again from {START_PATH}", [clear])
    status, headers, body = await captured(app, scope, receive)
    actor = new_actor(datasette, headers)
    if actor is not None and not is_member(actor, settings):
        where = f"team {settings.team}" if settings.team else f"organisation {settings.org}"
        log.warning("GitHub sign-in refused: %s is not in the %s", actor.get("gh_login"), where)
        return await respond(send, 403, f"Forbidden: {actor.get('gh_login')} is not a member of the GitHub {where}", [clear])
    await replay(send, status, [*headers, clear], body)


@hookimpl
def asgi_wrapper(datasette):
    def wrap(app):
        async def guarded(scope, receive, send):
            if scope["type"] != "http":
                return await app(scope, receive, send)
            settings = access(datasette)
            authorization = next((v for k, v in scope.get("headers", []) if k == b"authorization"), None)
            if authorization is not None:
                scheme, _, token = authorization.decode("latin-1").partition(" ")
                if scheme.lower() == "bearer" and not (
                    scheme == "Bearer" and any(secrets.compare_digest(token.encode(), t.encode()) for t in settings.tokens)
                ):
                    return await respond(
                        send, 401, json.dumps({"ok": False, "error": "invalid token"}), [(b"www-authenticate", b'Bearer realm="opsync"')]
                    )
            path = scope.get("path", "")
            if path in (START_PATH, CALLBACK_PATH):
                if not settings.github_ready:
                    return await respond(
                        send,
                        404,
                        "GitHub sign-in is not configured here (OPSYNC_GITHUB_CLIENT_ID, "
                        "OPSYNC_GITHUB_CLIENT_SECRET, OPSYNC_GITHUB_ORG or OPSYNC_GITHUB_TEAM)",
                    )
                if path == START_PATH:
                    return await github_start(datasette, app, scope, receive, send)
                return await github_callback(datasette, settings, app, scope, receive, send)
            return await app(scope, receive, send)

        return guarded

    return wrap
