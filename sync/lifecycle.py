"""Cloud lifecycle: move verified packs to cheaper access tiers as they age.

Ages are counted from the pack's creation, or from its last rehydration: a
recall of an archived pack brings it back online (PackService.ensure_online)
and records the tier it is on since (sync.recall), and from then the pack ages
as a new one would, back to Archive in `archive_after_days`. A pack only ever
moves towards colder tiers here. Manifests and key objects stay Hot: listing
and restoring need them quickly, and they are small.
"""

from __future__ import annotations

import logging
import time

from appliance.store.packs import packs_due_for_colder_tier, set_access_tier
from sync.blobstore.base import Tier
from sync.context import SyncContext

log = logging.getLogger(__name__)

DAY = 86400.0
_ORDER = [Tier.HOT, Tier.COOL, Tier.COLD, Tier.ARCHIVE]


def target_tier(age_days: float, *, cool: float, cold: float, archive: float) -> Tier:
    tier = Tier.HOT
    for limit, colder in ((cool, Tier.COOL), (cold, Tier.COLD), (archive, Tier.ARCHIVE)):
        if limit > 0 and age_days >= limit:
            tier = colder
    return tier


async def apply_lifecycle(ctx: SyncContext) -> int:
    """Re-tier every verified pack that is older than its tier allows; returns moves made."""
    assert ctx.index.writer is not None
    sync = ctx.config.sync
    now = time.time()
    moved = 0
    due = [(now - limit * DAY, [tier.value for tier in _ORDER[:_ORDER.index(colder)]])
           for limit, colder in ((sync.cool_after_days, Tier.COOL),
                                 (sync.cold_after_days, Tier.COLD),
                                 (sync.archive_after_days, Tier.ARCHIVE)) if limit > 0]
    for pack in await packs_due_for_colder_tier(ctx.index, due):
        target = target_tier((now - pack.tier_age_from) / DAY, cool=sync.cool_after_days,
                             cold=sync.cold_after_days, archive=sync.archive_after_days)
        if _ORDER.index(target) <= _ORDER.index(Tier(pack.access_tier)):
            continue
        await ctx.packs.set_tier(pack.pack_name, target)
        await ctx.index.writer.submit_sync(
            lambda c, p=pack.id, t=target.value: set_access_tier(c, p, t))
        moved += 1
    if moved:
        log.info("lifecycle moved packs=%d", moved)
    return moved
