"""``opsync alert-rules``: the Prometheus alerting rules at this site's thresholds."""

import click

from opsync.monitoring import alert_rules
from opsync.monitoring.alerts import Thresholds


@click.command("alert-rules")
@click.option("--job", default="opsync", show_default=True, help="Prometheus' scrape job of the ingest API's /metrics.")
def alert_rules_command(job: str) -> None:
    """Print Prometheus alerting rules (YAML) at this site's OPSYNC_ALERT_* thresholds.

    The same rules as the opsync_alerts DAG's; deploy/prometheus/opsync-rules.yml is this at the defaults."""
    click.echo(alert_rules.render(Thresholds(), job), nl=False)
