"""The one durable-write discipline: temp file in the same folder, fsync, rename, fsync folder.

A rename is atomic on POSIX file systems, but only the fsync of the folder
makes the new name survive power loss; the file's own fsync makes its bytes
survive. Temp files carry TEMP_SUFFIX so that a start-up sweep can remove
what a crash left behind.

Every package uses this module, provisioning included (it sits on the base
floor, below all three packages; see docs/architecture.md): the instance
store, the index's neighbours, the blob store's local folder, secrets, certificates
and the allowlist all write through the same five functions.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from appliance.base.errors import OutOfSpace

TEMP_SUFFIX = ".part"
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}


def is_no_space(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in _NO_SPACE


def fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_dir(path: Path) -> None:
    """Create `path` and parents, fsyncing each parent that gained an entry."""
    for folder in make_dirs(path):
        fsync_dir(folder)


def make_dirs(path: str | Path) -> list[str]:
    """Create `path` and its missing parents without fsyncing them; the folders that
    gained an entry (each created folder's parent), deepest first.

    The caller fsyncs those before anything depends on the new names. Fsyncing
    them after all the creations, deepest first, lets a journaling file system
    commit every new entry at the first fsync (ext4 commits its running
    transaction), where fsyncing after each mkdir commits once per level.
    """
    missing: list[str] = []
    probe = os.fspath(path)
    while not os.path.exists(probe):
        missing.append(probe)
        probe = os.path.dirname(probe) or os.curdir
    for folder in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(folder)
    return [os.path.dirname(folder) or os.curdir for folder in missing]


def atomic_write(path: Path, data: bytes, *, mode: int = 0o644,
                 owner: tuple[int, int] | None = None) -> None:
    """Replace `path` with `data` so that a crash leaves the old or the new file;
    `owner` (uid, gid) is given to the new file before it replaces the old one."""
    ensure_dir(path.parent)
    try:
        tmp = _synced_temp(path, data, mode, owner)
        try:
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        fsync_dir(path.parent)
    except BaseException as exc:
        if is_no_space(exc):
            raise OutOfSpace() from exc
        raise


def write_file(path: Path, data: bytes, mode: int, *, replace: bool = False) -> bool:
    """Write `path` durably with `mode`; without `replace`, False (no change) if it exists.

    Without `replace` the new file is published with a hard link: atomic, and it
    never replaces a file another process created meanwhile (a secret written
    twice by two `init`s must stay the first one)."""
    path = Path(path)
    if replace:
        atomic_write(path, data, mode=mode)
        return True
    if path.exists() or path.is_symlink():
        return False
    tmp = _synced_temp(path, data, mode)
    try:
        os.link(tmp, path)
        written = True
    except FileExistsError:
        written = False  # a concurrent writer won: keep its file
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    fsync_dir(path.parent)
    return written


def atomic_rewrite(path: Path, data: bytes, *, mode: int = 0o640) -> None:
    """atomic_write for a file edited in place: the new file keeps the old one's owner
    and mode (peers.toml that the Ansible role made pacs-edge's, 0640, stays so), or
    takes `mode` when there is none yet. A symbolic link is followed and the file behind
    it rewritten: replacing the link would leave its target governing nothing."""
    target = path.resolve()
    try:
        kept = target.stat()
    except FileNotFoundError:
        atomic_write(target, data, mode=mode)
        return
    atomic_write(target, data, mode=stat.S_IMODE(kept.st_mode),
                 owner=(kept.st_uid, kept.st_gid))


def _synced_temp(path: Path, data: bytes, mode: int,
                 owner: tuple[int, int] | None = None) -> str:
    """A temp file beside `path` holding `data` with `mode` (and `owner`), fsynced; the
    caller publishes it. mkstemp opens with O_CREAT | O_EXCL and mode 0600; fchown and
    fchmod set the final owner and mode (in that order: fchown may clear set-id bits)."""
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.",
                                   suffix=TEMP_SUFFIX)
    except OSError as exc:  # name the file asked for, not a temp name nobody knows of
        raise type(exc)(exc.errno, exc.strerror, os.fspath(path)) from exc
    try:
        if owner is not None:
            os.fchown(fd, *owner)
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return tmp


def durable_rename(source: str | Path, target: str | Path, *, sync_folder: bool = True,
                   folder_sync: Callable[[str], None] = fsync_dir) -> None:
    """Move an fsynced file into place and make the new name durable.

    Only the target folder is fsynced (and the folders that gained a new
    subfolder on the way to it, after the rename: see make_dirs): if a crash
    resurrects the source name too, it is a temp file that the start-up sweep
    removes. `sync_folder=False` leaves the target folder's fsync to the caller,
    who writes many files and fsyncs each folder once before anything depends on
    the names (a recall, before its index commit). `folder_sync` does the fsyncs
    (SharedFolderSync.sync shares them between concurrent writers).

    The rename is tried first: the target folder usually exists (every instance of
    a series but its first), and a failed rename costs no more than the check.
    """
    folder = os.path.dirname(os.fspath(target)) or os.curdir
    try:
        os.replace(source, target)
        gained: list[str] = []
    except FileNotFoundError:
        gained = make_dirs(folder)
        os.replace(source, target)
    for synced in ([folder] if sync_folder else []) + gained:
        folder_sync(synced)


def durable_link(source: str | Path, target: str | Path, *,
                 folder_sync: Callable[[str], None] = fsync_dir) -> bool:
    """Publish an fsynced file at `target` unless that name exists; True when it did.

    A hard link, where durable_rename renames: as atomic, but it never replaces
    a file that is there already (another writer's, or one that rows name), so
    the caller knows whether the name is its own. The caller removes `source`.
    The target folder is fsynced either way: a name found there may be a
    concurrent writer's whose own folder fsync has not returned yet.
    """
    folder = os.path.dirname(os.fspath(target)) or os.curdir
    gained: list[str] = []
    try:
        try:
            os.link(source, target)
        except FileNotFoundError:
            gained = make_dirs(folder)
            os.link(source, target)
        created = True
    except FileExistsError:
        created = False
    for synced in [folder, *gained]:
        folder_sync(synced)
    return created


class SharedFolderSync:
    """fsync of a folder shared by the threads that renamed into it at the same time.

    A rename is durable once an fsync of its folder *that started after the rename*
    has returned. A thread that asks while an fsync of that folder is already under
    way cannot use it (it may have started before the rename), but every thread that
    asks during it can share the next one: so concurrent writers into one folder
    (several associations storing one series) pay about one folder fsync between
    them instead of one each, and each still returns only once its own rename is
    durable. An fsync that fails raises in the thread that ran it; the threads it
    would have covered run their own.
    """

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._folders: dict[str, _FolderState] = {}

    def sync(self, folder: str) -> None:
        with self._lock:
            state = self._folders.setdefault(folder, _FolderState())
            state.users += 1
            state.asked += 1
            ticket = state.asked
            try:
                while state.synced < ticket:
                    if state.running:
                        self._lock.wait()
                        continue
                    state.running = True
                    covers = state.asked  # every rename asked about so far precedes this fsync
                    self._lock.release()
                    try:
                        fsync_dir(folder)
                    finally:
                        self._lock.acquire()
                        state.running = False
                        self._lock.notify_all()
                    state.synced = max(state.synced, covers)
            finally:
                state.users -= 1
                if not state.users and not state.running:
                    del self._folders[folder]


class _FolderState:
    __slots__ = ("asked", "running", "synced", "users")

    def __init__(self) -> None:
        self.asked = 0  # tickets handed out: one per rename whose thread asked
        self.synced = 0  # every ticket up to this one is durable
        self.running = False
        self.users = 0


def sweep_temp_files(root: Path, *, older_than: float = 0.0) -> int:
    """Remove crash leftovers (`*.part`) under `root`; return how many went."""
    if not root.exists():
        return 0
    cutoff = time.time() - older_than
    removed = 0
    for tmp in root.rglob(f"*{TEMP_SUFFIX}"):
        with contextlib.suppress(FileNotFoundError):
            if tmp.stat().st_mtime <= cutoff:
                tmp.unlink()
                removed += 1
    return removed
