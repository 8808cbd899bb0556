"""PackWriter: stream a study version's instance files into one encrypted pack.

The blob store pulls: `BlobStore.put(name, data)` iterates `data`. So the
writer is lazy. `feed_file` only records a source and returns where it will
sit in the plaintext (its size is known from stat, so offsets are known before
any byte is read); iterating `chunks()` then reads the sources, encrypts them
segment by segment and yields ciphertext. Memory stays at about two segments
plus one read, whatever the study size.

While streaming, the writer computes the SHA-256 of the ciphertext (what the
uploader compares with what the store reports) and of each instance's dataset
bytes (after the File Meta group). When the index's `instances.sha256` is
passed in, a mismatch (or a file whose size changed) aborts the stream with
PackSourceError: a damaged local file must never become the cloud copy.

After the iterator is exhausted, `result` holds sizes and hashes, and
`manifest(...)` builds the pack's Manifest.

    writer = PackWriter(data_key, pack_id)
    for row in rows:
        writer.feed_file(path, attrs, dataset_offset=row.dataset_offset,
                         dataset_sha256=row.sha256)
    store.put(naming.pack_name(key, version), writer.chunks())
    manifest = writer.manifest(study, study_version=version, created_at=time.time())
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from appliance.store.spool import dataset_offset as spool_dataset_offset
from sync.pack.manifest import (
    FORMAT_VERSION,
    InstanceAttributes,
    Manifest,
    ManifestEntry,
    StudyAttributes,
)
from sync.pack.pack_errors import PackError, PackSourceError
from sync.pack.segments import (
    DEFAULT_SEGMENT_SIZE,
    PackHeader,
    check_data_key,
    encrypt_segment,
)

# Enough of a Part 10 file to find where its dataset starts.
_META_HEAD = 144


def part10_dataset_offset(head: bytes) -> int:
    """First byte after the File Meta group, from a file's first 144 bytes.

    The appliance's own rule (the index's `dataset_offset`), so that hashes
    computed here match `instances.sha256`.
    """
    offset = spool_dataset_offset(head)
    if offset < 0:
        raise ValueError("not a Part 10 file with a File Meta group length")
    return offset


@dataclass(frozen=True)
class PackSlot:
    """Where a fed file sits in the pack's plaintext (known before streaming)."""

    index: int
    offset: int
    length: int
    dataset_offset: int


@dataclass(frozen=True)
class PackResult:
    """What the writer produced, known once chunks() is exhausted."""

    pack_id: bytes
    segment_size: int
    plaintext_size: int
    pack_size: int
    pack_sha256: str
    dataset_sha256: tuple[str, ...]  # per fed file, in feed order


@dataclass
class _Source:
    slot: PackSlot
    attributes: InstanceAttributes | None
    expected_sha256: str | None
    path: Path | None = None
    chunks: Iterable[bytes] | None = None


class PackWriter:
    """Encrypts fed sources into one pack, streaming; see the module docstring."""

    def __init__(self, data_key: bytes, pack_id: bytes,
                 segment_size: int = DEFAULT_SEGMENT_SIZE) -> None:
        check_data_key(data_key)
        self.header = PackHeader(pack_id, segment_size)  # validates both
        self._aead = AESGCM(data_key)
        self._sources: list[_Source] = []
        self._plaintext_size = 0
        self._started = False
        self._result: PackResult | None = None

    @property
    def pack_id(self) -> bytes:
        return self.header.pack_id

    @property
    def segment_size(self) -> int:
        return self.header.segment_size

    def feed_file(self, path: Path, attributes: InstanceAttributes | None = None, *,
                  dataset_offset: int | None = None,
                  dataset_sha256: str | None = None) -> PackSlot:
        """Queue a Part 10 file; it is read when chunks() gets to it.

        `dataset_offset` and `dataset_sha256` come from the index when known
        (the file's head is read otherwise; the hash is then only computed).
        `attributes` are needed for manifest(), not for the pack itself.
        """
        path = Path(path)
        try:
            length = path.stat().st_size
            if dataset_offset is None:
                with path.open("rb") as fh:
                    dataset_offset = part10_dataset_offset(fh.read(_META_HEAD))
        except (OSError, ValueError) as exc:
            # Never str(exc): an OSError's text holds the file's path, made of the study's,
            # series' and instance's UIDs, and this message reaches logs and `status`.
            why = (exc.strerror or "") if isinstance(exc, OSError) else str(exc)
            raise PackSourceError(f"instance file #{len(self._sources)} cannot be packed: "
                                  f"{type(exc).__name__}: {why}") from exc
        return self._add(_Source(self._slot(length, dataset_offset), attributes,
                                 _normalise_sha(dataset_sha256), path=path))

    def feed(self, chunks: Iterable[bytes], length: int,
             attributes: InstanceAttributes | None = None, *, dataset_offset: int,
             dataset_sha256: str | None = None) -> PackSlot:
        """Queue a source given as byte chunks of exactly `length` bytes in total."""
        return self._add(_Source(self._slot(length, dataset_offset), attributes,
                                 _normalise_sha(dataset_sha256), chunks=chunks))

    def _slot(self, length: int, dataset_offset: int) -> PackSlot:
        if self._started:
            raise PackError("cannot feed a pack that is already streaming")
        if length < 0 or not 0 <= dataset_offset <= length:
            raise PackSourceError(f"instance #{len(self._sources)}: dataset offset "
                                  f"{dataset_offset} outside a file of {length} bytes")
        return PackSlot(len(self._sources), self._plaintext_size, length, dataset_offset)

    def _add(self, source: _Source) -> PackSlot:
        self._sources.append(source)
        self._plaintext_size += source.slot.length
        return source.slot

    @property
    def plaintext_size(self) -> int:
        return self._plaintext_size

    def chunks(self) -> Iterator[bytes]:
        """Ciphertext of the whole pack, one segment per chunk (header first).

        Single use. Raises PackSourceError mid-stream when a source is not what
        was fed; the partial blob must then be discarded (put is atomic).
        """
        if self._started:
            raise PackError("a pack can be streamed only once")
        self._started = True
        return self._stream()

    def _stream(self) -> Iterator[bytes]:
        header = self.header.to_bytes()
        size = self.segment_size
        total = hashlib.sha256(header)
        written = len(header)
        yield header
        buf = bytearray()
        index = 0
        hashes: list[str] = []
        for source in self._sources:
            for piece in self._read(source, hashes):
                buf += piece
                # Emit only when more bytes follow: the segment that ends the
                # pack must carry final=1, so it is held back until the end.
                while len(buf) > size:
                    with memoryview(buf) as view, view[:size] as chunk:
                        out = encrypt_segment(self._aead, header, index, False, chunk)
                    del buf[:size]
                    index += 1
                    total.update(out)
                    written += len(out)
                    yield out
        out = encrypt_segment(self._aead, header, index, True, bytes(buf))
        total.update(out)
        written += len(out)
        yield out
        self._result = PackResult(self.pack_id, size, self._plaintext_size, written,
                                  total.hexdigest(), tuple(hashes))

    def _read(self, source: _Source, hashes: list[str]) -> Iterator[bytes]:
        """The source's bytes, checked for length and dataset SHA-256."""
        slot = source.slot
        digest = hashlib.sha256()
        seen = 0
        for piece in self._pieces(source):
            if seen + len(piece) > slot.length:
                raise PackSourceError(f"instance #{slot.index} grew while being packed")
            start = slot.dataset_offset - seen
            if start <= 0:
                digest.update(piece)
            elif start < len(piece):
                digest.update(memoryview(piece)[start:])
            seen += len(piece)
            yield piece
        if seen != slot.length:
            raise PackSourceError(f"instance #{slot.index} has {seen} bytes, "
                                  f"expected {slot.length} (changed while being packed)")
        got = digest.hexdigest()
        if source.expected_sha256 is not None and got != source.expected_sha256:
            raise PackSourceError(f"instance #{slot.index}: dataset SHA-256 differs from the "
                                  "index (local file damaged or replaced)")
        hashes.append(got)

    def _pieces(self, source: _Source) -> Iterator[bytes]:
        if source.chunks is not None:
            yield from source.chunks
            return
        assert source.path is not None
        try:
            with source.path.open("rb", buffering=0) as fh:
                while piece := fh.read(self.segment_size):
                    yield piece
        except OSError as exc:
            raise PackSourceError(f"instance #{source.slot.index} cannot be read: "
                                  f"{type(exc).__name__}") from exc

    @property
    def result(self) -> PackResult:
        if self._result is None:
            raise PackError("the pack has not been streamed to its end yet")
        return self._result

    def manifest(self, study: StudyAttributes, *, study_version: int, created_at: float,
                 withdrawn: tuple[str, ...] = ()) -> Manifest:
        """The pack's manifest, withdrawing `withdrawn` (SOP Instance UIDs of the study's
        earlier versions); every fed source must have had attributes."""
        result = self.result
        entries = []
        for source, sha in zip(self._sources, result.dataset_sha256, strict=True):
            if source.attributes is None:
                raise PackError(f"instance #{source.slot.index} was fed without attributes")
            slot = source.slot
            entries.append(ManifestEntry(source.attributes, offset=slot.offset,
                                         length=slot.length,
                                         dataset_offset=slot.dataset_offset, sha256=sha))
        return Manifest(version=FORMAT_VERSION, pack_id=self.pack_id,
                        study_version=study_version, created_at=created_at,
                        segment_size=self.segment_size, plaintext_size=result.plaintext_size,
                        pack_size=result.pack_size, pack_sha256=result.pack_sha256,
                        study=study, instances=tuple(entries), withdrawn=withdrawn)


def _normalise_sha(value: str | None) -> str | None:
    if value is None:
        return None
    value = value.strip().lower()
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise PackSourceError("dataset_sha256 must be 64 hex digits")
    return value
