"""The observatory domain opsync ships and uses by default (``OPSYNC_DOMAIN=observatory``).

Its models (:mod:`.models`), their Alembic migrations (``migrations/``), the Datasette metadata
(``datasette.yml``: titles, column descriptions with units, facets, canned queries, dashboards) and
the demo workload (:mod:`.demo`). The engine finds it through the ``opsync.domains`` entry point.
"""

from pathlib import Path

from opsync.domain import Domain
from opsync_observatory.models import Base

HERE = Path(__file__).resolve().parent

DOMAIN = Domain(
    name="observatory",
    base=Base,
    migrations=HERE / "migrations",
    datasette_metadata=HERE / "datasette.yml",
    legacy_revision="observatory_0001",
)
