"""Where a dropped file goes once ingest has decided (blocking file operations).

- stored, or identical content already stored: the original is deleted, or
  moved to `<root>.done/` (after_ingest = "move");
- refused (not DICOM, truncated, invalid UIDs, unreadable DICOMDIR or ZIP):
  moved to `<root>.rejected/` beside a `<name>.reason` text file holding the
  PHI-free reason. Rejected ZIP members go to
  `<root>.rejected/<archive path>.contents/<member path>`;
- a full disk or an unavailable index is no outcome: the file stays and is
  retried (the watcher decides that; nothing here).

Relative paths below the root are kept; a name already taken gets `~1`,
`~2`, ... before its suffix. None of these steps is fsynced, on purpose: the
instance is durable in the store before any of them runs, so a delete or move
lost in a crash only means the file is seen again and ingested as a no-op.

Every step goes through `confine`: the file is moved or deleted through its
folder's descriptor, reached without following a symlink below the root, and
the target folders and reason files are made the same way (a link planted in
done/ or rejected/ is refused, not followed).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import time
from collections.abc import Iterable
from pathlib import Path

from appliance.base.errors import UnsafePath
from appliance.dropfolder import confine
from appliance.dropfolder.layout import REASON_SUFFIX, Root

AFTER_INGEST_MOVE = "move"
_CHUNK = 1 << 20


class Outcomes:
    def __init__(self, after_ingest: str) -> None:
        self.move_done = after_ingest == AFTER_INGEST_MOVE

    def ingested(self, path: Path, root: Root) -> None:
        """The instance (or the DICOMDIR of an ingested set) is dealt with: clear it away."""
        if self.move_done:
            _move(root.path, path, root.done, root.done / path.relative_to(root.path))
        else:
            with contextlib.suppress(FileNotFoundError):
                confine.unlink(root.path, path)

    def rejected(self, path: Path, root: Root, reason: str, *, hint: str | None = None) -> Path:
        """Move `path` to rejected/ and write its reason; returns the new location."""
        return _move(root.path, path, root.rejected, root.rejected / path.relative_to(root.path),
                     reason=_reason_text(reason, hint))

    def rejected_member(self, temp: Path, archive: Path, root: Root, parts: Iterable[str],
                        reason: str) -> Path:
        """Keep a refused ZIP member's bytes (from its temp file) under rejected/.

        An archive is read again whole after a pass that did not finish (its refusal
        waiting out the quiet period, a full disk, a restart): a member already kept
        there with the same bytes is not kept twice (`~1`)."""
        base = root.rejected / archive.relative_to(root.path)
        target = base.with_name(base.name + ".contents").joinpath(*parts)
        if _same_bytes(root.rejected, target, temp):
            return target
        return _move(temp.parent, temp, root.rejected, target, reason=_reason_text(reason, None))


def _reason_text(reason: str, hint: str | None) -> str:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    lines = [reason, f"rejected_at: {stamp}"]
    if hint:
        lines.append(f"hint: {hint}")
    return "\n".join(lines) + "\n"


def count_rejected(root: Root) -> int:
    """Rejected files still waiting for the operator: those with their reason beside them."""
    count = 0
    for _dirpath, _dirs, filenames in os.walk(root.rejected):
        names = set(filenames)
        count += sum(1 for n in filenames
                     if n.endswith(REASON_SUFFIX) and n[: -len(REASON_SUFFIX)] in names)
    return count


def prune_empty_dirs(root: Root, *, quiet_seconds: float) -> int:
    """Remove folders below the root left empty by ingest, once untouched for a while.

    Only quiet folders go: a copy in progress may have just created one and
    be about to write into it (rmdir of a non-empty folder fails harmlessly,
    but an empty fresh one would vanish under the writer).
    """
    cutoff = time.time() - quiet_seconds
    quiet: list[Path] = []
    for dirpath, _dirs, _files in os.walk(root.path):
        folder = Path(dirpath)
        with contextlib.suppress(OSError):
            if folder != root.path and folder.lstat().st_mtime <= cutoff:
                quiet.append(folder)
    removed = 0
    for folder in reversed(quiet):  # children first; their removal is ours, not a writer's
        with contextlib.suppress(OSError, UnsafePath):  # not empty; swapped for a symlink
            confine.rmdir(root.path, folder)
            removed += 1
    return removed


def _move(source_base: Path, source: Path, target_base: Path, target: Path, *,
          reason: str | None = None) -> Path:
    """Move `source` to a free name at `target` (each below its base, see confine) and
    write `reason` beside it; returns where it went."""
    with confine.parent_of(source_base, source) as src, \
            confine.parent_of(target_base, target, create=True) as dst:
        name = _free_name(dst, target)
        try:
            os.rename(source.name, name, src_dir_fd=src, dst_dir_fd=dst)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            # Outcome folder on another file system (a watched mount point): copy,
            # make the copy and its name durable, then remove the original (a file set
            # aside has no copy in the store: a power cut must not lose both).
            _copy(src, source.name, dst, name)
            os.fsync(dst)
            os.unlink(source.name, dir_fd=src)
        if reason is not None:
            with confine.create_file(dst, name + REASON_SUFFIX) as out:
                out.write(reason.encode("utf-8"))
    return target.with_name(name)


def _same_bytes(base: Path, kept: Path, temp: Path) -> bool:
    """Whether `kept` (below `base`, see confine) is a file holding what `temp` holds."""
    try:
        existing = confine.open_file(base, kept)
    except (FileNotFoundError, NotADirectoryError, UnsafePath):
        return False
    with existing, temp.open("rb") as new:
        if os.fstat(existing.fileno()).st_size != os.fstat(new.fileno()).st_size:
            return False
        while chunk := new.read(_CHUNK):
            if existing.read(len(chunk)) != chunk:
                return False
    return True


def _free_name(folder: int, target: Path) -> str:
    """`target`'s name, or `stem~N.suffix` if that or its reason file is taken in `folder`."""
    name, n = target.name, 0
    while confine.lexists(folder, name) or confine.lexists(folder, name + REASON_SUFFIX):
        n += 1
        name = f"{target.stem}~{n}{target.suffix}"
    return name


def _copy(src: int, name: str, dst: int, new_name: str) -> None:
    """Copy the regular file `name` (never a link) to a new file, with its mode and times."""
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=src)
    with os.fdopen(fd, "rb") as fin, confine.create_file(dst, new_name) as fout:
        shutil.copyfileobj(fin, fout)
        fout.flush()  # before the times are set: a later write would change them
        st = os.fstat(fin.fileno())
        os.fchmod(fout.fileno(), stat.S_IMODE(st.st_mode))
        os.utime(fout.fileno(), ns=(st.st_atime_ns, st.st_mtime_ns))
        os.fsync(fout.fileno())
