"""Recall: bring an evicted study's files back from the cloud, verified, then mark it local.

`evicted -> recalling` is committed first, in the transaction that takes the
study's lease (no eviction or replication of the study runs meanwhile); every
non-local instance is fetched (a range read of only its segments, or the
whole pack), decrypted and checked against the SHA-256 the index holds, then
written with the store's atomic write. Only when every instance is on disk
does one transaction, fenced by the lease, set them local and commit
`recalling -> replicated`. A tampered or truncated blob fails the recall with
a clear error: the written files are removed, the study goes back to
`evicted`, and neither the index rows nor the cloud are changed.

Requests: the appliance never talks to the cloud. For a C-MOVE/C-GET of an
evicted study it inserts (or joins) a row in `recall_requests`
(appliance.store.recall_requests); the agent
picks pending rows up every `sync.recall_poll_seconds` (RecallRequests). One
row per study, so concurrent requests share one recall. A study whose pack is
on the Archive tier waits, still `evicted`, until its rehydration is done, and
holds up no other request meanwhile; `pacs-edge recall` waits for it instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator

from appliance.base import logsafe
from appliance.base.errors import PacsEdgeError
from appliance.base.metrics import RECALL_SECONDS, RECALLED_BYTES, RECALLS
from appliance.store.leases import StudyBusy, StudyLease
from appliance.store.packs import PackRow, packs_of, record_rehydrated
from appliance.store.recall_requests import finish_request, pending_recalls
from appliance.store.study_rows import (
    InstanceRow,
    StudyRow,
    evicted_instances_of,
    study_by_id,
)
from appliance.store.tier_steps import begin_recall, fail_recall, mark_recalled
from appliance.store.tiering import TierState
from sync.blobstore.base import BlobNotFound
from sync.context import SyncContext
from sync.crashpoints import crash_point
from sync.evict import drop_local_files
from sync.pack.pack_errors import PackIntegrityError
from sync.rollback import recover_study
from sync.threads import roll_back_on_stop

log = logging.getLogger(__name__)


class RecallFailed(PacsEdgeError):
    pass


class CloudCopyMissing(RecallFailed):
    """A blob of a pack the index verified at upload is not in the cloud: the evicted
    instances' only copy is gone (deleted, or the container with it)."""

    def __init__(self, exc: BlobNotFound) -> None:
        super().__init__(
            f"the study's cloud copy is missing ({exc.message})",
            hint="its local copies were evicted: restore the blob from the storage account's"
            " soft delete or blob versioning (or the NAS's snapshots), then recall again;"
            " `pacs-edge scrub` lists every pack that is missing or damaged")


@contextlib.contextmanager
def _missing_named() -> Iterator[None]:
    """BlobNotFound inside the block as CloudCopyMissing: the store's "no such blob"
    said neither what it means for the study nor what to do."""
    try:
        yield
    except BlobNotFound as exc:
        raise CloudCopyMissing(exc) from exc


def _count_failure(ctx: SyncContext, study: StudyRow, exc: BaseException) -> None:
    """The audit record and the count (PacsEdgeRecallsFailing) of a failed recall; a
    pack that failed authentication or is gone is a security alert too."""
    ctx.audit.recalled(study, 0, error=getattr(exc, "message", type(exc).__name__),
                       tampered=isinstance(exc, PackIntegrityError | CloudCopyMissing))
    RECALLS.labels("failed").inc()


async def recall_study(ctx: SyncContext, study: StudyRow, *,
                       on_progress: Callable[[int, int], None] = lambda done, total: None) -> int:
    """Recall one evicted study; returns the number of instances restored."""
    assert ctx.index.writer is not None
    writer = ctx.index.writer
    if study.tier_state != TierState.EVICTED:
        raise RecallFailed(f"study is {study.tier_state}, not evicted",
                           hint="only evicted studies need a recall")
    lease = StudyLease(writer, study.id, "recall")
    missing = await writer.submit_sync(lambda c: begin_recall(c, lease, study.id))
    async with lease.kept():
        return await _recall_under_lease(ctx, study, lease, missing, on_progress)


async def _recall_under_lease(ctx: SyncContext, study: StudyRow, lease: StudyLease,
                              missing: list[InstanceRow],
                              on_progress: Callable[[int, int], None]) -> int:
    assert ctx.index.writer is not None
    writer = ctx.index.writer
    packs = {p.id: p for p in await packs_of(ctx.index, study.id)}
    started = time.monotonic()
    written: list[str] = []
    by_pack: dict[int, list[InstanceRow]] = {}
    for instance in missing:
        if instance.pack_fk is not None:
            by_pack.setdefault(instance.pack_fk, []).append(instance)
    try:
        # Room for the whole study above the reserve, or no download at all.
        await asyncio.to_thread(ctx.files.check_space, sum(i.size for i in missing))
        with _missing_named():
            for pack_id in sorted(by_pack):
                await _bring_online(ctx, packs[pack_id])
        if any(instance.pack_fk not in packs for instance in missing):
            raise RecallFailed("an evicted instance has no verified pack",
                               hint="run pacs-edge fsck; the index is inconsistent")

        def landed(instance: InstanceRow) -> None:
            written.append(instance.path)
            crash_point("recall:mid-instances")
            on_progress(len(written), len(missing))

        with _missing_named():
            for pack_id in sorted(by_pack):
                await ctx.packs.recall_pack(packs[pack_id], by_pack[pack_id],
                                            on_written=landed)
        crash_point("recall:before-commit")
        # Inside the try: an index that cannot take the commit (SQLITE_FULL once the
        # recalled files took the disk's last blocks) left the study `recalling` with
        # every file on disk, and `pacs-edge recall` refused it until an agent's pass
        # rolled it back. The undo unlinks before its own commit, so it has room.
        await writer.submit_sync(lambda c: mark_recalled(c, lease, study.id, missing))
    except BaseException as exc:
        undo = _undo_recall(ctx, study, lease, written)
        if isinstance(exc, asyncio.CancelledError):
            log.info("recall cancelled by stop study=%s", logsafe.ref(study.study_uid))
            await roll_back_on_stop(undo, work="recall")
        else:
            await undo
            log.error("recall failed study=%s error=%s", logsafe.ref(study.study_uid),
                      getattr(exc, "message", type(exc).__name__))
        _count_failure(ctx, study, exc)
        raise
    log.info("recalled study=%s instances=%d", logsafe.ref(study.study_uid), len(missing))
    RECALLS.labels("ok").inc()
    RECALLED_BYTES.inc(sum(instance.size for instance in missing))
    RECALL_SECONDS.observe(time.monotonic() - started)
    ctx.audit.recalled(study, len(missing))
    return len(missing)


async def _bring_online(ctx: SyncContext, pack: PackRow) -> None:
    """Wait for the pack to be online; record the tier it came back to from Archive,
    or the index would keep saying Archive: the lifecycle would never move it to a
    colder tier again, and the web would answer its next recall as hours long."""
    assert ctx.index.writer is not None
    tier = await ctx.packs.ensure_online(pack)
    if tier.value != pack.access_tier:
        await ctx.index.writer.submit_sync(
            lambda c: record_rehydrated(c, pack.id, tier.value, time.time()))


async def _undo_recall(ctx: SyncContext, study: StudyRow, lease: StudyLease,
                       written: list[str]) -> None:
    """Remove the files a failed recall wrote, then move the study back to `evicted`."""
    assert ctx.index.writer is not None
    await drop_local_files(ctx, lease, written)
    await ctx.index.writer.submit_sync(lambda c: fail_recall(c, lease, study.id))


class RecallRequests:
    """The agent's recall-requests job: every pending request, oldest first.

    A study with a pack on the Archive tier is not recalled while that pack is
    offline: its rehydration is requested (at `[sync] rehydrate_priority`) and the
    request stays pending, the study `evicted` and without a lease, looked at again
    every `sync.rehydrate_poll_seconds`; once every pack it needs is online, it is
    recalled. A recall that waited for the rehydration inside the job (Azure: up to
    15 hours at Standard) held up every request behind it, and their C-MOVEs, C-GETs
    and viewers timed out though their packs were online.
    """

    def __init__(self, ctx: SyncContext) -> None:
        self.ctx = ctx
        self._rehydrating: dict[int, float] = {}  # study id -> monotonic time of the last look

    async def run(self) -> int:
        """Run every pending recall request that can run now; returns how many were served."""
        ctx = self.ctx
        assert ctx.index.writer is not None
        served = 0
        pending = await pending_recalls(ctx.index)
        self._rehydrating = {k: v for k, v in self._rehydrating.items() if k in pending}
        for study_id in pending:
            study = await study_by_id(ctx.index, study_id)
            if study is None:
                continue
            if study.tier_state == TierState.RECALLING:
                # Another process recalls it (the request waits), or one died doing so:
                # roll that back now rather than at the next replication pass.
                try:
                    await recover_study(ctx, study.id, study.study_uid)
                except StudyBusy:
                    continue
                study = await study_by_id(ctx.index, study_id)
                if study is None:
                    continue
            if study.tier_state != TierState.EVICTED:
                # Already back (or never gone): the request is satisfied.
                await ctx.index.writer.submit_sync(
                    lambda c, s=study_id: finish_request(c, s, "done", "", at=time.time()))
                continue
            try:
                if not await self._online(study):
                    continue
                await recall_study(ctx, study)
            except StudyBusy:
                continue  # another operation holds the study; the request stays pending
            except PacsEdgeError as exc:
                self._rehydrating.pop(study_id, None)
                await ctx.index.writer.submit_sync(
                    lambda c, s=study_id, m=exc.message: finish_request(c, s, "failed", m,
                                                                        at=time.time()))
            served += 1
        return served

    async def _online(self, study: StudyRow) -> bool:
        """Whether every pack the study's recall reads is online; the rehydration of
        those that are not is requested, and they are looked at again only after
        `sync.rehydrate_poll_seconds`."""
        looked = self._rehydrating.get(study.id)
        if looked is not None and (time.monotonic() - looked
                                   < self.ctx.config.sync.rehydrate_poll_seconds):
            return False
        needed = {row.pack_fk for row in await evicted_instances_of(self.ctx.index, study.id)}
        offline = 0
        try:
            with _missing_named():
                for pack in await packs_of(self.ctx.index, study.id):
                    if pack.id in needed and not (
                            await self.ctx.packs.request_online(pack)).online:
                        offline += 1
        except PacsEdgeError as exc:
            # The recall failed before it began (a pack gone, the cloud refusing the key):
            # said and counted as one that failed half-way is, or PacsEdgeRecallsFailing
            # never fired for a C-MOVE, C-GET or viewer whose recall the agent failed.
            log.error("recall failed study=%s error=%s", logsafe.ref(study.study_uid),
                      exc.message)
            _count_failure(self.ctx, study, exc)
            raise
        if not offline:
            self._rehydrating.pop(study.id, None)
            return True
        if looked is None:
            log.info("recall waits for the rehydration of archived packs study=%s packs=%d",
                     logsafe.ref(study.study_uid), offline)
        self._rehydrating[study.id] = time.monotonic()
        return False
