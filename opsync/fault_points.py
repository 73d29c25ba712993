"""Crash points a test harness arms in another process, so it can SIGKILL a drainer inside its window.

Inert unless the process starts with ``OPSYNC_FAULT_POINT`` set: then, on reaching that point
(:func:`reach`; in :func:`opsync.drain.drain_run`: ``after_claim``, a run's first batch claimed and
nothing sent; ``next_claimed``, batch N+1 claimed while batch N commits; ``after_commit``, committed
and not acknowledged), it writes its pid to the file ``OPSYNC_FAULT_SIGNAL`` names and blocks there
until killed; it never goes past the point. Unset (as in production), a point costs one string
comparison. (The soak's faults, from outside the processes, are :mod:`devstack.faults`.)
"""

import os
import signal
import time
from pathlib import Path

ARMED = os.environ.get("OPSYNC_FAULT_POINT", "")  # read once, at import: nothing arms a running process
HOLD_S = 120  # how long an armed process waits for the harness before killing itself at the point


def reach(point: str) -> None:
    """Block at ``point`` when it is the armed one: the harness learns it from the signal file, then kills."""
    if point != ARMED:
        return
    signal_file = Path(os.environ["OPSYNC_FAULT_SIGNAL"])
    written = signal_file.with_name(signal_file.name + ".tmp")
    written.write_text(str(os.getpid()))
    written.replace(signal_file)  # whole or absent: the harness never reads half a pid
    time.sleep(HOLD_S)
    os.kill(os.getpid(), signal.SIGKILL)
