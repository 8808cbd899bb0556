"""Compose the legacy PACS of a migration: its SCU edge, TLS, and for C-GET the ingest;
and for C-MOVE the probe of this box's own DICOM port (where the moves deliver).

Kept apart from migrate_commands.py so that `migrate status` never loads
pynetdicom. For C-GET this process receives the instances itself: it routes
pynetdicom's receive spool into the store's spool folder (as `serve` does) and
ingests each instance through the same IngestService before answering it.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from dataclasses import dataclass

from appliance.audit import Auditor
from appliance.base.config import Config
from appliance.base.errors import MigrationError
from appliance.dimse.legacy_scu import (
    GetReceiver,
    LegacyPeer,
    box_listening,
    instances_identifier,
    listing_identifier,
)
from appliance.dimse.server import configure_pynetdicom
from appliance.dimse.spooling import SpoolRouter
from appliance.dimse.tls import client_context
from appliance.services.ingest import IngestService
from appliance.services.legacy_migration import RetrieveOutcome, check_peer
from appliance.services.peers import Allowlist, Peer
from appliance.store.files import FileStore
from appliance.store.index import Index
from appliance.store.migration_rows import RunSettings
from provisioning.certs import TlsPaths


def _peer(config: Config, settings: RunSettings) -> tuple[Peer, ssl.SSLContext | None]:
    """The run's peer as it is in the allowlist now, and the TLS client context for it."""
    configure_pynetdicom()
    peer = Allowlist(config.peers_path).peers().get(settings.peer)
    if peer is None:
        raise MigrationError(f"peer {settings.peer!r} of this migration left the allowlist",
                             hint=f"pacs-edge peers add {settings.peer} ...")
    tls = None
    if peer.tls and config.dicom.tls_port:
        paths = TlsPaths(config.home)
        tls = client_context(cert=paths.node_cert, key=paths.node_key, ca=paths.ca_cert)
    return peer, tls


def legacy_finder(config: Config, settings: RunSettings) -> LegacyPeer:
    """The run's peer for C-FINDs only (`migrate verify`)."""
    peer, tls = _peer(config, settings)
    if not peer.may("find"):
        raise MigrationError(f"peer {peer.name!r} lacks permission find",
                             hint=f"pacs-edge peers add {peer.name} ... --allow find,...")
    return LegacyPeer(peer, config.dicom, tls_client=tls)


def legacy_source(config: Config, settings: RunSettings, index: Index,
                  auditor: Auditor) -> LegacyPeer:
    """The run's peer as it is in the allowlist now (checked again: peers change)."""
    peer, tls = _peer(config, settings)
    check_peer(peer, settings.via)
    receiver = None
    if settings.via == "get":
        files = FileStore(config.store.path, reserve_bytes=config.store.reserve_bytes)
        files.create_folders()  # no sweep: serve may be receiving into the spool
        spools = SpoolRouter(files)
        spools.install()
        receiver = GetReceiver(
            spools, IngestService(files, index, max_inflated=config.store.max_inflated_mb << 20),
            source_ae=peer.ae_title,
            on_stored=lambda result: auditor.imported("migrate", result.header))
    return LegacyPeer(peer, config.dicom, tls_client=tls, on_store=receiver)


@dataclass(frozen=True)
class LegacyAudit:
    """The migration's requests to its legacy PACS in the audit trail (MigrationAudit)."""

    auditor: Auditor
    peer: Peer
    via: str

    def listed(self, day: str, *, queries: int, studies: int, reason: str = "") -> None:
        self.auditor.legacy_queried(peer_ae=self.peer.ae_title, address=self.peer.host,
                                    identifier=listing_identifier(day), queries=queries,
                                    matches=studies, reason=reason)

    def retrieved(self, study_uid: str, outcome: RetrieveOutcome, *, reason: str = "") -> None:
        self.auditor.legacy_retrieved(peer_ae=self.peer.ae_title, address=self.peer.host,
                                      action=f"C-{self.via.upper()}", study_uid=study_uid,
                                      completed=outcome.completed, failed=outcome.failed,
                                      reason=reason)

    def verified(self, *, studies: int, instances: int) -> None:
        """`migrate verify`'s image-level C-FINDs, one per study, as one record."""
        self.auditor.legacy_queried(peer_ae=self.peer.ae_title, address=self.peer.host,
                                    identifier=instances_identifier(), queries=studies,
                                    matches=instances, what="migration verify")


def legacy_audit(config: Config, settings: RunSettings, auditor: Auditor) -> LegacyAudit:
    """The audit trail of the run's C-FINDs and C-MOVEs/C-GETs to its legacy PACS."""
    peer, _ = _peer(config, settings)
    return LegacyAudit(auditor, peer, settings.via)


def move_destination_probe(config: Config, settings: RunSettings) -> Callable[[], bool] | None:
    """For a C-MOVE run: whether `pacs-edge serve` takes connections on this box's DICOM
    port (the migration waits for it instead of failing studies while it is away)."""
    return box_listening(config.dicom) if settings.via == "move" else None
