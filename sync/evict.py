"""Evict: free local disk by deleting files of studies whose packs are verified in the cloud.

The transition to `evicted` (and `is_local = 0` for every instance) is
committed first, in the transaction that takes the study's lease; the files
are deleted after, fenced by that lease, so no recall of the same study can
write them in between. A crash in between leaves files the index no longer
needs (removed when the agent starts, see sync.rollback), never an index row
whose only copy was deleted. The index keeps every row, so C-FIND still
answers (InstanceAvailability NEARLINE).

A pack that restore recorded (its manifest read, not its bytes) is scrubbed
first: the files restore kept may be the only good copy of a pack that rotted
before the index was lost (sync.scrub.read_back_unread_packs).

A scrub takes no lease (sync.scrub), so its verdict that a pack is damaged
can be committed after the eviction's commit, while the files are still on
disk. The transaction right before the unlinks (`keep_damaged_files`, which
also fences the lease) therefore keeps the files of every instance in a pack
found damaged: they are local again, out of that pack, and the next
replication uploads them as a new version before deleting them; the eviction
deletes the others and fails with NotEvictable. A verdict committed after
that transaction finds the eviction done, as if it had come a moment later.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence

from appliance.base import logsafe
from appliance.store import database
from appliance.store.disk import DiskState
from appliance.store.leases import StudyLease
from appliance.store.prefetch_rows import held_study_uids
from appliance.store.study_rows import StudyRow, replicated_by_last_access
from appliance.store.tier_steps import (
    NotEvictable,
    drop_unneeded_files,
    keep_damaged_files,
    mark_evicted,
)
from appliance.store.tiering import TierState
from sync.context import SyncContext
from sync.crashpoints import crash_point
from sync.escrow_gate import eviction_allowed, require_escrow
from sync.scrub import confirm_cloud_copy, read_back_unread_packs, refuse_if_at_risk
from sync.threads import in_thread

log = logging.getLogger(__name__)

DAY = 86400.0
# Files decided and deleted per write transaction (at most index.PATHS_PER_QUERY): the
# longest an ingest's commit waits for an eviction, against one WAL fsync per batch.
DELETES_PER_COMMIT = 64

_REPLICATE_FIRST = ("replicate it first (pacs-edge sync --once); only studies whose packs are"
                    " verified in the cloud can be evicted")
# An evicted study was told to replicate first, which an operator cannot do.
_NOT_EVICTABLE_HINTS = {
    TierState.EVICTED: "nothing to do: its local files are already gone (pacs-edge recall"
                       " brings them back)",
    TierState.RECALLING: "a recall is bringing it back: evict it once that has finished",
}


async def evict_study(ctx: SyncContext, study: StudyRow) -> int:
    """Evict one study; returns the bytes freed."""
    assert ctx.index.writer is not None
    require_escrow(ctx)
    study = await read_back_unread_packs(ctx, study)  # packs restore recorded unread
    await refuse_if_at_risk(ctx, study)  # a damaged only copy: keep whatever is local
    if study.tier_state != TierState.REPLICATED:
        raise NotEvictable(f"study is {study.tier_state}, not replicated",
                           hint=_NOT_EVICTABLE_HINTS.get(study.tier_state, _REPLICATE_FIRST))
    await confirm_cloud_copy(ctx, study)  # HEAD every pack: refuse a missing or changed one
    writer = ctx.index.writer
    lease = StudyLease(writer, study.id, "evict")
    paths = await writer.submit_sync(lambda c: mark_evicted(c, lease, study.id))
    async with lease.kept():
        crash_point("evict:after-commit")
        # A scrub's verdict since the commit: those files stay (see the module docstring).
        kept = await writer.submit_sync(lambda c: keep_damaged_files(c, lease, study.id, paths))
        keep = set(kept.paths)
        gone = [p for p in paths if p not in keep]
        freed = await drop_local_files(ctx, lease, gone)
    if gone:
        log.info("evicted study=%s files=%d bytes=%d", logsafe.ref(study.study_uid),
                 len(gone), freed)
        ctx.audit.evicted(study, len(gone))
    if kept.paths:
        log.warning("eviction kept files of instances in a pack a scrub found damaged meanwhile"
                    " study=%s files=%d pack=%s", logsafe.ref(study.study_uid),
                    len(kept.paths), kept.pack_names[0])
        raise NotEvictable(
            f"a scrub found the pack {kept.pack_names[0]} damaged while the eviction ran:"
            f" {len(kept.paths)} file(s) of its instances are kept on local disk"
            f" ({len(gone)} other(s) deleted)",
            hint="nothing to do: the next sync pass uploads them again as a new version and"
                 " deletes them only when that is verified")
    return freed


async def drop_local_files(ctx: SyncContext, lease: StudyLease, paths: Sequence[str]) -> int:
    """Delete files whose instances are already marked non-local (after the commit), while
    `lease` is still held; returns the bytes freed. Each DELETES_PER_COMMIT of them are
    decided and deleted in one write transaction that fences the lease first
    (tier_steps.drop_unneeded_files): a file that a row marked local names stays, one
    whose content was sent again meanwhile (X, Y, X) included, as does a prior
    version's (its only copy). The transaction holds SQLite's write lock while it
    unlinks, so an ingest waits at most one such batch for its commit."""
    assert ctx.index.writer is not None
    writer = ctx.index.writer
    freed = 0
    kept = 0
    for start in range(0, len(paths), DELETES_PER_COMMIT):
        batch = paths[start:start + DELETES_PER_COMMIT]
        dropped = await writer.submit_sync(
            lambda c, b=batch: drop_unneeded_files(c, lease, b, lambda p: _unlink(ctx, p)))
        freed += dropped.freed
        kept += dropped.kept
        crash_point("evict:mid-delete")
    if kept:
        log.warning("kept files that rows marked local name (sent again meanwhile, or a prior"
                    " version's) files=%d", kept)

    def remove_folders() -> None:
        for relative in {str(ctx.files.absolute(p).parent) for p in paths}:
            with contextlib.suppress(OSError):
                ctx.files.absolute(relative).rmdir()  # only when empty

    await in_thread(lambda _stop: remove_folders())
    return freed


def _unlink(ctx: SyncContext, relative: str) -> int:
    """Delete one stored file (in the writer's transaction); the bytes it held."""
    path = ctx.files.absolute(relative)
    try:
        size = path.stat().st_size
        path.unlink()
    except FileNotFoundError:
        return 0
    return size


async def eviction_candidates(ctx: SyncContext) -> list[StudyRow]:
    """Replicated studies to evict now: idle past `evict_after_days`, then least recently
    used ones while the store's disk is above the high watermark (down to the low one).
    Priors a prefetch chose stay until their hold ends (appliance/services/prefetch.py):
    the radiologist reads them next to the new study."""
    if not eviction_allowed(ctx):
        return []
    sync = ctx.config.sync
    held = await database.run_sync(
        ctx.index.reader, lambda c: held_study_uids(
            c, time.time(), keep_local_seconds=ctx.config.prefetch.keep_local_days * DAY))
    replicated = [s for s in await replicated_by_last_access(ctx.index)
                  if s.study_uid not in held]
    chosen: list[StudyRow] = []
    if sync.evict_after_days > 0:
        cutoff = time.time() - sync.evict_after_days * DAY
        chosen = [s for s in replicated if s.last_access_at < cutoff]
    disk = await asyncio.to_thread(ctx.files.disk)
    room = _Room(disk, chosen)
    over = room.above(sync.disk_high_watermark_percent)
    for study in replicated:
        if not over & room.above(sync.disk_low_watermark_percent):
            break
        if study not in chosen:
            chosen.append(study)
            room.free(study)
    return chosen


class _Room:
    """The store's use in bytes and in inodes, less what the studies chosen so far
    will free. Each is a room of its own: a store of many small instances runs out of
    inodes with bytes to spare, and then refuses every new file (one inode an
    instance; a study's series and study folders are not counted). What is above the
    high watermark is brought down to the low one; the other is left as it is."""

    def __init__(self, disk: DiskState, chosen: Sequence[StudyRow]) -> None:
        self._disk = disk
        self._bytes = disk.total_bytes - disk.free_bytes
        self._inodes = disk.total_inodes - disk.free_inodes
        for study in chosen:
            self.free(study)

    def free(self, study: StudyRow) -> None:
        self._bytes -= study.total_bytes
        self._inodes -= study.instance_count

    def above(self, percent: float) -> frozenset[str]:
        """Which of "bytes" and "inodes" are used above `percent`."""
        used = {"bytes": (self._bytes, self._disk.total_bytes),
                "inodes": (self._inodes, self._disk.total_inodes)}
        return frozenset(name for name, (count, total) in used.items()
                         if count * 100 > total * percent)
