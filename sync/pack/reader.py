"""Reading packs: the whole pack as a stream, or one instance by range reads.

Nothing here does I/O. A full recall feeds the blob's chunks (e.g.
`BlobStore.iter_chunks`) to `unpack_instances`; a single instance is read with
`iter_instance(fetch, ...)`, where `fetch(offset, length)` is the caller's
range read (of a blob store's pack: sync.pack_reads.pack_ranges, which
reports a range past the blob's end as a truncated pack).
`read_instances(fetch, stream, ...)` chooses between the two for a set of
wanted instances of one pack (the edge's recall and the reader's pull both
use it): at least half the pack's instances wanted, one streamed read of the
whole blob; fewer, range reads of only their segments.

What a consumer may trust, and when:
- every plaintext byte yielded comes from a segment that authenticated, at
  its position, in this pack;
- that the pack is complete is only known at the end: the final segment
  (final flag) is checked before its plaintext is yielded, so a truncated
  pack raises before the last bytes of the last instance come out;
- an instance is whole and matches the manifest's SHA-256 only when its
  piece with `last=True` arrives: write pieces to a temp file and commit it
  then, never before.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sync.pack.manifest import Manifest, ManifestEntry
from sync.pack.pack_errors import PackError, PackIntegrityError, TruncatedPackError
from sync.pack.segments import (
    HEADER_SIZE,
    TAG_SIZE,
    PackHeader,
    check_data_key,
    decrypt_range,
    decrypt_segment,
    plan_range,
)

Fetch = Callable[[int, int], bytes]
Stream = Callable[[], Iterable[bytes]]  # the whole blob as chunks (e.g. BlobStore.iter_chunks)


class PackDecryptor:
    """Incremental decryption of a whole pack blob fed in arbitrary chunks.

    A segment is decrypted as soon as a byte after it arrives (then it cannot
    be the final one); the rest is decrypted as the final segment by finish().
    Memory stays at about one segment plus one fed chunk.
    """

    def __init__(self, data_key: bytes, *, expected_pack_id: bytes | None = None,
                 expected_segment_size: int | None = None,
                 expected_sha256: str | None = None) -> None:
        check_data_key(data_key)
        self._aead = AESGCM(data_key)
        self._expected_pack_id = expected_pack_id
        self._expected_segment_size = expected_segment_size
        self._expected_sha256 = expected_sha256
        self._sha = hashlib.sha256()
        self._buf = bytearray()
        self._header: PackHeader | None = None
        self._header_bytes = b""
        self._index = 0
        self._done = False

    @property
    def header(self) -> PackHeader | None:
        return self._header

    def feed(self, chunk: bytes) -> Iterator[bytes]:
        """Plaintext of every segment that this chunk completes (never the final one)."""
        if self._done:
            raise PackError("the pack was already finished")
        self._sha.update(chunk)
        self._buf += chunk
        if self._header is None:
            if len(self._buf) < HEADER_SIZE:
                return
            self._read_header()
        assert self._header is not None
        stride = self._header.segment_size + TAG_SIZE
        while len(self._buf) > stride:
            with memoryview(self._buf) as view, view[:stride] as segment:
                plain = decrypt_segment(self._aead, self._header_bytes, self._index, False,
                                        segment)
            del self._buf[:stride]
            self._index += 1
            yield plain

    def finish(self) -> bytes:
        """Plaintext of the final segment, after checking the pack really ends here."""
        self._done = True
        if self._header is None:
            raise TruncatedPackError("pack ends inside its header")
        if not self._buf:
            raise TruncatedPackError("pack has no segment after its header")
        if self._expected_sha256 is not None and not hmac.compare_digest(
                self._sha.hexdigest(), self._expected_sha256):
            raise PackIntegrityError("pack SHA-256 differs from the manifest")
        last = bytes(self._buf)
        self._buf.clear()
        try:
            return decrypt_segment(self._aead, self._header_bytes, self._index, True, last)
        except PackIntegrityError:
            # Authentic but not final: the segments after it were cut off.
            try:
                decrypt_segment(self._aead, self._header_bytes, self._index, False, last)
            except PackIntegrityError:
                raise PackIntegrityError(
                    f"pack final segment {self._index} failed authentication (truncated "
                    "mid-segment, modified, or from another pack)") from None
            raise TruncatedPackError(f"pack ends after segment {self._index}, which is not "
                                     "its final segment (truncated)") from None

    def _read_header(self) -> None:
        header = PackHeader.from_bytes(bytes(self._buf[:HEADER_SIZE]))
        if self._expected_pack_id is not None and header.pack_id != self._expected_pack_id:
            raise PackIntegrityError("pack belongs to another pack id than expected")
        if self._expected_segment_size is not None \
                and header.segment_size != self._expected_segment_size:
            raise PackIntegrityError("pack segment size differs from the manifest")
        self._header = header
        self._header_bytes = header.to_bytes()
        del self._buf[:HEADER_SIZE]


def decrypt_pack(data_key: bytes, chunks: Iterable[bytes], *,
                 expected_pack_id: bytes | None = None,
                 expected_segment_size: int | None = None,
                 expected_sha256: str | None = None) -> Iterator[bytes]:
    """The pack's plaintext as a stream of segment-sized pieces (see module docstring)."""
    decryptor = PackDecryptor(data_key, expected_pack_id=expected_pack_id,
                              expected_segment_size=expected_segment_size,
                              expected_sha256=expected_sha256)
    for chunk in chunks:
        yield from decryptor.feed(chunk)
    yield decryptor.finish()


@dataclass(frozen=True)
class InstancePiece:
    """Consecutive bytes of one instance's Part 10 file; `last` after verification."""

    entry: ManifestEntry
    data: bytes
    last: bool


class _InstanceCheck:
    """Running length and dataset SHA-256 of one instance's bytes."""

    def __init__(self, entry: ManifestEntry) -> None:
        self.entry = entry
        self.seen = 0
        self.sha = hashlib.sha256()

    def update(self, data: bytes) -> None:
        start = self.entry.dataset_offset - self.seen
        if start <= 0:
            self.sha.update(data)
        elif start < len(data):
            self.sha.update(memoryview(data)[start:])
        self.seen += len(data)

    def verify(self) -> None:
        if self.seen != self.entry.length:
            raise PackIntegrityError(f"instance at pack offset {self.entry.offset}: got "
                                     f"{self.seen} bytes, expected {self.entry.length}")
        if not hmac.compare_digest(self.sha.hexdigest(), self.entry.sha256):
            raise PackIntegrityError(f"instance at pack offset {self.entry.offset}: dataset "
                                     "SHA-256 differs from the manifest")


def verify_instance(entry: ManifestEntry, data: bytes) -> None:
    """Check a whole instance file against its manifest entry (length and SHA-256)."""
    verify_instance_chunks(entry, (data,))


def verify_instance_chunks(entry: ManifestEntry, chunks: Iterable[bytes]) -> None:
    """Check an instance file read in chunks (a multi-frame study's file may be GBs)."""
    check = _InstanceCheck(entry)
    for chunk in chunks:
        check.update(chunk)
    check.verify()


def unpack_instances(data_key: bytes, chunks: Iterable[bytes],
                     manifest: Manifest) -> Iterator[InstancePiece]:
    """Split a whole pack stream into verified instance pieces, in manifest order."""
    plaintext = decrypt_pack(data_key, chunks, expected_pack_id=manifest.pack_id,
                             expected_segment_size=manifest.segment_size,
                             expected_sha256=manifest.pack_sha256)
    entries = iter(manifest.instances)
    check = _next_check(entries)
    total = 0
    for block in plaintext:
        total += len(block)
        view = memoryview(block)
        while check is not None:
            need = check.entry.length - check.seen
            piece = bytes(view[:need])
            view = view[len(piece):]
            check.update(piece)
            if check.seen < check.entry.length:
                if piece:
                    yield InstancePiece(check.entry, piece, False)
                break
            check.verify()
            yield InstancePiece(check.entry, piece, True)
            check = _next_check(entries)
        if check is None and len(view):
            raise PackIntegrityError("pack holds more bytes than its manifest lists")
    if check is not None or total != manifest.plaintext_size:
        raise PackIntegrityError(f"pack has {total} plaintext bytes, manifest lists "
                                 f"{manifest.plaintext_size}")


def _next_check(entries: Iterator[ManifestEntry]) -> _InstanceCheck | None:
    entry = next(entries, None)
    return None if entry is None else _InstanceCheck(entry)


def iter_instance(fetch: Fetch, data_key: bytes, manifest: Manifest, entry: ManifestEntry,
                  *, segments_per_fetch: int = 16) -> Iterator[bytes]:
    """One instance's Part 10 bytes by range reads of only its segments.

    Fetches at most `segments_per_fetch` segments at a time (bounded memory
    for large multi-frame instances). The last piece is yielded only after
    the length and dataset SHA-256 matched the manifest.
    """
    if segments_per_fetch < 1:
        raise ValueError("segments_per_fetch must be at least 1")
    header = PackHeader(manifest.pack_id, manifest.segment_size)
    check = _InstanceCheck(entry)
    step = manifest.segment_size * segments_per_fetch
    start, end = entry.offset, entry.offset + entry.length
    pending: bytes | None = None
    while True:
        # Sub-ranges end on multiples of `step`, so no segment is fetched twice.
        stop = min(end, (start // step + 1) * step)
        plan = plan_range(start, stop - start, segment_size=manifest.segment_size,
                          plaintext_size=manifest.plaintext_size)
        data = decrypt_range(data_key, header, plan, fetch(plan.blob_offset, plan.blob_length))
        check.update(data)
        if pending is not None:
            yield pending
        pending = data
        start = stop
        if start >= end:
            break
    check.verify()
    yield pending


def read_instance(fetch: Fetch, data_key: bytes, manifest: Manifest,
                  entry: ManifestEntry) -> bytes:
    """One verified instance file in memory (see iter_instance for the streaming form)."""
    return b"".join(iter_instance(fetch, data_key, manifest, entry))


def streams_whole_pack(manifest: Manifest, wanted: int) -> bool:
    """Whether reading `wanted` instances of this pack streams the whole blob.

    At least half the instances: one sequential read (fewer round trips, each
    segment fetched once) beats a range read per instance, which also fetches
    the segments shared by neighbouring instances again."""
    return wanted * 2 >= len(manifest.instances)


def read_instances(fetch: Fetch, stream: Stream, data_key: bytes, manifest: Manifest,
                   entries: Sequence[ManifestEntry]) -> Iterator[InstancePiece]:
    """Verified pieces of the wanted `entries` of one pack, in manifest order.

    Streams the whole pack (`stream()`, authenticated end to end, its SHA-256
    checked at the end) when `streams_whole_pack`; else range-reads each entry
    with `fetch`. Either way an instance's piece with `last=True` comes only
    after its length and dataset SHA-256 matched the manifest, so a consumer
    writes pieces to a temp file and commits it then. `entries` must be
    entries of `manifest` (ValueError otherwise).
    """
    listed = {entry.offset: entry for entry in manifest.instances}
    wanted = {entry.offset for entry in entries}
    if any(listed.get(entry.offset) != entry for entry in entries):
        raise ValueError("read_instances: an entry is not one of the manifest's")
    if not wanted:
        return
    if streams_whole_pack(manifest, len(wanted)):
        for piece in unpack_instances(data_key, stream(), manifest):
            if piece.entry.offset in wanted:
                yield piece
        return
    for offset in sorted(wanted):
        entry = listed[offset]
        pending: bytes | None = None
        for data in iter_instance(fetch, data_key, manifest, entry):
            if pending is not None:
                yield InstancePiece(entry, pending, False)
            pending = data
        assert pending is not None  # iter_instance yields at least one piece
        yield InstancePiece(entry, pending, True)
