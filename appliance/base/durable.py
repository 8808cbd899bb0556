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
    return [_parent(folder) for folder in _create(_missing(path))]


def _missing(path: str | Path) -> list[str]:
    """`path` and those of its parents that do not exist, deepest first."""
    missing: list[str] = []
    probe = os.fspath(path)
    while not os.path.exists(probe):
        missing.append(probe)
        probe = _parent(probe)
    return missing


def _create(missing: list[str]) -> list[str]:
    for folder in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(folder)
    return missing


def _parent(folder: str) -> str:
    return os.path.dirname(folder) or os.curdir


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
        if is_no_space(exc):  # the file is named: a secret, a config, not the store's
            raise OutOfSpace(f"no space left to write {path}") from exc
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
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.filename is None:
            # A write or fsync that finds the disk full names no file: without one the
            # CLI took it for a bug and printed a traceback (`keys rotate`, `keys escrow`).
            raise type(exc)(exc.errno, exc.strerror, os.fspath(path)) from exc
        raise
    return tmp


def durable_rename(source: str | Path, target: str | Path, *, sync_folder: bool = True,
                   folders: SharedFolderSync | None = None) -> None:
    """Move an fsynced file into place and make the new name durable.

    Only the target folder is fsynced (and the folders that gained a new
    subfolder on the way to it, after the rename: see make_dirs): if a crash
    resurrects the source name too, it is a temp file that the start-up sweep
    removes. `sync_folder=False` leaves the target folder's fsync to the caller,
    who writes many files and fsyncs each folder once before anything depends on
    the names (a recall, before its index commit). `folders` does the fsyncs
    (SharedFolderSync shares them between concurrent writers, and makes durable
    the path of a folder another of its writers has just made: see there).

    The rename is tried first: the target folder usually exists (every instance of
    a series but its first), and a failed rename costs no more than the check.
    """
    folder = os.path.dirname(os.fspath(target)) or os.curdir
    try:
        os.replace(source, target)
        created: list[str] = []
    except FileNotFoundError:
        created = folders.make_dirs(folder) if folders else _create(_missing(folder))
        os.replace(source, target)
    _sync_placed(folder, created, folders, sync_folder=sync_folder)


def durable_link(source: str | Path, target: str | Path, *,
                 folders: SharedFolderSync | None = None) -> bool:
    """Publish an fsynced file at `target` unless that name exists; True when it did.

    A hard link, where durable_rename renames: as atomic, but it never replaces
    a file that is there already (another writer's, or one that rows name), so
    the caller knows whether the name is its own. The caller removes `source`.
    The target folder is fsynced either way: a name found there may be a
    concurrent writer's whose own folder fsync has not returned yet.
    """
    folder = os.path.dirname(os.fspath(target)) or os.curdir
    created: list[str] = []
    try:
        try:
            os.link(source, target)
        except FileNotFoundError:
            created = folders.make_dirs(folder) if folders else _create(_missing(folder))
            os.link(source, target)
        linked = True
    except FileExistsError:
        linked = False
    _sync_placed(folder, created, folders, sync_folder=True)
    return linked


def _sync_placed(folder: str, created: list[str], folders: SharedFolderSync | None, *,
                 sync_folder: bool) -> None:
    """After a rename or link into `folder`: fsync it, then the parent of each folder
    this writer created on the way (deepest first), then, through `folders`, the
    parents of the folders on its path that another writer is still making durable."""
    sync = folders.sync if folders else fsync_dir
    for synced in ([folder] if sync_folder else []) + [_parent(new) for new in created]:
        sync(synced)
    if folders is not None:
        folders.settled(created)
        folders.sync_new_ancestors(folder)


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

    It also knows the folders its writers are creating (`make_dirs`) until the
    fsyncs of their parents have returned (`settled`). A writer that renames into a
    folder another has just made (the second association storing into a new series)
    finds it there and would otherwise answer once that folder is fsynced, while the
    folder's own entry, and its study folder's in the store, may not be durable yet:
    on a file system that does not order metadata (no journal), a power cut would
    lose the path of an acknowledged instance. `sync_new_ancestors` fsyncs, for it,
    the parent of each such folder on its path (shared, as above, with the creator's
    own fsync when one starts after it). Writers in this process know them from a
    dictionary; below `root` a new folder also carries a mark on disk, the sticky
    bit from its mkdir until it is settled, so a writer in another process (a second
    DIMSE worker, `import`) sees it too, at the cost of a stat per folder between its
    target and `root`, never an fsync. A writer that fsynced a marked folder's parent
    clears the mark (a creator killed before settling leaves it, and the next writer
    settles it). A creation that fails leaves its folders marked: later writers into
    them fsync their parents themselves.
    """

    def __init__(self, root: str | None = None) -> None:
        self._lock = threading.Condition()
        self._folders: dict[str, _FolderState] = {}
        self._new: dict[str, int] = {}  # folder -> writers creating it, not yet settled
        self._root = os.path.abspath(root) if root is not None else None

    def make_dirs(self, folder: str) -> list[str]:
        """Create `folder` and its missing parents, each marked new before its mkdir
        (a writer that finds it a moment later must see the mark); the folders it
        set out to create, deepest first. The caller fsyncs their parents, then
        calls `settled` with them."""
        missing = _missing(folder)
        with self._lock:
            for new in missing:
                self._new[new] = self._new.get(new, 0) + 1
        mode = 0o777 | (stat.S_ISVTX if self._root is not None else 0)  # umask: 0o777 only
        for new in reversed(missing):
            with contextlib.suppress(FileExistsError):
                os.mkdir(new, mode)
        return missing

    def settled(self, created: list[str]) -> None:
        """The parents of `created` (from make_dirs) were fsynced: their entries are durable."""
        if not created:
            return
        for folder in created:
            _unmark(folder)
        with self._lock:
            for folder in created:
                left = self._new[folder] - 1
                if left:
                    self._new[folder] = left
                else:
                    del self._new[folder]

    def sync_new_ancestors(self, folder: str) -> None:
        """fsync the parent of `folder` and of each of its ancestors that another writer
        is still creating, deepest first: after it, the path to `folder` is durable."""
        with self._lock:
            pending = {new for new in _up_from(folder) if new in self._new}
        marked = {new for new in self._below_root(folder) if _is_marked(new)}
        for new in sorted(pending | marked, key=len, reverse=True):
            self.sync(_parent(new))
            if new in marked:
                _unmark(new)

    def _below_root(self, folder: str) -> list[str]:
        """`folder` and its parents below `root` (none when it is not below `root`)."""
        if self._root is None:
            return []
        below: list[str] = []
        for probe in _up_from(os.path.abspath(folder)):
            if probe == self._root:
                return below
            below.append(probe)
        return []

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


def _up_from(folder: str) -> list[str]:
    """`folder` and each of its parents, up to the root of its path."""
    chain = [folder]
    while (parent := _parent(chain[-1])) != chain[-1]:
        chain.append(parent)
    return chain


def _is_marked(folder: str) -> bool:
    try:
        return bool(os.stat(folder).st_mode & stat.S_ISVTX)
    except FileNotFoundError:
        return False


def _unmark(folder: str) -> None:
    """Clear a settled folder's mark; one that cannot be cleared (gone, or not this
    user's) only costs its next writers the fsyncs of its parents."""
    with contextlib.suppress(OSError):
        mode = os.stat(folder).st_mode
        if mode & stat.S_ISVTX:
            os.chmod(folder, stat.S_IMODE(mode) & ~stat.S_ISVTX)


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
