"""The agent's scheduler runs a job late rather than skipping it for a whole interval.

(Wall-clock steps, the scheduler's other duty, are proven on real processes in
test_clock_steps.py.)
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

from sync.steady_scheduler import SteadyScheduler


async def test_a_job_whose_start_a_busy_loop_delays_past_a_second_still_runs() -> None:
    scheduler = SteadyScheduler(event_loop=asyncio.get_running_loop())
    ran: list[str] = []

    async def hold_the_loop() -> None:
        ran.append("first")
        time.sleep(1.5)  # a pass's synchronous start on a loaded box

    async def waits_its_turn() -> None:
        ran.append("second")

    now = datetime.now(UTC)  # the holder is due first, so that it starts first
    scheduler.add_job(hold_the_loop, "interval", seconds=300,
                      next_run_time=now - timedelta(seconds=0.2))
    scheduler.add_job(waits_its_turn, "interval", seconds=300, next_run_time=now)
    scheduler.start()
    try:
        for _ in range(50):
            if len(ran) == 2:
                break
            await asyncio.sleep(0.1)
    finally:
        scheduler.shutdown(wait=False)
    assert ran == ["first", "second"]
