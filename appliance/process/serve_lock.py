"""One `pacs-edge serve` per data home: an exclusive flock on `<home>/run/serve.lock`.

Why: serve's start-up treats the home as its own. It removes every temp file
under the store (FileStore.prepare) and, finding no clean-shutdown marker
(the running serve consumed it), reconciles store and index. A second serve
on a home where serve ran took the first one's transfers in flight (the
sender got a failure status) before it failed to bind the DICOM port. So
serve takes this lock before anything touches the home, and a second one is
refused at once, naming the pid of the holder.

An flock goes with the process: a serve killed by SIGKILL, the OOM killer or a
power cut leaves no stale lock, and systemd's restart finds it free. The file
stays (0600, in `run/`, 0700); the pid in it is only for the message. The
other commands (the sync agent, import, status, fsck) share the home with
serve by design and never take this lock.

With `[dicom] workers` above 1 the supervisor takes the lock and each worker
inherits the same open file (`InheritedLock`, passed with the spawn): the lock
is held while any process of that serve lives, so a supervisor killed alone
(`kill -9` of its pid) leaves workers that still serve the home, and a new
serve is refused until they are gone too.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from multiprocessing import reduction
from pathlib import Path
from typing import Any

from appliance.base.errors import PacsEdgeError

LOCK_FILE = "serve.lock"


@contextlib.contextmanager
def serve_lock(home: Path) -> Iterator[InheritedLock]:
    """Hold the home's serve lock for the block; PacsEdgeError at once if another
    serve holds it. Yields what a spawned worker is given to hold it too."""
    path = home / "run" / LOCK_FILE
    path.parent.mkdir(mode=0o700, exist_ok=True)  # run/ also holds metrics (metrics_dir.py)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            raise PacsEdgeError(
                f"pacs-edge serve already runs on data home {home}"
                + (f" (pid {holder})" if holder.isdigit() else ""),
                hint="stop it first (systemctl stop pacs-edge), or give this one another"
                " --home") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        yield InheritedLock(fd)
    finally:
        os.close(fd)


class InheritedLock:
    """The serve lock's open file, for a worker started with multiprocessing's spawn.

    Pickled while the worker is spawned, it has multiprocessing pass the
    descriptor to the child (as it does for a socket); the child holds it with
    `keep()` and never closes it, so the lock lasts as long as the worker."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled as a Process argument while the process is spawned: DupFd adds the
        # descriptor to those the spawn passes on, under the same number.
        return (_from_parent, (reduction.DupFd(self.fd),))

    def keep(self) -> None:
        """In the worker: hold the lock, for the worker alone (the spawn made the
        descriptor inheritable, and a program the worker ran would hold it too)."""
        os.set_inheritable(self.fd, False)


def _from_parent(dup: Any) -> InheritedLock:
    return InheritedLock(dup.detach())
