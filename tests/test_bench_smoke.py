"""``make bench-smoke`` (``bench/smoke.py``) fails a benchmark that crashes, hangs, misses a FIGURES key
or does not end with a JSON line, and passes one that only misses its targets. Tiny scripts stand in for
benchmarks: this tests the runner, not a service."""

import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from bench import smoke
from tests.conftest import wait_for

GOOD = textwrap.dedent("""
    import json, sys
    FIGURES = ("rate", "rate_target_met")
    if sys.argv[1:] != ["--size", "smoke"]:
        raise SystemExit(f"not run at smoke size: {sys.argv[1:]}")
    print("progress", file=sys.stderr)
    print("a summary line")
    print(json.dumps({"rate": 3, "rate_target_met": False, "extra": 1}))
""")


def bench(directory, name: str, source: str):
    path = directory / f"{name}.py"
    path.write_text(textwrap.dedent(source))
    return path


@pytest.mark.parametrize(
    ("source", "error"),
    [
        (GOOD.replace('"extra": 1}))', '"extra": 1}))\nraise SystemExit(3)'), "exited with status 3"),
        (GOOD.replace('"rate": 3, ', ""), "lacks FIGURES keys: rate"),
        (GOOD + 'print("done")\n', "last stdout line is not a JSON object: 'done'"),
        (GOOD.replace("print(json.dumps(", "print(json.dumps([").replace("})", "}])"), "not a JSON object"),
        ('FIGURES = ("rate",)\n', "printed nothing on stdout"),
        ('FIGURES = tuple(["rate"])\n', "FIGURES must be a literal tuple of strings"),
        ('FIGURES = ("rate", 2)\n', "FIGURES must be a literal tuple of strings"),
    ],
)
def test_a_broken_benchmark_fails(tmp_path, source, error):
    verdict = smoke.check(bench(tmp_path, "broken", source))
    assert verdict.error is not None and error in verdict.error


def test_a_benchmark_that_misses_its_targets_at_smoke_size_passes(tmp_path):
    verdict = smoke.check(bench(tmp_path, "good", GOOD))
    assert verdict.error is None, verdict.error


def test_a_benchmark_past_its_timeout_fails_and_nothing_it_started_is_left(tmp_path):
    """The benchmark is interrupted (so it can stop its services), and its process group killed."""
    pid_file = tmp_path / "child.pid"
    path = bench(
        tmp_path,
        "hangs",
        f"""
        import subprocess, time
        FIGURES = ("rate",)
        child = subprocess.Popen(["sleep", "600"])
        open({str(pid_file)!r}, "w").write(str(child.pid))
        time.sleep(600)
    """,
    )
    started = time.monotonic()
    verdict = smoke.check(path, timeout_s=2)
    assert "no result within 2 s" in verdict.error
    assert time.monotonic() - started < 30
    wait_for(lambda: dead(int(pid_file.read_text())), timeout=10, what="the benchmark's child killed")


def dead(pid: int) -> bool:
    """Gone, or killed and not yet reaped by init (its parent, the benchmark, died first)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_the_runner_finds_every_script_that_declares_figures_and_exits_1_if_one_fails(tmp_path):
    bench(tmp_path, "good", GOOD)
    bench(tmp_path, "other", GOOD)
    bench(tmp_path, "helper", 'raise SystemExit("a helper without FIGURES is not a benchmark and never runs")\n')
    passing = subprocess.run([sys.executable, smoke.__file__, "--dir", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert passing.returncode == 0, passing.stdout + passing.stderr
    assert [line.split()[:2] for line in passing.stdout.splitlines()[:-1]] == [["ok", "good"], ["ok", "other"]]

    bench(tmp_path, "missing", GOOD.replace('"rate": 3, ', ""))
    failing = subprocess.run([sys.executable, smoke.__file__, "--dir", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert failing.returncode == 1
    assert "FAIL missing" in failing.stdout and "failed: missing" in failing.stdout.splitlines()[-1]


def test_every_benchmark_in_the_repository_is_found():
    """What CI runs: the benchmarks of bench/ at least, never floor.py (the ingest bench's helper app)."""
    names = {path.stem for path in smoke.benchmarks(smoke.BENCH)}
    assert {"ingest", "drain", "read", "outage"} <= names and not names & {"floor", "smoke"}
