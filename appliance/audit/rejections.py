"""Rejected associations, counted per source so that a scan cannot flood the audit log.

A port scan or a misconfigured modality retrying with a wrong AE title is
rejected hundreds of times a minute; one full audit record each (~1.1 KB)
buried everything else (300 rejections, ~330 KB). So, per remote address:

- the first rejection opens a window of `window_seconds` and is recorded in
  full, as before (who called, from where, which AE titles, why);
- further rejections from that address inside the window are only counted,
  with the first and last time, and the calling AE titles and reasons seen
  (the first few of each);
- when the window ends, the count becomes one summary record.

So an address costs at most two records per window, whatever its rate. At
most MAX_SOURCES addresses are tracked at once; rejections from further
addresses (a scan from a whole subnet) share one "other addresses" tally,
which is only ever summarised. Nothing is dropped: every rejection is in a
record or a count.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

MAX_SOURCES = 1024
OTHER_SOURCES = "other addresses"
_MAX_LISTED = 8  # distinct AE titles and reasons kept per tally


@dataclass
class Tally:
    """Rejections from one source inside one window, beyond its first (recorded) one."""

    address: str
    closes_at: float  # time.monotonic()
    count: int = 0
    first: datetime | None = None
    last: datetime | None = None
    ae_titles: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)

    def add(self, ae_title: str, reason: str, when: datetime) -> None:
        self.count += 1
        self.first = self.first or when
        self.last = when
        for seen, value in ((self.ae_titles, ae_title), (self.reasons, reason)):
            if value not in seen and len(seen) < _MAX_LISTED:
                seen.append(value)


class RejectionTally:
    """Thread-safe; `note` on every rejection, `due` from a timer, `drain` at shutdown."""

    def __init__(self, window_seconds: float, *, max_sources: int = MAX_SOURCES) -> None:
        self.window_seconds = window_seconds
        self.max_sources = max_sources
        self._lock = threading.Lock()
        self._open: dict[str, Tally] = {}
        self._closed: list[Tally] = []

    def note(self, address: str, ae_title: str, reason: str) -> bool:
        """Count one rejection; True when it opens a window and must be recorded in full."""
        now, when = time.monotonic(), datetime.now(UTC)
        with self._lock:
            tally = self._open.get(address)
            if tally is not None and tally.closes_at <= now:
                self._closed.append(self._open.pop(address))
                tally = None
            if tally is not None:
                tally.add(ae_title, reason, when)
                return False
            if self._addresses() >= self.max_sources:
                self._close_expired(now)
            if self._addresses() < self.max_sources:
                self._open[address] = Tally(address, now + self.window_seconds)
                return True
            other = self._open.get(OTHER_SOURCES)
            if other is None:
                other = self._open[OTHER_SOURCES] = Tally(OTHER_SOURCES,
                                                          now + self.window_seconds)
            other.add(ae_title, reason, when)
            return False

    def due(self) -> list[Tally]:
        """Tallies whose window has ended and that counted something."""
        with self._lock:
            self._close_expired(time.monotonic())
            closed, self._closed = self._closed, []
        return [t for t in closed if t.count]

    def drain(self) -> list[Tally]:
        """Every tally that counted something, windows ended or not (at shutdown)."""
        with self._lock:
            closed = self._closed + list(self._open.values())
            self._closed, self._open = [], {}
        return [t for t in closed if t.count]

    def _addresses(self) -> int:
        return len(self._open) - (OTHER_SOURCES in self._open)

    def _close_expired(self, now: float) -> None:
        expired = [a for a, t in self._open.items() if t.closes_at <= now]
        self._closed.extend(self._open.pop(a) for a in expired)
