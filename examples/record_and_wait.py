"""Record rows from a script and wait until the site's replica has them: the ``client`` extra is all it needs.

    OPSYNC_API_URL=http://127.0.0.1:8000 OPSYNC_TOKEN=... \\
        python examples/record_and_wait.py executed_obs_unit rows.json --wait replicated --timeout 600

``rows.json`` holds one row (an object) or a list of them. Prints one JSON line: the transaction, the keys
of its rows and the state it reached. Exits 0 once that state is reached, 1 if the transaction failed,
2 if the wait timed out; retrying the script with the same ``--key`` never records the rows twice.
"""

import argparse
import json
import os
import sys
from pathlib import Path

from opsync.client import OpsyncClient, State, TransactionFailed, WaitTimeout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("table")
    parser.add_argument("rows", type=Path, help="JSON file: one row or a list of rows")
    parser.add_argument("--wait", choices=[s.value for s in State if s is not State.failed], default=State.replicated.value)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for that state")
    parser.add_argument("--key", help="Idempotency-Key, to make a re-run of this script safe")
    args = parser.parse_args()
    with OpsyncClient(os.environ["OPSYNC_API_URL"], os.environ["OPSYNC_TOKEN"]) as client:
        receipt = client.records(args.table, json.loads(args.rows.read_text()), idempotency_key=args.key)
        out = {"txn_id": str(receipt.txn_id), "ids": [str(i) for i in receipt.ids]}
        try:
            out["state"] = client.wait(receipt.txn_id, args.wait, timeout=args.timeout).value
        except TransactionFailed as failed:
            print(json.dumps(out | {"state": State.failed.value, "reason": failed.reason}))
            return 1
        except WaitTimeout as late:
            print(json.dumps(out | {"state": late.last, "timed_out": True}))
            return 2
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
