"""Start-up recovery: adopt what a crash left between the rename and the index commit.

`serve` removes the clean-shutdown marker when it starts and writes it back
when it stops cleanly. A start without the marker means the last run
crashed (or was killed), so the whole store is reconciled: temp files are
removed and files without index rows are adopted, exactly as
`pacs-edge fsck --repair` would. A start after a clean stop skips the walk.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Protocol

from appliance.base.durable import atomic_write, fsync_dir
from appliance.services.fsck import FsckReport, fsck
from appliance.store.files import FileStore
from appliance.store.index import Index
from appliance.store.instance_header import InstanceHeader

log = logging.getLogger(__name__)

CLEAN_MARKER = ".clean-shutdown"
# What `systemctl status` shows while serve starts: on an index of millions of
# instances a migration or the walk after a crash takes minutes (base/notify.py).
STARTUP_STATUS = "starting: index migrations; after an unclean stop, the store walk"


def begin_run(home: Path) -> bool:
    """Consume the clean-shutdown marker; True if the previous run ended cleanly."""
    marker = home / CLEAN_MARKER
    clean = marker.exists()
    with contextlib.suppress(FileNotFoundError):
        marker.unlink()
        fsync_dir(home)
    return clean


def end_run(home: Path) -> None:
    atomic_write(home / CLEAN_MARKER, b"")


class AdoptionAudit(Protocol):
    """Where adopted files are audited (appliance.audit.Auditor): an Import, source fsck."""

    def imported(self, source: str, instance: InstanceHeader) -> None: ...


async def recover(files: FileStore, index: Index, audit: AdoptionAudit) -> FsckReport:
    """Adopt what the crash left, each file adopted audited as `fsck --repair` does."""
    report = await fsck(files, index, repair=True,
                        on_adopted=lambda header: audit.imported("fsck", header))
    if report.adopted or report.temp_files_removed:
        log.warning("recovered after an unclean stop adopted=%d temp_files_removed=%d",
                    len(report.adopted), report.temp_files_removed)
    for relative, reason in report.unreadable:
        log.error("file without index row cannot be adopted path=%s reason=%s", relative, reason)
    if report.missing_files:
        log.error("index rows without files count=%d (run pacs-edge fsck)",
                  len(report.missing_files))
    return report
