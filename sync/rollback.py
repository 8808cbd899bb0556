"""Roll back tiering work that a killed or failed operation left half done.

What can be left behind, and what undoes it:
- a study in `replicating` or `recalling` whose lease has no live holder:
  `failed` moves it back to `local` or `evicted` (tiering.TRANSITIONS);
- a pack row still `uploading` (an upload that crashed, or whose clean-up
  the cloud refused): its blobs are deleted, then the row;
- files of instances marked non-local (an eviction killed between its commit
  and the last unlink, a recall killed before its commit): deleted. The
  start-up sweep deletes such a file only when it is a copy of what a sound
  pack holds: the instance's size and dataset SHA-256, its pack verified by
  this box (at upload, or by a scrub: it has an ETag or a scrub's ok) and not
  found damaged. A file with the instance's content whose pack a scrub found
  damaged (after the eviction's commit) is its only good copy: the row is
  local again and leaves the pack, and the next pass uploads it anew, as an
  eviction that sees the verdict itself does (tier_steps.keep_damaged_files).
  Any other file is kept and reported: it may be the only good copy (a pack
  restore recorded but nothing on this box ever read, which may have rotted
  in the cloud), or not the instance's content (a recall writes the right
  content over it).

Every study is handled under its lease, taken only when no live holder has
it, so a pass never touches work that is still running (another job of the
agent, a CLI command). `recover_stuck` runs at the start of every sync pass,
so a study stuck by a cloud outage is rolled back without a restart;
`sweep_leftover_files`, which walks the store (and hashes the files it finds
that the index says are evicted), only at start-up. It walks the files on disk
and looks each up by path, rather than statting every evicted instance's path:
after a year most of the index is evicted (millions of rows), and the start-up
must finish within systemd's start timeout, in bounded memory.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging

from appliance.base import logsafe
from appliance.store.files import FileStore, hash_dataset
from appliance.store.index import PATHS_PER_QUERY
from appliance.store.leases import StudyBusy, StudyLease
from appliance.store.packs import packs_of
from appliance.store.study_rows import (
    InstanceRow,
    evicted_instances_of,
    non_local_among,
    studies_in_transient_state,
)
from appliance.store.tier_steps import keep_damaged_files, take_and_roll_back
from sync.context import SyncContext
from sync.evict import drop_local_files
from sync.replicate import delete_abandoned_pack

log = logging.getLogger(__name__)


async def recover_stuck(ctx: SyncContext) -> int:
    """Roll back every study whose tiering operation died; returns how many were touched."""
    touched = 0
    for study in await studies_in_transient_state(ctx.index):
        try:
            touched += await recover_study(ctx, study.id, study.study_uid)
        except StudyBusy:
            continue  # still running somewhere: not stuck
    if touched:
        log.warning("rolled back interrupted tiering work studies=%d", touched)
    return touched


async def recover_study(ctx: SyncContext, study_id: int, study_uid: str) -> int:
    """Roll back one study's dead operation; StudyBusy when a live holder still runs it."""
    assert ctx.index.writer is not None
    lease = StudyLease(ctx.index.writer, study_id, "recover")
    undone = await ctx.index.writer.submit_sync(lambda c: take_and_roll_back(c, lease, study_id))
    async with lease.kept():
        for pack in undone.packs:
            await delete_abandoned_pack(ctx, study_uid, pack)
        if undone.leftovers:
            await drop_local_files(ctx, lease, undone.leftovers)
    log.info("rolled back study=%s was=%s unverified_packs=%d", logsafe.ref(study_uid),
             undone.was, len(undone.packs))
    return 1


async def sweep_leftover_files(ctx: SyncContext) -> int:
    """Delete files of non-local instances that are copies of a sound pack's content (an
    eviction killed mid-way; see the module docstring); returns bytes freed."""
    by_study = await _files_of_evicted_instances(ctx)
    assert ctx.index.writer is not None
    freed = kept = 0
    for study_id, paths in by_study.items():
        lease = StudyLease(ctx.index.writer, study_id, "sweep")
        try:
            await ctx.index.writer.submit_sync(lease.take)
        except StudyBusy:
            continue  # a recall is writing them: they are not leftovers
        async with lease.kept():
            # Re-read under the lease: only rows still non-local are leftovers.
            packs = await packs_of(ctx.index, study_id)
            sound = {p.id for p in packs
                     if p.scrub_state != "damaged" and (p.pack_etag or p.scrub_state == "ok")}
            damaged = {p.id for p in packs if p.scrub_state == "damaged"}
            wanted = set(paths)
            leftovers = [row for row in await evicted_instances_of(ctx.index, study_id)
                         if row.path in wanted]
            intact = await asyncio.to_thread(_intact, ctx.files, leftovers)
            copies = sorted(row.path for row in intact if row.pack_fk in sound)
            # The only good copy of an instance whose pack a scrub found damaged since the
            # eviction's commit: local again, uploaded anew (as the eviction itself does).
            only = [row.path for row in intact if row.pack_fk in damaged]
            if only:
                restored = await ctx.index.writer.submit_sync(
                    functools.partial(keep_damaged_files, lease=lease, study_id=study_id,
                                      paths=only))
                log.warning("files an interrupted eviction left are the only good copy of"
                            " instances in a damaged pack; local again files=%d",
                            len(restored.paths))
            kept += len(leftovers) - len(copies) - len(only)
            freed += await drop_local_files(ctx, lease, copies)
    if freed:
        log.warning("removed files an interrupted eviction left behind bytes=%d", freed)
    if kept:
        log.warning("kept files of evicted instances that are no copy of a pack this box"
                    " verified files=%d", kept)
    return freed


async def _files_of_evicted_instances(ctx: SyncContext) -> dict[int, list[str]]:
    """Files on local disk whose instance row says they are not, by study id."""
    walk = ctx.files.iter_files()
    by_study: dict[int, list[str]] = {}
    # The walk advances in a worker thread, a chunk at a time (never two at once).
    while chunk := await asyncio.to_thread(
            lambda: list(itertools.islice(walk, PATHS_PER_QUERY))):
        for study_id, path in await non_local_among(ctx.index, chunk):
            by_study.setdefault(study_id, []).append(path)
    return by_study


def _intact(files: FileStore, rows: list[InstanceRow]) -> list[InstanceRow]:
    """The rows whose file holds the row's content (size, dataset SHA-256: read in
    chunks)."""
    intact = []
    for row in rows:
        path = files.absolute(row.path)
        try:
            if (path.stat().st_size == row.size
                    and hash_dataset(path, row.dataset_offset) == row.sha256):
                intact.append(row)
        except OSError:  # gone meanwhile, or unreadable: nothing to delete on its word
            continue
    return intact
