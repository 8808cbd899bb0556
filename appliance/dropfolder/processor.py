"""One ready unit through the durable ingest path, and each file to its outcome.

Runs as coroutines on the serving loop, next to the index: ingest is async
already, and the blocking steps (reading a DICOMDIR, unpacking a ZIP member,
moving files) go through `asyncio.to_thread`. See watcher.py for why the
drop folder lives on the loop rather than behind the LoopBridge.

Every instance goes through `IngestService.ingest_file`, exactly like
`pacs-edge import`; the index row carries source `dropfolder`, which is what
`pacs-edge status` counts. The file is cleared away only after ingest
returned, i.e. after the instance is fsynced and its row committed.

And only the file that was ingested is cleared away. A writer may replace or
rewrite a dropped file at any moment, also between the last look at it and the
delete, which acts on a name. So the delete first claims the file: one rename,
through its folder's descriptor, to a private name beside it (`_claim`); the
claimed entry is then compared with the signature taken before ingest, and only
if it is the same file, unchanged, is the private name unlinked. Otherwise it
gets its name back and is watched again (CHANGED). A writer that replaces the
file after the claim makes a new file under the original name, which is left
alone. The private name is an ordinary one on purpose: one left behind by a
crash is seen by the next rescan and ingested again (as a no-op if it was).
A move to done/ (after_ingest = "move") deletes nothing; the file is looked at
once more through its folder's descriptor just before it is moved (a claim
there would need outcomes.py to move the claimed name to the original one).

What each failure means here:

    RejectedInstance (not DICOM, truncated, bad UIDs)   -> rejected/ + .reason, or WAIT
                                                           while quiet for too short a time
    OutOfSpace, other PacsEdgeError, unexpected OSError -> left in place, RETRY later
    the file changed while it was read                  -> CHANGED: watch it again
    the file cannot be read or moved (permissions, RO)  -> STUCK: left until it changes
    its path crosses a symlink (UnsafePath)             -> STUCK: left alone; what the
                                                           link points to is never touched

Log lines carry counts and keyed references of relative paths, never names:
a CD's file names can spell a patient's name.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import secrets
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from appliance.base import logsafe
from appliance.base.errors import OutOfSpace, PacsEdgeError, RejectedInstance, UnsafePath
from appliance.dropfolder import confine
from appliance.dropfolder.confine import open_file
from appliance.dropfolder.layout import Root
from appliance.dropfolder.outcomes import Outcomes
from appliance.dropfolder.sources import (
    Unit,
    UnitKind,
    ZipSource,
    file_signature,
    find_dicomdir,
    is_zip,
    read_media_index,
)
from appliance.services.ingest import IngestService
from appliance.store.index import RecordOutcome

log = logging.getLogger(__name__)

SOURCE_AE = "dropfolder"
# A claimed file's private name (see the module docstring): not one layout.is_ignored skips.
CLAIM_PREFIX = "pacs-edge-claim-"
Signature = tuple[int, int, int]  # size, mtime_ns, inode: see sources.file_signature


class Verdict(enum.Enum):
    DONE = "done"  # every file of the unit reached its outcome
    RETRY = "retry"  # transient failure (disk full, index busy, stopping): try again later
    CHANGED = "changed"  # written to while being ingested: not complete after all
    STUCK = "stuck"  # cannot be read or cleared away: leave it until it changes
    WAIT = "wait"  # refused, but quiet too briefly to be sure it was finished: try again


@dataclass
class Tally:
    stored: int = 0
    duplicates: int = 0
    rejected: int = 0
    missing: int = 0  # DICOMDIR references to files that are not there

    def add(self, other: Tally) -> None:
        self.stored += other.stored
        self.duplicates += other.duplicates
        self.rejected += other.rejected
        self.missing += other.missing


@dataclass
class Job:
    """One unit's processing: where it is, what happened, and whether a refusal may stand.

    `may_reject` is False while the unit has been quiet for less than the
    rejection grace: a refusal then (truncated, not DICOM yet) most likely
    means a writer paused longer than stable_seconds, so the file stays.
    """

    root: Root
    tally: Tally
    may_reject: bool = True


class Processor:
    def __init__(self, ingest: IngestService, outcomes: Outcomes, tmp: Path,
                 stopping: Callable[[], bool]) -> None:
        self.ingest = ingest
        self.outcomes = outcomes
        self.tmp = tmp
        self.stopping = stopping
        self._paused_for: str | None = None  # the reason of the pause last logged

    async def process(self, unit: Unit, job: Job) -> Verdict:
        if unit.kind is UnitKind.MEDIA:
            return await self._media(unit.path, job)
        before = await asyncio.to_thread(file_signature, unit.path)
        if before is None:
            return Verdict.DONE  # gone meanwhile
        try:
            archive = await asyncio.to_thread(is_zip, unit.root.path, unit.path)
        except UnsafePath as exc:
            return _unsafe(unit.path, unit.root, exc)
        except OSError as exc:
            _warn("dropped file cannot be read", unit.path, unit.root, exc)
            return Verdict.STUCK
        if archive:
            return await self._zip(unit.path, before, job)
        return await self._instance(unit.path, before, job)

    async def _instance(self, path: Path, before: Signature, job: Job) -> Verdict:
        root, tally = job.root, job.tally
        if before[0] == 0:  # clearer for the operator than "not a DICOM Part 10 file"
            return await self._reject(path, "file is empty", None, job)
        try:
            with await asyncio.to_thread(open_file, root.path, path) as fh:
                result = await self.ingest.ingest_file(fh, source_ae=SOURCE_AE)
        except UnsafePath as exc:
            return _unsafe(path, root, exc)
        except OutOfSpace as exc:
            return self._pause(exc)
        except RejectedInstance as exc:
            if await self._changed(path, before):
                return Verdict.CHANGED
            return await self._reject(path, exc.reason, exc.hint, job)
        except FileNotFoundError:
            return Verdict.DONE
        except (PermissionError, IsADirectoryError) as exc:
            _warn("dropped file cannot be read", path, root, exc)
            return Verdict.STUCK
        except (PacsEdgeError, OSError) as exc:
            _warn("drop folder ingest failed; will retry", path, root, exc)
            return Verdict.RETRY
        self._resume()
        if await self._changed(path, before):
            # Written to after it looked complete: what was stored may be a
            # prefix. Watch it again; the whole file supersedes it (a new version).
            _warn("dropped file changed while ingested; watching it again", path, root, None)
            return Verdict.CHANGED
        if result.outcome is RecordOutcome.DUPLICATE:
            tally.duplicates += 1
        else:
            tally.stored += 1
        return await self._clear(path, root, before)

    async def _media(self, folder: Path, job: Job) -> Verdict:
        root, tally = job.root, job.tally
        dicomdir = await asyncio.to_thread(find_dicomdir, folder)
        if dicomdir is None:
            return Verdict.DONE  # its files are plain files now
        try:
            media = await asyncio.to_thread(read_media_index, dicomdir, root.path)
        except UnsafePath as exc:
            return _unsafe(dicomdir, root, exc)
        except RejectedInstance as exc:
            return await self._reject(dicomdir, exc.reason, exc.hint, job)
        except OSError as exc:
            _warn("DICOMDIR cannot be read", dicomdir, root, exc)
            return Verdict.STUCK
        tally.missing += media.missing + media.invalid
        stuck = False
        for path in media.files:
            if self.stopping():
                return Verdict.RETRY
            before = await asyncio.to_thread(file_signature, path)
            if before is None:
                tally.missing += 1
                continue
            verdict = await self._instance(path, before, job)
            if verdict in (Verdict.RETRY, Verdict.CHANGED, Verdict.WAIT):
                return verdict
            stuck = stuck or verdict is Verdict.STUCK
        if media.missing or media.invalid:
            log.warning("DICOMDIR references files that are not there or lead outside its"
                        " folder (.., symlinks) missing=%d invalid=%d media=%s", media.missing,
                        media.invalid, path_ref(folder, root))
        verdict = await self._clear(dicomdir, root)
        return Verdict.STUCK if stuck else verdict

    async def _zip(self, path: Path, before: Signature, job: Job) -> Verdict:
        root = job.root
        try:
            source = await asyncio.to_thread(ZipSource, root.path, path)
        except UnsafePath as exc:
            return _unsafe(path, root, exc)
        except OSError as exc:
            _warn("dropped file cannot be read", path, root, exc)
            return Verdict.STUCK
        except RejectedInstance as exc:
            if await self._changed(path, before):
                return Verdict.CHANGED
            return await self._reject(path, exc.reason, exc.hint, job)
        broken: str | None = None
        try:
            for member in source.members:
                if self.stopping():
                    return Verdict.RETRY
                if member.is_media_index:
                    continue  # the members are ingested anyway; the index is no instance
                try:
                    temp = await asyncio.to_thread(source.extract, member, self.tmp)
                except OutOfSpace as exc:
                    return self._pause(exc)
                except RejectedInstance as exc:
                    broken = broken or exc.reason  # the archive is damaged: keep it whole
                    continue
                try:
                    verdict = await self._member(temp, member.parts, path, job)
                finally:
                    with contextlib.suppress(FileNotFoundError):
                        temp.unlink()
                if verdict is not Verdict.DONE:
                    return verdict
        finally:
            await asyncio.to_thread(source.close)
        if await self._changed(path, before):
            return Verdict.CHANGED
        if broken is not None:
            return await self._reject(path, broken, None, job)
        return await self._clear(path, root, before)

    async def _member(self, temp: Path, parts: tuple[str, ...], archive: Path,
                      job: Job) -> Verdict:
        root, tally = job.root, job.tally
        try:
            result = await self.ingest.ingest_file(temp, source_ae=SOURCE_AE)
        except OutOfSpace as exc:
            return self._pause(exc)
        except RejectedInstance as exc:
            try:
                await asyncio.to_thread(self.outcomes.rejected_member, temp, archive, root,
                                        parts, exc.reason)
            except OSError as move_error:
                _warn("rejected ZIP member cannot be kept in rejected/", archive, root,
                      move_error)
                return Verdict.STUCK
            tally.rejected += 1
            log.warning("rejected ZIP member archive=%s reason=%s", path_ref(archive, root),
                        exc.reason)
            return Verdict.DONE
        except (PacsEdgeError, OSError) as exc:
            _warn("drop folder ingest failed; will retry", archive, root, exc)
            return Verdict.RETRY
        self._resume()
        if result.outcome is RecordOutcome.DUPLICATE:
            tally.duplicates += 1
        else:
            tally.stored += 1
        return Verdict.DONE

    def _pause(self, exc: OutOfSpace) -> Verdict:
        """A full (or read-only) store: the unit is retried every rescan_seconds, as is
        every other unit waiting, so the pause is logged once, not once per file and
        rescan (a CD of 2,000 files would log 2,000 lines every rescan), and again only
        when its reason changes; `_resume` says when it ends."""
        if self._paused_for != exc.reason:
            log.warning("drop folder ingest paused until the store takes files again"
                        " reason=%s", exc.reason)
            self._paused_for = exc.reason
        return Verdict.RETRY

    def _resume(self) -> None:
        """An instance was ingested: a pause, if one was logged, is over."""
        if self._paused_for is not None:
            log.info("drop folder ingest resumed")
            self._paused_for = None

    async def _reject(self, path: Path, reason: str, hint: str | None, job: Job) -> Verdict:
        if not job.may_reject:
            return Verdict.WAIT
        root, tally = job.root, job.tally
        try:
            await asyncio.to_thread(self.outcomes.rejected, path, root, reason, hint=hint)
        except FileNotFoundError:
            return Verdict.DONE
        except UnsafePath as exc:
            return _unsafe(path, root, exc)
        except OSError as exc:
            _warn("rejected file cannot be moved to rejected/", path, root, exc)
            return Verdict.STUCK
        tally.rejected += 1
        log.warning("rejected dropped file file=%s reason=%s", path_ref(path, root), reason)
        return Verdict.DONE

    async def _clear(self, path: Path, root: Root, before: Signature | None = None) -> Verdict:
        """Delete `path` or move it to done/; with `before`, only if it is still the file
        that had that signature before it was ingested (CHANGED otherwise)."""
        try:
            if not await asyncio.to_thread(self._clear_file, path, root, before):
                _warn("dropped file changed while ingested; watching it again", path, root,
                      None)
                return Verdict.CHANGED
        except FileNotFoundError:
            pass
        except UnsafePath as exc:
            return _unsafe(path, root, exc)
        except OSError as exc:
            _warn("ingested file cannot be removed or moved to done/", path, root, exc)
            return Verdict.STUCK
        return Verdict.DONE

    def _clear_file(self, path: Path, root: Root, before: Signature | None) -> bool:
        """The blocking part of `_clear`; False when the file is not the one ingested."""
        if before is None:
            self.outcomes.ingested(path, root)
        elif self.outcomes.move_done:
            # A move keeps what it moves, in done/; still, look again just before.
            if _signature_at(root, path) != before:
                return False
            self.outcomes.ingested(path, root)
        else:
            claimed = _claim(root, path, before)
            if claimed is None:
                return False
            self.outcomes.ingested(claimed, root)
        return True

    @staticmethod
    async def _changed(path: Path, before: Signature) -> bool:
        after = await asyncio.to_thread(file_signature, path)
        return after is not None and after != before


def _claim(root: Root, path: Path, before: Signature) -> Path | None:
    """Rename `path` to a private name in its folder and return that path if the entry
    claimed is the file whose signature was `before`; else give it its name back (a
    hard link, which never replaces a file a writer made there meanwhile; where that
    fails the file stays under the private name, which the watcher picks up as a file
    of its own) and return None. FileNotFoundError if `path` is gone."""
    with confine.parent_of(root.path, path) as parent:
        private = _free_claim_name(parent)
        os.rename(path.name, private, src_dir_fd=parent, dst_dir_fd=parent)
        st = os.stat(private, dir_fd=parent, follow_symlinks=False)
        if stat.S_ISREG(st.st_mode) and (st.st_size, st.st_mtime_ns, st.st_ino) == before:
            return path.with_name(private)
        try:
            os.link(private, path.name, src_dir_fd=parent, dst_dir_fd=parent,
                    follow_symlinks=False)
        except OSError as exc:
            _warn("changed dropped file kept under a new name", path.with_name(private), root,
                  exc)
        else:
            os.unlink(private, dir_fd=parent)
        return None


def _free_claim_name(parent: int) -> str:
    while True:  # only this process claims, and it checks first: a name is never reused
        name = CLAIM_PREFIX + secrets.token_hex(8)
        if not confine.lexists(parent, name):
            return name


def _signature_at(root: Root, path: Path) -> Signature | None:
    """`path`'s signature, looked up through its folder's descriptor (no link followed);
    None if it is not a regular file, FileNotFoundError if it is gone."""
    with confine.parent_of(root.path, path) as parent:
        st = os.stat(path.name, dir_fd=parent, follow_symlinks=False)
    return (st.st_size, st.st_mtime_ns, st.st_ino) if stat.S_ISREG(st.st_mode) else None


def path_ref(path: Path, root: Root) -> str:
    """A keyed reference to a dropped file or folder: file names may carry PHI, so never the name.

    A name is bytes to the file system and need not be UTF-8 (a CD burned on Windows
    in Latin-1): Python holds such bytes as surrogates, which `str.encode` refuses, so
    the reference is taken of the name's bytes, escaped (a UTF-8 name is unchanged)."""
    name = os.fsencode(path.relative_to(root.path)).decode("utf-8", "backslashreplace")
    return logsafe.ref(name)


def _warn(event: str, path: Path, root: Root, exc: BaseException | None) -> None:
    error = "" if exc is None else f" error={type(exc).__name__}"
    log.warning("%s file=%s%s", event, path_ref(path, root), error)


def _unsafe(path: Path, root: Root, exc: UnsafePath) -> Verdict:
    """A path that crosses a symlink: leave it, and what it points to, alone."""
    log.warning("dropped file left alone: %s file=%s", exc.message, path_ref(path, root))
    return Verdict.STUCK
