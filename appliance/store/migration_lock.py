"""One process migrates an index at a time; the others wait for it, however long it takes.

Why: serve and the sync agent start together at boot, and an operator's `status`
may start beside them; each applies the pending migrations when it opens the index
(database.migrate). SQLite alone lets one of them migrate and makes the others wait
in its busy handler, for at most the busy timeout (30 s) on one lock: a migration
that outlasts it (one over millions of instance rows) failed the others with
`database is locked`, named as a disk or permission problem, and systemd restarted
them until the migration was done. So the process that migrates holds an exclusive
flock on `<index>-migrating` (beside SQLite's own -wal and -shm files) for all of
its migrations; another one that finds it held logs that it waits, and for whom,
then waits for the flock with no time limit (the holder is working, or dead, and
an flock goes with its process: a migration killed by SIGKILL leaves no stale
lock) and reads the schema version again before it migrates what is left.

The file stays (0600); the pid in it is only for the message.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path

log = logging.getLogger(__name__)

SUFFIX = "-migrating"


@contextlib.asynccontextmanager
async def migration_lock(index_path: Path) -> AsyncIterator[None]:
    """Hold the index's migration lock for the block, waiting for another process's."""
    fd = os.open(f"{index_path}{SUFFIX}", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            log.warning("index migration under way in another process: waiting for it pid=%s",
                        holder if holder.isdigit() else "unknown")
            await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
            log.info("index migration of the other process ended")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        yield
    finally:
        os.close(fd)
