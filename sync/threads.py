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
import threading
from collections.abc import Callable
from typing import TypeVar

from appliance.base.errors import PacsEdgeError

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
