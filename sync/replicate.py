"""Replicate: every stable study with instances not yet in the cloud gets a new pack version
(so does one the cloud must be told a change: an instance that left it for another
study, a patient merged or updated; see appliance/store/amendments.py). The version
states the study as the index has it when the version begins.

Order per study, each step committed before the next:
 1. one transaction takes the study's lease, moves `local -> replicating`
    (an evicted study stays `evicted`: only its late instances are uploaded),
    inserts a `packs` row in state `uploading` (a trace a crash leaves for
    sync.rollback) and reads the instances to upload;
 2. upload pack, manifest and key object; read back and verify (PackService);
 3. one transaction, fenced by the lease: pack `verified`, instances point at
    it, `replicating -> replicated`. For an evicted study the same transaction
    marks the uploaded instances non-local, and their files are deleted only
    after it, still under the lease: an index row never says "local" for a
    file that is gone, so a recall brings the late instances back too. Not
    while the site key is not escrowed (sync.escrow_gate): then they stay local.
A failure moves the study back to `local` first and then removes what was
uploaded; when the cloud refuses that too, the `uploading` row stays and the
next pass (sync.rollback) finishes the clean-up. What was uploaded is what
carries the upload's pack id, recorded in step 1 before any put: a blob by the
same name that another upload wrote is never deleted.

The version is the index's next. When the cloud holds it already (VersionTaken:
an index rebuilt by `fsck --repair` after it was lost, or a second box writing
to the container), those blobs stay and the study is uploaded once more, above
the highest version the cloud names.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from appliance.base import logsafe
from appliance.base.metrics import REPLICATED_BYTES, REPLICATION_SECONDS, REPLICATIONS
from appliance.store.leases import StudyLease
from appliance.store.packs import UnverifiedPack
from appliance.store.study_rows import StudyRow, stable_studies
from appliance.store.tier_steps import (
    UploadPlan,
    abandon_upload,
    begin_upload,
    commit_pack,
    forget_pack,
)
from sync.cloud import VersionTaken
from sync.context import SyncContext
from sync.crashpoints import crash_point
from sync.escrow_gate import late_instances_may_leave
from sync.evict import drop_local_files
from sync.pack.data_keys import new_pack_id
from sync.readers import grant_study
from sync.threads import roll_back_on_stop

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Replicated:
    study_ref: str
    version: int
    instances: int
    bytes: int


async def replication_candidates(ctx: SyncContext, stable_after: float) -> list[StudyRow]:
    """Studies quiet for `stable_after` seconds with local instances not in any pack."""
    return await stable_studies(ctx.index, time.time(), stable_after)


async def replicate_study(ctx: SyncContext, study: StudyRow) -> Replicated | None:
    try:
        return await _replicate(ctx, study, lowest_version=1)
    except VersionTaken as taken:
        log.warning("the cloud holds versions of study=%s this index does not know; left in"
                    " place, uploading above them version_taken=%d highest=%d",
                    logsafe.ref(study.study_uid), taken.version, taken.highest)
        return await _replicate(ctx, study, lowest_version=taken.highest + 1)


async def _replicate(ctx: SyncContext, study: StudyRow, *,
                     lowest_version: int) -> Replicated | None:
    assert ctx.index.writer is not None
    writer = ctx.index.writer
    lease = StudyLease(writer, study.id, "replicate")
    upload_id = new_pack_id()
    plan = await writer.submit_sync(
        lambda c: begin_upload(c, lease, study.id, lambda v: ctx.packs.names(study.study_uid, v),
                               upload_id, lowest_version=lowest_version))
    if plan is None:
        return None  # another pass packed them meanwhile
    started = time.monotonic()
    async with lease.kept():
        crash_point("replicate:before-upload")
        try:
            uploaded = await ctx.packs.upload(plan.study, plan.instances, plan.version,
                                              plan.upload_id, withdrawn=plan.withdrawn)
        except VersionTaken:
            await _abandon(ctx, lease, study, plan)
            raise
        except asyncio.CancelledError:
            log.info("replication cancelled by stop; rolling back study=%s version=%d",
                     logsafe.ref(study.study_uid), plan.version)
            await roll_back_on_stop(_abandon(ctx, lease, study, plan), work="replicate")
            raise
        except BaseException as exc:
            # The reason goes in the line: the pass records it only in the index, and a
            # journal that says "failed" without why (credentials refused, container
            # gone, a timeout) leaves the operator guessing.
            log.error("replication failed; rolling back study=%s version=%d error=%s",
                      logsafe.ref(study.study_uid), plan.version,
                      getattr(exc, "message", type(exc).__name__))
            REPLICATIONS.labels("failed").inc()
            await _abandon(ctx, lease, study, plan)
            raise
        crash_point("replicate:before-commit")
        # Dropping an evicted study's late instances is an eviction: it waits for the
        # escrow of the key that wrapped them, as sync.evict does (sync.escrow_gate).
        keep = plan.evicted and not late_instances_may_leave(ctx)
        gone = await writer.submit_sync(
            lambda c: commit_pack(c, lease, study.id, plan, uploaded, keep_local=keep))
        crash_point("replicate:after-commit")
        # Remote readers in scope get a key object for the new version (never fails the pass).
        await grant_study(ctx.config.home, ctx.index, ctx.store, study.id)
        if gone:
            await drop_local_files(ctx, lease, gone)
    log.info("replicated study=%s version=%d instances=%d withdrawn=%d restated=%s bytes=%d",
             logsafe.ref(study.study_uid), plan.version, len(plan.instances),
             len(plan.withdrawn), bool(plan.restated), uploaded.pack_size)
    REPLICATIONS.labels("ok").inc()
    REPLICATED_BYTES.inc(uploaded.pack_size)
    REPLICATION_SECONDS.observe(time.monotonic() - started)
    ctx.audit.exported(study, len(plan.instances))
    return Replicated(logsafe.ref(study.study_uid), plan.version, len(plan.instances),
                      uploaded.pack_size)


async def _abandon(ctx: SyncContext, lease: StudyLease, study: StudyRow, plan: UploadPlan) -> None:
    """After a failed upload: the study goes back to where it was at once; the pack row
    stays `uploading` until its blobs are gone, so a cloud outage that also stops the
    clean-up leaves work for the next pass (sync.rollback), never a stuck study."""
    assert ctx.index.writer is not None
    if not plan.evicted:
        await ctx.index.writer.submit_sync(lambda c: abandon_upload(c, lease, study.id))
    await delete_abandoned_pack(
        ctx, study.study_uid, UnverifiedPack(plan.pack_id, plan.version, plan.upload_id))


async def delete_abandoned_pack(ctx: SyncContext, study_uid: str, pack: UnverifiedPack) -> bool:
    """Remove what the unverified version's upload wrote, then its row; False when the
    cloud refused."""
    assert ctx.index.writer is not None
    try:
        kept = await ctx.packs.delete_version(study_uid, pack.version, pack.upload_id)
    except Exception as exc:  # whatever the cloud said, the row waits for the next pass
        log.error("clean-up of an unverified pack deferred study=%s version=%d error=%s",
                  logsafe.ref(study_uid), pack.version,
                  getattr(exc, "message", type(exc).__name__))
        return False
    if kept:
        log.warning("clean-up left another upload's blobs of study=%s version=%d blobs=%d",
                    logsafe.ref(study_uid), pack.version, len(kept))
    await ctx.index.writer.submit_sync(lambda c: forget_pack(c, pack.id))
    return True
