"""The one durable-write discipline: temp file in the same folder, fsync, rename, fsync folder.

A rename is atomic on POSIX file systems, but only the fsync of the folder
makes the new name survive power loss; the file's own fsync makes its bytes
survive. Temp files carry TEMP_SUFFIX so that a start-up sweep can remove
what a crash left behind.

Every package uses this module, provisioning included (it sits on the base
floor, below all three packages; see docs/architecture.md): the instance
store, the index's neighbours, the blob store's local folder, secrets, certificates
and the allowlist all write through the same four functions.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
import time
from pathlib import Path

from appliance.base.errors import OutOfSpace

TEMP_SUFFIX = ".part"
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}


def is_no_space(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in _NO_SPACE


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_dir(path: Path) -> None:
    """Create `path` and parents, fsyncing each parent that gained an entry."""
    missing: list[Path] = []
    probe = path
    while not probe.exists():
        missing.append(probe)
        probe = probe.parent
    for folder in reversed(missing):
        with contextlib.suppress(FileExistsError):
            folder.mkdir()
        fsync_dir(folder.parent)


def atomic_write(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Replace `path` with `data` so that a crash leaves the old or the new file."""
    ensure_dir(path.parent)
    try:
        tmp = _synced_temp(path, data, mode)
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


def _synced_temp(path: Path, data: bytes, mode: int) -> str:
    """A temp file beside `path` holding `data` with `mode`, fsynced; the caller publishes
    it. mkstemp opens with O_CREAT | O_EXCL and mode 0600; fchmod sets the final mode."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    try:
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


def durable_rename(source: Path, target: Path, *, sync_folder: bool = True) -> None:
    """Move an fsynced file into place and make the new name durable.

    Only the target folder is fsynced: if a crash resurrects the source name
    too, it is a temp file that the start-up sweep removes. `sync_folder=False`
    leaves that fsync to the caller, who writes many files and fsyncs each
    folder once before anything depends on the names (a recall, before its
    index commit).
    """
    ensure_dir(target.parent)
    os.replace(source, target)
    if sync_folder:
        fsync_dir(target.parent)


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
