"""Scrub: read packs back from the cloud and authenticate every byte of them.

Bit rot or tampering in the cloud would otherwise be found only when a
recall fails, years later. A scrub (restic's `check --read-data-subset`)
streams each chosen pack back and checks (PackService.scrub):
- pack and manifest exist; the pack has the size the index recorded;
- the site key object unwraps the data key; the manifest authenticates and
  describes the pack the index recorded (size and SHA-256);
- the manifest lists every instance the index keeps in this pack, with the
  SHA-256 the index holds;
- every segment authenticates (AES-GCM, index and final flag, pack id), the
  blob's SHA-256 matches, and every instance's length and SHA-256 match.
Archived packs are skipped (reading them needs a costly rehydration).

Which packs: verified packs that some instance row still points at, or that
hold the only copy of a prior version (content superseded after its study was
evicted: no file, no newer pack holds it), least recently checked first (by a
scrub, else at upload). `--all` takes them all, `--fraction F` the first
ceil(F * N). The agent's job runs every
SCRUB_INTERVAL and takes, of the packs not checked for 1/F days (F =
`[sync] scrub_fraction_per_day`), at most its share of F * N per day: every
pack is read about every 1/F days, a steady F of the store per day.

What a verdict does (one transaction per pack, appliance.store.tier_steps):
- ok: `scrubbed_at`, state ok, and the blobs' current ETags and manifest size
  (a container copied to new storage gets new ETags; the content was just
  proved to be the uploaded one, so evict's HEAD check trusts them again);
- damaged: the pack is marked damaged; its instances still on local disk
  leave it (the study takes the `damaged` trigger, replicated -> local) and
  the next replication uploads them again as a new version; instances only
  in the cloud stay, and the study is at risk (prior versions only in the
  pack are reported and audited too; no upload can make them again, and
  eviction, which never touches prior versions, is not refused for them) (`status`, audit log, and
  evict refuses it: `refuse_if_at_risk`, and again in its commit; evict also
  HEADs the packs before it deletes anything: `confirm_cloud_copy`). A later
  scrub that finds the pack whole again (restored from the storage account's
  soft delete or versioning) clears it.
A scrub takes no study lease. A verdict that lands while an eviction is
between its commit and its unlinks counts that study's instances at risk
(the rows say non-local); the eviction, which re-reads the verdicts in the
transaction right before its unlinks, keeps those files, puts them back
local and out of the pack, and the next replication uploads them again
(sync.evict). The study is then no longer at risk, which `status` shows.
The audit record (a security alert, integrity failure) of a damaged pack is
written before that commit: a crash in between repeats it at the next scrub
(the pack is still the least recently checked), never loses it. The scrub
never writes to the cloud. Reports name packs by blob name (a keyed hash),
never patients or UIDs.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from appliance.base import logsafe
from appliance.base.errors import PacsEdgeError
from appliance.store.packs import (
    PackRow,
    damaged_packs_in_use,
    packs_of,
    packs_to_scrub,
    packs_to_scrub_count,
    versions_only_in_pack,
)
from appliance.store.study_rows import StudyRow, instances_in_pack, instances_of, study_by_id
from appliance.store.tier_steps import NotEvictable, record_scrub_damaged, record_scrub_ok
from sync.cloud import ScrubVerdict
from sync.container_check import confirm_container
from sync.context import SyncContext
from sync.crashpoints import crash_point

log = logging.getLogger(__name__)

DAY = 86400.0
SCRUB_INTERVAL = 3600.0  # the agent's job; each run takes its share of the daily fraction


class StudyAtRisk(PacsEdgeError):
    """A study's only copy of some instances is a pack that a scrub found damaged."""


@dataclass(frozen=True)
class DamagedPack:
    pack_name: str
    reason: str
    requeued: int  # instances uploaded again from local disk by the next replication
    at_risk: int   # instances whose only copy is this damaged pack
    versions_at_risk: int = 0  # prior versions whose only copy is this damaged pack

    def outcome(self) -> str:
        return _outcome(local=self.requeued, remote=self.at_risk,
                        versions=self.versions_at_risk)


@dataclass
class ScrubReport:
    ok: int = 0
    bytes_read: int = 0
    damaged: list[DamagedPack] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (pack name, why)
    wrong_key: list[tuple[str, str]] = field(default_factory=list)  # (pack name, why)


async def select_packs(ctx: SyncContext, *, fraction: float | None) -> list[PackRow]:
    """Every pack in use (`fraction` None), or the least recently checked ceil(F * N)."""
    if fraction is None:
        return await packs_to_scrub(ctx.index)
    total = await packs_to_scrub_count(ctx.index)
    return await packs_to_scrub(ctx.index, limit=math.ceil(total * fraction))


async def scheduled_scrub(ctx: SyncContext) -> ScrubReport | None:
    """The agent's job: this run's share of `[sync] scrub_fraction_per_day` (0: off)."""
    fraction = ctx.config.sync.scrub_fraction_per_day
    if fraction <= 0:
        return None
    # An unmounted NAS would otherwise have every pack it reads found damaged.
    await confirm_container(ctx.index, ctx.store, ctx.config.cloud_url)
    share = math.ceil(await packs_to_scrub_count(ctx.index) * fraction * SCRUB_INTERVAL / DAY)
    packs = await packs_to_scrub(ctx.index, limit=share, now=time.time(), period=DAY / fraction)
    if not packs:
        return None
    report = await scrub_packs(ctx, packs)
    log.info("scheduled scrub packs=%d ok=%d damaged=%d skipped=%d bytes=%d", len(packs),
             report.ok, len(report.damaged), len(report.skipped), report.bytes_read)
    return report


async def scrub_packs(ctx: SyncContext, packs: list[PackRow], *,
                      on_bytes: Callable[[int], None] = lambda n: None) -> ScrubReport:
    """Scrub `packs` in order and record each verdict; see the module docstring."""
    report = ScrubReport()

    def counted(n: int) -> None:
        report.bytes_read += n
        on_bytes(n)

    for pack in packs:
        study = await study_by_id(ctx.index, pack.study_fk)
        if study is None:
            continue
        rows = await instances_in_pack(ctx.index, study.id, pack.id)
        verdict = await ctx.packs.scrub(pack, rows, on_bytes=counted)
        if verdict.state == "skipped":
            report.skipped.append((pack.pack_name, verdict.reason))
            log.info("scrub skipped pack=%s reason=%s", pack.pack_name, verdict.reason)
            continue
        if verdict.state == "wrong-key":
            report.wrong_key.append((pack.pack_name, verdict.reason))
            continue
        if verdict.state == "ok":
            await _record_ok(ctx, pack, verdict)
            report.ok += 1
            continue
        report.damaged.append(await _record_damaged(ctx, study, pack, verdict.reason,
                                                    local=sum(r.is_local for r in rows),
                                                    remote=sum(not r.is_local for r in rows)))
    if report.wrong_key:
        name, why = report.wrong_key[0]
        log.error("scrub could not open packs wrapped for a site key this box does not hold;"
                  " none was marked damaged count=%d first=%s error=%s",
                  len(report.wrong_key), name, why)
    return report


async def _record_ok(ctx: SyncContext, pack: PackRow, verdict: ScrubVerdict) -> None:
    assert ctx.index.writer is not None
    if pack.pack_etag and verdict.pack_etag != pack.pack_etag:
        log.warning("pack blob was replaced by identical content; new ETag recorded pack=%s",
                    pack.pack_name)
    crash_point("scrub:before-commit")
    await ctx.index.writer.submit_sync(lambda c: record_scrub_ok(
        c, pack.id, at=time.time(), pack_etag=verdict.pack_etag,
        manifest_etag=verdict.manifest_etag, manifest_size=verdict.manifest_size))
    crash_point("scrub:after-commit")


async def _record_damaged(ctx: SyncContext, study: StudyRow, pack: PackRow, reason: str, *,
                          local: int, remote: int) -> DamagedPack:
    assert ctx.index.writer is not None
    outcome = _outcome(local=local, remote=remote,
                       versions=await versions_only_in_pack(ctx.index, pack.id))
    # Audit first (fsynced): a crash before the commit repeats it, never loses it.
    ctx.audit.integrity_failure(
        study, f"scrub: pack version {pack.version} is damaged ({reason}); {outcome}")
    crash_point("scrub:before-commit")
    marked = await ctx.index.writer.submit_sync(lambda c: record_scrub_damaged(
        c, pack.id, study.id, at=time.time(), error=reason))
    crash_point("scrub:after-commit")
    log.error("scrub found a damaged pack pack=%s study=%s requeued=%d at_risk=%d"
              " versions_at_risk=%d error=%s", pack.pack_name, logsafe.ref(study.study_uid),
              marked.requeued, marked.at_risk, marked.versions_at_risk, reason)
    return DamagedPack(pack.pack_name, reason, marked.requeued, marked.at_risk,
                       marked.versions_at_risk)


def _outcome(*, local: int, remote: int, versions: int) -> str:
    """What a damaged pack means for the instances and prior versions it holds."""
    said = (f"{remote} instance(s) have no other copy: study AT RISK" if remote
            else f"{local} instance(s) will be uploaded again from local disk" if local
            else "")
    if versions:
        lost = f"{versions} prior version(s) of re-sent instances have no other copy"
        said = f"{said}; {lost}" if said else lost
    return said or "no instance needs it any more"


async def refuse_if_at_risk(ctx: SyncContext, study: StudyRow) -> None:
    """StudyAtRisk when a pack the study still needs was found damaged by a scrub."""
    damaged = await damaged_packs_in_use(ctx.index, study.id)
    if damaged:
        raise StudyAtRisk(
            f"the cloud copy of this study is damaged ({damaged[0].pack_name}: "
            "found by a scrub); nothing is deleted",
            hint="keep any local files; restore the blob from the storage account's soft "
            "delete or versioning, then `pacs-edge scrub --all` clears the mark")


async def read_back_unread_packs(ctx: SyncContext, study: StudyRow) -> StudyRow:
    """Scrub each pack the study needs that this box never read (restore recorded it
    from its manifest and the listing's size), before evict deletes local files on its
    word: those files may be the only good copy of a pack that rotted before the index
    was lost. Returns the study as it is after the verdicts (a damaged pack takes its
    local instances out: the study is `local` again, and evict refuses it). A pack that
    cannot be read now (archived) is no better than a damaged one: NotEvictable."""
    in_use = {row.pack_fk for row in await instances_of(ctx.index, study.id)}
    unread = [pack for pack in await packs_of(ctx.index, study.id)
              if pack.id in in_use and not pack.read_by_this_box]
    if not unread:
        return study
    log.info("evict reads back packs this box never read study=%s packs=%d",
             logsafe.ref(study.study_uid), len(unread))
    report = await scrub_packs(ctx, unread)
    if report.wrong_key:
        name, why = report.wrong_key[0]
        raise StudyAtRisk(f"the pack {name} cannot be opened with this box's site keys"
                          f" ({why}); nothing is deleted",
                          hint="recover the site key it was wrapped with (pacs-edge keys"
                          " recover), then evict again")
    if report.skipped:  # on the Archive tier, or replaced while read: nothing vouches for it
        name, why = report.skipped[0]
        raise NotEvictable(f"the pack {name} was never read by this box and cannot be read"
                           f" now ({why}); nothing is deleted",
                           hint="the local files stay; once the blob is on the Hot or Cool"
                           " tier again (az storage blob set-tier), evict reads it and"
                           " goes on")
    return await study_by_id(ctx.index, study.id) or study


async def confirm_cloud_copy(ctx: SyncContext, study: StudyRow) -> None:
    """What evict checks in the cloud before it deletes a study's local files: each pack
    the study needs, its manifest and a site key object are there as verified at upload
    (a HEAD each; CloudCopyChanged when missing or replaced)."""
    in_use = {row.pack_fk for row in await instances_of(ctx.index, study.id)}
    for pack in await packs_of(ctx.index, study.id):
        if pack.id in in_use:
            await ctx.packs.confirm_unchanged(pack)
