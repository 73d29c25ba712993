"""A second domain, for the tests only: the data-transfer side (:mod:`.models`), its Alembic branch
(``migrations/``) and its Datasette metadata (``datasette.yml``).

Not installed: tests/test_second_domain.py publishes it under the ``opsync.domains`` entry-point
group from a ``.dist-info`` of its own on ``PYTHONPATH`` (what installing a package would leave)
and selects it with ``OPSYNC_DOMAIN=transfer``, as a site selects its own.
"""

from pathlib import Path

from opsync.domain import Domain, Examples
from tests.domains.transfer.models import Base

HERE = Path(__file__).resolve().parent
PACKAGE = "019b0000-0000-4000-8000-00000000a001"

DOMAIN = Domain(
    name="transfer",
    base=Base,
    migrations=HERE / "migrations",
    datasette_metadata=HERE / "datasette.yml",
    examples=Examples(
        table="data_transfer",
        transaction={
            "steps": [
                {
                    "table": "data_transfer_package",
                    "id": PACKAGE,  # the key column (package_uuid) travels as the step's id
                    "values": {
                        "label": "pkg-0001.tar",
                        "origin_site_id": "CCAT",
                        "size_bytes": 5_000_000_000,
                        "checksum_sha256": "ab" * 32,
                    },
                },
                {"table": "data_transfer", "values": {"package_uuid": PACKAGE, "route_id": "019b0000-0000-7000-8000-000000000002"}},
            ]
        },
        record={"package_uuid": PACKAGE, "route_id": "019b0000-0000-7000-8000-000000000002"},
        update={"state": "moving", "bytes_moved": 1_000_000},
    ),
)
