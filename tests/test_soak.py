"""The short soak: a whole site under writes and a dozen kinds of faults loses, duplicates and strands nothing.

Runs ``python -m opsync.stack.soak`` as ``make soak`` does (its own temporary site on free ports), with
a fixed seed so that a failure replays, and judges it by the one JSON line it prints last.
"""

import json
import subprocess
import sys

import pytest

from opsync.stack.settings import REPO

pytestmark = pytest.mark.stack

SEED = 20261121
RECORDS = 5000


def test_nothing_acknowledged_is_lost_duplicated_or_stuck_under_faults():
    proc = subprocess.run(
        [
            sys.executable, "-m", "opsync.stack.soak", "--seed", str(SEED), "--records", str(RECORDS),
            "--duration", "100", "--fault-gap", "0.5,2", "--settle-timeout", "120",
        ],
        cwd=REPO, capture_output=True, text=True, timeout=420,
    )
    lines = proc.stdout.strip().splitlines()
    assert lines, f"no report (exit {proc.returncode}):\n{proc.stderr[-6000:]}"
    result = json.loads(lines[-1])
    context = f"{json.dumps(result, indent=1)}\n{proc.stderr[-6000:]}"
    assert result["acknowledged"] >= RECORDS, context
    assert result["fault_kinds"] >= 8 and sum(result["faults"].values()) >= 8, context
    assert (result["lost"], result["duplicated"], result["stuck"], result["stale"]) == (0, 0, 0, 0), context
    assert result["invalid_sent"] > 0 and result["invalid_failed"] == result["invalid_sent"], context
    assert result["resubmitted"] > 0 and result["updates"] > 0, context
    assert result["settled"] and not result["errors"] and not result["refused"], context
    assert proc.returncode == 0, context
