"""WADO-RS reads: which stored files a web user may read, recalled first when evicted.

The contract for the edge (appliance/http/dicomweb_wado.py and friends)::

    found = await service.locate(principal, study_uid=..., series_uid=..., sop_uid=...)

answers None when nothing matches *or* the study is outside the user's scope
(the edge says 404 for both: a referring physician cannot learn that a study
exists). Otherwise it lists the matched instances in study/series/instance
order, split into those on local disk and those that are not. A study that is
evicted is recalled first, exactly as C-GET does it (RetrieveService
.await_studies: a request row the sync agent picks up, one recall per study
however many wait), for up to `[http] recall_wait_seconds`: a browser is not kept
waiting minutes for an answer (a reverse proxy would time it out first); once the
wait is over the recall goes on, `recall_pending` says so, and the edge answers
503 with a short Retry-After that the viewer acts on (appliance/http/viewer_recall.py).

A file may be gone by the time the edge reads it (the answer streams one
file after the other, and an eviction commits, then deletes):
`gone_since_located()` looks again; a study evicted meanwhile is recalled and
waited for as above, a file missing from a study on local disk is a damaged
store (fsck).

Files are located only through the index: a path never comes from a URL.
Each located study's last access time is stamped (eviction picks the least
recently used), at most once a minute per study: a viewer asks for every frame
of a series separately, and eviction counts in days, so one index write per
frame would be all cost and no information.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from appliance.services.access import Principal
from appliance.services.retrieve import NOT_LOCAL_STATES, RetrieveService
from appliance.store.files import FileStore
from appliance.store.index import Index, InstanceLocation
from appliance.store.packs import archived_packs_in_use
from appliance.store.study_rows import study_by_uid

log = logging.getLogger(__name__)

REQUESTED_BY = "dicomweb"
TOUCH_INTERVAL = 60.0  # seconds between two last-access stamps of one study
_TOUCHED_KEPT = 10_000  # studies remembered before old entries are dropped


@dataclass(frozen=True)
class StoredInstance:
    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    transfer_syntax: str
    sha256: str
    path: Path


@dataclass(frozen=True)
class Located:
    instances: tuple[StoredInstance, ...]  # on local disk, in index order
    unavailable: tuple[StoredInstance, ...]  # matched but not on disk (recall failed)
    recall_errors: tuple[str, ...] = ()
    recall_pending: bool = False  # the study's recall is still running: ask again soon
    recall_from_archive: bool = False  # ...and waits for an Archive-tier rehydration


class WebRetrieveService:
    def __init__(self, index: Index, files: FileStore, retrieve: RetrieveService, *,
                 recall_wait: float) -> None:
        self.index = index
        self.files = files
        self.retrieve = retrieve
        self.recall_wait = recall_wait
        self._touched: dict[str, float] = {}  # study UID -> monotonic time of the last stamp

    async def locate(self, principal: Principal, *, study_uid: str, series_uid: str = "",
                     sop_uid: str = "", wait: float | None = None) -> Located | None:
        """The instances of a study, series or instance the principal may read; UIDs
        must be valid (the edge checks them). An evicted study's recall is waited for
        up to `wait` seconds (default: recall_wait; 0: asked for, not waited for)."""
        rows = await self._rows(study_uid, series_uid, sop_uid)
        if not rows or not await self.in_scope(principal, study_uid):
            return None
        errors: tuple[str, ...] = ()
        pending = False
        if any(row.tier_state in NOT_LOCAL_STATES for row in rows):
            recall = await self.retrieve.await_studies(
                [study_uid], requested_by=REQUESTED_BY,
                wait=self.recall_wait if wait is None else wait)
            errors, pending = recall.errors, not recall.done and not recall.errors
            rows = await self._rows(study_uid, series_uid, sop_uid)
        archived = pending and bool(await archived_packs_in_use(self.index, study_uid))
        ready, missing = await asyncio.to_thread(self._split, rows)
        await self._touch(study_uid)
        return Located(tuple(ready), tuple(missing), errors, pending, archived)

    async def gone_since_located(self, item: StoredInstance) -> StoredInstance | None:
        """`item` again, its file not there when the edge came to read it: its study
        evicted since `locate()` is recalled, waited for up to recall_wait; None when
        it cannot be read (the recall failed or is not back, or a damaged store)."""
        rows = await self._rows(item.study_uid, item.series_uid, item.sop_uid)
        evicted = any(row.tier_state in NOT_LOCAL_STATES for row in rows)
        if evicted:
            log.info("wado-rs: file gone since located, its study evicted meanwhile: recall")
            recall = await self.retrieve.await_studies(
                [item.study_uid], requested_by=REQUESTED_BY, wait=self.recall_wait)
            if not recall.done:
                log.error("wado-rs: the answer is cut short: the recall of a study evicted"
                          " while it was sent %s", "failed" if recall.errors
                          else "is not back within recall_wait_seconds")
            rows = await self._rows(item.study_uid, item.series_uid, item.sop_uid)
        ready, _ = await asyncio.to_thread(self._split, rows)
        if not ready and not evicted:
            log.error("wado-rs: the answer is cut short: a stored file is missing from a study"
                      " on local disk (run pacs-edge fsck)")
        return ready[0] if ready else None

    async def _touch(self, study_uid: str) -> None:
        now = time.monotonic()
        if now - self._touched.get(study_uid, -TOUCH_INTERVAL) < TOUCH_INTERVAL:
            return
        if len(self._touched) >= _TOUCHED_KEPT:
            self._touched = {uid: t for uid, t in self._touched.items()
                             if now - t < TOUCH_INTERVAL}
        self._touched[study_uid] = now
        await self.index.touch_studies([study_uid])

    async def in_scope(self, principal: Principal, study_uid: str) -> bool:
        if principal.sees_all():
            return True
        study = await study_by_uid(self.index, study_uid)
        return study is not None and principal.may_see(study.referring_physician)

    async def _rows(self, study_uid: str, series_uid: str, sop_uid: str
                    ) -> list[InstanceLocation]:
        return await self.index.locate(study_uids=[study_uid],
                                       series_uids=[series_uid] if series_uid else [],
                                       sop_uids=[sop_uid] if sop_uid else [])

    def _split(self, rows: Sequence[InstanceLocation]
               ) -> tuple[list[StoredInstance], list[StoredInstance]]:
        ready: list[StoredInstance] = []
        missing: list[StoredInstance] = []
        for row in rows:
            instance = StoredInstance(row.study_uid, row.series_uid, row.sop_uid,
                                      row.sop_class_uid, row.transfer_syntax, row.sha256,
                                      self.files.absolute(row.path))
            local = row.tier_state not in NOT_LOCAL_STATES and instance.path.is_file()
            (ready if local else missing).append(instance)
        return ready, missing
