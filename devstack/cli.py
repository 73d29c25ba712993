"""``python -m devstack.cli up|down|status``: the local site, as ``make up``, ``make down`` and ``make status`` run it."""

import argparse
import sys

from rich.console import Console

from devstack.local import LocalStack

console = Console(soft_wrap=True)


def say(message: str) -> None:
    console.print(message, highlight=False)


def up(stack: LocalStack) -> None:
    stack.up(say)
    s = stack.settings
    say("\n[bold green]opsync is up[/]")
    say(f"  ingest API   http://{s.host}:{s.api_port}/docs")
    say(f"  Datasette    http://{s.host}:{s.datasette_port}/")
    say(f"  Airflow      http://{s.host}:{s.airflow_port}/  (login: admin / {s.secrets['airflow_admin_password']})")
    say(f"  primary      postgresql://{s.host}:{s.primary_port}/opsync  (replica on port {s.replica_port})")
    say(f"  Redis        redis://{s.host}:{s.redis_port}/0")
    say(f"  API token    {s.secrets['demo_token']}  (all tables; try: make demo)")
    say(f"  Datasette token {s.secrets['datasette_token']}  (scripts: Authorization: Bearer …; people browse freely with make up)")
    say(f"  logs         {s.logs}/   secrets in {s.run_dir / 'secrets.json'}")


def status(stack: LocalStack) -> int:
    if stack.supervisord_pid() is None:
        say("opsync is not running (make up)")
        return 3
    say(stack.supervisorctl("status", check=False).stdout.rstrip())
    results = stack.status()
    for name, result in results:
        say(f"{name:<11} {'[green]ok[/]' if result.ok else '[red]FAIL[/]'}  {result.detail}")
    return 0 if all(r.ok for _, r in results) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devstack.cli", description=__doc__)
    parser.add_argument("command", choices=["up", "down", "status"])
    args = parser.parse_args(argv)
    stack = LocalStack()
    try:
        if args.command == "up":
            up(stack)
        elif args.command == "down":
            stack.down(say)
        else:
            return status(stack)
    except RuntimeError as exc:
        console.print(f"[red]error:[/] {exc}", highlight=False)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
