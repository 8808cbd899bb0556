"""Where the drop folder's files live, and which names it leaves alone.

Each watched root `<dir>/<name>` gets two siblings, created on first use::

    <dir>/<name>.done/        originals after ingest, when after_ingest = "move"
    <dir>/<name>.rejected/    files ingest refused, each beside a `<file>.reason`

They sit beside the root, not inside it, so neither inotify nor a rescan ever
walks them: an exclusion inside the root would have to be repeated in every
code path, and one missed check would re-ingest or re-reject forever. Being
siblings they are normally on the same file system, so a move is a rename.
Relative paths below the root are kept (`incoming/CD1/IMG1` ->
`incoming.rejected/CD1/IMG1`), so an operator finds a file where it was put.

ZIP members are unpacked one at a time into `<home>/dropfolder/tmp/`, which
the watcher empties at start (leftovers of a crash).

Ignored names (never ingested, never counted as pending): hidden files (a
leading dot: rsync's temp files, macOS `._*` and `.DS_Store`), the partial-
download suffixes copy tools use while writing (`.part`, `.partial`, `.tmp`,
`.crdownload`, `.filepart`), and Windows' `Thumbs.db` / `desktop.ini`. A
writer that cannot be made to pause less than `stable_seconds` can write to
`name.part` and rename it when done: the rename is then the completion signal.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from appliance.base.config import Config

DONE_SUFFIX = ".done"
REJECTED_SUFFIX = ".rejected"
REASON_SUFFIX = ".reason"
WORK_DIR = "dropfolder"

_IGNORED_SUFFIXES = (".part", ".partial", ".tmp", ".crdownload", ".filepart")
_IGNORED_NAMES = frozenset({"thumbs.db", "desktop.ini"})


@dataclass(frozen=True)
class Root:
    """One watched folder and its two sibling outcome folders."""

    path: Path

    @property
    def done(self) -> Path:
        return self.path.with_name(self.path.name + DONE_SUFFIX)

    @property
    def rejected(self) -> Path:
        return self.path.with_name(self.path.name + REJECTED_SUFFIX)

    def contains(self, path: Path) -> bool:
        return path.is_relative_to(self.path)


@dataclass(frozen=True)
class DropLayout:
    roots: tuple[Root, ...]
    work: Path
    excluded: tuple[Path, ...]

    @classmethod
    def from_config(cls, config: Config) -> DropLayout:
        roots = tuple(Root(p) for p in config.dropfolder.paths)
        work = config.home / WORK_DIR
        # The store and the index could sit under a watched folder by mistake
        # (paths = ["."]); never ingest the appliance's own files.
        excluded = (work, config.store.path, config.index.path,
                    *(r.done for r in roots), *(r.rejected for r in roots))
        return cls(roots, work, excluded)

    @property
    def tmp(self) -> Path:
        return self.work / "tmp"

    def root_of(self, path: Path) -> Root | None:
        """The innermost watched root holding `path` (roots may be nested), if any."""
        holding = [r for r in self.roots if r.contains(path)]
        return max(holding, key=lambda r: len(r.path.parts)) if holding else None

    def is_excluded(self, path: Path) -> bool:
        return any(path.is_relative_to(x) for x in self.excluded)


def is_ignored(name: str) -> bool:
    lowered = name.lower()
    return (
        lowered.startswith(".")
        or lowered.endswith(_IGNORED_SUFFIXES)
        or lowered in _IGNORED_NAMES
    )
