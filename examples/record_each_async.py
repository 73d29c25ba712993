"""Record each row as its own transaction and follow them all at once with the async client (``client`` extra only).

    OPSYNC_API_URL=http://127.0.0.1:8000 OPSYNC_TOKEN=... \\
        python examples/record_each_async.py housekeeping_sample rows.json --wait replicated --timeout 600

``rows.json`` holds a list of rows. The writes go one after the other (the buffer keeps their order); the waits
run concurrently, each on its own event stream. Prints one JSON line per transaction, in the order written: its
key, its row's key and the state it reached (``failed`` with the reason; the last state seen and
``"timed_out": true`` when the wait ran out). Exits 0 when every one reached the state, else 1.
"""

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

from opsync.client import AsyncOpsyncClient, Receipt, State, TransactionFailed, WaitTimeout


async def reached(client: AsyncOpsyncClient, receipt: Receipt, state: str, timeout: float) -> dict[str, Any]:
    out = {"txn_id": str(receipt.txn_id), "id": str(receipt.id)}
    try:
        return out | {"state": (await client.wait(receipt.txn_id, state, timeout=timeout)).value}
    except TransactionFailed as failed:
        return out | {"state": State.failed.value, "reason": failed.reason}
    except WaitTimeout as late:
        return out | {"state": late.last, "timed_out": True}


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("table")
    parser.add_argument("rows", type=Path, help="JSON file: a list of rows")
    parser.add_argument("--wait", choices=[s.value for s in State if s is not State.failed], default=State.replicated.value)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for that state")
    args = parser.parse_args()
    async with AsyncOpsyncClient(os.environ["OPSYNC_API_URL"], os.environ["OPSYNC_TOKEN"]) as client:
        receipts = [await client.records(args.table, row) for row in json.loads(args.rows.read_text())]
        outcomes = await asyncio.gather(*(reached(client, r, args.wait, args.timeout) for r in receipts))
    for outcome in outcomes:
        print(json.dumps(outcome))
    return 0 if all(o["state"] != State.failed and not o.get("timed_out") for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
