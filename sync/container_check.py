"""Before a sync job uses the cloud: is it the one this index's packs are in?

A file:// cloud on a NAS whose mount failed is an empty folder on the box's
own disk (the mount point, or a folder the store creates under it); a typo in
azure://CONTAINER, or another storage account, is an empty container. The
agent would upload new versions there, verify them, and evict their local
copies; once the NAS is mounted again over that folder, those packs are
hidden and their recalls fail. So every job that opens the cloud, and each of
the agent's replicate-and-evict passes and scheduled scrubs, first HEADs the
newest packs the index recorded (up to CHECKED) and refuses to run when none
of them is there (a mount can go away under a running agent).
One pack missing among others is a scrub's finding, not this check's; a store
that cannot be reached is left to the jobs, which retry and report it. When a
scrub found every pack damaged (bit rot on a NAS, an old snapshot put back),
those packs and their manifests are what the check looks for: they are still
this box's, and with no pack to look for an unmounted NAS went unnoticed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from appliance.base.errors import PacsEdgeError
from appliance.store.index import Index
from appliance.store.packs import newest_sound_packs, newest_verified_packs
from sync.blobstore.base import BlobNotFound, BlobStore, BlobStoreUnavailable

log = logging.getLogger(__name__)

CHECKED = 3


class NotThisBoxsCloud(PacsEdgeError):
    """The configured cloud holds none of the newest packs this box uploaded."""


async def confirm_container(index: Index, store: BlobStore, url: str) -> None:
    """NotThisBoxsCloud when none of the index's newest packs is in `store`."""
    packs = await newest_sound_packs(index, limit=CHECKED)
    names = [pack.pack_name for pack in packs]
    if not packs:
        packs = await newest_verified_packs(index, limit=CHECKED)
        names = [name for pack in packs for name in (pack.pack_name, pack.manifest_name)]
    if not packs:
        return  # nothing uploaded yet: any container is this box's first
    try:
        found = await asyncio.to_thread(_present, store, names)
    except BlobStoreUnavailable as exc:
        log.warning("cloud not reachable; whether it holds this box's packs is not checked"
                    " error=%s", exc.message)
        return
    if not found:
        raise NotThisBoxsCloud(
            f"the cloud {url} holds none of the {len(packs)} newest packs this box uploaded"
            f" (e.g. {packs[0].pack_name}); nothing is uploaded or evicted",
            hint="mount the NAS (systemd: RequiresMountsFor= on the folder), or set"
                 " [cloud] url back to the container the box replicates to")


def _present(store: BlobStore, names: list[str]) -> list[str]:
    found = []
    for name in names:
        with contextlib.suppress(BlobNotFound):
            store.stat(name)
            found.append(name)
    return found
