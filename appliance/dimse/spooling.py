"""Route pynetdicom's C-STORE receive spool into the store's SpoolFiles.

With `_config.STORE_RECV_CHUNKED_DATASET`, pynetdicom writes each incoming
dataset, as it arrives and without decoding it, to a file it creates with
`tempfile.NamedTemporaryFile` (module `pynetdicom.dimse_messages`). We point
that name at a factory of SpoolFiles in the store's spool folder: the data
lands on the store's file system (commit is a rename), is hashed on the fly,
and a full disk is recorded rather than raised inside the reactor thread.

This is process-wide state; only `pacs-edge serve` installs it.
"""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path
from typing import Any

from pynetdicom import _config, dimse_messages

from appliance.store.files import FileStore
from appliance.store.spool import SpoolFile


class SpoolRouter:
    def __init__(self, files: FileStore) -> None:
        self._files = files
        self._lock = threading.Lock()
        self._open: dict[str, SpoolFile] = {}

    def install(self) -> None:
        _config.STORE_RECV_CHUNKED_DATASET = True
        dimse_messages.NamedTemporaryFile = self._create  # type: ignore[assignment]

    def claim(self, path: Path) -> SpoolFile:
        """The SpoolFile behind `event.dataset_path`; the caller now owns it."""
        with self._lock:
            return self._open.pop(str(path))

    def sweep(self, idle_seconds: float) -> int:
        """Discard spools of transfers abandoned mid-dataset (peer aborted or vanished)."""
        cutoff = time.monotonic() - idle_seconds
        with self._lock:
            stale = [name for name, spool in self._open.items() if spool.last_write < cutoff]
            spools = [self._open.pop(name) for name in stale]
        for spool in spools:
            with contextlib.suppress(OSError):
                spool.discard()
        return len(spools)

    def _create(self, *args: Any, **kwargs: Any) -> SpoolFile:
        spool = self._files.new_spool()
        with self._lock:
            self._open[spool.name] = spool
        return spool
