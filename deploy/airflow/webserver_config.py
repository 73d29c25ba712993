"""Airflow UI sign-in with GitHub, for the FAB auth manager of the compose deployment.

Airflow loads this file (``[fab] config_file``) with ``AIRFLOW__CORE__AUTH_MANAGER`` set to the FAB
auth manager; ``make up`` keeps the simple auth manager and never reads it. Only members of one
GitHub organisation sign in, and their teams there decide their Airflow roles, recomputed at every
sign-in. An organisation member in none of the listed teams is refused like an outsider: access is
granted by team, so leaving every listed team revokes it at the next sign-in. Settings come from
``AIRFLOW_GITHUB_*`` variables (README, "Signing in to the Airflow UI with GitHub"); a missing or
malformed one stops the API server at start with its name, never with its value.
"""

import logging
import re
from typing import Annotated, Any
from urllib.parse import quote

from airflow.providers.fab.auth_manager.security_manager.override import FabAirflowSecurityManagerOverride
from flask import flash, session
from flask_appbuilder.const import AUTH_OAUTH
from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

log = logging.getLogger(__name__)

ENV_PREFIX = "AIRFLOW_GITHUB_"
PROVIDER = "github"
USERNAME_PREFIX = "github_"  # a GitHub login can never take over a local account such as ``admin``
PAGE_SIZE = 100  # GitHub's largest page
TEAM_ROLE = re.compile(r"^\s*([A-Za-z0-9_.-]+)\s*=\s*([A-Za-z0-9_ -]*[A-Za-z0-9_])\s*$")


class SignInRefused(Exception):
    """A GitHub user who may not use this Airflow; the message is shown on the login page."""


def parse_team_roles(text: str) -> dict[str, list[str]]:
    """``team-slug=Role,...`` as FAB's ``AUTH_ROLES_MAPPING`` (role key -> roles); slugs lower-cased like GitHub's."""
    mapping: dict[str, list[str]] = {}
    for entry in filter(None, (part.strip() for part in text.split(","))):
        match = TEAM_ROLE.match(entry)
        if not match:
            raise ValueError(f"entry {entry!r} is not team-slug=Role")
        team, role = match.group(1).lower(), match.group(2)
        if team in mapping:
            raise ValueError(f"team {team!r} is listed twice")
        mapping[team] = [role]
    if not mapping:
        raise ValueError("no team=Role entry: nobody could sign in")
    return mapping


class GitHubSignIn(BaseSettings):
    """The ``AIRFLOW_GITHUB_*`` variables; the URLs change only for GitHub Enterprise or a test's fake GitHub."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    client_id: str = Field(min_length=1)
    client_secret: SecretStr = Field(min_length=1)
    org: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9-]*$")
    team_roles: Annotated[dict[str, list[str]], NoDecode]
    api_url: str = Field("https://api.github.com", pattern=r"^https?://")
    url: str = Field("https://github.com", pattern=r"^https?://")

    @field_validator("team_roles", mode="before")
    @classmethod
    def _parse_team_roles(cls, value: Any) -> Any:
        return parse_team_roles(value) if isinstance(value, str) else value


# Flask compiles this file from its own module, which has ``from __future__ import annotations``, so
# the annotations above are strings, and this module is not in ``sys.modules`` for pydantic to look in.
GitHubSignIn.model_rebuild(_types_namespace=globals())


def load_settings() -> GitHubSignIn:
    """Settings from the environment; errors name each variable but never echo a value (it may be the secret)."""
    try:
        return GitHubSignIn()
    except ValidationError as exc:
        problems = "; ".join(f"{ENV_PREFIX}{str(error['loc'][0]).upper()}: {error['msg']}" for error in exc.errors(include_input=False))
        raise RuntimeError(f"GitHub sign-in for Airflow is misconfigured: {problems}") from None


def org_team_slugs(teams: list[dict[str, Any]], org: str) -> list[str]:
    """Slugs of the user's teams in ``org`` (``GET /user/teams`` lists teams of every organisation)."""
    return sorted(team["slug"].lower() for team in teams if (team.get("organization") or {}).get("login", "").lower() == org.lower())


def user_info(user: dict[str, Any], team_slugs: list[str], team_roles: dict[str, list[str]], org: str) -> dict[str, Any]:
    """FAB's user-info dict for an organisation member; ``role_keys`` are the teams that grant a role."""
    granting = [slug for slug in team_slugs if slug in team_roles]
    if not granting:
        raise SignInRefused(
            f"GitHub user {user['login']} is in none of the teams of {org} that give access to Airflow ({', '.join(sorted(team_roles))})."
        )
    first_name, _, last_name = (user.get("name") or user["login"]).partition(" ")
    return {
        "username": USERNAME_PREFIX + user["login"],
        "email": user.get("email") or "",
        "first_name": first_name,
        "last_name": last_name,
        "role_keys": granting,
    }


class GitHubTeamSecurityManager(FabAirflowSecurityManagerOverride):
    """Signs in members of one GitHub organisation, with roles from their teams there."""

    def get_oauth_user_info(self, provider: str, resp: dict[str, Any]) -> dict[str, Any]:
        """Ask GitHub who signed in, refuse non-members, and drop GitHub's token: it is needed only here."""
        try:
            return self._github_user_info(resp)
        except SignInRefused as exc:
            flash(str(exc), "warning")
            raise
        finally:
            session.pop("oauth", None)

    def _github_user_info(self, token: dict[str, Any]) -> dict[str, Any]:
        github = self.oauth_remotes[PROVIDER]
        response = github.get("user", token=token)
        response.raise_for_status()
        user = response.json()
        self._require_membership(github, token, user["login"])
        teams = self._all_pages(github, token, "user/teams")
        info = user_info(user, org_team_slugs(teams, SETTINGS.org), SETTINGS.team_roles, SETTINGS.org)
        log.info("GitHub user %s signed in through teams %s", user["login"], ", ".join(info["role_keys"]))
        return info

    @staticmethod
    def _require_membership(github: Any, token: dict[str, Any], login: str) -> None:
        """Active membership only: a pending invitation is not membership yet (404 = not a member)."""
        response = github.get(f"user/memberships/orgs/{quote(SETTINGS.org)}", token=token)
        if response.status_code == 404:
            raise SignInRefused(f"GitHub user {login} is not a member of the organisation {SETTINGS.org}.")
        if response.status_code == 403:
            raise SignInRefused(
                f"The organisation {SETTINGS.org} has not granted this Airflow's GitHub OAuth app access "
                "to its membership (an organisation owner can approve it on GitHub)."
            )
        response.raise_for_status()
        if response.json().get("state") != "active":
            raise SignInRefused(f"GitHub user {login} has not yet accepted the invitation to the organisation {SETTINGS.org}.")

    @staticmethod
    def _all_pages(github: Any, token: dict[str, Any], path: str) -> list[dict[str, Any]]:
        """Every item of a paginated GitHub list, following its ``Link: rel="next"`` headers."""
        items: list[dict[str, Any]] = []
        url: str | None = f"{path}?per_page={PAGE_SIZE}"
        while url:
            response = github.get(url, token=token)
            response.raise_for_status()
            items.extend(response.json())
            url = response.links.get("next", {}).get("url")
        return items


SETTINGS = load_settings()

AUTH_TYPE = AUTH_OAUTH
SECURITY_MANAGER_CLASS = GitHubTeamSecurityManager
AUTH_USER_REGISTRATION = True
AUTH_USER_REGISTRATION_ROLE = "Public"  # no access of its own: every permission comes from a team's role
AUTH_ROLES_MAPPING = SETTINGS.team_roles
AUTH_ROLES_SYNC_AT_LOGIN = True
OAUTH_PROVIDERS = [
    {
        "name": PROVIDER,
        "icon": "fa-github",
        "token_key": "access_token",
        "remote_app": {
            "client_id": SETTINGS.client_id,
            "client_secret": SETTINGS.client_secret.get_secret_value(),
            "api_base_url": SETTINGS.api_url.rstrip("/") + "/",
            "access_token_url": SETTINGS.url.rstrip("/") + "/login/oauth/access_token",
            "authorize_url": SETTINGS.url.rstrip("/") + "/login/oauth/authorize",
            "request_token_url": None,
            "client_kwargs": {"scope": "read:org", "token_endpoint_auth_method": "client_secret_post"},
        },
    }
]
