"""Alerts through Airflow's callbacks: the site's findings (:mod:`opsync.monitoring.alerts`) to Apprise, a webhook, and by email.

:class:`SiteAlertNotifier` measures the site, judges it by :class:`opsync.monitoring.alerts.Thresholds` and
announces only what changed since the last announcement (kept in Redis, shared by every caller),
including what is resolved; a full evaluation is also stored for the Datasette dashboard. The
``opsync_alerts`` DAG calls it every minute; the drain task calls it as its failure and retry
callback for the ``drain_failed_runs`` figure alone, which needs Redis only.

The webhook URL may hold a secret (Slack's does), so it is never logged: it comes from the Airflow
connection ``opsync_alert_webhook`` (extra ``{"url": ..., "format": "slack"}``) or from
``OPSYNC_ALERT_WEBHOOK_URL``, and is posted to with the standard library, which logs nothing.
Email goes through the SMTP provider (connection ``smtp_default``) when ``OPSYNC_ALERT_EMAIL_TO`` is set.

Any service Apprise knows (Slack, Teams, Matrix, ntfy, e-mail, a JSON endpoint, ...) gets the alert text
through the Apprise provider: its connection ``opsync_alert_apprise`` (type ``apprise``, extra
``{"config": {"path": URL}}``) or ``OPSYNC_ALERT_APPRISE_URL``. Apprise masks the secrets of the URLs it logs,
except at DEBUG (urllib3 too): those loggers are held at INFO while an alert is sent.
The provider's own notifier drops Apprise's result, so a failed delivery would be recorded as sent and
the alert lost: the provider's hook reads the connection, and the result of Apprise's ``notify`` decides.
"""

import html
import json
import logging
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from enum import StrEnum

import apprise
import redis
from airflow.providers.apprise.hooks.apprise import AppriseHook
from airflow.providers.smtp.notifications.smtp import SmtpNotifier
from airflow.sdk import BaseNotifier
from airflow.sdk.bases.hook import BaseHook
from airflow.sdk.exceptions import AirflowNotFoundException
from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from opsync.buffer import Buffer
from opsync.buffer.figures import buffer_stats
from opsync.config import get_settings
from opsync.errors import one_line
from opsync.monitoring.alerts import FIGURES, Change, Finding, Level, Thresholds, announce, evaluate, payload, store_findings, summary
from opsync.monitoring.drain_metrics import DrainMetrics, drain_metrics
from opsync.monitoring.status import SiteStatus, site_status
from opsync_airflow.hooks import BUFFER_CONN_ID, PRIMARY_CONN_ID, REPLICA_CONN_ID, SiteBufferHook
from opsync_airflow.operators import engine

WEBHOOK_CONN_ID = "opsync_alert_webhook"
APPRISE_CONN_ID = "opsync_alert_apprise"
NOTIFY_TYPES = {Level.critical: apprise.NotifyType.FAILURE, Level.warn: apprise.NotifyType.WARNING}
"""Apprise's type of a message by its worst firing level (colour, icon); only resolutions: success."""
BUFFER_FIGURES = frozenset({"depth", "buffer_oldest_age_s", "awaiting_replica", "dead_letters", "drain_failed_runs", "last_drain_s"})
"""Figures measured from Redis alone: judging only these needs no database connection."""


class WebhookFormat(StrEnum):
    json = "json"  # {"site", "text", "changes": [...]}
    slack = "slack"  # {"text": ...}: Slack, Mattermost, Rocket.Chat, Teams workflows


class Delivery(BaseSettings):
    """Where alerts go, from the environment; the Airflow connections ``opsync_alert_webhook`` and ``opsync_alert_apprise``
    win over the URLs here."""

    model_config = SettingsConfigDict(env_prefix="OPSYNC_ALERT_", env_file=".env", extra="ignore")

    webhook_url: SecretStr | None = Field(None, description="URL alerts are POSTed to as JSON (may hold a secret)")
    webhook_format: WebhookFormat = Field(WebhookFormat.json, description='json (generic) or slack ({"text": ...})')
    webhook_timeout_s: float = Field(10, description="How long a webhook may take to answer")
    email_to: list[str] = Field([], description="Addresses alerts are mailed to through Airflow's SMTP connection")
    apprise_url: SecretStr | None = Field(None, description="Apprise URL(s) alerts are sent to, comma-separated (may hold secrets)")


class DeliveryFailed(Exception):
    """The webhook or an Apprise service did not take the alert; it is announced again at the next evaluation."""


class SiteAlertNotifier(BaseNotifier):
    """Announce the changes in the site's findings (all of them, or ``figures``) to Apprise, the webhook and by email."""

    def __init__(
        self,
        *,
        figures: Sequence[str] = FIGURES,
        webhook_conn_id: str = WEBHOOK_CONN_ID,
        apprise_conn_id: str = APPRISE_CONN_ID,
        buffer_conn_id: str = BUFFER_CONN_ID,
        primary_conn_id: str = PRIMARY_CONN_ID,
        replica_conn_id: str = REPLICA_CONN_ID,
    ) -> None:
        super().__init__()
        if unknown := set(figures) - set(FIGURES):
            raise ValueError(f"unknown figures {sorted(unknown)}; known: {', '.join(FIGURES)}")
        self.figures = tuple(figures)
        self.webhook_conn_id = webhook_conn_id
        self.apprise_conn_id = apprise_conn_id
        self.buffer_conn_id = buffer_conn_id
        self.primary_conn_id = primary_conn_id
        self.replica_conn_id = replica_conn_id

    def notify(self, context) -> list[Change]:
        buffer = SiteBufferHook(self.buffer_conn_id).get_buffer()
        try:
            return self.announce(context, buffer)
        finally:
            buffer.client.close()

    def announce(self, context, buffer: Buffer) -> list[Change]:
        """Log what is not ok, keep a full evaluation for the dashboard, deliver what changed."""
        findings = [f for f in self.findings(buffer) if f.figure in self.figures]
        if set(self.figures) == set(FIGURES):
            store_findings(buffer, datetime.now(UTC).isoformat(), findings)
        for finding in findings:
            if finding.level != "ok":
                self.log.warning("%s %s: %s", finding.level.upper(), finding.figure, finding.message)
        changes = announce(buffer, findings, lambda changes: self.deliver(context, changes))
        if changes:
            self.log.info("announced: %s", ", ".join(f"{c.finding.figure} {c.previous} -> {c.finding.level}" for c in changes))
        else:
            self.log.info("nothing changed since the last announcement")
        return changes

    def findings(self, buffer: Buffer) -> list[Finding]:
        status, metrics = self.measure(buffer), DrainMetrics()
        if "redis" not in status.unavailable:
            try:
                metrics = drain_metrics(buffer.client, buffer)
            except redis.RedisError as exc:  # then the drain's figures are unknown, not zero
                status.unavailable["redis"] = one_line(exc)
        return evaluate(status, metrics, Thresholds())

    def measure(self, buffer: Buffer) -> SiteStatus:
        """What the figures need: Redis alone when that is enough, else the databases too."""
        if not BUFFER_FIGURES.issuperset(self.figures):
            with engine(self.primary_conn_id) as primary, engine(self.replica_conn_id) as replica:
                return site_status(buffer, primary, replica, slot=get_settings().site)
        status = SiteStatus(at=datetime.now(UTC).isoformat())
        try:
            status.buffer = buffer_stats(buffer.client, buffer)
        except redis.RedisError as exc:
            status.unavailable["redis"] = one_line(exc)
        return status

    def deliver(self, context, changes: list[Change]) -> None:
        delivery, site = Delivery(), get_settings().site
        url, fmt = self.webhook(delivery)
        with urls_unlogged():
            services = self.apprise(delivery)
        if url is None and services is None and not delivery.email_to:
            self.log.warning(
                "no Apprise URL (connection %s or OPSYNC_ALERT_APPRISE_URL), webhook (connection %s or"
                " OPSYNC_ALERT_WEBHOOK_URL) or email configured: alert only logged",
                self.apprise_conn_id,
                self.webhook_conn_id,
            )
        if services is not None:
            with urls_unlogged():
                notify_apprise(services, site, changes)
        if url is not None:
            post_json(url, payload(site, changes, slack=fmt is WebhookFormat.slack), delivery.webhook_timeout_s)
        if delivery.email_to:
            text = summary(site, changes)
            SmtpNotifier(to=delivery.email_to, subject=text.splitlines()[0], html_content=f"<pre>{html.escape(text)}</pre>").notify(context)

    def webhook(self, delivery: Delivery) -> tuple[str | None, WebhookFormat]:
        try:
            extra = BaseHook.get_connection(self.webhook_conn_id).extra_dejson
        except AirflowNotFoundException:
            url = delivery.webhook_url and delivery.webhook_url.get_secret_value()
            return url or None, delivery.webhook_format
        return extra.get("url"), WebhookFormat(extra.get("format", delivery.webhook_format))

    def apprise(self, delivery: Delivery) -> apprise.Apprise | None:
        """The services of the Apprise connection (the provider's format: a URL, or a list with tags), else of
        ``OPSYNC_ALERT_APPRISE_URL``; None when neither is set. A URL Apprise cannot use fails the delivery."""
        services = apprise.Apprise()
        try:
            connection = AppriseHook.get_connection(self.apprise_conn_id)
        except AirflowNotFoundException:
            if delivery.apprise_url is None:
                return None
            understood = services.add(delivery.apprise_url.get_secret_value())
        else:
            AppriseHook(self.apprise_conn_id).set_config_from_conn(connection, services)
            understood = len(services) > 0
        if not understood:
            where = f"connection {self.apprise_conn_id} or OPSYNC_ALERT_APPRISE_URL"
            raise DeliveryFailed(f"an Apprise URL ({where}) is not one Apprise can use")
        return services


def notify_apprise(services: apprise.Apprise, site: str, changes: list[Change]) -> None:
    """The alert's text (its first line as the title, as the e-mail's subject) to every service; any not taking it fails it."""
    text = summary(site, changes)
    worst = max((c.finding.level for c in changes if not c.resolved), key=list(Level).index, default=Level.ok)
    result = services.notify(body=text, title=text.splitlines()[0], notify_type=NOTIFY_TYPES.get(worst, apprise.NotifyType.SUCCESS))
    if not result:
        raise DeliveryFailed(f"Apprise delivery {result.status.name.lower()}: {result.failed_count} of {len(result)} services failed")


@contextmanager
def urls_unlogged() -> Iterator[None]:
    """Apprise (loading a URL, sending to it) and urllib3 log whole URLs, secrets included, at DEBUG: not while this lasts."""
    loggers = [logging.getLogger(name) for name in URL_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(logger.getEffectiveLevel(), logging.INFO))
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


URL_LOGGERS = ("apprise", "urllib3")


def post_json(url: str, body: dict, timeout_s: float) -> None:
    """POST ``body``; the errors raised name the status or the network's reason, never the URL."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            response.read()
    except urllib.error.HTTPError as exc:
        raise DeliveryFailed(f"alert webhook answered HTTP {exc.code}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise DeliveryFailed(f"alert webhook unreachable: {getattr(exc, 'reason', exc)}") from None
