"""Every minute: judge the site's figures by the alert rules and announce what changed (Apprise, webhook, email).

Thresholds: ``OPSYNC_ALERT_*`` (``opsync.monitoring.alerts.Thresholds``); delivery: connection ``opsync_alert_apprise``
or ``OPSYNC_ALERT_APPRISE_URL``, connection ``opsync_alert_webhook`` or ``OPSYNC_ALERT_WEBHOOK_URL``, ``OPSYNC_ALERT_EMAIL_TO`` (see
``opsync_airflow.notifiers``). A problem is announced once, again when its level changes, and when it
clears; a failed delivery fails the task and is retried at the next run.
"""

from datetime import timedelta

from airflow.sdk import dag, get_current_context, task

from opsync_airflow.notifiers import SiteAlertNotifier
from opsync_airflow.settings import UNATTENDED


@task
def announce_changes() -> int:
    return len(SiteAlertNotifier().notify(get_current_context()))


@dag(
    schedule=timedelta(minutes=1),
    **UNATTENDED,
    tags=["opsync", "alerts"],
    default_args={"owner": "opsync"},
    doc_md=__doc__,
)
def opsync_alerts():
    announce_changes()


opsync_alerts()
