"""``make bench-smoke``: every benchmark at smoke size, so that none stops working unnoticed (CI runs it).

A benchmark is any ``bench/*.py`` that assigns ``FIGURES`` at module level: a literal tuple of
strings, read from its source, so no code of a benchmark runs here and a new one needs no entry.
Each runs as ``python bench/<name>.py --size smoke`` in its own process group, with a timeout, and
passes when it exits 0 and its last stdout line is a JSON object holding every key of its
``FIGURES``. Figures and targets are not judged: smoke sizes are too small for them, so a missed
target passes; a crash, a timeout or a missing key fails.

Benchmarks' progress goes to stderr as they run; one verdict line per benchmark to stdout; exit 1
if any failed. ``python bench/smoke.py --help`` for the options.
"""

import argparse
import ast
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
TIMEOUT_S = 120  # per benchmark, against hangs: smoke sizes take 20-25 s on two quiet cores, about a minute on busy ones
GRACE_S = 30  # after the interrupt at a timeout, for a benchmark to stop its own services


@dataclass
class Verdict:
    name: str
    seconds: float
    error: str | None  # None: passed


def benchmarks(directory: Path) -> list[Path]:
    """The scripts in ``directory`` that assign ``FIGURES``; helpers such as ``floor.py`` do not."""
    return [path for path in sorted(directory.glob("*.py")) if figures_value(path) is not None]


def figures_value(path: Path) -> ast.expr | None:
    """The expression assigned to ``FIGURES`` at module level in ``path``, or None."""
    for node in ast.parse(path.read_text(), str(path)).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "FIGURES" for t in node.targets):
            return node.value
    return None


def declared(path: Path) -> tuple[str, ...]:
    """The benchmark's ``FIGURES``; ValueError unless it is a literal tuple of strings."""
    figures = ast.literal_eval(figures_value(path))
    if not isinstance(figures, tuple) or not all(isinstance(key, str) for key in figures):
        raise ValueError(f"{figures!r} is not a tuple of strings")
    return figures


def stop(proc: subprocess.Popen) -> None:
    """Interrupt the benchmark (as Ctrl-C would), so it stops the services it started; then kill what is left of its group.

    The interrupt matters: ``pg_ctl`` detaches PostgreSQL into a session of its own, so only the
    benchmark's own clean-up stops it; the API, Datasette and Redis are in the group.
    """
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(GRACE_S)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run(path: Path, timeout_s: float) -> tuple[int | None, str]:
    """``path --size smoke``: (exit status, or None after a timeout; its stdout)."""
    proc = subprocess.Popen(
        [sys.executable, str(path), "--size", "smoke"], stdout=subprocess.PIPE, text=True, cwd=BENCH.parent, start_new_session=True
    )
    try:
        stdout, _ = proc.communicate(timeout=timeout_s)
        return proc.returncode, stdout
    except subprocess.TimeoutExpired:
        return None, ""
    finally:
        stop(proc)


def check(path: Path, timeout_s: float = TIMEOUT_S) -> Verdict:
    """Run one benchmark at smoke size and say what, if anything, is wrong with what it printed."""
    started = time.monotonic()
    try:
        figures = declared(path)
    except ValueError as exc:
        return Verdict(path.stem, 0.0, f"FIGURES must be a literal tuple of strings ({exc})")
    status, stdout = run(path, timeout_s)
    verdict = Verdict(path.stem, round(time.monotonic() - started, 1), None)
    lines = stdout.splitlines()
    if status is None:
        verdict.error = f"no result within {timeout_s:g} s (stopped)"
    elif status != 0:
        verdict.error = f"exited with status {status}"
    elif not lines:
        verdict.error = "printed nothing on stdout"
    else:
        try:
            last = json.loads(lines[-1])
        except json.JSONDecodeError:
            last = None
        if not isinstance(last, dict):
            verdict.error = f"its last stdout line is not a JSON object: {lines[-1][:200]!r}"
        elif missing := [key for key in figures if key not in last]:
            verdict.error = f"its last line lacks FIGURES keys: {', '.join(missing)}"
    return verdict


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=BENCH, help="where the benchmarks are (default bench/)")
    parser.add_argument("--timeout", type=float, default=TIMEOUT_S, help=f"seconds per benchmark (default {TIMEOUT_S})")
    args = parser.parse_args()
    found = benchmarks(args.dir)
    if not found:
        print(f"no benchmark (a script assigning FIGURES) in {args.dir}", flush=True)
        return 1
    started, verdicts = time.monotonic(), []
    for path in found:
        print(f"{path.stem}: --size smoke …", file=sys.stderr, flush=True)
        verdicts.append(verdict := check(path, args.timeout))
        print(
            f"{'ok  ' if verdict.error is None else 'FAIL'} {verdict.name} ({verdict.seconds:g} s)"
            + (f": {verdict.error}" if verdict.error else ""),
            flush=True,
        )
    failed = [v.name for v in verdicts if v.error]
    print(
        f"{len(verdicts) - len(failed)} of {len(verdicts)} benchmarks passed at smoke size in "
        f"{time.monotonic() - started:.0f} s" + (f"; failed: {', '.join(failed)}" if failed else ""),
        flush=True,
    )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
