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
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import time
from collections.abc import Iterable
from pathlib import Path

from appliance.dropfolder.layout import REASON_SUFFIX, Root

AFTER_INGEST_MOVE = "move"


class Outcomes:
    def __init__(self, after_ingest: str) -> None:
        self.move_done = after_ingest == AFTER_INGEST_MOVE

    def ingested(self, path: Path, root: Root) -> None:
        """The instance (or the DICOMDIR of an ingested set) is dealt with: clear it away."""
        if self.move_done:
            _move(path, _free_name(root.done / path.relative_to(root.path)))
        else:
            path.unlink(missing_ok=True)

    def rejected(self, path: Path, root: Root, reason: str, *, hint: str | None = None) -> Path:
        """Move `path` to rejected/ and write its reason; returns the new location."""
        target = _free_name(root.rejected / path.relative_to(root.path))
        _move(path, target)
        write_reason(target, reason, hint)
        return target

    def rejected_member(self, temp: Path, archive: Path, root: Root, parts: Iterable[str],
                        reason: str) -> Path:
        """Keep a refused ZIP member's bytes (from its temp file) under rejected/."""
        base = root.rejected / archive.relative_to(root.path)
        target = _free_name(base.with_name(base.name + ".contents").joinpath(*parts))
        _move(temp, target)
        write_reason(target, reason, None)
        return target


def write_reason(target: Path, reason: str, hint: str | None) -> None:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    lines = [reason, f"rejected_at: {stamp}"]
    if hint:
        lines.append(f"hint: {hint}")
    target.with_name(target.name + REASON_SUFFIX).write_text("\n".join(lines) + "\n",
                                                             encoding="utf-8")


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
        with contextlib.suppress(OSError):  # not empty
            folder.rmdir()
            removed += 1
    return removed


def _free_name(target: Path) -> Path:
    """`target`, or `stem~N.suffix` if that or its reason file is taken."""
    candidate = target
    n = 0
    while candidate.exists() or candidate.with_name(candidate.name + REASON_SUFFIX).exists():
        n += 1
        candidate = target.with_name(f"{target.stem}~{n}{target.suffix}")
    return candidate


def _move(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(source, target)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        # Outcome folder on another file system (a watched mount point):
        # copy, then remove the original.
        shutil.move(source, target)
