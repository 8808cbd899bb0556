"""The agent's scheduler: APScheduler's asyncio scheduler, made to survive wall-clock steps.

Why: APScheduler 3 keeps each job's next run as a wall-clock time. A box that
boots with a dead RTC battery and is then stepped by NTP, or whose clock is
corrected after months ahead, moves that clock by years while the agent runs:
- stepped back, every job's next run lies years ahead and the scheduler sleeps
  until then (replication, eviction and recall requests stop, and stay stopped
  after the clock is put right: nothing wakes the scheduler again);
- stepped forward, the scheduler lists every missed run of a job before it
  coalesces them, one datetime per interval (a 1 s recall poll and a one-year
  step: 31 million of them), blocking the loop for minutes and growing the
  process by gigabytes.
The monotonic clock does not step. Before each pass over the jobs the scheduler
compares the wall clock with it; on a step it runs every job now, after which each
keeps its interval from there. It wakes at least every CHECK_SECONDS so that a
backward step is seen even when no job is due for long.

APScheduler also skips a run that starts more than a second late (its default
misfire grace), and a run of an asyncio job "starts" when its task first gets
the loop: the jobs due together start one after another, so a first pass that
holds the loop for a second on a loaded box made the others skip a whole
interval (the audit anchor five minutes, the scrub a day). Here a late run
always runs, once (coalesced), and never beside a run of the same job.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import Any

from apscheduler.schedulers.asyncio import AsyncIOScheduler

log = logging.getLogger(__name__)

CHECK_SECONDS = 10.0
STEP_TOLERANCE = 5.0  # far above NTP slewing (500 ppm) between two checks


def _wall_minus_monotonic() -> float:
    return time.time() - time.monotonic()


class SteadyScheduler(AsyncIOScheduler):
    """An AsyncIOScheduler whose interval jobs run on after the wall clock steps."""

    _offset = 0.0  # set at start

    def __init__(self, **options: Any) -> None:
        options.setdefault("job_defaults", {"misfire_grace_time": None, "coalesce": True,
                                            "max_instances": 1})
        super().__init__(**options)

    def start(self, paused: bool = False) -> None:
        self._offset = _wall_minus_monotonic()
        super().start(paused)

    def _process_jobs(self) -> float | None:
        offset = _wall_minus_monotonic()
        step, self._offset = offset - self._offset, offset
        if abs(step) > STEP_TOLERANCE:
            log.warning("wall clock stepped seconds=%d: every job runs now", step)
            now = datetime.now(UTC)
            for job in self.get_jobs():
                job.modify(next_run_time=now)
        return super()._process_jobs()

    def _start_timer(self, wait_seconds: float | None) -> None:
        super()._start_timer(None if wait_seconds is None else min(wait_seconds, CHECK_SECONDS))
