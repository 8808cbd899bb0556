"""Recall: bring an evicted study's files back from the cloud, verified, then mark it local.

`evicted -> recalling` is committed first; every instance is fetched (a range
read of only its segments), decrypted and checked against the SHA-256 the
index holds, then written with the store's atomic write. Only when every
instance is on disk does one transaction set them local and commit
`recalling -> replicated`. A tampered or truncated blob fails the recall with
a clear error: the written files are removed, the study goes back to
`evicted`, and neither the index rows nor the cloud are changed.

Requests: the appliance never talks to the cloud. For a C-MOVE/C-GET of an
evicted study it inserts (or joins) a row in `recall_requests`; the agent
picks pending rows up every `sync.recall_poll_seconds`. One row per study,
so concurrent requests share one recall.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import aiosqlite

from appliance import logsafe
from appliance.errors import PacsEdgeError
from appliance.store.tiering import TierState, Trigger, apply
from sync.context import SyncContext
from sync.crashpoints import crash_point
from sync.evict import drop_local_files
from sync.pack.errors import PackIntegrityError
from sync.records import InstanceRow, StudyRow, instances_of, packs_of, study_by_id

log = logging.getLogger(__name__)


class RecallFailed(PacsEdgeError):
    pass


async def recall_study(ctx: SyncContext, study: StudyRow, *,
                       on_progress: Callable[[int, int], None] = lambda done, total: None) -> int:
    """Recall one evicted study; returns the number of instances restored."""
    assert ctx.index.writer is not None
    writer = ctx.index.writer
    if study.tier_state != TierState.EVICTED:
        raise RecallFailed(f"study is {study.tier_state}, not evicted",
                           hint="only evicted studies need a recall")
    await writer.submit(lambda c: apply(c, study.id, Trigger.RECALL, expect=TierState.EVICTED))
    missing = await instances_of(ctx.index, study.id, "i.is_local = 0")
    packs = {p.id: p for p in await packs_of(ctx.index, study.id)}
    written: list[str] = []
    by_pack: dict[int, list[InstanceRow]] = {}
    for instance in missing:
        if instance.pack_fk is not None:
            by_pack.setdefault(instance.pack_fk, []).append(instance)
    try:
        for pack_id in sorted(by_pack):
            await ctx.packs.ensure_online(packs[pack_id])
        if any(instance.pack_fk not in packs for instance in missing):
            raise RecallFailed("an evicted instance has no verified pack",
                               hint="run pacs-edge fsck; the index is inconsistent")

        def landed(instance: InstanceRow) -> None:
            written.append(instance.path)
            crash_point("recall:mid-instances")
            on_progress(len(written), len(missing))

        for pack_id in sorted(by_pack):
            await ctx.packs.recall_pack(packs[pack_id], by_pack[pack_id], on_written=landed)
    except BaseException as exc:
        await drop_local_files(ctx, study.id, written)
        await writer.submit(lambda c: apply(c, study.id, Trigger.FAILED,
                                            expect=TierState.RECALLING))
        log.error("recall failed study=%s error=%s", logsafe.ref(study.study_uid),
                  getattr(exc, "message", type(exc).__name__))
        ctx.audit.recalled(study, 0, error=getattr(exc, "message", type(exc).__name__),
                           tampered=isinstance(exc, PackIntegrityError))
        raise
    crash_point("recall:before-commit")
    await writer.submit(lambda c: _mark_recalled(c, study.id))
    log.info("recalled study=%s instances=%d", logsafe.ref(study.study_uid), len(missing))
    ctx.audit.recalled(study, len(missing))
    return len(missing)


async def _mark_recalled(conn: aiosqlite.Connection, study_id: int) -> None:
    await conn.execute(
        "UPDATE instances SET is_local = 1 WHERE series_fk IN"
        " (SELECT id FROM series WHERE study_fk = ?)", (study_id,))
    await apply(conn, study_id, Trigger.RECALLED, expect=TierState.RECALLING)
    now = time.time()
    await conn.execute("UPDATE studies SET last_access_at = ? WHERE id = ?", (now, study_id))
    await conn.execute(
        "UPDATE recall_requests SET state = 'done', finished_at = ?, error = ''"
        " WHERE study_fk = ? AND state = 'pending'", (now, study_id))


async def serve_recall_requests(ctx: SyncContext) -> int:
    """Run every pending recall request; returns how many were served."""
    assert ctx.index.writer is not None
    rows = await ctx.index.fetchall(
        "SELECT study_fk FROM recall_requests WHERE state = 'pending' ORDER BY requested_at")
    served = 0
    for (study_id,) in rows:
        study = await study_by_id(ctx.index, study_id)
        if study is None:
            continue
        if study.tier_state != TierState.EVICTED:
            # Already back (or never gone): the request is satisfied.
            await ctx.index.writer.submit(lambda c, s=study_id: _finish(c, s, "done", ""))
            continue
        try:
            await recall_study(ctx, study)
        except PacsEdgeError as exc:
            await ctx.index.writer.submit(
                lambda c, s=study_id, m=exc.message: _finish(c, s, "failed", m))
        served += 1
    return served


async def _finish(conn: aiosqlite.Connection, study_id: int, state: str, error: str) -> None:
    await conn.execute(
        "UPDATE recall_requests SET state = ?, error = ?, finished_at = ?"
        " WHERE study_fk = ? AND state = 'pending'", (state, error, time.time(), study_id))
