"""Per-study leases: one tiering operation at a time per study, across processes.

Why: replicate, evict, recall and the recovery of interrupted work each run
several committed steps with file or cloud I/O between them. Interleaved on
one study (two jobs of the agent, a CLI `evict` or `recall` beside the agent)
one can delete files that another has just written. A lease row says who is
working on a study:

- it is taken in the same transaction as the operation's first state change
  (`StudyLease.take`), and refused with StudyBusy while another live holder
  has it;
- every later committed step, and every deletion of local files, is fenced
  first (`StudyLease.fence`): a holder that lost its lease stops before it
  changes anything;
- it is released when the operation ends (`StudyLease.kept`), and renewed in
  the background while the operation runs.

A lease is live while its expiry lies ahead and its holder process is alive:
a killed holder frees its leases at once (its pid is gone, or the machine
booted since, where both sides can read the boot id), a hung one when they
expire (LEASE_SECONDS after its last renewal). The appliance's processes share
one PID namespace (the systemd units set no PrivatePIDs); `os.kill(pid, 0)`
answers EPERM for another user's live process, and the start time in /proc,
where visible, tells a reused pid apart.

Ingest takes no lease, by design: it never deletes a file, and NEW_INSTANCE
is allowed in every tiering state, so a modality never waits behind an upload.
Where it meets a deletion, on a file name (content sent again while its study
is evicted), the write transaction orders the two: deletions decide and unlink
inside one (tier_steps.drop_unneeded_files), ingest looks for its file inside
the one that commits its row.
Neither does a scrub that finds a pack damaged (sync.scrub): it deletes no
file either, and its one transaction (local instances leave the pack, the
study takes DAMAGED, allowed in every state) is consistent with every step of
a lease holder, which re-reads what it changes inside its own transactions.
That includes an eviction between its commit and its unlinks, whose files
are then still on disk though the rows say `is_local = 0`: the fence right
before the unlinks (tier_steps.keep_damaged_files) re-reads the verdicts and
keeps the files of instances in a damaged pack. Taking the lease would not
do: the scrub would wait for the eviction, which would delete them first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from appliance.base.errors import PacsEdgeError
from appliance.store import database

log = logging.getLogger(__name__)

LEASE_SECONDS = 120.0
RENEW_EVERY = LEASE_SECONDS / 4


class StudyBusy(PacsEdgeError):
    """Another live process is running a tiering operation on this study."""

    def __init__(self, operation: str, pid: int) -> None:
        super().__init__(
            f"the study is busy: {operation} is running in process {pid}",
            hint="try again when it has finished (the sync agent retries by itself)")
        self.operation = operation
        self.pid = pid


class LeaseLost(PacsEdgeError):
    """The lease expired or was taken over: the operation must not go on."""

    def __init__(self, operation: str) -> None:
        super().__init__(f"{operation}: the study's lease expired before the step could run",
                         hint="the process was stalled for too long; the next pass retries")
        self.operation = operation


@dataclass(frozen=True)
class Holder:
    """Who holds a lease: this boot, this process, one operation of it."""

    boot_id: str
    pid: int
    started: str
    token: str

    def __str__(self) -> str:
        return f"{self.boot_id}/{self.pid}/{self.started}/{self.token}"

    @classmethod
    def parse(cls, text: str) -> Holder | None:
        parts = text.split("/")
        if len(parts) != 4 or not parts[1].isdigit():
            return None
        return cls(parts[0], int(parts[1]), parts[2], parts[3])

    @classmethod
    def new(cls) -> Holder:
        pid = os.getpid()
        return cls(_boot_id(), pid, _start_time(pid), uuid.uuid4().hex[:12])

    def alive(self) -> bool:
        # The systemd units hide /proc/sys (ProcSubset=pid): their boot id is '' while
        # an operator's CLI beside them reads the real one. Unknown on either side, it
        # says nothing, and pid and start time decide: taken for a restart, a live
        # holder's lease would go to a second operation on its study.
        booted = _boot_id()
        if self.boot_id and booted and self.boot_id != booted:
            return False  # the machine restarted since: every process of then is gone
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True  # alive, owned by another user
        started = _start_time(self.pid)
        return not started or not self.started or started == self.started


@cache
def _boot_id() -> str:
    with contextlib.suppress(OSError):
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    return ""


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot ('' when /proc hides it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    # Field 22; the command name (field 2) may hold spaces, so count after its ')'.
    return stat.rsplit(")", 1)[1].split()[19]


def _live(row: sqlite3.Row, now: float) -> bool:
    if row["expires_at"] <= now:
        return False
    holder = Holder.parse(row["holder"])
    return holder is not None and holder.alive()


def is_free(conn: sqlite3.Connection, study_id: int) -> bool:
    """No live holder works on the study (no lease, or an expired or orphaned one)."""
    row = database.query_one(
        conn, "SELECT holder, expires_at FROM study_leases WHERE study_fk = ?", (study_id,))
    return row is None or not _live(row, time.time())


class StudyLease:
    """One operation's lease on one study; see the module docstring for the protocol."""

    def __init__(self, writer: database.Writer, study_id: int, operation: str, *,
                 seconds: float = LEASE_SECONDS) -> None:
        self._writer = writer
        self.study_id = study_id
        self.operation = operation
        self.holder = Holder.new()
        self._seconds = seconds

    def take(self, conn: sqlite3.Connection) -> None:
        """Take the lease inside the caller's transaction; StudyBusy if a live holder has it."""
        now = time.time()
        row = database.query_one(
            conn, "SELECT operation, holder, expires_at FROM study_leases WHERE study_fk = ?",
            (self.study_id,))
        if row is not None and row["holder"] != str(self.holder) and _live(row, now):
            holder = Holder.parse(row["holder"])
            raise StudyBusy(row["operation"], holder.pid if holder else 0)
        if row is not None and row["holder"] != str(self.holder):
            log.warning("took over an orphaned study lease from=%s by=%s",
                        row["operation"], self.operation)
        conn.execute(
            "INSERT INTO study_leases (study_fk, operation, holder, acquired_at, expires_at)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT (study_fk) DO UPDATE SET"
            " operation = excluded.operation, holder = excluded.holder,"
            " acquired_at = excluded.acquired_at, expires_at = excluded.expires_at",
            (self.study_id, self.operation, str(self.holder), now, now + self._seconds))

    def fence(self, conn: sqlite3.Connection) -> None:
        """Inside the caller's transaction: still ours and unexpired (LeaseLost if not);
        extends it."""
        now = time.time()
        cur = conn.execute(
            "UPDATE study_leases SET expires_at = ? WHERE study_fk = ? AND holder = ?"
            " AND expires_at > ?", (now + self._seconds, self.study_id, str(self.holder), now))
        if cur.rowcount != 1:
            raise LeaseLost(self.operation)

    def release(self, conn: sqlite3.Connection) -> None:
        conn.execute("DELETE FROM study_leases WHERE study_fk = ? AND holder = ?",
                     (self.study_id, str(self.holder)))

    async def check(self) -> None:
        """Fence in a transaction of its own: call right before deleting files."""
        await self._writer.submit_sync(self.fence)

    @contextlib.asynccontextmanager
    async def kept(self) -> AsyncIterator[StudyLease]:
        """Renew the (taken) lease in the background; release it on the way out."""
        renewer = asyncio.get_running_loop().create_task(self._renew(), name="lease-renew")
        try:
            yield self
        finally:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer
            try:
                await self._writer.submit_sync(self.release)
            except PacsEdgeError as exc:  # it expires by itself; nothing is at risk
                log.warning("study lease not released operation=%s error=%s",
                            self.operation, exc.message)

    async def _renew(self) -> None:
        interval = min(RENEW_EVERY, self._seconds / 4)
        while True:
            await asyncio.sleep(interval)
            try:
                await self._writer.submit_sync(self.fence)
            except LeaseLost:
                log.error("study lease lost operation=%s", self.operation)
                return
            except PacsEdgeError as exc:
                log.warning("study lease renewal failed operation=%s error=%s",
                            self.operation, exc.message)
