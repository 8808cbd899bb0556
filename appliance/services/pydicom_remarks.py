"""pydicom's remarks on what it reads: one log line each, or held back in one thread.

pydicom remarks on input it reads badly (an unknown tag in Implicit VR, a value
its character set cannot read, a value that runs past the end of the file) with
misc.warn_and_log: a WARNING line on the "pydicom" logger, then a warning with the
same text, which Python prints to stderr outside the log's format. So:

- pydicom's warnings are ignored, process-wide, by one filter added at import and
  never changed: its log line says the same.
- `held_back()`: while a block runs in this thread, pydicom's log lines are not
  written but collected, for this thread alone. The box reads with pydicom in many
  threads at once (one per association, ingest's worker threads, the event loop).

Never warnings.catch_warnings around a read: it copies the process's
warnings.filters and showwarning on entry and puts back, on exit, what it copied,
so threads whose blocks overlap put back each other's. Served that way, six
associations sending at once (whole instances, and truncated ones pydicom remarks
on) had a few whole instances refused as truncated, the other thread's remark
having reached their list; a filter and a hook stayed installed for good. aiohttp
enters one on the event loop for each multipart STOW-RS part, too.
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

_held = threading.local()


class _HeldBack(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        messages: list[str] | None = getattr(_held, "messages", None)
        if messages is None:
            return True
        messages.append(record.getMessage())
        return False


@contextmanager
def held_back() -> Iterator[list[str]]:
    """pydicom's log lines of this thread, not written while the block runs: their
    messages, in the list yielded. Their text can quote values (PHI)."""
    outer = getattr(_held, "messages", None)
    messages: list[str] = []
    _held.messages = messages
    try:
        yield messages
    finally:
        _held.messages = outer


logging.getLogger("pydicom").addFilter(_HeldBack())
warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")
