"""A blob store in a local folder: the embedded default (`file:///abs/path`).

It is a product backend, not a test double: `make run` replicates here with no
cloud account, and the folder may be a NAS mount. It keeps the whole contract
of sync.blobstore.base, including tiers, so that the agent runs the same code
whatever the backend.

Layout under `root` (names map to sub-folders by `/`)::

    packs/ab/ab12.pack          the blob's bytes, exactly as put
    packs/ab/.ab12.pack.meta    sidecar: JSON {tier, md5, metadata, rehydrate, put_id}
    packs/ab/.ab12.pack.*.part  a put in progress (or a crash leftover)

Names never start a segment with a dot (sync.blobstore.names), so dot-files
are the store's own and list() skips them.

Atomic, no-overwrite put: the bytes go to a temp file in the target folder,
are fsynced, read back and compared with what was streamed (MD5, page cache
dropped first), and then `os.link(temp, final)` publishes them; link fails when
the name exists, so a put can never replace a blob, even against a racing
writer. The sidecar is written after the link (temp, fsync, rename) and the
folder is fsynced. A crash between link and sidecar leaves a blob with no
sidecar: stat() then rebuilds it (md5 recomputed, tier Hot, no metadata), and
the agent, whose put never returned, re-checks the blob by size and hash.
File systems without hard links (some SMB mounts) fall back to a checked
rename, atomic for readers but not against a second concurrent writer of the
same name, which the single sync agent never is.

Tiers are labels in the sidecar: a folder has no cheaper storage class, but
keeping them lets set_tier/stat round-trip and lets Archive behave as it does
in the cloud: open_range and iter_chunks raise BlobOffline until the blob is
brought back online. For a folder that completes at once, unless
`rehydrate_delay` (seconds) is set: then leaving Archive takes that long, which
the state-machine tests use to observe the rehydrating state. The clock is the
wall clock, written in the sidecar, so another process sees the same state.

Caveat for NAS mounts: the root is created when missing, so an unmounted NAS
whose empty mount point exists would be written to as a local folder. Once a
box has uploaded, its sync jobs refuse a folder without its newest packs
(sync.container_check); a new box must still be mounted before the agent
starts (systemd: RequiresMountsFor=).
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import json
import os
import secrets
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from appliance.base import durable
from appliance.base.errors import OutOfSpace
from sync.blobstore.base import (
    BlobExists,
    BlobInfo,
    BlobIntegrityError,
    BlobNotFound,
    BlobOffline,
    BlobRangeError,
    BlobStore,
    BlobStoreError,
    BlobStoreUnavailable,
    Tier,
    TransientBlobError,
)
from sync.blobstore.names import check_metadata, check_name, check_prefix

_READ_BLOCK = 1 << 20
# NAS hiccups worth retrying; everything else from the file system is not.
_TRANSIENT = {errno.ETIMEDOUT, errno.EAGAIN, errno.EINTR, errno.ESTALE, errno.EHOSTUNREACH,
              errno.ECONNRESET, errno.ECONNABORTED}
_NO_LINK = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK}


class LocalFolderStore(BlobStore):
    """Blobs as files under `root`; see the module docstring for layout and guarantees."""

    def __init__(self, root: Path, *, rehydrate_delay: float = 0.0,
                 rehydrate_to: Tier = Tier.HOT, file_mode: int = 0o640) -> None:
        if rehydrate_to is Tier.ARCHIVE:
            raise ValueError("rehydrate_to must be an online tier, not Archive")
        self.root = Path(root).absolute()
        self.url = self.root.as_uri()
        self.rehydrate_delay = float(rehydrate_delay)
        self.rehydrate_to = rehydrate_to
        self.file_mode = file_mode
        try:
            durable.ensure_dir(self.root)
        except OSError as exc:
            raise _os_error("open", str(self.root), exc, self.root) from exc
        if not self.root.is_dir():
            raise BlobStoreUnavailable("open", str(self.root), "not a folder",
                                       hint="point [cloud] url at a folder")

    # -- the contract ---------------------------------------------------------------

    def put(self, name: str, data: Iterable[bytes], *,
            metadata: dict[str, str] | None = None) -> BlobInfo:
        check_name(name)
        meta = check_metadata(metadata)
        path = self._path(name)
        if path.is_file():
            raise _exists(name)
        try:
            durable.ensure_dir(path.parent)
        except (FileExistsError, NotADirectoryError):
            pass  # reported just below
        except OSError as exc:
            raise _os_error("put", name, exc, self.root) from exc
        if path.exists() or not path.parent.is_dir():
            raise BlobStoreError("put", name, "a blob is in the way of its folder, or a "
                                 "folder of longer names is in the way of the blob",
                                 hint="a local folder cannot hold both 'a' and 'a/b'; "
                                 "this is a naming bug")
        md5 = hashlib.md5(usedforsecurity=False)
        size = 0
        tmp = ""
        chunks = iter(data)
        in_caller = False
        try:
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.",
                                       suffix=durable.TEMP_SUFFIX)
            with os.fdopen(fd, "wb") as fh:
                os.fchmod(fh.fileno(), self.file_mode)
                while True:
                    in_caller = True
                    chunk = next(chunks, None)
                    in_caller = False
                    if chunk is None:
                        break
                    fh.write(chunk)
                    md5.update(chunk)
                    size += len(chunk)
                fh.flush()
                os.fsync(fh.fileno())
            _check_written(name, Path(tmp), size, md5.digest())
            self._publish(name, Path(tmp), path)
        except OSError as exc:
            if in_caller:
                raise  # the caller's own failure (reading its source): not ours to map
            raise _os_error("put", name, exc, self.root) from exc
        finally:
            if tmp:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
        sidecar = {"tier": Tier.HOT.value, "md5": _b64(md5.digest()), "metadata": meta,
                   "rehydrate": None, "put_id": secrets.token_hex(8)}
        try:
            self._write_sidecar(name, sidecar)  # fsyncs the folder: link and sidecar durable
        except BaseException:
            # The put must fail whole: a blob without its metadata is not what was asked.
            with contextlib.suppress(OSError):
                path.unlink()
            raise
        try:
            etag = _etag(sidecar, path.stat())
        except OSError as exc:
            raise _os_error("put", name, exc, self.root) from exc
        return BlobInfo(name, size, Tier.HOT, True, md5.digest(), meta, etag)

    def open_range(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        fd = self._open_online("open_range", name)
        try:
            size = os.fstat(fd).st_size
            end = _check_range(name, offset, length, size)
            parts: list[bytes] = []
            pos = offset
            while pos < end:
                part = os.pread(fd, end - pos, pos)
                if not part:
                    raise BlobRangeError("open_range", name, f"blob shrank below {end} bytes")
                parts.append(part)
                pos += len(part)
            return b"".join(parts)
        except OSError as exc:
            raise _os_error("open_range", name, exc, self.root) from exc
        finally:
            os.close(fd)

    def iter_chunks(self, name: str, *, chunk_size: int = 4 << 20) -> Iterator[bytes]:
        if chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        # Opened here, not in the generator, so a missing or archived blob fails at the call.
        fd = self._open_online("iter_chunks", name)
        return self._chunks(name, fd, chunk_size)

    def stat(self, name: str) -> BlobInfo:
        return self._info("stat", name)

    def _info(self, operation: str, name: str) -> BlobInfo:
        check_name(name)
        path = self._path(name)
        try:
            st = self._data_stat(operation, name, path)
            side = self._sidecar(name, path)
        except OSError as exc:
            raise _os_error(operation, name, exc, self.root) from exc
        tier, online = self._effective(side)
        md5 = base64.b64decode(side["md5"]) if side.get("md5") else None
        return BlobInfo(name, st.st_size, tier, online, md5, dict(side.get("metadata") or {}),
                        _etag(side, st))

    def list(self, prefix: str = "") -> Iterator[BlobInfo]:
        check_prefix(prefix)
        folder = self.root / prefix.rsplit("/", 1)[0] if "/" in prefix else self.root
        names: list[str] = []
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel = Path(dirpath).relative_to(self.root).as_posix()
            for filename in filenames:
                if filename.startswith("."):
                    continue
                name = filename if rel == "." else f"{rel}/{filename}"
                if name.startswith(prefix):
                    names.append(name)
        names.sort()
        return self._infos(names)

    def delete(self, name: str) -> None:
        check_name(name)
        path = self._path(name)
        try:
            self._data_stat("delete", name, path)
            path.unlink()
            with contextlib.suppress(FileNotFoundError):
                self._sidecar_path(path).unlink()
            durable.fsync_dir(path.parent)
        except FileNotFoundError as exc:
            raise _not_found("delete", name) from exc
        except OSError as exc:
            raise _os_error("delete", name, exc, self.root) from exc

    def set_tier(self, name: str, tier: Tier) -> None:
        """Change the tier label; leaving Archive with a rehydrate_delay starts the clock.

        Unlike Azure, which refuses tier changes while a rehydration runs (409,
        raised as BlobOffline), a pending rehydration here only changes its target.
        """
        check_name(name)
        path = self._path(name)
        try:
            self._data_stat("set_tier", name, path)
            side = self._sidecar(name, path)
        except OSError as exc:
            raise _os_error("set_tier", name, exc, self.root) from exc
        _, online = self._effective(side)
        if tier is Tier.ARCHIVE or online or self.rehydrate_delay <= 0:
            side.update(tier=tier.value, rehydrate=None)
        else:
            # Leaving Archive: the blob stays offline for rehydrate_delay seconds (a
            # pending rehydration keeps its finish time and only changes its target).
            pending = side.get("rehydrate") or {}
            ready_at = pending.get("ready_at", time.time() + self.rehydrate_delay)
            side.update(tier=Tier.ARCHIVE.value,
                        rehydrate={"tier": tier.value, "ready_at": ready_at})
        self._write_sidecar(name, side)

    def request_online(self, name: str, *, early: bool = False) -> None:
        """`early` changes nothing here: a folder has one pace (rehydrate_delay)."""
        info = self._info("request_online", name)
        if info.online or self._rehydrating(name):
            return
        self.set_tier(name, self.rehydrate_to)

    def close(self) -> None:
        """Nothing to release: every call opens and closes its own files."""

    # -- local-only -------------------------------------------------------------------

    def sweep_interrupted_writes(self, *, older_than: float = 3600.0) -> int:
        """Remove temp files of puts that a crash interrupted; the agent calls it at start-up.

        `older_than` keeps the temp files of a put that is still running elsewhere
        (another box or process writing to the same folder).
        """
        return durable.sweep_temp_files(self.root, older_than=older_than)

    # -- helpers ------------------------------------------------------------------------

    def _path(self, name: str) -> Path:
        return self.root.joinpath(*name.split("/"))

    @staticmethod
    def _sidecar_path(path: Path) -> Path:
        return path.with_name(f".{path.name}.meta")

    def _data_stat(self, operation: str, name: str, path: Path) -> os.stat_result:
        try:
            st = path.stat()
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise _not_found(operation, name) from exc
        if not os.path.isfile(path):
            raise _not_found(operation, name)  # a folder that holds longer names
        return st

    def _publish(self, name: str, tmp: Path, path: Path) -> None:
        try:
            os.link(tmp, path)
        except FileExistsError as exc:
            raise _exists(name) from exc
        except OSError as exc:
            if exc.errno not in _NO_LINK:
                raise
            if path.exists():
                raise _exists(name) from exc
            os.rename(tmp, path)  # no hard links here: see the module docstring

    def _sidecar(self, name: str, path: Path) -> dict[str, Any]:
        """The blob's sidecar; rebuilt when a crash left the blob without one."""
        try:
            side: dict[str, Any] = json.loads(self._sidecar_path(path).read_bytes())
            return side
        except FileNotFoundError:
            pass
        except ValueError:
            pass  # a torn sidecar cannot happen with atomic writes; rebuild it anyway
        md5 = hashlib.md5(usedforsecurity=False)
        with open(path, "rb") as fh:
            while block := fh.read(_READ_BLOCK):
                md5.update(block)
        side = {"tier": Tier.HOT.value, "md5": _b64(md5.digest()), "metadata": {},
                "rehydrate": None, "put_id": secrets.token_hex(8)}
        with contextlib.suppress(BlobStoreError):  # a read-only mount still answers stat
            self._write_sidecar(name, side)
        return side

    def _write_sidecar(self, name: str, side: dict[str, Any]) -> None:
        path = self._path(name)
        try:
            durable.atomic_write(self._sidecar_path(path), json.dumps(side).encode(),
                                 mode=self.file_mode)
        except OutOfSpace as exc:
            raise BlobStoreUnavailable("put", name, "the store's folder is full",
                                       hint=f"free space under {self.root}") from exc
        except OSError as exc:
            raise _os_error("put", name, exc, self.root) from exc

    @staticmethod
    def _effective(side: dict[str, Any]) -> tuple[Tier, bool]:
        pending = side.get("rehydrate")
        if pending:
            if time.time() >= pending["ready_at"]:
                return Tier(pending["tier"]), True
            return Tier.ARCHIVE, False
        tier = Tier(side.get("tier", Tier.HOT.value))
        return tier, tier is not Tier.ARCHIVE

    def _rehydrating(self, name: str) -> bool:
        path = self._path(name)
        return bool(self._sidecar(name, path).get("rehydrate"))

    def _open_online(self, operation: str, name: str) -> int:
        info = self._info(operation, name)
        if not info.online:
            raise BlobOffline(operation, name, "the blob is in the Archive tier",
                              hint="request_online() first and wait until stat() reports it "
                              "online (recall does this)")
        try:
            return os.open(self._path(name), os.O_RDONLY)
        except FileNotFoundError as exc:
            raise _not_found(operation, name) from exc
        except OSError as exc:
            raise _os_error(operation, name, exc, self.root) from exc

    def _chunks(self, name: str, fd: int, chunk_size: int) -> Iterator[bytes]:
        try:
            with os.fdopen(fd, "rb", buffering=0) as fh:
                while chunk := fh.read(chunk_size):
                    yield chunk
        except OSError as exc:
            raise _os_error("iter_chunks", name, exc, self.root) from exc

    def _infos(self, names: Sequence[str]) -> Iterator[BlobInfo]:
        for name in names:
            try:
                yield self.stat(name)
            except BlobNotFound:
                continue  # deleted while listing


def _etag(side: dict[str, Any], st: os.stat_result) -> str:
    """The blob's identity: the put's random id (sidecar), and the data file's inode,
    size and mtime in ns (as HTTP file servers do).

    A rewrite of the file in place changes the mtime, a replacing rename the
    inode, a delete and put the id (even when the file system recycles the inode
    within one timestamp tick). set_tier rewrites only the sidecar and keeps the
    id. Hashing the content would also catch an edit that restores the mtime,
    but would cost a full read per stat: the scrub reads the content instead."""
    return f"{side.get('put_id', '')}-{st.st_ino:x}-{st.st_size:x}-{st.st_mtime_ns:x}"


def _check_written(name: str, tmp: Path, size: int, md5: bytes) -> None:
    """Read the fsynced temp file back and compare it with what was streamed.

    The file's cached pages are dropped first (posix_fadvise DONTNEED: after
    fsync they are clean), so on Linux the read comes from the disk or the NAS,
    not from the page cache that the write filled. BlobIntegrityError when the
    file does not hold exactly the streamed bytes; the caller then publishes
    nothing and removes the temp file."""
    digest = hashlib.md5(usedforsecurity=False)
    seen = 0
    with open(tmp, "rb") as fh:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        while block := fh.read(_READ_BLOCK):
            digest.update(block)
            seen += len(block)
    if seen != size or digest.digest() != md5:
        raise BlobIntegrityError(
            "put", name, f"read back {seen} bytes that differ from the {size} bytes written",
            hint="the folder's disk or network mount did not keep what was written; check "
            "its health (dmesg, SMART, NAS logs); the put published nothing")


def _check_range(name: str, offset: int, length: int | None, size: int) -> int:
    """The end of [offset, offset+length) after checking it lies inside a blob of `size`."""
    end = size if length is None else offset + length
    if offset < 0 or (length is not None and length < 0) or offset > size or end > size:
        raise BlobRangeError("open_range", name,
                             f"range offset={offset} length={length} is outside the blob "
                             f"({size} bytes)",
                             hint="the pack index and the blob disagree: re-verify the pack")
    return end


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode("ascii")


def _exists(name: str) -> BlobExists:
    return BlobExists("put", name, "a blob by that name exists; blobs are never overwritten",
                      hint="write a new version under a new name")


def _not_found(operation: str, name: str) -> BlobNotFound:
    return BlobNotFound(operation, name, "no such blob")


def _os_error(operation: str, name: str, exc: OSError, root: Path) -> BlobStoreError:
    """Map a file-system error to the blob-store tree, with a hint for the operator."""
    reason = exc.strerror or str(exc)
    if durable.is_no_space(exc):
        return BlobStoreUnavailable(operation, name, "the store's folder is full",
                                    hint=f"free space under {root}")
    if exc.errno in _TRANSIENT:
        return TransientBlobError(operation, name, reason,
                                  hint=f"the folder {root} did not answer (network mount?)")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return BlobStoreUnavailable(operation, name, reason,
                                    hint=f"let the agent's user write to {root} "
                                    "(and check the mount is read-write)")
    return BlobStoreUnavailable(operation, name, reason,
                                hint=f"check the folder {root} and its file system")
