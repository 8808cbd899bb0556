"""Prefetch, the sync agent's part: bring evicted priors back before the patient arrives.

The serving process chooses priors (appliance/services/prefetch.py) and
never talks to the cloud; priors of source `cloud` (evicted studies) are
this job's, run every `sync.recall_poll_seconds`:

- a study whose packs are all online is recalled at once (sync.recall, the
  same verified recall as an on-demand one): pending -> recalling -> done;
- a study with a pack on the Archive tier would wait hours in an ordinary
  recall. Here the rehydration is requested early, with High priority
  (BlobStore.request_online(early=True): on Azure under an hour for most
  packs instead of up to 15), and the prior waits in `rehydrating`, the
  job looking again every `sync.rehydrate_poll_seconds` without holding a
  lease or blocking other priors; once every pack is online the study is
  recalled: pending -> rehydrating -> recalling -> done;
- a study that is back in the index's local states (an on-demand recall, a
  new upload) is done; one that is being recalled by another operation is
  left for the next round; one no longer in the index fails (not_found).

A killed agent leaves priors in recalling or rehydrating; at start they go
back to pending (store.prefetch_rows.resume_interrupted): the study's own
tiering state was rolled back by sync.rollback, and asking a rehydration
again is a no-op while one runs.

Recalled priors stay local until their request's hold ends (sync.evict).
"""

from __future__ import annotations

import asyncio
import logging
import time

from appliance.base import logsafe, metrics
from appliance.base.errors import PacsEdgeError, PrefetchFailure
from appliance.store import database
from appliance.store.leases import StudyBusy
from appliance.store.packs import packs_of
from appliance.store.prefetch_rows import (
    PrefetchPrior,
    PrefetchTransitionError,
    PriorState,
    PriorTrigger,
    Retries,
    Source,
    advance,
    priors_to_work,
    resume_interrupted,
)
from appliance.store.study_rows import StudyRow, study_by_uid
from appliance.store.tiering import TierState
from sync.context import SyncContext
from sync.recall import recall_study

log = logging.getLogger(__name__)

_BACK = (TierState.LOCAL, TierState.REPLICATING, TierState.REPLICATED)


class PrefetchRecalls:
    """The agent's prefetch job; it remembers when it last looked at each archived prior."""

    def __init__(self, ctx: SyncContext) -> None:
        self.ctx = ctx
        self._looked: dict[int, float] = {}  # prior id -> monotonic time of the last stat
        self._resumed = False

    async def run(self) -> int:
        """One round over the cloud priors; returns how many were recalled."""
        writer = self.ctx.index.writer
        assert writer is not None
        if not self._resumed:
            resumed = await writer.submit_sync(lambda c: resume_interrupted(c, Source.CLOUD))
            if resumed:
                log.info("prefetch recalls resumed after a restart count=%d", resumed)
            self._resumed = True
        recalled = 0
        for prior in await self._waiting():
            try:
                recalled += await self._work(prior)
            except PrefetchTransitionError:  # changed meanwhile (its order was cancelled)
                log.info("prefetch prior changed meanwhile prior=%d", prior.id)
        return recalled

    async def _work(self, prior: PrefetchPrior) -> int:
        """One prior's step this round; 1 if it was recalled."""
        study = await study_by_uid(self.ctx.index, prior.study_uid)
        if study is None:
            await self._advance(prior, PriorTrigger.FAIL,
                                failure_kind=PrefetchFailure.NOT_FOUND.value,
                                error="the study is no longer in the index")
        elif study.tier_state in _BACK:
            await self._advance(prior, PriorTrigger.LOCAL)
        elif study.tier_state == TierState.EVICTED:
            return await self._fetch(prior, study)
        return 0

    async def _waiting(self) -> list[PrefetchPrior]:
        return await database.run_sync(self.ctx.index.reader, priors_to_work, Source.CLOUD)

    async def _fetch(self, prior: PrefetchPrior, study: StudyRow) -> int:
        if prior.state == PriorState.REHYDRATING and (
                time.monotonic() - self._looked.get(prior.id, 0.0)
                < self.ctx.config.sync.rehydrate_poll_seconds):
            return 0
        self._looked[prior.id] = time.monotonic()
        offline = []
        for pack in await packs_of(self.ctx.index, study.id):
            info = await asyncio.to_thread(self.ctx.store.stat, pack.pack_name)
            if not info.online:
                offline.append(pack.pack_name)
        if offline:
            if prior.state == PriorState.RECALLING:  # archived again since: start over
                await self._advance(prior, PriorTrigger.RESUME)
            elif prior.state == PriorState.PENDING:
                for name in offline:
                    await asyncio.to_thread(self.ctx.store.request_online, name, early=True)
                await self._advance(prior, PriorTrigger.REHYDRATE)
                log.info("prefetch asked early rehydration study=%s packs=%d",
                         logsafe.ref(study.study_uid), len(offline))
            return 0
        if prior.state == PriorState.REHYDRATING:
            await self._advance(prior, PriorTrigger.ONLINE)
        elif prior.state == PriorState.PENDING:
            await self._advance(prior, PriorTrigger.RECALL)
        self._looked.pop(prior.id, None)
        try:
            await recall_study(self.ctx, study)
        except StudyBusy:
            return 0  # another operation holds the study; the next round looks again
        except PacsEdgeError as exc:
            await self._advance(prior, PriorTrigger.FAIL,
                                failure_kind=PrefetchFailure.RECALL_FAILED.value,
                                error=exc.message)
            return 0
        await self._advance(prior, PriorTrigger.RECALLED)
        log.info("prefetch recalled study=%s", logsafe.ref(study.study_uid))
        return 1

    async def _advance(self, prior: PrefetchPrior, trigger: PriorTrigger, *,
                       failure_kind: str = "", error: str = "") -> None:
        writer = self.ctx.index.writer
        assert writer is not None
        retries = Retries.of(self.ctx.config.prefetch)
        state = await writer.submit_sync(lambda c: advance(
            c, prior.id, trigger, failure_kind=failure_kind, error=error, retries=retries))
        if state in (PriorState.DONE, PriorState.FAILED):
            metrics.PREFETCH_PRIORS.labels(source="cloud",
                                           outcome=failure_kind or state.value).inc()

