"""Drop-folder ingest: files written into watched folders go through the durable ingest path.

Modules, each with one job:

    layout      where things live: watched roots, their done/rejected folders, ignored names
    stability   when a file is complete: size and mtime unchanged for `stable_seconds`
    sources     what a unit is: a file, a ZIP archive, a DICOMDIR media set; reading them safely
    outcomes    what happens after ingest: delete or move to done, move to rejected + .reason
    processor   one unit through IngestService, mapped to outcomes (async, on the loop)
    watcher     watchdog events and periodic rescans feeding the processor
    status      the counters `pacs-edge status` shows (derived, nothing to keep in sync)

The operator's view is in docs/dropfolder.md.
"""

from appliance.dropfolder.watcher import DropFolderWatcher

__all__ = ["DropFolderWatcher"]
