"""`pacs-edge migrate verify`: prove, after a run, that the box holds every instance
the legacy PACS lists for each study the run migrated.

For every study the run marked done, one image-level C-FIND asks the legacy PACS
for its SOP Instance UIDs now, and the index says which the box holds (as a
current instance of any study or a prior version: a UID two legacy studies share
is held once). A study with UIDs the box lacks (the legacy PACS received more of
it after its migration, or an instance was lost since) is marked failed,
`incomplete`, with how many are missing; `migrate resume --retry-failed` then
fetches what is missing, as for any failure. A study the legacy PACS no longer
lists at all is reported apart (`gone`), not reopened. All C-FINDs share one
association; each is bounded by the DIMSE timeouts of the SCU edge.

Only done studies can be checked: the run's other studies (failed, an earlier
verify's incomplete ones among them, or not tried yet) and the days it could not
list are counted (`not_migrated`, `days_not_listed`), so that a verify run again
before `resume --retry-failed` does not call the run complete.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from appliance.base import logsafe
from appliance.services.legacy_migration import LegacySource
from appliance.store import database
from appliance.store import migration_rows as rows
from appliance.store.index import Index

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StudyCheck:
    study_uid: str
    listed: int  # instances the legacy PACS lists now
    missing: int  # of those, instances the box does not hold


@dataclass
class VerifyReport:
    checked: int = 0
    complete: int = 0
    listed: int = 0  # instances the legacy PACS lists for the checked studies
    incomplete: list[StudyCheck] = field(default_factory=list)
    gone: list[str] = field(default_factory=list)  # studies it no longer lists
    not_migrated: int = 0  # the run's studies not done before the check: not checked
    days_not_listed: int = 0  # the run's days failed or not listed yet: studies unknown

    @property
    def run_complete(self) -> bool:
        return not (self.incomplete or self.not_migrated or self.days_not_listed)

    @property
    def missing(self) -> int:
        return sum(s.missing for s in self.incomplete)


async def verify_run(index: Index, run_id: int, source: LegacySource, *,
                     on_study: Callable[[int, int], None] | None = None) -> VerifyReport:
    """Check every done study of the run against the legacy PACS; `on_study(n, total)`
    hears of each one checked."""
    assert index.writer is not None
    writer = index.writer
    studies = await database.run_sync(index.reader, rows.done_studies, run_id)
    counts = await database.run_sync(index.reader, rows.summary, run_id)
    report = VerifyReport(not_migrated=counts.studies_found - counts.studies_done,
                          days_not_listed=counts.days_total - counts.days_done)
    session_cm = source.session()
    session = await asyncio.to_thread(session_cm.__enter__)
    try:
        for n, task in enumerate(studies, 1):
            answers = await asyncio.to_thread(session.instances_of, task.study_uid)
            sops = [sop for sop, _ in answers if sop]
            held = await database.run_sync(index.reader, rows.held_sop_uids, sops)
            missing = sum(sop not in held for sop in sops)
            report.checked += 1
            report.listed += len(sops)
            if not sops:
                report.gone.append(task.study_uid)
            elif missing:
                report.incomplete.append(StudyCheck(task.study_uid, len(sops), missing))
                await writer.submit_sync(partial(rows.verify_failed, study_id=task.id,
                                                 listed=len(sops), missing=missing))
                log.warning("migration verify incomplete run=%d study=%s listed=%d missing=%d",
                            run_id, logsafe.ref(task.study_uid), len(sops), missing)
            else:
                report.complete += 1
            if on_study is not None:
                on_study(n, len(studies))
    finally:
        await asyncio.to_thread(session_cm.__exit__, None, None, None)
    log.info("migration verified run=%d studies=%d complete=%d incomplete=%d gone=%d"
             " missing=%d not_migrated=%d days_not_listed=%d", run_id, report.checked,
             report.complete, len(report.incomplete), len(report.gone), report.missing,
             report.not_migrated, report.days_not_listed)
    return report
