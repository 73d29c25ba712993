"""The data-transfer side of an observatory: sites, routes between them, data transfer packages, transfers
along a route, and the physical copies of a package at a site.

Shaped unlike the observatory domain on purpose (tests/test_second_domain.py): no observing night, a
package key the client gives (the packaging system names its packages by UUID before opsync sees
them) in a column not called ``id``, a site keyed by the text code its operators give it (a natural key),
a buffered volume keyed by its label (a natural key too), planning tables written directly, a deletable copy, and an
``onupdate`` column on the transfers the drain's updates must stamp.
"""

import uuid
from datetime import datetime
from typing import ClassVar

from sqlalchemy import BigInteger, CheckConstraint, ForeignKey, MetaData, String, UniqueConstraint, func, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from opsync.domain import Ingest, Key, Mode
from opsync.schema import MANAGED, NAMING_CONVENTION, SHA256, TYPE_ANNOTATIONS, Keyed, Rule

SITE_KIND = Rule(choices=("observatory", "archive", "mirror"))
METHOD = Rule(choices=("network", "shipment"))
TRANSFER_STATE = Rule(choices=("queued", "moving", "done", "failed"))
MEDIUM = Rule(choices=("disk", "tape", "object_store"))
NON_NEGATIVE = Rule(ge=0)
SITE_CODE = String(16)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = TYPE_ANNOTATIONS


class Site(Base):
    """A place data lives: the observatory, the archive, a mirror; keyed by the code its operators give it; a
    closed site no route or copy names is deleted."""

    __tablename__ = "site"
    __opsync__: ClassVar[Ingest] = Ingest(Mode.direct, deletable=True, key=Key.client, facets=("kind",))
    __table_args__ = (SITE_KIND.check("kind"), {"comment": "Places data lives"})

    code: Mapped[str] = mapped_column(String(16), primary_key=True, comment="Short code the operators give, e.g. CCAT")
    name: Mapped[str] = mapped_column(String(64), unique=True, comment="Short unique name")
    kind: Mapped[str] = mapped_column(String(16), index=True, info=SITE_KIND.info, comment="observatory, archive or mirror")


class Route(Keyed, Base):
    """A way data travels from one site to another; retired routes are deleted."""

    __tablename__ = "route"
    __opsync__: ClassVar[Ingest] = Ingest(Mode.direct, deletable=True, facets=("method", "origin_site_id"))
    __table_args__ = (
        UniqueConstraint("origin_site_id", "destination_site_id", "method"),
        CheckConstraint("origin_site_id <> destination_site_id", name="elsewhere"),
        METHOD.check("method"),
        NON_NEGATIVE.check("bandwidth_mbps"),
        {"comment": "Routes between sites"},
    )

    origin_site_id: Mapped[str] = mapped_column(SITE_CODE, ForeignKey("site.code"), comment="Where data leaves")
    destination_site_id: Mapped[str] = mapped_column(SITE_CODE, ForeignKey("site.code"), index=True, comment="Where data arrives")
    method: Mapped[str] = mapped_column(String(16), index=True, info=METHOD.info, comment="network or shipment")
    bandwidth_mbps: Mapped[float | None] = mapped_column(info=NON_NEGATIVE.info, comment="Nominal bandwidth, Mbit/s")


class DataTransferPackage(Base):
    """A package of data to move, keyed by the UUID the packaging system gave it."""

    __tablename__ = "data_transfer_package"
    __opsync__: ClassVar[Ingest] = Ingest(Mode.critical, key=Key.client, facets=("origin_site_id",))
    __table_args__ = (NON_NEGATIVE.check("size_bytes"), SHA256.check("checksum_sha256"), {"comment": "Packages of data to transfer"})

    package_uuid: Mapped[uuid.UUID] = mapped_column(primary_key=True, comment="Given by the packaging system")
    label: Mapped[str] = mapped_column(String(128), unique=True, comment="Archive file name")
    origin_site_id: Mapped[str] = mapped_column(SITE_CODE, ForeignKey("site.code"), index=True, comment="Site that packed it")
    size_bytes: Mapped[int] = mapped_column(BigInteger, info=NON_NEGATIVE.info, comment="Size, bytes")
    checksum_sha256: Mapped[str] = mapped_column(String(64), info=SHA256.info, comment="SHA-256, lowercase hex")


class DataTransfer(Keyed, Base):
    """One package moving along one route; its state is updated as it goes."""

    __tablename__ = "data_transfer"
    __opsync__: ClassVar[Ingest] = Ingest(Mode.critical, facets=("state", "route_id"))
    __table_args__ = (TRANSFER_STATE.check("state"), NON_NEGATIVE.check("bytes_moved"), {"comment": "Transfers along routes"})

    package_uuid: Mapped[uuid.UUID] = mapped_column(ForeignKey("data_transfer_package.package_uuid"), index=True, comment="Package")
    route_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("route.id"), index=True, comment="Route taken")
    state: Mapped[str] = mapped_column(
        String(16), server_default=text("'queued'"), index=True, info=TRANSFER_STATE.info, comment="queued, moving, done or failed"
    )
    bytes_moved: Mapped[int] = mapped_column(BigInteger, server_default=text("0"), info=NON_NEGATIVE.info, comment="Bytes, so far")
    started_at: Mapped[datetime | None] = mapped_column(comment="When it began moving (UTC)")
    changed_at: Mapped[datetime] = mapped_column(
        server_default=func.now(), onupdate=func.now(), info=MANAGED, comment="Last change on the primary"
    )


class PhysicalCopy(Keyed, Base):
    """A package stored at a site on one medium; deleted when the copy is wiped."""

    __tablename__ = "physical_copy"
    __opsync__: ClassVar[Ingest] = Ingest(Mode.critical, deletable=True, facets=("site_id", "medium"))
    __table_args__ = (UniqueConstraint("package_uuid", "site_id", "medium"), MEDIUM.check("medium"), {"comment": "Stored copies"})

    package_uuid: Mapped[uuid.UUID] = mapped_column(ForeignKey("data_transfer_package.package_uuid"), index=True, comment="Package")
    site_id: Mapped[str] = mapped_column(SITE_CODE, ForeignKey("site.code"), index=True, comment="Where the copy is")
    medium: Mapped[str] = mapped_column(String(16), index=True, info=MEDIUM.info, comment="disk, tape or object_store")
    location: Mapped[str] = mapped_column(String(512), comment="Path or volume label at the site")


class Volume(Base):
    """A storage volume at a site (a tape, a disk), keyed by the label written on it: buffered like the copies."""

    __tablename__ = "volume"
    __opsync__: ClassVar[Ingest] = Ingest(Mode.critical, deletable=True, key=Key.client, facets=("site_id",))
    __table_args__ = (NON_NEGATIVE.check("capacity_bytes"), {"comment": "Storage volumes"})

    label: Mapped[str] = mapped_column(String(32), primary_key=True, comment="Label written on the volume, e.g. TAPE-0001")
    site_id: Mapped[str] = mapped_column(SITE_CODE, ForeignKey("site.code"), index=True, comment="Where the volume is")
    capacity_bytes: Mapped[int] = mapped_column(BigInteger, info=NON_NEGATIVE.info, comment="Capacity, bytes")
