"""The audit log file: append-only, hash-chained, one JSON record per line.

`<home>/audit/audit.log`, mode 0600 in a 0700 folder. Each line is the
canonical JSON (sorted keys, no spaces, UTF-8) of

    {"seq": N, "time": "<UTC append time>", "prev_hash": "<hex>",
     "record": {<PS3.15 audit message, see records.py>}, "hash": "<hex>"}

with `hash = SHA-256(prev_hash + canonical({seq, time, prev_hash, record}))`
and the first record's prev_hash 64 zeros. Changing, removing or reordering
a line breaks the chain at that line (verify.py); cutting lines off the end
does not, which is what anchors (anchor.py) are for.

Writers: the serving process and the sync agent append to the same file.
Every append takes `flock(LOCK_EX)` on the file, reads the head (last seq and
hash) from the file itself, writes all of its lines with one `write()` on an
O_APPEND descriptor and fsyncs before unlocking, so two processes never
interleave or fork the chain, and an append that returned is durable.

A crash in the middle of `write()` can leave a last line without its newline.
It was never acknowledged, so the next append (under the lock) cuts it off
and says so in the log; readers ignore a last line without a newline, since
it may be an append in progress. An append that fails without a crash (a full
disk takes a write up to the end of its last block) is cut back to where it began
before the error is raised: the Auditor appends its records again later, once.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from appliance.base.durable import ensure_dir, fsync_dir
from appliance.base.errors import PacsEdgeError

log = logging.getLogger(__name__)

AUDIT_DIR = "audit"
LOG_FILE = "audit.log"
GENESIS = "0" * 64
_TAIL_WINDOW = 64 * 1024


class AuditLogError(PacsEdgeError):
    """The audit log cannot be appended to or read (the message names no record content)."""


def log_path(home: Path) -> Path:
    return Path(home) / AUDIT_DIR / LOG_FILE


def canonical(value: Any) -> bytes:
    """The one byte form that is hashed: sorted keys, no whitespace, UTF-8."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False).encode("utf-8")


def chain_hash(prev_hash: str, seq: int, time: str, record: dict[str, Any]) -> str:
    body = {"seq": seq, "time": time, "prev_hash": prev_hash, "record": record}
    return hashlib.sha256(prev_hash.encode("ascii") + canonical(body)).hexdigest()


@dataclass(frozen=True)
class Entry:
    """One parsed line of the log."""

    seq: int
    time: str
    prev_hash: str
    hash: str
    record: dict[str, Any]

    @classmethod
    def parse(cls, line: bytes) -> Entry:
        """Parse a line; ValueError (with a reason) when it is not a well-formed entry."""
        try:
            raw = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError("not valid JSON") from exc
        if not isinstance(raw, dict) or set(raw) != {"seq", "time", "prev_hash", "hash",
                                                     "record"}:
            raise ValueError("not an audit entry (fields missing or extra)")
        seq, time, prev, digest, record = (raw["seq"], raw["time"], raw["prev_hash"],
                                           raw["hash"], raw["record"])
        if not (isinstance(seq, int) and isinstance(time, str) and isinstance(prev, str)
                and isinstance(digest, str) and isinstance(record, dict)):
            raise ValueError("an entry field has the wrong type")
        return cls(seq, time, prev, digest, record)

    def line(self) -> bytes:
        return canonical({"seq": self.seq, "time": self.time, "prev_hash": self.prev_hash,
                          "record": self.record, "hash": self.hash}) + b"\n"


@dataclass(frozen=True)
class Head:
    """The chain's last entry: its seq (0 for an empty log), hash and the file's size."""

    seq: int
    hash: str
    size: int


class AuditLog:
    """Appends to, and reads, one audit log file (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @classmethod
    def for_home(cls, home: Path) -> AuditLog:
        return cls(log_path(home))

    def append(self, records: Sequence[dict[str, Any]]) -> Head:
        """Chain `records` onto the log; returns the new head. Durable on return."""
        if not records:
            return self.head()
        try:
            with self._locked() as fd:
                head = self._tail(fd, repair=True)
                seq, prev = head.seq, head.hash
                lines = []
                for record in records:
                    seq += 1
                    now = datetime.now(UTC).isoformat(timespec="microseconds")
                    digest = chain_hash(prev, seq, now, record)
                    lines.append(Entry(seq, now, prev, digest, record).line())
                    prev = digest
                data = b"".join(lines)
                _write_or_take_back(fd, data, head.size)
                return Head(seq, prev, head.size + len(data))
        except OSError as exc:
            raise AuditLogError(f"audit log append failed: {exc.strerror}",
                                hint=f"check free space and permissions of {self.path}") from exc

    def head(self) -> Head:
        """The current head, read under the lock (no repair)."""
        if not self.path.exists():
            return Head(0, GENESIS, 0)
        with self._locked() as fd:
            return self._tail(fd, repair=False)

    def entries(self, *, start: int = 0) -> Iterator[tuple[int, int, bytes]]:
        """(line number, byte offset after the line, raw line) of every complete line,
        from byte offset `start`; a last line without newline is left out (in progress)."""
        try:
            fh = self.path.open("rb")
        except FileNotFoundError:
            return
        with fh:
            fh.seek(start)
            offset = start
            for number, line in enumerate(fh, start=1):
                if not line.endswith(b"\n"):
                    return
                offset += len(line)
                yield number, offset, line.rstrip(b"\n")

    # --- internals ---------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[int]:
        folder = self.path.parent
        if not folder.is_dir():
            ensure_dir(folder)
            os.chmod(folder, 0o700)
        created = not self.path.exists()
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            if created:
                os.fchmod(fd, 0o600)  # whatever the umask said
                fsync_dir(folder)
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield fd
        finally:
            os.close(fd)  # also releases the lock

    def _tail(self, fd: int, *, repair: bool) -> Head:
        """Seq and hash of the last complete line; cuts off a torn last line if `repair`."""
        size = os.fstat(fd).st_size
        if size == 0:
            return Head(0, GENESIS, 0)
        window = _TAIL_WINDOW
        while True:
            start = max(0, size - window)
            data = os.pread(fd, size - start, start)
            end = data.rfind(b"\n")
            if end < 0 and start > 0:
                window *= 4
                continue
            if end != len(data) - 1:  # a torn last line: a crash mid-append
                complete = start + end + 1
                if not repair:
                    size = complete
                    if complete == 0:
                        return Head(0, GENESIS, 0)
                    continue
                log.warning("audit log ended in a partial record (crash during an append);"
                            " cutting it off bytes=%d", size - complete)
                os.ftruncate(fd, complete)
                os.fsync(fd)
                size = complete
                if complete == 0:
                    return Head(0, GENESIS, 0)
                continue
            begin = data.rfind(b"\n", 0, end)
            if begin < 0 and start > 0:
                window *= 4
                continue
            try:
                last = Entry.parse(data[begin + 1:end])
            except ValueError as exc:
                raise AuditLogError(
                    f"the last audit record cannot be read ({exc}); refusing to extend the chain",
                    hint="run `pacs-edge audit verify` and keep the file as evidence") from exc
            return Head(last.seq, last.hash, size)


def _write_or_take_back(fd: int, data: bytes, size: int) -> None:
    """Write and fsync `data` at the end of the log (`size` bytes long before it); on
    failure, cut the file back to `size` before raising. A full disk takes a write up
    to the end of its last block: left there, the whole lines among it stayed in the
    chain, and the Auditor, which keeps the records of a failed append, appended them
    again, so they were in the log twice."""
    try:
        written = 0
        while written < len(data):
            written += os.write(fd, data[written:])
        os.fsync(fd)
    except OSError:
        with contextlib.suppress(OSError):  # else the next append cuts the torn line
            os.ftruncate(fd, size)
        raise
