"""The data-transfer tables, on top of the engine's (``depends_on``); change capture on each, by its key column.

Revision ID: transfer_0001
Revises:
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "transfer_0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = ("transfer",)
depends_on: str | Sequence[str] | None = "engine_0003"  # change capture of a natural (text) key

CAPTURED = {
    "site": "code",
    "route": "id",
    "data_transfer_package": "package_uuid",
    "data_transfer": "id",
    "physical_copy": "id",
    "volume": "label",
}
UUID_KEY = "Time-ordered UUIDv7, generated before insert"
TIMESTAMPTZ = sa.DateTime(timezone=True)
SITE_CODE = sa.String(16)


def key() -> sa.Column:
    return sa.Column("id", sa.UUID(), nullable=False, comment=UUID_KEY)


def check(table: str, name: str, sql: str) -> sa.CheckConstraint:
    return sa.CheckConstraint(sql, name=op.f(f"ck_{table}_{name}"))


def reference(table: str, column: str, referred: str, key: str = "id") -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint([column], [f"{referred}.{key}"], name=op.f(f"fk_{table}_{column}_{referred}"))


def index(table: str, *columns: str) -> None:
    for column in columns:
        op.create_index(op.f(f"ix_{table}_{column}"), table, [column])


def upgrade() -> None:
    op.create_table(
        "site",
        sa.Column("code", sa.String(16), nullable=False, comment="Short code the operators give, e.g. CCAT"),
        sa.Column("name", sa.String(64), nullable=False, comment="Short unique name"),
        sa.Column("kind", sa.String(16), nullable=False, comment="observatory, archive or mirror"),
        sa.PrimaryKeyConstraint("code", name=op.f("pk_site")),
        sa.UniqueConstraint("name", name=op.f("uq_site_name")),
        check("site", "kind", "kind IN ('observatory', 'archive', 'mirror')"),
        comment="Places data lives",
    )
    index("site", "kind")
    op.create_table(
        "route",
        key(),
        sa.Column("origin_site_id", SITE_CODE, nullable=False, comment="Where data leaves"),
        sa.Column("destination_site_id", SITE_CODE, nullable=False, comment="Where data arrives"),
        sa.Column("method", sa.String(16), nullable=False, comment="network or shipment"),
        sa.Column("bandwidth_mbps", sa.Double(), nullable=True, comment="Nominal bandwidth, Mbit/s"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_route")),
        reference("route", "origin_site_id", "site", key="code"),
        reference("route", "destination_site_id", "site", key="code"),
        sa.UniqueConstraint(
            "origin_site_id", "destination_site_id", "method", name=op.f("uq_route_origin_site_id_destination_site_id_method")
        ),
        check("route", "elsewhere", "origin_site_id <> destination_site_id"),
        check("route", "method", "method IN ('network', 'shipment')"),
        check("route", "bandwidth_mbps", "bandwidth_mbps >= 0"),
        comment="Routes between sites",
    )
    index("route", "destination_site_id", "method")
    op.create_table(
        "data_transfer_package",
        sa.Column("package_uuid", sa.UUID(), nullable=False, comment="Given by the packaging system"),
        sa.Column("label", sa.String(128), nullable=False, comment="Archive file name"),
        sa.Column("origin_site_id", SITE_CODE, nullable=False, comment="Site that packed it"),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False, comment="Size, bytes"),
        sa.Column("checksum_sha256", sa.String(64), nullable=False, comment="SHA-256, lowercase hex"),
        sa.PrimaryKeyConstraint("package_uuid", name=op.f("pk_data_transfer_package")),
        sa.UniqueConstraint("label", name=op.f("uq_data_transfer_package_label")),
        reference("data_transfer_package", "origin_site_id", "site", key="code"),
        check("data_transfer_package", "size_bytes", "size_bytes >= 0"),
        check("data_transfer_package", "checksum_sha256", "checksum_sha256 ~ '^[0-9a-f]{64}$'"),
        comment="Packages of data to transfer",
    )
    index("data_transfer_package", "origin_site_id")
    op.create_table(
        "data_transfer",
        key(),
        sa.Column("package_uuid", sa.UUID(), nullable=False, comment="Package"),
        sa.Column("route_id", sa.UUID(), nullable=False, comment="Route taken"),
        sa.Column("state", sa.String(16), server_default=sa.text("'queued'"), nullable=False, comment="queued, moving, done or failed"),
        sa.Column("bytes_moved", sa.BigInteger(), server_default=sa.text("0"), nullable=False, comment="Bytes, so far"),
        sa.Column("started_at", TIMESTAMPTZ, nullable=True, comment="When it began moving (UTC)"),
        sa.Column("changed_at", TIMESTAMPTZ, server_default=sa.text("now()"), nullable=False, comment="Last change on the primary"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_data_transfer")),
        reference("data_transfer", "package_uuid", "data_transfer_package", key="package_uuid"),
        reference("data_transfer", "route_id", "route"),
        check("data_transfer", "state", "state IN ('queued', 'moving', 'done', 'failed')"),
        check("data_transfer", "bytes_moved", "bytes_moved >= 0"),
        comment="Transfers along routes",
    )
    index("data_transfer", "package_uuid", "route_id", "state")
    op.create_table(
        "physical_copy",
        key(),
        sa.Column("package_uuid", sa.UUID(), nullable=False, comment="Package"),
        sa.Column("site_id", SITE_CODE, nullable=False, comment="Where the copy is"),
        sa.Column("medium", sa.String(16), nullable=False, comment="disk, tape or object_store"),
        sa.Column("location", sa.String(512), nullable=False, comment="Path or volume label at the site"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_physical_copy")),
        reference("physical_copy", "package_uuid", "data_transfer_package", key="package_uuid"),
        reference("physical_copy", "site_id", "site", key="code"),
        sa.UniqueConstraint("package_uuid", "site_id", "medium", name=op.f("uq_physical_copy_package_uuid_site_id_medium")),
        check("physical_copy", "medium", "medium IN ('disk', 'tape', 'object_store')"),
        comment="Stored copies",
    )
    index("physical_copy", "package_uuid", "site_id", "medium")
    op.create_table(
        "volume",
        sa.Column("label", sa.String(32), nullable=False, comment="Label written on the volume, e.g. TAPE-0001"),
        sa.Column("site_id", SITE_CODE, nullable=False, comment="Where the volume is"),
        sa.Column("capacity_bytes", sa.BigInteger(), nullable=False, comment="Capacity, bytes"),
        sa.PrimaryKeyConstraint("label", name=op.f("pk_volume")),
        reference("volume", "site_id", "site", key="code"),
        check("volume", "capacity_bytes", "capacity_bytes >= 0"),
        comment="Storage volumes",
    )
    index("volume", "site_id")
    for table, column in CAPTURED.items():
        op.capture_changes(table, key=column)  # type: ignore[attr-defined]  # registered by opsync.migration_ops


def downgrade() -> None:
    for table in reversed(CAPTURED):
        op.drop_table(table)
