"""Route pynetdicom's C-STORE receive spool into the store's SpoolFiles.

With `_config.STORE_RECV_CHUNKED_DATASET`, pynetdicom writes each incoming
dataset, as it arrives and without decoding it, to a file it creates with
`tempfile.NamedTemporaryFile`. `install()` points that (through
appliance.base.compat, which keeps every patch of a library's internals) at a
factory of SpoolFiles in the store's spool folder: the data
lands on the store's file system (commit is a rename), is hashed on the fly,
and a full disk is recorded rather than raised inside the reactor thread.

The factory is also the last point before a dataset byte touches the disk.
pynetdicom spools a C-STORE-RQ's dataset whatever presentation context it
came on (the Verification context will do) and calls the C-STORE handler,
which checks the peer's permission, only once all of it is on disk. So a
C-STORE on a context that was not accepted for storage with this box as SCP
(negotiation refuses those to peers without `store`: see
negotiation.restrict_storage) gets a sink that writes nothing, and the
association is aborted.

This is process-wide state; only `pacs-edge serve` installs it.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from pynetdicom.dul import DULServiceProvider

from appliance.base import compat
from appliance.dimse.file_meta import encode_file_meta
from appliance.store.files import FileStore
from appliance.store.spool import SpoolFile

log = logging.getLogger(__name__)


class _Sink:
    """What pynetdicom writes a refused dataset into: nothing is kept.

    The subset of NamedTemporaryFile that pynetdicom uses: `name`, `write`,
    `file.flush()` and `close()`."""

    def __init__(self, spool_dir: Path) -> None:
        self.file = self
        self.name = str(spool_dir / f"rx-refused-{uuid.uuid4().hex}")

    def write(self, data: bytes | bytearray | memoryview) -> int:
        return len(data)

    def flush(self) -> None:
        """Nothing to flush."""

    def close(self) -> None:
        """Nothing to close."""


class SpoolRouter:
    def __init__(self, files: FileStore) -> None:
        self._files = files
        self._lock = threading.Lock()
        self._open: dict[str, SpoolFile] = {}
        self._refused: dict[str, float] = {}  # sink name -> when refused

    def install(self) -> None:
        compat.set_receive_spool(self._create, encode_file_meta)

    def claim(self, path: Path) -> SpoolFile | None:
        """The SpoolFile behind `event.dataset_path`, which the caller now owns;
        None for a dataset that was refused before it was spooled."""
        with self._lock:
            if self._refused.pop(str(path), None) is not None:
                return None
            return self._open.pop(str(path))

    def discard(self, path: Path) -> None:
        """Discard the spool at `path` (a C-STORE data set its association's end cut
        off); nothing for one already claimed or swept."""
        with self._lock:
            self._refused.pop(str(path), None)
            spool = self._open.pop(str(path), None)
        if spool is not None:
            spool.discard()  # never raises

    def sweep(self, idle_seconds: float) -> int:
        """Discard spools of transfers abandoned mid-dataset (peer aborted or vanished)."""
        cutoff = time.monotonic() - idle_seconds
        with self._lock:
            stale = [name for name, spool in self._open.items() if spool.last_write < cutoff]
            spools = [self._open.pop(name) for name in stale]
            # A refused dataset's handler may never run (its association is aborted).
            for name in [n for n, when in self._refused.items() if when < cutoff]:
                del self._refused[name]
        for spool in spools:
            spool.discard()  # never raises
        return len(spools)

    def _create(self, *args: Any, **kwargs: Any) -> SpoolFile | _Sink:
        if _refused_here():
            sink = _Sink(self._files.spool_dir)
            with self._lock:
                self._refused[sink.name] = time.monotonic()
            return sink
        spool = self._files.new_spool()
        with self._lock:
            self._open[spool.name] = spool
        return spool


def _refused_here() -> bool:
    """True (after aborting its association) when the C-STORE being decoded in this
    DUL thread came on a context not accepted for storage with this box as SCP."""
    thread = threading.current_thread()
    if not isinstance(thread, DULServiceProvider):
        return False
    assoc = thread.assoc
    message = assoc.dimse.message
    context_id = getattr(message, "context_id", None)
    context = next((cx for cx in assoc.accepted_contexts if cx.context_id == context_id),
                   None)
    if (context is not None and context.as_scp
            and str(context.abstract_syntax) in assoc.ae.storage_classes):
        return False
    log.warning("aborting association: C-STORE on presentation context %s, which was not"
                " accepted for storage to this box calling=%s address=%s", context_id,
                str(assoc.requestor.ae_title).strip(), assoc.requestor.address)
    assoc.abort(block=False)  # queued: the DUL sends it once this PDU is handled
    return True
