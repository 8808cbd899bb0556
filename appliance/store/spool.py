"""SpoolFile: where an incoming instance lands while it is being received.

Both C-STORE (pynetdicom writes into it as P-DATA arrives) and `import`
stream a DICOM Part 10 file into a SpoolFile in the store's spool folder, on
the same file system as the final path, so that committing it is an fsync and
a rename, never a copy.

Two jobs beyond writing:
- it hashes the dataset bytes (everything after the File Meta group) from
  the buffers they arrived in, so the SHA-256 costs no second read. Buffers
  that will not change (a C-STORE's PDUs, `bytes`) are hashed when the
  instance is complete, up to 2 MiB of them: ingest starts the file's fsync
  first, so the hash runs while the disk works instead of before (one
  association's instances/s +8% in 16 alternating pairs);
- it swallows a full disk instead of raising inside pynetdicom's reactor
  (which would abort the association): it records the error, drops further
  data, and ingest answers Out of Resources (0xA700) for that instance.
  With a store reserve it also looks at the free space every RESERVE_CHECK
  bytes and gives up as on a full disk once the space left is below the
  reserve: a data set's size is known only at its end, and one of GBs (a
  tomosynthesis, a whole-slide image) would otherwise take the disk to its
  last block, the reserve that the index, the audit log and eviction write
  into included, before ingest refused it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import itertools
import os
import struct
import time
import uuid
from concurrent import futures
from pathlib import Path

from appliance.base.durable import TEMP_SUFFIX, is_no_space

# 128-byte preamble + b"DICM" + (0002,0000) UL tag/VR/length header + 4-byte value
_PREAMBLE = 132
_GROUP_LENGTH_END = _PREAMBLE + 12
_GROUP_LENGTH_HEADER = b"\x02\x00\x00\x00UL\x04\x00"
# Where spools are made durable while their receiver goes on (see SpoolFile.start_sync).
_SYNC_POOL = futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="spool-fsync")
# How a spool file is opened: as tempfile.mkstemp opens its files.
_CREATE_FLAGS = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_NAME_ATTEMPTS = 100
_NAMES = itertools.count()
# Bytes written between two looks at the free space, when there is a reserve to keep.
RESERVE_CHECK = 4 << 20
# Dataset bytes whose hashing waits until the instance is complete, per spool: hashed
# then while the file's fsync runs in its thread (SpoolFile.dataset_sha256).
_DEFERRED_HASH_BYTES = 2 << 20


BELOW_RESERVE = "free space is below the configured store reserve"


class BelowReserve(OSError):
    """Writing the spool left less free space than the store reserve (a full disk to
    everything that handles a full disk: its errno is ENOSPC)."""

    def __init__(self) -> None:
        super().__init__(errno.ENOSPC, BELOW_RESERVE)


def dataset_offset(head: bytes) -> int:
    """Where the dataset starts in a Part 10 file, from its first 144 bytes; -1 if unknown."""
    if len(head) < _GROUP_LENGTH_END or head[128:132] != b"DICM":
        return -1
    if head[_PREAMBLE:_PREAMBLE + 8] != _GROUP_LENGTH_HEADER:
        return -1
    (group_length,) = struct.unpack("<I", head[_GROUP_LENGTH_END - 4:_GROUP_LENGTH_END])
    return _GROUP_LENGTH_END + int(group_length)


def _create(spool_dir: Path) -> tuple[int, str]:
    """A new spool file (descriptor, absolute name), made as tempfile.mkstemp makes one
    (O_EXCL, mode 0600, close-on-exec), but named after this process and a counter:
    mkstemp's random names cost more Python than the open itself on the C-STORE path.
    A name already taken (a pid reused since a crash left a spool) moves on to the next."""
    folder = os.path.abspath(spool_dir)
    for _ in range(_NAME_ATTEMPTS):
        name = f"{folder}/rx-{os.getpid()}-{next(_NAMES)}{TEMP_SUFFIX}"
        try:
            return os.open(name, _CREATE_FLAGS, 0o600), name
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free spool file name", folder)


class SpoolFile:
    """A write-only temp file with a running SHA-256 of its dataset part.

    The interface is the subset of NamedTemporaryFile that pynetdicom uses:
    `name`, `write`, `file.flush()` and `close()`.
    """

    def __init__(self, spool_dir: Path, *, reserve_bytes: int = 0) -> None:
        self.file = self
        self._reserve = reserve_bytes
        self._next_check = RESERVE_CHECK
        self.error: OSError | None = None
        self._fh: io.FileIO | None = None
        try:
            fd, name = _create(spool_dir)
            self._fh = io.FileIO(fd, "wb")
        except OSError as exc:
            # Even creating the file can fail on a full disk: behave as a spool
            # whose first write failed, so the instance is refused, not crashed on.
            name = str(spool_dir / f"rx-unwritable-{uuid.uuid4().hex}{TEMP_SUFFIX}")
            self.error = exc
        self.name = name
        self._written = 0
        self._head = bytearray()
        self._meta_end: int | None = None
        self._sha = hashlib.sha256()
        self._unhashed: list[memoryview] = []
        self._unhashed_bytes = 0
        self._syncing: futures.Future[None] | None = None
        self._renamed = False
        self.last_write = time.monotonic()

    @property
    def path(self) -> Path:
        return Path(self.name)

    @property
    def size(self) -> int:
        return self._written

    @property
    def meta_end(self) -> int | None:
        """Offset of the first dataset byte, once the File Meta group was seen."""
        return self._meta_end

    @property
    def dataset_sha256(self) -> str | None:
        if self._meta_end is None or self._meta_end < 0:
            return None
        self._hash_deferred()
        return self._sha.hexdigest()

    @property
    def read_fd(self) -> int | None:
        """The file's descriptor, readable too (opened O_RDWR), for a pread of what
        was written; None when the file could not be created or is closed already (the
        reader then opens `path`). Valid until `close`, which nothing may call meanwhile."""
        return None if self._fh is None or self._fh.closed else self._fh.fileno()

    def write(self, data: bytes | bytearray | memoryview, *, owned: bool = False) -> int:
        """Append `data`. With `owned` (or `bytes`, which cannot change), the caller
        promises never to change the bytes: their hashing may then wait until the
        instance is complete (`dataset_sha256`), where it overlaps the file's fsync."""
        view = memoryview(data)
        self.last_write = time.monotonic()
        if self.error is None:
            self._hash(view, defer=owned or isinstance(data, bytes))
            try:
                self._write_all(view)
                if self._reserve and self._written + len(view) >= self._next_check:
                    self._next_check = self._written + len(view) + RESERVE_CHECK
                    self._check_reserve()
            except OSError as exc:
                self._fail(exc)
        self._written += len(view)
        return len(view)

    def _check_reserve(self) -> None:
        assert self._fh is not None
        st = os.fstatvfs(self._fh.fileno())
        if st.f_bavail * st.f_frsize < self._reserve:
            raise BelowReserve

    def _write_all(self, view: memoryview) -> None:
        """An unbuffered write may be short (a nearly full disk takes what fits):
        loop until everything is written or the kernel reports the error."""
        assert self._fh is not None
        while view:
            written = self._fh.write(view)
            if not written:
                raise OSError(errno.EIO, "write made no progress")
            view = view[written:]

    def flush(self) -> None:
        """Unbuffered: nothing to flush. pynetdicom calls this after each fragment."""

    def sync(self) -> None:
        """Make the bytes durable; raises the recorded or a new OSError."""
        if self.error is not None:
            raise self.error
        assert self._fh is not None
        # fdatasync: the data and what reading it back needs (size, block map); the
        # timestamps it skips are nothing a recovered instance depends on.
        os.fdatasync(self._fh.fileno())

    def start_sync(self) -> futures.Future[None]:
        """`sync()` in a background thread, started once: every caller gets the same
        future. Nothing may be written after it started."""
        if self._syncing is None:
            self._syncing = _SYNC_POOL.submit(self.sync)
        return self._syncing

    def renamed(self) -> None:
        """The file was moved to its final name (FileStore.commit): `discard` only closes it."""
        self._renamed = True

    def close(self) -> None:
        if self._syncing is not None and not self._syncing.done():
            # Never close under a running fsync: the descriptor could be reused.
            futures.wait([self._syncing])
        if self._fh is not None:
            with contextlib.suppress(OSError):
                self._fh.close()

    def discard(self) -> None:
        """Close and remove the spool file; never raises. Callers discard in cleanup,
        after the instance already failed or succeeded: an error here would hide that
        outcome (a store remounted read-only refuses the unlink too, and a raise in a
        DUL thread aborts the association). A file left behind is a temp file, which
        serve's start-up sweep removes."""
        self.close()
        if self._renamed or self._fh is None:  # moved away, or never created
            return
        with contextlib.suppress(OSError):
            os.unlink(self.name)

    def _fail(self, exc: OSError) -> None:
        self.error = exc
        if is_no_space(exc) and self._fh is not None:
            # Give the space back at once: the instance will be refused anyway.
            with contextlib.suppress(OSError):
                os.ftruncate(self._fh.fileno(), 0)

    def _hash(self, view: memoryview, *, defer: bool) -> None:
        if self._meta_end is None:
            self._head += view
            if len(self._head) < _GROUP_LENGTH_END:
                return
            self._meta_end = dataset_offset(bytes(self._head[:_GROUP_LENGTH_END]))
            if self._meta_end < 0:
                return  # not a Part 10 stream with a group length: refused at ingest
            self._sha.update(self._head[self._meta_end :])
            self._head = bytearray()
            return
        if self._meta_end < 0:
            return
        start = self._meta_end - self._written
        part = view[start:] if start > 0 else view
        if defer and self._unhashed_bytes + len(part) <= _DEFERRED_HASH_BYTES:
            self._unhashed.append(part)
            self._unhashed_bytes += len(part)
            return
        self._hash_deferred()
        self._sha.update(part)

    def _hash_deferred(self) -> None:
        for part in self._unhashed:
            self._sha.update(part)
        self._unhashed = []
        self._unhashed_bytes = 0
