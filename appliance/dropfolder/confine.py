"""File operations that never leave a folder: no symlink below it is ever followed.

The drop folder is written by others (a modality's export, a share staff copy CDs
into), so a path below a root may cross a symlink: a DICOMDIR's referenced folder
that links to a folder elsewhere, a link in the middle of a path, a linked file.
Path-based calls follow symlinks in every component but the last (lstat, rename
and unlink spare only the last), so checking the final component is not enough,
and checking first and then using the path races with a writer that swaps a
folder for a link in between.

Here every operation walks from the base folder one component at a time, each
opened with O_NOFOLLOW relative to its parent's descriptor, and acts on the last
name through its parent's descriptor (openat, renameat, unlinkat). A symlink
anywhere below the base raises UnsafePath; what it points to is neither read,
moved nor deleted. The base folder itself (a watched root, or its sibling
done/rejected folder) is the operator's choice and may be a symlink or a mount.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from appliance.base.errors import UnsafePath

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO must not wait for a writer; cleared once it is a regular file.
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def open_dir(base: Path, folder: Path, *, create: bool = False) -> int:
    """A descriptor of `folder` (at or below `base`), reached without following a
    symlink below `base`; with `create`, missing folders are made on the way."""
    parts = _parts_below(base, folder)
    if create:
        base.mkdir(parents=True, exist_ok=True)
    fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in parts:
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, dir_fd=fd)
            child = _open_at(fd, part, _DIR_FLAGS)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def parent_of(base: Path, path: Path, *, create: bool = False) -> Iterator[int]:
    """open_dir of `path`'s folder, closed on exit."""
    fd = open_dir(base, path.parent, create=create)
    try:
        yield fd
    finally:
        os.close(fd)


def open_file(base: Path, path: Path) -> BinaryIO:
    """`path` opened for reading; UnsafePath if it is reached through or is a symlink,
    or is not a regular file."""
    with parent_of(base, path) as parent:
        fd = _open_at(parent, path.name, _FILE_FLAGS)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UnsafePath("not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def create_file(parent: int, name: str) -> BinaryIO:
    """A new file `name` in the folder `parent`; never opens an existing one or a link."""
    return os.fdopen(os.open(name, _NEW_FILE_FLAGS, 0o666, dir_fd=parent), "wb")


def lexists(parent: int, name: str) -> bool:
    """Whether `name` exists in the folder `parent` (a symlink counts, dangling or not)."""
    try:
        os.stat(name, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def unlink(base: Path, path: Path) -> None:
    """Remove the file `path`: the entry itself, never what a link points to."""
    with parent_of(base, path) as parent:
        os.unlink(path.name, dir_fd=parent)


def rmdir(base: Path, folder: Path) -> None:
    """Remove the empty folder `folder` (below `base`)."""
    with parent_of(base, folder) as parent:
        os.rmdir(folder.name, dir_fd=parent)


def _parts_below(base: Path, path: Path) -> tuple[str, ...]:
    try:
        parts = path.relative_to(base).parts
    except ValueError as exc:
        raise UnsafePath("path is outside its folder") from exc
    if any(p in (".", "..") for p in parts):
        raise UnsafePath("path is outside its folder")
    return parts


def _open_at(parent: int, name: str, flags: int) -> int:
    try:
        return os.open(name, flags, dir_fd=parent)
    except OSError as exc:
        # O_NOFOLLOW fails on a link with ELOOP, or with ENOTDIR when O_DIRECTORY is
        # asked for too (Linux); ENOTDIR also means a plain file where a folder should be.
        if exc.errno == errno.ELOOP or (exc.errno == errno.ENOTDIR and _is_link(parent, name)):
            raise UnsafePath("path crosses a symbolic link") from exc
        raise


def _is_link(parent: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode)
    except OSError:
        return False
