"""The observatory domain opsync ships and uses by default (``OPSYNC_DOMAIN=observatory``).

Its models (:mod:`.models`, each ingestible one declaring ``__opsync__``), their Alembic
migrations (``migrations/``), the Datasette metadata (``datasette.yml``: titles, column
descriptions with units, facets, canned queries, dashboards), the API's OpenAPI examples and the
demo workload (:mod:`.demo`) and the soak workload (:mod:`.workload`). The engine finds it through the ``opsync.domains`` entry point.
"""

from pathlib import Path

from opsync.domain import Domain, Examples
from opsync_observatory.models import Base

HERE = Path(__file__).resolve().parent
SHA = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
RAW_FILE = {"path": "/data/2026-11-20/scan_0001.fits", "size_bytes": 104857600, "file_type": "fits", "checksum_sha256": SHA}

DOMAIN = Domain(
    name="observatory",
    base=Base,
    migrations=HERE / "migrations",
    datasette_metadata=HERE / "datasette.yml",
    examples=Examples(
        table="raw_data_file",
        transaction={
            "steps": [
                {
                    "table": "executed_obs_unit",
                    "ref": "obs",
                    "values": {
                        "obs_unit_id": "019a0000-0000-7000-8000-000000000001",
                        "instrument_module_id": "019a0000-0000-7000-8000-000000000002",
                        "start_time": "2026-11-21T02:10:00Z",
                    },
                },
                {"table": "raw_data_file", "values": {"executed_obs_unit_id": {"$ref": "obs"}, **RAW_FILE}},
            ]
        },
        record={"executed_obs_unit_id": "019a0000-0000-7000-8000-000000000003", **RAW_FILE},
        update={"status": "completed", "end_time": "2026-11-21T02:40:00Z"},
    ),
    legacy_revision="observatory_0001",
    demo="opsync_observatory.demo:main",
    workload="opsync_observatory.workload:WORKLOAD",
)
