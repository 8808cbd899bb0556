"""The drop-folder watcher: watchdog events and periodic rescans feed one scheduler.

Shape::

    watchdog observer thread --paths--> Inbox --wake--> scheduler task (loop)
                                                           | stat/walk in to_thread
                                                           v
                                       StabilityTracker -> ready units -> queue
                                                                            |
                                       INGEST_CONCURRENCY consumer tasks <--+
                                       (Processor: ingest, then outcome)

Why on the loop, not behind LoopBridge: the ingest service is async and the
index lives on this loop; the watchdog thread does nothing but drop a path in
a set and, when the set was empty, wake the scheduler with
`call_soon_threadsafe`. Running the consumers as tasks lets several ingests
share a group commit, needs no thread blocked in `future.result()` when the
index closes, and makes stopping an ordinary await. Blocking steps (stat,
walks, unpacking, moves) run in `asyncio.to_thread`.

Why also rescan: events are a latency optimisation, not the source of truth.
A rescan of every root at start (files waiting from before a restart) and
every `rescan_seconds` (NFS/SMB deliver no inotify events; inotify's queue can
overflow; a folder can be filled before its watch exists) finds everything;
a unit already tracked is just observed again, so nothing is ingested twice.

Exactly once: a unit is handed to a consumer only when the tracker says it is
ready, it leaves the tracker at that moment, and while it is in flight every
observation of it is set aside. A file that changed while it was ingested
(CHANGED) or could not be cleared away (STUCK, remembered with its
signature) is not handed out again until it changes; a transient failure
(RETRY: disk full, index busy, stopping) is retried after `rescan_seconds`.
A refusal of a unit quiet for less than REJECT_QUIET_FACTOR x stable_seconds
(WAIT) is retried once it has been quiet that long: only then is it rejected.

Stopping lets in-flight units finish (a multi-file unit stops between files)
for a grace period before cancelling: cancelling `ingest_file` between the
index commit and its return would leave the row without its file.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import shutil
import stat
import threading
import time
from collections.abc import Callable, Hashable, Iterable
from pathlib import Path

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver, ObservedWatch

from appliance.base.config import Config, DropFolderConfig
from appliance.dropfolder.layout import DropLayout, Root, is_ignored
from appliance.dropfolder.outcomes import Outcomes, prune_empty_dirs
from appliance.dropfolder.processor import Job, Processor, Tally, Verdict, path_ref
from appliance.dropfolder.sources import Unit, UnitKind, signature, unit_for, walk_files
from appliance.dropfolder.stability import StabilityTracker
from appliance.services.ingest import IngestService

log = logging.getLogger(__name__)

INGEST_CONCURRENCY = 4
STOP_GRACE_SECONDS = 10.0
PRUNE_QUIET_SECONDS = 60.0
# A refusal stands only once the unit was quiet this many times stable_seconds:
# a writer that pauses a little longer than promised gets its file ingested
# whole instead of a truncated prefix in rejected/. Good files are not delayed.
REJECT_QUIET_FACTOR = 5.0

# Our own reads open and close files too: only events that can mean "new or
# changed content" are subscribed (no FileOpenedEvent / FileClosedNoWriteEvent).
_EVENTS: list[type[FileSystemEvent]] = [
    FileCreatedEvent, FileModifiedEvent, FileClosedEvent, FileMovedEvent, FileDeletedEvent,
    DirCreatedEvent, DirMovedEvent, DirDeletedEvent,
]

Observation = tuple[Unit, Hashable | None]
FolderId = tuple[int, int]  # st_dev, st_ino


def _folder_id(path: Path) -> FolderId | None:
    """Which folder is at `path` now (None if none is)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None


class Inbox:
    """Paths reported by the observer thread, coalesced; wakes the loop once per batch."""

    def __init__(self, wake: Callable[[], None]) -> None:
        self._wake = wake
        self._lock = threading.Lock()
        self._paths: set[Path] = set()

    def add(self, *paths: Path) -> None:
        with self._lock:
            was_empty = not self._paths
            self._paths.update(paths)
        if was_empty:
            self._wake()

    def drain(self) -> set[Path]:
        with self._lock:
            paths, self._paths = self._paths, set()
        return paths


class _EventHandler(FileSystemEventHandler):
    def __init__(self, inbox: Inbox) -> None:
        self._inbox = inbox

    def on_any_event(self, event: FileSystemEvent) -> None:
        paths = [event.src_path, getattr(event, "dest_path", "")]
        self._inbox.add(*(Path(os.fsdecode(p)) for p in paths if p))


class DropFolderWatcher:
    """Watches the configured folders while `serve` runs; start() and stop() on the loop."""

    def __init__(self, settings: DropFolderConfig, layout: DropLayout, ingest: IngestService,
                 *, home: Path) -> None:
        self.settings = settings
        self.layout = layout
        self.home = home
        self.processor = Processor(ingest, Outcomes(settings.after_ingest), layout.tmp,
                                   lambda: self._stopping)
        self.total = Tally()  # this run's counts (status derives its own from disk/index)
        self._batch = Tally()
        self._tracker: StabilityTracker[Path] = StabilityTracker(settings.stable_seconds)
        self._units: dict[Path, Unit] = {}  # tracked units by key
        self._in_flight: set[Path] = set()
        self._handled: dict[Path, Hashable] = {}  # STUCK units: signature when given up
        self._quiet: dict[Path, tuple[Hashable, float]] = {}  # signature, unchanged since
        self._reject_quiet = REJECT_QUIET_FACTOR * settings.stable_seconds
        self._retry: dict[Path, tuple[Unit, float]] = {}
        self._queue: asyncio.Queue[Unit | None] = asyncio.Queue()
        self._wake = asyncio.Event()
        self._stopping = False
        self._observer: BaseObserver | None = None
        self._watched: dict[Path, tuple[ObservedWatch, FolderId]] = {}
        self._renew: set[Path] = set()  # roots whose watch stopped, until it is added again
        self._unreadable: set[Path] = set()  # folders it may not list, each logged once
        self._tasks: list[asyncio.Task[None]] = []
        self._consumers: list[asyncio.Task[None]] = []
        self.inbox: Inbox | None = None

    @classmethod
    def from_config(cls, config: Config, ingest: IngestService) -> DropFolderWatcher:
        return cls(config.dropfolder, DropLayout.from_config(config), ingest, home=config.home)

    # --- life cycle ------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()

        def wake() -> None:
            with contextlib.suppress(RuntimeError):  # loop closed during shutdown
                loop.call_soon_threadsafe(self._wake.set)

        self.inbox = Inbox(wake)
        await asyncio.to_thread(self._prepare)
        observer = Observer()
        observer.start()
        self._observer = observer
        await asyncio.to_thread(self._watch_roots)
        self._tasks.append(loop.create_task(self._schedule(), name="dropfolder-scheduler"))
        self._consumers = [loop.create_task(self._consume(), name=f"dropfolder-ingest-{n}")
                           for n in range(INGEST_CONCURRENCY)]
        log.info("drop folder watching folders=%d watched=%d stable_seconds=%.1f"
                 " rescan_seconds=%.0f after_ingest=%s", len(self.layout.roots),
                 len(self._watched), self.settings.stable_seconds,
                 self.settings.rescan_seconds, self.settings.after_ingest)

    async def stop(self, grace: float = STOP_GRACE_SECONDS) -> None:
        self._stopping = True
        self._wake.set()
        if self._observer is not None:
            observer, self._observer = self._observer, None
            observer.stop()
            await asyncio.to_thread(observer.join, 5.0)
        for task in self._tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self._tasks, return_exceptions=True)
        while not self._queue.empty():  # not started: picked up again at the next start
            self._queue.get_nowait()
        for _ in self._consumers:
            self._queue.put_nowait(None)
        if self._consumers:
            _done, pending = await asyncio.wait(self._consumers, timeout=grace)
            for task in pending:
                log.warning("drop folder ingest still running at stop; cancelling it")
                task.cancel()
            await asyncio.gather(*self._consumers, return_exceptions=True)
        self._log_batch()
        log.info("drop folder stopped stored=%d duplicates=%d rejected=%d",
                 self.total.stored, self.total.duplicates, self.total.rejected)

    def _prepare(self) -> None:
        """Create roots inside the data home (never a missing mount point elsewhere);
        empty the temp folder of a crashed run."""
        for root in self.layout.roots:
            with contextlib.suppress(OSError):
                if root.path.is_relative_to(self.home):
                    root.path.mkdir(parents=True, exist_ok=True)
            if not root.path.is_dir():
                log.warning("drop folder missing; rescans will keep looking folder=%s",
                            root.path)
        shutil.rmtree(self.layout.tmp, ignore_errors=True)
        try:
            self.layout.tmp.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # ZIP archives then wait (RETRY) until it can be made
            log.error("drop folder temp folder cannot be created error=%s", type(exc).__name__)

    def _watch_roots(self) -> None:
        """Add an inotify watch for each root that exists and has none yet (blocking).

        A watch belongs to the folder it was added on, not to its path: once that folder
        is removed (its watch stops; the new folder may even get the same inode number)
        or renamed away (its watch follows it), a folder made again under the path would
        get no events at all, only rescans. So a root whose watch stopped, or whose
        folder is not the watched one any more, has its watch replaced."""
        assert self._observer is not None
        for root in self.layout.roots:
            current = _folder_id(root.path)
            watched = self._watched.get(root.path)
            if watched is not None:
                if watched[1] == current and self._alive(watched[0]):
                    continue
                self._observer.unschedule(watched[0])
                del self._watched[root.path]
                self._renew.add(root.path)
            if current is not None:
                self._watch(root, current)

    def _watch(self, root: Root, folder: FolderId) -> None:
        assert self._observer is not None and self.inbox is not None
        try:
            watch = self._observer.schedule(_EventHandler(self.inbox), str(root.path),
                                            recursive=True, event_filter=_EVENTS)
        except OSError as exc:
            # e.g. fs.inotify.max_user_watches reached: rescans still find everything.
            log.warning("drop folder events unavailable; relying on rescans error=%s",
                        type(exc).__name__)
            return
        self._watched[root.path] = (watch, folder)
        if root.path in self._renew:
            self._renew.discard(root.path)
            log.warning("drop folder was removed or replaced; its watch is renewed folder=%s",
                        root.path)

    def _alive(self, watch: ObservedWatch) -> bool:
        """Whether `watch` still delivers events (watchdog stops it with its folder)."""
        assert self._observer is not None
        return any(e.watch == watch and e.is_alive() for e in self._observer.emitters)

    # --- scheduler -------------------------------------------------------------

    async def _schedule(self) -> None:
        assert self.inbox is not None
        next_rescan = 0.0  # at once: files that waited through a restart
        while not self._stopping:
            now = time.monotonic()
            retry_at = min((at for _u, at in self._retry.values()), default=math.inf)
            deadline = min(next_rescan, self._tracker.next_due() or math.inf, retry_at)
            if deadline > now:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), deadline - now)
            self._wake.clear()
            paths = self.inbox.drain()
            now = time.monotonic()
            rescan = now >= next_rescan
            if rescan:
                next_rescan = now + self.settings.rescan_seconds
                paths.update(r.path for r in self.layout.roots)
            try:
                recheck = [self._units[k] for k in self._tracker.due(now)]
                for key, (unit, at) in list(self._retry.items()):
                    if at <= now:
                        del self._retry[key]
                        recheck.append(unit)
                observed = await asyncio.to_thread(self._observe, paths, recheck, rescan)
                self._apply(observed, time.monotonic())
            except Exception as exc:  # a bug: say so, and the next rescan looks at all again
                log.error("drop folder scan failed error=%s", type(exc).__name__)

    def _observe(self, paths: Iterable[Path], recheck: list[Unit],
                 rescan: bool) -> list[Observation]:
        """Resolve reported paths to units and take their signatures (blocking)."""
        if rescan:
            self._watch_roots()
            for root in self.layout.roots:
                if root.path.is_dir():
                    prune_empty_dirs(root, quiet_seconds=max(
                        PRUNE_QUIET_SECONDS, 2 * self.settings.stable_seconds))
        units: dict[Path, Unit] = {}
        gone: list[Unit] = []
        unreadable: list[Path] = []

        def add(path: Path, root: Root) -> None:
            unit = unit_for(path, root)
            units.setdefault(unit.path, unit)
            if unit.kind is UnitKind.MEDIA:
                # Possibly tracked as a plain file before its DICOMDIR arrived.
                gone.append(Unit(UnitKind.FILE, path, root))

        for path in paths:
            owner = self.layout.root_of(path)
            if owner is None or self._skipped(path, owner):
                continue
            try:
                mode = path.lstat().st_mode
            except (FileNotFoundError, NotADirectoryError):
                if path.parent.is_dir():
                    add(path, owner)  # signature None, or its media set is re-signed
                else:
                    gone.append(Unit(UnitKind.FILE, path, owner))
                continue
            except PermissionError:
                continue  # below a folder it may not search: the rescan's walk names it
            if stat.S_ISDIR(mode):
                for found in walk_files(path, unreadable):
                    if not self._skipped(found, owner):
                        add(found, owner)
            elif stat.S_ISREG(mode):
                add(path, owner)
        for unit in recheck:
            if unit.kind is UnitKind.FILE:
                add(unit.path, unit.root)
            else:
                units.setdefault(unit.path, unit)
        observed: list[Observation] = [(u, None) for u in gone if u.path not in units]
        observed.extend((u, signature(u)) for u in units.values())
        self._note_unreadable(unreadable, complete=rescan)
        return observed

    def _note_unreadable(self, found: list[Path], *, complete: bool) -> None:
        """Log each folder it may not list once, and again when it can (`complete`: a
        rescan walked every root). Its files wait there, uncounted by `status`'s pending,
        until the service user may read it: without this line nobody would know."""
        found = [folder for folder in found if not self.layout.is_excluded(folder)]
        for folder in sorted(set(found) - self._unreadable):
            root = self.layout.root_of(folder)
            if root is not None:
                log.warning("drop folder cannot list a folder: its files wait until the"
                            " service user may read it folder=%s", path_ref(folder, root))
        if complete:
            for folder in sorted(self._unreadable - set(found)):
                root = self.layout.root_of(folder)
                if root is not None:
                    log.info("drop folder: a folder it could not list is readable or gone"
                             " folder=%s", path_ref(folder, root))
            self._unreadable = set(found)
        else:
            self._unreadable |= set(found)

    def _skipped(self, path: Path, root: Root) -> bool:
        relative = path.relative_to(root.path).parts
        return any(is_ignored(p) for p in relative) or self.layout.is_excluded(path)

    def _apply(self, observed: list[Observation], now: float) -> None:
        assert self.inbox is not None
        for unit, sig in observed:
            key = unit.path
            if key in self._in_flight or key in self._retry:
                continue  # its consumer (or its retry) looks at it again
            if sig is None:
                self._tracker.forget(key)
                self._units.pop(key, None)
                self._handled.pop(key, None)
                self._quiet.pop(key, None)
                if unit.kind is UnitKind.MEDIA and unit.path.is_dir():
                    self.inbox.add(unit.path)  # DICOMDIR gone: leftovers are plain files
                continue
            if self._handled.get(key) == sig:
                continue
            self._handled.pop(key, None)
            if self._quiet.get(key, (None,))[0] != sig:
                self._quiet[key] = (sig, now)
            self._tracker.observe(key, sig, now)
            self._units[key] = unit
        for key in self._tracker.pop_ready():
            self._in_flight.add(key)
            self._queue.put_nowait(self._units.pop(key))

    # --- consumers -------------------------------------------------------------

    async def _consume(self) -> None:
        while (unit := await self._queue.get()) is not None:
            quiet_since = self._quiet.get(unit.path, (None, time.monotonic()))[1]
            tally = Tally()
            job = Job(unit.root, tally,
                      may_reject=time.monotonic() - quiet_since >= self._reject_quiet)
            try:
                verdict = await self.processor.process(unit, job)
            except Exception as exc:  # a bug: keep watching, retry the unit later
                log.error("drop folder unit failed kind=%s error=%s", unit.kind.value,
                          type(exc).__name__)
                verdict = Verdict.RETRY
            await self._finish(unit, verdict, tally)

    async def _finish(self, unit: Unit, verdict: Verdict, tally: Tally) -> None:
        assert self.inbox is not None
        self.total.add(tally)
        self._batch.add(tally)
        now = time.monotonic()
        if verdict is Verdict.RETRY:
            self._retry[unit.path] = (unit, now + self.settings.rescan_seconds)
        elif verdict is Verdict.WAIT:
            since = self._quiet.get(unit.path, (None, now))[1]
            self._retry[unit.path] = (unit, max(since + self._reject_quiet, now))
        elif verdict is Verdict.STUCK:
            sig = await asyncio.to_thread(signature, unit)
            if sig is not None:
                self._handled[unit.path] = sig
        if verdict not in (Verdict.RETRY, Verdict.WAIT):
            self._quiet.pop(unit.path, None)
        self._in_flight.discard(unit.path)
        if verdict is not Verdict.STUCK:
            self.inbox.add(unit.path)  # gone, changed, or a media set's leftovers
        self._wake.set()
        if not self._in_flight and self._queue.empty():
            self._log_batch()

    def _log_batch(self) -> None:
        b = self._batch
        if b.stored or b.duplicates or b.rejected or b.missing:
            log.info("drop folder ingested stored=%d duplicates=%d rejected=%d missing=%d",
                     b.stored, b.duplicates, b.rejected, b.missing)
        self._batch = Tally()
