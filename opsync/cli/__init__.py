"""``opsync``: the operators' command line, one group of subcommands per area (``tokens``, ``dlq``,
``backlog``) plus ``status``, ``replay`` and ``alert-rules``, each in its own module here.

Output is for people by default (tables, messages, a progress bar) and for scripts with ``--json``;
either way data goes to stdout and messages to stderr. Every command exits with one of
:data:`opsync.cli.common.EXIT_CODES`, so a script can tell "try again later" (5) from "fix something" (1, 2) from
"look at the site" (3).
"""

import click

from opsync.cli import alert_rules, backlog, dlq, replay, status, tokens
from opsync.cli.common import EXIT_CODES

EPILOG = "\b\nExit codes:\n" + "\n".join(f"  {code:<3} {meaning}" for code, meaning in EXIT_CODES.items())


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, epilog=EPILOG)
@click.version_option(package_name="opsync", prog_name="opsync", message="%(prog)s %(version)s")
def main() -> None:
    """Operate an opsync site: its buffer, dead letters, tokens and read model."""


for command in (
    tokens.tokens_group,
    status.status,
    dlq.dlq_group,
    backlog.backlog_group,
    replay.replay,
    alert_rules.alert_rules_command,
):
    main.add_command(command)
