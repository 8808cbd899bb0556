"""Replicate: every stable study with instances not yet in the cloud gets a new pack version.

Order per study, each step committed before the next:
 1. `local -> replicating` (the transition row says an upload is under way);
 2. a `packs` row in state `uploading` (so a crash leaves a trace to clean up);
 3. upload pack, manifest and key object; read back and verify (PackService);
 4. one transaction: pack `verified`, instances point at it, `replicating -> replicated`.
A failure rolls back to `local` and removes what was uploaded; a crash is
rolled back the same way by `recover_interrupted` when the agent restarts.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass

import aiosqlite

from appliance import logsafe
from appliance.store.tiering import TierState, Trigger, apply
from sync.cloud import UploadedPack
from sync.context import SyncContext
from sync.crashpoints import crash_point
from sync.evict import drop_local_files
from sync.readers import grant_study
from sync.records import StudyRow, instances_of, studies_where

log = logging.getLogger(__name__)

_UNPACKED = ("EXISTS (SELECT 1 FROM instances i JOIN series se ON i.series_fk = se.id"
             " WHERE se.study_fk = st.id AND i.pack_fk IS NULL AND i.is_local = 1)")


@dataclass(frozen=True)
class Replicated:
    study_ref: str
    version: int
    instances: int
    bytes: int


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
    instances = await instances_of(ctx.index, study.id, "i.pack_fk IS NULL AND i.is_local = 1")
    if not instances:
        return None
    evicted = study.tier_state == TierState.EVICTED
    if study.tier_state == TierState.REPLICATED:
        await writer.submit(lambda c: apply(c, study.id, Trigger.NEW_INSTANCE))
    if not evicted:
        await writer.submit(lambda c: apply(c, study.id, Trigger.REPLICATE,
                                            expect=TierState.LOCAL))
    version = await _next_version(ctx, study.id)
    pack_name, manifest_name = ctx.packs.names(study.study_uid, version)
    pack_id = await writer.submit(lambda c: _insert_pack(c, study.id, version, pack_name,
                                                         manifest_name))
    crash_point("replicate:before-upload")
    try:
        uploaded = await ctx.packs.upload(study, instances, version)
    except BaseException:
        log.error("replication failed; rolled back study=%s version=%d",
                  logsafe.ref(study.study_uid), version)
        await ctx.packs.delete_version(study.study_uid, version)
        await writer.submit(lambda c: _forget_pack(c, pack_id, study.id,
                                                   roll_back=not evicted))
        raise
    crash_point("replicate:before-commit")
    await writer.submit(lambda c: _commit_pack(c, pack_id, study.id, uploaded, evicted))
    crash_point("replicate:after-commit")
    # Remote readers in scope get a key object for the new version (never fails the pass).
    await grant_study(ctx.config.home, ctx.index, ctx.store, study.id)
    if evicted:
        await drop_local_files(ctx, study.id, [i.path for i in instances])
    log.info("replicated study=%s version=%d instances=%d bytes=%d",
             logsafe.ref(study.study_uid), version, len(instances), uploaded.pack_size)
    ctx.audit.exported(study, len(instances))
    return Replicated(logsafe.ref(study.study_uid), version, len(instances), uploaded.pack_size)


async def recover_interrupted(ctx: SyncContext) -> int:
    """Roll back what a killed agent left half done; returns how many studies it touched."""
    assert ctx.index.writer is not None
    rows = await ctx.index.fetchall(
        "SELECT p.id, p.study_fk, p.version, st.study_uid, st.tier_state FROM packs p"
        " JOIN studies st ON p.study_fk = st.id WHERE p.state = 'uploading'"
    )
    for pack_id, study_id, version, study_uid, state in rows:
        await ctx.packs.delete_version(study_uid, version)
        await ctx.index.writer.submit(
            lambda c, p=pack_id, s=study_id, st=state: _forget_pack(
                c, p, s, roll_back=st == TierState.REPLICATING))
    stuck = await studies_where(ctx.index, "st.tier_state IN ('replicating', 'recalling')")
    for study in stuck:
        await ctx.index.writer.submit(lambda c, s=study: apply(c, s.id, Trigger.FAILED))
    leftovers = await ctx.index.fetchall("SELECT path FROM instances WHERE is_local = 0")
    freed = await drop_local_files(ctx, 0, [row[0] for row in leftovers])
    if freed:
        log.warning("removed files an interrupted eviction or recall left behind bytes=%d",
                    freed)
    touched = len(rows) + len(stuck)
    if touched:
        log.warning("rolled back work interrupted by an earlier stop studies=%d", touched)
    return touched


async def _next_version(ctx: SyncContext, study_id: int) -> int:
    row = await ctx.index.fetchone(
        "SELECT COALESCE(MAX(version), 0) + 1 FROM packs WHERE study_fk = ?", (study_id,))
    assert row is not None
    return int(row[0])


async def _insert_pack(conn: aiosqlite.Connection, study_id: int, version: int,
                       pack_name: str, manifest_name: str) -> int:
    async with conn.execute(
        "INSERT INTO packs (study_fk, version, pack_name, manifest_name, created_at)"
        " VALUES (?, ?, ?, ?, ?) RETURNING id",
        (study_id, version, pack_name, manifest_name, time.time()),
    ) as cur:
        row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def _forget_pack(conn: aiosqlite.Connection, pack_id: int, study_id: int, *,
                       roll_back: bool) -> None:
    await conn.execute("UPDATE instances SET pack_fk = NULL WHERE pack_fk = ?", (pack_id,))
    await conn.execute("DELETE FROM packs WHERE id = ?", (pack_id,))
    if roll_back:
        with contextlib.suppress(Exception):
            await apply(conn, study_id, Trigger.FAILED, expect=TierState.REPLICATING)


async def _commit_pack(conn: aiosqlite.Connection, pack_id: int, study_id: int,
                       uploaded: UploadedPack, evicted: bool) -> None:
    await conn.execute(
        "UPDATE packs SET state = 'verified', verified_at = ?, pack_size = ?, pack_sha256 = ?,"
        " instance_count = ?, pack_etag = ?, manifest_etag = ?, manifest_size = ? WHERE id = ?",
        (time.time(), uploaded.pack_size, uploaded.pack_sha256, len(uploaded.offsets),
         uploaded.pack_etag, uploaded.manifest_etag, uploaded.manifest_size, pack_id),
    )
    await conn.executemany(
        "UPDATE instances SET pack_fk = ?, pack_offset = ?, pack_length = ? WHERE id = ?",
        [(pack_id, offset, length, instance_id)
         for instance_id, (offset, length) in uploaded.offsets.items()],
    )
    if evicted:
        return
    await apply(conn, study_id, Trigger.VERIFIED, expect=TierState.REPLICATING)
    async with conn.execute(
        "SELECT 1 FROM instances i JOIN series se ON i.series_fk = se.id"
        " WHERE se.study_fk = ? AND i.pack_fk IS NULL LIMIT 1", (study_id,)
    ) as cur:
        if await cur.fetchone():  # instances arrived during the upload: not done yet
            await apply(conn, study_id, Trigger.NEW_INSTANCE)
