"""Roll back tiering work that a killed or failed operation left half done.

What can be left behind, and what undoes it:
- a study in `replicating` or `recalling` whose lease has no live holder:
  `failed` moves it back to `local` or `evicted` (tiering.TRANSITIONS);
- a pack row still `uploading` (an upload that crashed, or whose clean-up
  the cloud refused): its blobs are deleted, then the row;
- files of instances marked non-local (an eviction killed between its commit
  and the last unlink, a recall killed before its commit): deleted.

Every study is handled under its lease, taken only when no live holder has
it, so a pass never touches work that is still running (another job of the
agent, a CLI command). `recover_stuck` runs at the start of every sync pass,
so a study stuck by a cloud outage is rolled back without a restart;
`sweep_leftover_files`, which stats every evicted file, only at start-up.
"""

from __future__ import annotations

import asyncio
import logging

from appliance.base import logsafe
from appliance.store.leases import StudyBusy, StudyLease
from appliance.store.study_rows import (
    evicted_instances_of,
    non_local_files,
    studies_in_transient_state,
)
from appliance.store.tier_steps import take_and_roll_back
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
    """Delete files of non-local instances (an eviction killed mid-way); returns bytes freed."""
    rows = await non_local_files(ctx.index)
    present = await asyncio.to_thread(
        lambda: [(s, p) for s, p in rows if ctx.files.absolute(p).exists()])
    by_study: dict[int, list[str]] = {}
    for study_id, path in present:
        by_study.setdefault(study_id, []).append(path)
    assert ctx.index.writer is not None
    freed = 0
    for study_id, paths in by_study.items():
        lease = StudyLease(ctx.index.writer, study_id, "sweep")
        try:
            await ctx.index.writer.submit_sync(lease.take)
        except StudyBusy:
            continue  # a recall is writing them: they are not leftovers
        async with lease.kept():
            # Re-read under the lease: only rows still non-local are leftovers.
            still = await evicted_instances_of(ctx.index, study_id)
            wanted = set(paths) & {row.path for row in still}
            freed += await drop_local_files(ctx, lease, sorted(wanted))
    if freed:
        log.warning("removed files an interrupted eviction left behind bytes=%d", freed)
    return freed
