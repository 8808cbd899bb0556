"""Drop-folder counters for `pacs-edge status`, derived from what is there, never kept.

- ingested: instances in the index whose source is the drop folder (the row
  is committed with the instance, so the count survives restarts and cannot
  drift). Identical re-drops (no-ops) add nothing; an instance later replaced
  by a C-STORE of different content counts for its new source.
- rejected: files waiting in the rejected folders, i.e. with their `.reason`
  beside them; the operator clears the count by dealing with them.
- pending: files in the watched folders that are not ignored: written but not
  yet ingested (still being written, waiting for stability, or stuck).
- unreadable: folders in them that this user may not list (their files are in
  no count: they wait there until the service user may read them).

A counter kept in a file would need its own durability and would disagree
with the folders after an operator tidies up; these cannot.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

from appliance.base.config import Config
from appliance.dropfolder.layout import DropLayout
from appliance.dropfolder.outcomes import count_rejected
from appliance.dropfolder.processor import SOURCE_AE
from appliance.dropfolder.sources import walk_files
from appliance.store.index import Index


@dataclass(frozen=True)
class DropFolderCounts:
    ingested: int
    rejected: int
    pending: int
    unreadable: int


async def drop_folder_counts(config: Config, index: Index) -> DropFolderCounts:
    ingested = await index.instance_count_from(SOURCE_AE)
    rejected, pending, unreadable = await asyncio.to_thread(
        _disk_counts, DropLayout.from_config(config))
    return DropFolderCounts(ingested, rejected, pending, unreadable)


def _disk_counts(layout: DropLayout) -> tuple[int, int, int]:
    pending: set[str] = set()  # roots may be nested: count each file once
    unreadable: list[Path] = []
    for root in layout.roots:
        pending.update(str(p) for p in walk_files(root.path, unreadable)
                       if not layout.is_excluded(p))
    return (sum(count_rejected(r) for r in layout.roots), len(pending),
            len({f for f in unreadable if not layout.is_excluded(f)}))
