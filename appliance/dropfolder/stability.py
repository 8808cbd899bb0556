"""When is a dropped file complete? When our own observations saw it unchanged for a while.

A unit (a file, or a DICOMDIR media folder) is *ready* once two observations
at least `stable_seconds` apart (monotonic clock) returned the same signature:
size and mtime for a file, a digest of every file's name, size and mtime for a
media folder. Any change restarts the clock. The watcher re-observes a unit
when its quiet period is due, so readiness never depends on an event arriving.

Why not the close-after-write event (inotify IN_CLOSE_WRITE, watchdog's
FileClosedEvent)? It is a good *wake-up*, and the watcher uses it as one, but
it is not proof of completeness: a writer that reopens the file for each chunk
(many copy tools, an SMB server relaying a client's writes) closes it many
times, and network file systems (NFS, SMB mounts) deliver no inotify events
at all. Why not the file's mtime age? Samba pins ("sticky write time") an mtime
a client has set explicitly, so a file being written can look old. Only
repeated observation is portable; `stable_seconds` must exceed the longest
pause of the slowest writer (or the writer renames `name.part` when done).

Pure bookkeeping with an injected clock: no I/O, no threads, easy to test.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
Signature = Hashable


@dataclass
class _Entry:
    signature: Signature
    since: float  # when the current signature was first seen
    last_seen: float  # the latest observation that returned it


class StabilityTracker(Generic[K]):
    """Observations in, ready units out; each ready unit is handed out once."""

    def __init__(self, stable_seconds: float) -> None:
        self.stable_seconds = stable_seconds
        self._entries: dict[K, _Entry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def observe(self, key: K, signature: Signature, now: float) -> None:
        entry = self._entries.get(key)
        if entry is None or entry.signature != signature:
            self._entries[key] = _Entry(signature, now, now)
        else:
            entry.last_seen = now

    def forget(self, key: K) -> None:
        self._entries.pop(key, None)

    def due(self, now: float) -> list[K]:
        """Units whose quiet period has elapsed but were not observed since: re-observe them."""
        return [k for k, e in self._entries.items()
                if e.since + self.stable_seconds <= now and not self._stable(e)]

    def pop_ready(self) -> list[K]:
        """Units observed unchanged across `stable_seconds`; they leave the tracker."""
        ready = [k for k, e in self._entries.items() if self._stable(e)]
        for key in ready:
            del self._entries[key]
        return ready

    def next_due(self) -> float | None:
        """When the earliest unit becomes due for its confirming observation."""
        times = [e.since + self.stable_seconds for e in self._entries.values()
                 if not self._stable(e)]
        return min(times, default=None)

    def _stable(self, entry: _Entry) -> bool:
        return entry.last_seen - entry.since >= self.stable_seconds
