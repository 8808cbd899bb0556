"""Blocking cloud and disk work in a thread, whose cancellation waits for the thread.

A task cancelled while it awaits `asyncio.to_thread` gets its CancelledError at
once, while the thread runs on. The sync jobs roll back on the way out (an
upload deletes the blobs of its version, a recall the files it wrote): beside a
thread still writing, that roll-back races it and leaves blobs or files nothing
indexes. The agent cancels its running jobs when it stops (sync.agent), so
every thread a job starts to change the cloud or the store goes through
`in_thread`: on cancel, the work is asked to stop (`stop` is set; long loops
check it between chunks or instances with `check`), and the cancellation
reaches the caller only once the thread has returned.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import TypeVar

from appliance.base.errors import PacsEdgeError

log = logging.getLogger(__name__)

T = TypeVar("T")


class StopRequested(PacsEdgeError):
    """Raised in the thread by `check` once the awaiting task was cancelled."""

    def __init__(self) -> None:
        super().__init__("the sync agent is stopping: work ended early")


def check(stop: threading.Event | None) -> None:
    if stop is not None and stop.is_set():
        raise StopRequested


async def in_thread(work: Callable[[threading.Event], T]) -> T:
    """Run `work(stop)` in a thread; if the caller is cancelled, set `stop`, wait until
    `work` has returned or raised, then let the cancellation through."""
    stop = threading.Event()
    future = asyncio.ensure_future(asyncio.to_thread(work, stop))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        stop.set()
        await asyncio.wait([future])
        if not future.cancelled():
            future.exception()  # retrieved: what the caller sees is its cancellation
        raise


async def roll_back_on_stop(undo: Awaitable[object], *, work: str) -> None:
    """Await the roll-back of a job that the agent's stop cancelled; never raise.

    A roll-back can fail at stop: the study's lease lapsed meanwhile (LeaseLost),
    or the job's thread outlived the agent's bound (sync.agent.JOB_STOP_TIMEOUT)
    and ended while the index was closing. Raised from the job's `except
    CancelledError`, that error would replace the cancellation: the job would take
    it for a failure of one study and run its pass on, uploading the next study
    while the agent stops. What the roll-back leaves undone is rolled back at the
    next start (sync.rollback), as after a kill.
    """
    try:
        await undo
    except Exception as exc:  # LeaseLost; a closing index: IndexUnavailable, ValueError
        log.warning("roll-back at stop left to the next start work=%s error=%s", work,
                    getattr(exc, "message", "") or type(exc).__name__)
