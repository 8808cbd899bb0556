"""The one durable file write of the provisioning layer (which imports nothing above it).

Temp file in the target folder with the final mode, fsync, then publish: a
hard link when the name must not exist yet (atomic, and it never replaces a
file another process created meanwhile), or a rename when replacing; then
fsync the folder so the new name survives a power cut.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def write_file(path: Path, data: bytes, mode: int, *, replace: bool = False) -> bool:
    """Write `path` durably with `mode`; without `replace`, False (no change) if it exists."""
    path = Path(path)
    if not replace and (path.exists() or path.is_symlink()):
        return False
    # mkstemp opens with O_CREAT | O_EXCL and mode 0600; fchmod sets the final mode.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
        written = True
    except FileExistsError:
        written = False  # a concurrent writer won: keep its file
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    fsync_dir(path.parent)
    return written


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
