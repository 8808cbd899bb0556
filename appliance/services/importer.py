"""`pacs-edge import`: ingest files and folders through the same durable path as C-STORE.

Only regular files are read. A named pipe, socket or device met in a folder or named on
the command line is rejected without being opened (opening a FIFO blocks until a writer
comes); a symbolic link is followed, and one that loops or dangles is rejected. Each
rejected path is reported with its reason and the rest of the import goes on, also
when a file fails half-way through its read (a scratched CD's bad sector: EIO).

A `DICOMDIR` is the index of a CD's files, not an instance (PS3.10): met in a folder,
whose every file the import reads anyway, it is passed over; named on its own, it is
rejected with a reason that says to import its folder. It was taken for an instance
and rejected ("StudyInstanceUID is missing"), so every CD import exited 1.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from appliance.base.errors import InvalidInstance, PacsEdgeError, RejectedInstance
from appliance.services.ingest import IngestService
from appliance.store.index import RecordOutcome

# Reasons for an input that cannot be opened as a regular file, by errno.
_OPEN_REASONS = {
    errno.ENOENT: "file not found",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EISDIR: "is a directory",
    errno.ELOOP: "symbolic link loop (too many levels of symbolic links)",
}
_KINDS = ((stat.S_ISDIR, "is a directory"), (stat.S_ISFIFO, "named pipe"),
          (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
          (stat.S_ISBLK, "block device"))


@dataclass
class ImportSummary:
    stored: int = 0
    duplicates: int = 0
    new_versions: int = 0
    bytes: int = 0
    rejected: list[tuple[Path, str]] = field(default_factory=list)


def expand_paths(paths: Iterable[Path],
                 unlisted: list[tuple[Path, str]] | None = None) -> Iterator[Path]:
    """Files named directly, and every file under named folders (sorted, recursive) but
    the folders' DICOMDIRs (see the module docstring).

    Every other non-folder entry is yielded, whatever its type (`import_files` rejects
    what is not a regular file); symbolic links to folders are not descended into. A folder that
    cannot be listed (permissions, a disk error) goes to `unlisted` with the reason: an
    import that skipped it in silence said it was done, and the source was deleted."""

    def note(exc: OSError) -> None:
        if unlisted is not None and exc.filename is not None:
            unlisted.append((Path(os.fsdecode(exc.filename)),
                             (exc.strerror or os.strerror(exc.errno or 0)).lower()))

    for path in paths:
        if path.is_dir():
            for dirpath, dirnames, filenames in os.walk(path, onerror=note):
                dirnames.sort()
                for name in sorted(filenames):
                    if not _is_dicomdir(name):
                        yield Path(dirpath) / name
        else:
            yield path


def _is_dicomdir(name: str) -> bool:
    """A media directory, by its name, which PS3.10 fixes (ISO 9660: `DICOMDIR;1`)."""
    return name.upper().removesuffix(";1") == "DICOMDIR"


def _not_regular(mode: int) -> str | None:
    if stat.S_ISREG(mode):
        return None
    kind = next((name for test, name in _KINDS if test(mode)), "unknown file type")
    return kind if kind == "is a directory" else f"not a regular file ({kind})"


def _open_regular(path: Path) -> BinaryIO:
    """`path` open for reading, if it is a regular file (through symlinks); else
    InvalidInstance with the reason. The type is checked before opening, so a FIFO is never
    opened, and again on the open file (O_NONBLOCK: a FIFO swapped in between cannot
    block the open), so what is read is the file that was checked."""
    try:
        reason = _not_regular(os.stat(path).st_mode)
        if reason is not None:
            raise InvalidInstance(reason)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno is None:
            raise
        raise InvalidInstance(_OPEN_REASONS.get(exc.errno) or (exc.strerror or "").lower()
                             or os.strerror(exc.errno)) from exc
    try:
        reason = _not_regular(os.fstat(fd).st_mode)
        if reason is not None:
            raise InvalidInstance(reason)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


async def import_files(
    ingest: IngestService,
    files: list[Path],
    *,
    on_progress: Callable[[Path], None] = lambda _path: None,
) -> ImportSummary:
    summary = ImportSummary()
    for path in files:
        try:
            if _is_dicomdir(path.name):
                raise InvalidInstance("a DICOMDIR is the index of a CD's files, not an"
                                      " instance: import the folder that holds it")
            with _open_regular(path) as fh:
                size = os.fstat(fh.fileno()).st_size
                result = await ingest.ingest_file(fh, source_ae="import")
        except RejectedInstance as exc:  # the input's open errors too (_open_regular)
            summary.rejected.append((path, exc.reason))
        except PacsEdgeError as exc:
            summary.rejected.append((path, exc.message))
        except OSError as exc:  # the read failed half-way (an open failure is InvalidInstance)
            if exc.errno is None:
                raise
            summary.rejected.append((path, f"copy failed ({os.strerror(exc.errno).lower()})"))
        else:
            if result.outcome is RecordOutcome.DUPLICATE:
                summary.duplicates += 1
            else:
                summary.stored += 1
                summary.bytes += size
                if result.outcome is RecordOutcome.NEW_VERSION:
                    summary.new_versions += 1
        on_progress(path)
    return summary
