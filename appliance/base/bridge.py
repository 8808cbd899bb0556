"""The one bridge between pynetdicom's association threads and the asyncio loop.

pynetdicom runs each association in its own thread and calls handlers
synchronously; the index (aiosqlite) lives on one event loop. Handlers never
touch the loop directly: they call `bridge.call(coro)`, which schedules the
coroutine on the loop and blocks the association thread until it finishes, or
`bridge.post(coro)` for work the association need not wait for.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)


class LoopBridge:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._loop_thread = threading.get_ident() if loop.is_running() else None

    def call(self, coro: Coroutine[Any, Any, T], *, timeout: float | None = None) -> T:
        """Run `coro` on the loop from a worker thread and return its result.

        Raises what the coroutine raised, or TimeoutError after `timeout` seconds
        (the coroutine is then cancelled).
        """
        if threading.get_ident() == self._loop_thread:
            coro.close()
            raise RuntimeError("LoopBridge.call() from the event loop thread would deadlock")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise

    def post(self, coro: Coroutine[Any, Any, None]) -> None:
        """Schedule `coro` on the loop and return at once. Nobody waits for it, so it
        handles (logs) its expected failures; anything else it raises is logged here."""
        try:
            future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        except RuntimeError:  # the loop is closed: serve is stopping
            coro.close()
            return
        future.add_done_callback(_log_unexpected)


def _log_unexpected(future: concurrent.futures.Future[None]) -> None:
    error = None if future.cancelled() else future.exception()
    if error is not None:
        log.error("posted work failed error=%s", type(error).__name__, exc_info=error)
