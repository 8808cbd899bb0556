"""Replicate: every stable study with instances not yet in the cloud gets a new pack version.

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
    file that is gone, so a recall brings the late instances back too.
A failure moves the study back to `local` first and then removes what was
uploaded; when the cloud refuses that too, the `uploading` row stays and the
next pass (sync.rollback) finishes the clean-up.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass

from appliance.base import logsafe
from appliance.store import database
from appliance.store.leases import StudyLease
from appliance.store.study_rows import InstanceRow, StudyRow, instance_rows, studies_where
from appliance.store.tiering import TierState, Trigger, apply_sync
from sync.cloud import UploadedPack
from sync.context import SyncContext
from sync.crashpoints import crash_point
from sync.evict import drop_local_files
from sync.readers import grant_study

log = logging.getLogger(__name__)

_UNPACKED = ("EXISTS (SELECT 1 FROM instances i JOIN series se ON i.series_fk = se.id"
             " WHERE se.study_fk = st.id AND i.pack_fk IS NULL AND i.is_local = 1)")


@dataclass(frozen=True)
class Replicated:
    study_ref: str
    version: int
    instances: int
    bytes: int


@dataclass(frozen=True)
class _Upload:
    """What step 1 committed: the pack row to fill and the instances to put in it."""

    pack_id: int
    version: int
    evicted: bool
    instances: list[InstanceRow]


async def stable_studies(ctx: SyncContext, stable_after: float) -> list[StudyRow]:
    """Studies quiet for `stable_after` seconds with local instances not in any pack."""
    cutoff = time.time() - stable_after
    return await studies_where(
        ctx.index,
        f"st.tier_state IN ('local', 'replicated', 'evicted') AND st.last_received_at <= ?"
        f" AND {_UNPACKED}",
        (cutoff,),
        order="st.last_received_at",
    )


async def replicate_study(ctx: SyncContext, study: StudyRow) -> Replicated | None:
    assert ctx.index.writer is not None
    writer = ctx.index.writer
    lease = StudyLease(writer, study.id, "replicate")
    plan = await writer.submit_sync(
        lambda c: _begin_upload(c, lease, study.id, lambda v: ctx.packs.names(study.study_uid, v)))
    if plan is None:
        return None  # another pass packed them meanwhile
    async with lease.kept():
        crash_point("replicate:before-upload")
        try:
            uploaded = await ctx.packs.upload(study, plan.instances, plan.version)
        except BaseException:
            log.error("replication failed; rolling back study=%s version=%d",
                      logsafe.ref(study.study_uid), plan.version)
            await _abandon(ctx, lease, study, plan)
            raise
        crash_point("replicate:before-commit")
        gone = await writer.submit_sync(
            lambda c: _commit_pack(c, lease, study.id, plan, uploaded))
        crash_point("replicate:after-commit")
        # Remote readers in scope get a key object for the new version (never fails the pass).
        await grant_study(ctx.config.home, ctx.index, ctx.store, study.id)
        if gone:
            await drop_local_files(ctx, lease, gone)
    log.info("replicated study=%s version=%d instances=%d bytes=%d",
             logsafe.ref(study.study_uid), plan.version, len(plan.instances), uploaded.pack_size)
    ctx.audit.exported(study, len(plan.instances))
    return Replicated(logsafe.ref(study.study_uid), plan.version, len(plan.instances),
                      uploaded.pack_size)


def _begin_upload(conn: sqlite3.Connection, lease: StudyLease, study_id: int,
                  names: Callable[[int], tuple[str, str]]) -> _Upload | None:
    lease.take(conn)
    instances = instance_rows(conn, study_id, "i.pack_fk IS NULL AND i.is_local = 1")
    if not instances:
        lease.release(conn)
        return None
    state = TierState(database.query_one(
        conn, "SELECT tier_state FROM studies WHERE id = ?", (study_id,))[0])
    if state is TierState.REPLICATED:
        state = apply_sync(conn, study_id, Trigger.NEW_INSTANCE)
    evicted = state is TierState.EVICTED
    if not evicted:
        apply_sync(conn, study_id, Trigger.REPLICATE, expect=TierState.LOCAL)
    version = int(database.query_one(
        conn, "SELECT COALESCE(MAX(version), 0) + 1 FROM packs WHERE study_fk = ?",
        (study_id,))[0])
    pack_name, manifest_name = names(version)
    pack_id = database.query_one(
        conn,
        "INSERT INTO packs (study_fk, version, pack_name, manifest_name, created_at)"
        " VALUES (?, ?, ?, ?, ?) RETURNING id",
        (study_id, version, pack_name, manifest_name, time.time()))[0]
    return _Upload(int(pack_id), version, evicted, instances)


async def _abandon(ctx: SyncContext, lease: StudyLease, study: StudyRow, plan: _Upload) -> None:
    """After a failed upload: the study goes back to where it was at once; the pack row
    stays `uploading` until its blobs are gone, so a cloud outage that also stops the
    clean-up leaves work for the next pass (sync.rollback), never a stuck study."""
    assert ctx.index.writer is not None
    if not plan.evicted:
        await ctx.index.writer.submit_sync(lambda c: _roll_back(c, lease, study.id))
    await delete_abandoned_pack(ctx, study.study_uid, plan.pack_id, plan.version)


async def delete_abandoned_pack(ctx: SyncContext, study_uid: str, pack_id: int,
                                version: int) -> bool:
    """Remove an unverified version's blobs, then its row; False when the cloud refused."""
    assert ctx.index.writer is not None
    try:
        await ctx.packs.delete_version(study_uid, version)
    except Exception as exc:  # whatever the cloud said, the row waits for the next pass
        log.error("clean-up of an unverified pack deferred study=%s version=%d error=%s",
                  logsafe.ref(study_uid), version, getattr(exc, "message", type(exc).__name__))
        return False
    await ctx.index.writer.submit_sync(lambda c: forget_pack(c, pack_id))
    return True


def _roll_back(conn: sqlite3.Connection, lease: StudyLease, study_id: int) -> None:
    lease.fence(conn)
    apply_sync(conn, study_id, Trigger.FAILED, expect=TierState.REPLICATING)


def forget_pack(conn: sqlite3.Connection, pack_id: int) -> None:
    """Drop an unverified pack's row (its blobs are gone); no instance points at it."""
    conn.execute("DELETE FROM packs WHERE id = ? AND state = 'uploading'", (pack_id,))


def _commit_pack(conn: sqlite3.Connection, lease: StudyLease, study_id: int, plan: _Upload,
                 uploaded: UploadedPack) -> list[str]:
    """Returns the paths of files that are no longer needed locally (evicted study)."""
    lease.fence(conn)
    conn.execute(
        "UPDATE packs SET state = 'verified', verified_at = ?, pack_size = ?, pack_sha256 = ?,"
        " instance_count = ?, pack_etag = ?, manifest_etag = ?, manifest_size = ? WHERE id = ?",
        (time.time(), uploaded.pack_size, uploaded.pack_sha256, len(uploaded.offsets),
         uploaded.pack_etag, uploaded.manifest_etag, uploaded.manifest_size,
         plan.pack_id),
    )
    # An evicted study's late instances leave local disk in this same transaction. A row
    # superseded during the upload (new content, same SOP Instance UID) is not updated, so
    # its file, now a prior version, is kept.
    gone = []
    for instance_id, (offset, length) in uploaded.offsets.items():
        row = database.query_one(
            conn, "UPDATE instances SET pack_fk = ?, pack_offset = ?, pack_length = ?,"
            " is_local = ? WHERE id = ? RETURNING path",
            (plan.pack_id, offset, length, 0 if plan.evicted else 1, instance_id))
        if row is not None and plan.evicted:
            gone.append(row[0])
    if plan.evicted:
        return gone
    apply_sync(conn, study_id, Trigger.VERIFIED, expect=TierState.REPLICATING)
    if database.query_one(
        conn,
        "SELECT 1 FROM instances i JOIN series se ON i.series_fk = se.id"
        " WHERE se.study_fk = ? AND i.pack_fk IS NULL LIMIT 1", (study_id,),
    ):  # instances arrived during the upload: not done yet
        apply_sync(conn, study_id, Trigger.NEW_INSTANCE)
    return []
