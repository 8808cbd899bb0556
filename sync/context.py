"""What every sync job works with: config, index, file store, blob store and the pack codec."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from appliance.audit import Auditor
from appliance.base.config import Config
from appliance.store.files import FileStore
from appliance.store.index import Index
from appliance.store.pairing import check_pairing
from sync.blobstore.base import BlobStore
from sync.cloud import PackService
from sync.container_check import confirm_container
from sync.sitekeys import site_keys_in_use


@dataclass
class SyncContext:
    config: Config
    index: Index
    files: FileStore
    store: BlobStore
    packs: PackService
    audit: Auditor


@asynccontextmanager
async def open_context(config: Config, *,
                       check_container: bool = True) -> AsyncIterator[SyncContext]:
    """The context of one command, or of the agent. `check_container=False` is for the
    agent: each of its passes checks the container before it uploads or evicts
    (sync_pass), and its start must not wait on a cloud that does not answer (a stalled
    link held it for 10 minutes of retries, past systemd's start timeout)."""
    from sync.blobstore.factory import open_blob_store

    store = open_blob_store(config.cloud_url, credentials_file=config.cloud.credentials_file)
    files = FileStore(config.store.path, reserve_bytes=config.store.reserve_bytes)
    files.create_folders()
    audit = Auditor.for_home(config, process="sync")  # run_agent starts its flusher
    try:
        async with Index(config.index.path) as index:
            await check_pairing(index, files)
            if check_container:
                await confirm_container(index, store, config.cloud_url)
            with site_keys_in_use(config.home):  # no key rotation meanwhile
                yield SyncContext(config, index, files, store,
                                  PackService.for_home(config, store, files), audit)
    finally:
        audit.close()
        store.close()
