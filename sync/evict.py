"""Evict: free local disk by deleting files of studies whose packs are verified in the cloud.

The transition to `evicted` (and `is_local = 0` for every instance) is
committed first, in the transaction that takes the study's lease; the files
are deleted after, fenced by that lease, so no recall of the same study can
write them in between. A crash in between leaves files the index no longer
needs (removed when the agent starts, see sync.rollback), never an index row
whose only copy was deleted. The index keeps every row, so C-FIND still
answers (InstanceAvailability NEARLINE).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from collections.abc import Sequence

from appliance.base import logsafe
from appliance.store import database
from appliance.store.leases import StudyLease
from appliance.store.prefetch_rows import held_study_uids
from appliance.store.study_rows import StudyRow, replicated_by_last_access
from appliance.store.tier_steps import NotEvictable, mark_evicted
from appliance.store.tiering import TierState
from sync.context import SyncContext
from sync.crashpoints import crash_point
from sync.escrow_gate import eviction_allowed, require_escrow
from sync.scrub import confirm_cloud_copy, refuse_if_at_risk

log = logging.getLogger(__name__)

DAY = 86400.0


async def evict_study(ctx: SyncContext, study: StudyRow) -> int:
    """Evict one study; returns the bytes freed."""
    assert ctx.index.writer is not None
    require_escrow(ctx)
    await refuse_if_at_risk(ctx, study)  # a damaged only copy: keep whatever is local
    if study.tier_state != TierState.REPLICATED:
        raise NotEvictable(
            f"study is {study.tier_state}, not replicated",
            hint="replicate it first (pacs-edge sync --once); only studies whose packs are"
                 " verified in the cloud can be evicted",
        )
    await confirm_cloud_copy(ctx, study)  # HEAD every pack: refuse a missing or changed one
    lease = StudyLease(ctx.index.writer, study.id, "evict")
    paths = await ctx.index.writer.submit_sync(lambda c: mark_evicted(c, lease, study.id))
    async with lease.kept():
        crash_point("evict:after-commit")
        freed = await drop_local_files(ctx, lease, paths)
    log.info("evicted study=%s files=%d bytes=%d", logsafe.ref(study.study_uid), len(paths),
             freed)
    ctx.audit.evicted(study, len(paths))
    return freed


async def drop_local_files(ctx: SyncContext, lease: StudyLease, paths: Sequence[str]) -> int:
    """Delete files whose instances are already marked non-local (after the commit), while
    `lease` is still held: the fence comes right before the first unlink."""
    await lease.check()

    def remove() -> int:
        freed = 0
        for relative in paths:
            path = ctx.files.absolute(relative)
            with contextlib.suppress(FileNotFoundError):
                freed += path.stat().st_size
                path.unlink()
                crash_point("evict:mid-delete")
        for relative in {str(ctx.files.absolute(p).parent) for p in paths}:
            with contextlib.suppress(OSError):
                ctx.files.absolute(relative).rmdir()  # only when empty
        return freed

    return await asyncio.to_thread(remove)


async def eviction_candidates(ctx: SyncContext) -> list[StudyRow]:
    """Replicated studies to evict now: idle past `evict_after_days`, then least recently
    used ones while the store's disk is above the high watermark (down to the low one).
    Priors a prefetch chose stay until their hold ends (appliance/services/prefetch.py):
    the radiologist reads them next to the new study."""
    if not eviction_allowed(ctx):
        return []
    sync = ctx.config.sync
    held = await database.run_sync(ctx.index.reader, held_study_uids, time.time())
    replicated = [s for s in await replicated_by_last_access(ctx.index)
                  if s.study_uid not in held]
    chosen: list[StudyRow] = []
    if sync.evict_after_days > 0:
        cutoff = time.time() - sync.evict_after_days * DAY
        chosen = [s for s in replicated if s.last_access_at < cutoff]
    usage = await asyncio.to_thread(shutil.disk_usage, ctx.files.root)
    used = usage.used - sum(s.total_bytes for s in chosen)
    if used * 100 > usage.total * sync.disk_high_watermark_percent:
        target = usage.total * sync.disk_low_watermark_percent / 100
        for study in replicated:
            if used <= target:
                break
            if study not in chosen:
                chosen.append(study)
                used -= study.total_bytes
    return chosen
