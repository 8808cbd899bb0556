"""Web accesses folded into windows, so that a viewer cannot flood the audit trail.

A viewer opening a 500-slice series sends ~500 WADO-RS requests (metadata,
frames, thumbnails); one full audit record each buried the trail and the
site's SIEM under copies of the same fact. PS3.15 A.5.3 and IHE ATNA ask for
who accessed which study, from where, and how: so, per key (user, role, client
address, study, kind of access: query, retrieve or store):

- the first access opens a window of `window_seconds` and is recorded in full
  at once (the caller writes it before answering: an access is never
  unaudited, even if the process dies right after);
- further accesses with that key inside the window are only counted (requests,
  instances, and what was read: frames, metadata...), with the last time;
- when the window ends, or the process stops, the counts become one summary
  record, if anything was counted.

Refusals (a study not found or out of the user's scope, a bad query, a study
that could not be recalled) are keyed by user, address and reason, not by
study, so that probing many studies costs two records per window as well;
the studies tried are listed (the first few) and counted. Failed logins are
keyed by the name typed and the address.

At most MAX_WINDOWS windows are open at once; beyond that an access is
recorded in full (`note` answers True) and never folded: memory stays
bounded and nothing is dropped.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

MAX_WINDOWS = 4096
MAX_LISTED = 8  # studies kept per refusal window


@dataclass(frozen=True)
class AccessKey:
    """What makes two accesses the same for the audit trail."""

    kind: str  # "query", "retrieve", "store", "login"; "hl7", "C-FIND", "C-MOVE", "C-GET";
    # "refused" (a DIMSE service the peer may not use)
    user: str  # a web user, a name typed, an HL7 sender or a DIMSE peer's AE title
    role: str
    address: str
    study_uid: str = ""  # "" for refusals and searches across studies
    search: str = ""  # a search across studies: its query string
    refused: str = ""  # the refusal reason ("" for an access that was answered)


@dataclass
class Window:
    """Accesses with one key inside one window, beyond its first (recorded) one."""

    key: AccessKey
    closes_at: float  # time.monotonic()
    context: Any  # what the caller needs to write the summary (its first record's parts)
    requests: int = 0
    instances: int = 0
    first: datetime | None = None
    last: datetime | None = None
    what: Counter[str] = field(default_factory=Counter)
    studies: list[str] = field(default_factory=list)

    def add(self, what: str, instances: int, study_uid: str, when: datetime) -> None:
        self.requests += 1
        self.instances += instances
        self.first = self.first or when
        self.last = when
        if what:
            self.what[what] += 1
        if study_uid and study_uid not in self.studies and len(self.studies) < MAX_LISTED:
            self.studies.append(study_uid)


class AccessWindows:
    """Thread-safe; `note` on every access, `due` from a timer, `drain` at shutdown."""

    def __init__(self, window_seconds: float, *, max_windows: int = MAX_WINDOWS) -> None:
        self.window_seconds = window_seconds
        self.max_windows = max_windows
        self._lock = threading.Lock()
        self._open: dict[AccessKey, Window] = {}
        self._closed: list[Window] = []

    def note(self, key: AccessKey, *, what: str = "", instances: int = 0,
             study_uid: str = "", context: Any = None) -> bool:
        """Count one access; True when it opens a window (or none can be opened) and must
        be recorded in full. `context` is kept with a new window for its summary."""
        now, when = time.monotonic(), datetime.now(UTC)
        with self._lock:
            window = self._open.get(key)
            if window is not None and window.closes_at <= now:
                self._closed.append(self._open.pop(key))
                window = None
            if window is not None:
                window.add(what, instances, study_uid, when)
                return False
            if len(self._open) >= self.max_windows:
                self._close_expired(now)
            if len(self._open) < self.max_windows:
                self._open[key] = Window(key, now + self.window_seconds, context)
            return True

    def due(self) -> list[Window]:
        """Windows that have ended and counted something."""
        with self._lock:
            self._close_expired(time.monotonic())
            closed, self._closed = self._closed, []
        return [w for w in closed if w.requests]

    def drain(self) -> list[Window]:
        """Every window that counted something, ended or not (at shutdown)."""
        with self._lock:
            closed = self._closed + list(self._open.values())
            self._closed, self._open = [], {}
        return [w for w in closed if w.requests]

    def _close_expired(self, now: float) -> None:
        expired = [k for k, w in self._open.items() if w.closes_at <= now]
        self._closed.extend(self._open.pop(k) for k in expired)
