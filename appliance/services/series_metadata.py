"""WADO-RS metadata: DICOM JSON (PS3.18 F.2) of stored instances, cached per series.

`instance_json` reads one stored file's header (never its pixel data) and
answers the PS3.18 JSON model; Pixel Data and every other top-level bulk
element (OB, OW, OF, OD, OL, OV, UN longer than BULK_THRESHOLD bytes) become a
`BulkDataURI` under the instance's URL (`.../bulkdata/GGGGEEEE`); small binary
values are inline. Nested bulk values (an icon image in a sequence) stay
inline: they are small by nature.

`SeriesMetadataCache` keeps each series' JSON array gzipped on disk under
`<home>/cache/metadata/`, so the second opening of a 500-slice series reads
one small file instead of 500 headers. The file name holds a digest of the
series' instances (SOP Instance UID and content SHA-256 of each), of the
URL base the BulkDataURIs were written with and of FORMAT: when the series
gains (or changes) an instance, is reached under another host name, or the
JSON this code writes changes (FORMAT is bumped), the name changes,
the old file is removed and a new one built. No invalidation hook in ingest is
needed, and a stale answer cannot be served. Since the name needs only the
index's UIDs and hashes, `cached_file` finds a series' file without its
instances on disk: an evicted study's metadata is answered during its recall.
Files are written to a temp file and renamed (a reader never sees half a
file); a crash leaves at worst a temp file, removed by a later build of that
series once it is an hour old.

The cache is bounded (`[http] metadata_cache_mb`): after each build the files
used least recently (a hit refreshes its file's mtime) go until the rest fit,
sparing any used in the last minute, which a request may be about to read.
It also holds patient data of studies since evicted; the bound ages it out.

Elements are encoded by dicom_json (raw bytes to JSON, pydicom's
to_json_dict only for what it declines): pydicom's per-element conversion was
two thirds of a cold build.

Building streams one instance at a time into the gzip stream: memory stays
bounded by the largest single header, whatever the series size. Blocking:
callers run it in a worker thread.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import logging
import os
import struct
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, BinaryIO

from pydicom import dcmread
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag, Tag

from appliance.services.dicom_json import CODECS, dataset_element_json
from appliance.services.pixel_frames import PIXEL_TAGS

log = logging.getLogger(__name__)

BULK_THRESHOLD = 1024
BULK_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
PIXEL_DATA = Tag(0x7FE0, 0x0010)
_DEFLATED = "1.2.840.10008.1.2.1.99"
_IMPLICIT = "1.2.840.10008.1.2"
_BIG_ENDIAN = "1.2.840.10008.1.2.2"
_UNDEFINED = 0xFFFFFFFF
_TEMP_PREFIX = ".building-"
STALE_TEMP_SECONDS = 3600.0
IN_USE_SECONDS = 60.0  # a file used this recently may be about to be read
# Bumped whenever the JSON written changes, so that no file of an earlier build is served.
# 2: no NaN or Infinity (non-finite DS/FL/FD values are answered empty: dicom_json).
# 3: bytes a text value's character set cannot read are read as Latin-1 (dicom_json).
FORMAT = 3


def instance_url(base: str, study_uid: str, series_uid: str, sop_uid: str) -> str:
    return f"{base}/dicom-web/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}"


def instance_json(path: Path, transfer_syntax: str, url: str) -> dict[str, Any]:
    """The DICOM JSON object of one stored instance, bulk data as URIs under `url`."""
    with path.open("rb") as fh:
        if transfer_syntax == _DEFLATED:  # inflated in memory by pydicom: no file position
            ds = dcmread(fh, defer_size=BULK_THRESHOLD)
            pixels = next(((tag, ds[tag].VR) for tag in PIXEL_TAGS if tag in ds), None)
            if pixels is not None:
                del ds[pixels[0]]
        else:
            ds = dcmread(fh, stop_before_pixels=True, defer_size=BULK_THRESHOLD)
            pixels = _pixels(fh, implicit=transfer_syntax == _IMPLICIT,
                             big_endian=transfer_syntax == _BIG_ENDIAN)
    try:
        charset = ds.get("SpecificCharacterSet")
    except Exception:  # a malformed value (an unknown VR): read as the default repertoire
        charset = None
    codec = CODECS.get(charset or "") if charset is None or isinstance(charset, str) else None
    out: dict[str, Any] = {}
    for tag in sorted(ds.keys()):
        out[f"{tag:08X}"] = _element_json(ds, tag, url, codec)
    if pixels is not None:
        tag, vr = pixels
        out[f"{tag:08X}"] = {"vr": vr, "BulkDataURI": f"{url}/bulkdata/{tag:08X}"}
    return out


def _pixels(fh: BinaryIO, *, implicit: bool, big_endian: bool) -> tuple[int, str] | None:
    """The tag and VR of the pixel element where pydicom stopped (Pixel Data, or a
    parametric map's Float or Double Float Pixel Data); None if there is none."""
    header = fh.read(6)
    if len(header) < 4:
        return None
    group, element = struct.unpack(">HH" if big_endian else "<HH", header[:4])
    tag = group << 16 | element
    if tag not in PIXEL_TAGS:
        return None
    if implicit:
        return tag, PIXEL_TAGS[tag]
    vr = header[4:6].decode("ascii", "replace")
    if tag == PIXEL_DATA:
        return tag, vr if vr in ("OB", "OW") else "OB"
    return tag, PIXEL_TAGS[tag]


def _element_json(ds: Dataset, tag: BaseTag, url: str, codec: str | None) -> dict[str, Any]:
    raw = ds.get_item(tag, keep_deferred=True)  # read (and converted) in the try below
    vr = getattr(raw, "VR", None) or _dictionary_vr(tag)
    if vr in BULK_VRS:
        length = raw.length if isinstance(raw, RawDataElement) else len(raw.value or b"")
        if length == _UNDEFINED or length > BULK_THRESHOLD:
            return {"vr": vr, "BulkDataURI": f"{url}/bulkdata/{tag:08X}"}
    try:
        return dataset_element_json(ds, tag, codec)
    except Exception:  # a malformed value: answer the element empty rather than fail
        log.debug("metadata element could not be encoded tag=%08X", tag)
        return {"vr": vr}


def _dictionary_vr(tag: BaseTag) -> str:
    try:
        return dictionary_VR(tag).split(" ")[0]
    except KeyError:
        return "UN"


class SeriesMetadataCache:
    def __init__(self, root: Path, *, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes

    def series_file(self, series_uid: str, instances: Iterable[tuple[str, str, Path, str]],
                    base: str, study_uid: str) -> Path:
        """The gzipped JSON array of a series, built if missing or stale.

        `instances` are (SOP Instance UID, content SHA-256, path, transfer syntax),
        all on local disk."""
        members = sorted(instances)
        target = self._name(series_uid, [(sop, sha) for sop, sha, _, _ in members], base)
        if self._used(target):
            return target
        key, folder = target.name.split("-")[0], target.parent
        folder.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(dir=folder, prefix=f"{_TEMP_PREFIX}{key}-")
        try:
            with os.fdopen(fd, "wb") as raw:
                with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6, mtime=0) as out:
                    out.write(b"[")
                    for number, (sop_uid, _, path, syntax) in enumerate(members):
                        url = instance_url(base, study_uid, series_uid, sop_uid)
                        if number:
                            out.write(b",")
                        out.write(json.dumps(instance_json(path, syntax, url),
                                             separators=(",", ":"), allow_nan=False).encode())
                    out.write(b"]")
                # Its contents durable before its name: a power cut after the rename
                # must not leave an empty file that every later request is answered from.
                raw.flush()
                os.fdatasync(raw.fileno())
            os.replace(temp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
        for stale in folder.glob(f"{key}-*.json.gz"):
            if stale != target:
                with contextlib.suppress(OSError):
                    stale.unlink()
        cutoff = time.time() - STALE_TEMP_SECONDS  # a crashed build's leftovers, not a running one
        for left in folder.glob(f"{_TEMP_PREFIX}{key}-*"):
            with contextlib.suppress(OSError):
                if left.stat().st_mtime < cutoff:
                    left.unlink()
        self.trim()
        return target

    def cached_file(self, series_uid: str, instances: Iterable[tuple[str, str]],
                    base: str) -> Path | None:
        """The series' file if it is cached, never built: `instances` are (SOP Instance
        UID, content SHA-256) from the index, so this answers for a series whose files
        are not on local disk (an evicted study, its recall running)."""
        target = self._name(series_uid, sorted(instances), base)
        return target if self._used(target) else None

    def _name(self, series_uid: str, members: list[tuple[str, str]], base: str) -> Path:
        key = hashlib.sha256(series_uid.encode()).hexdigest()[:32]
        digest = hashlib.sha256(f"{FORMAT}\n{base}".encode())
        for sop_uid, sha256 in members:
            digest.update(f"\n{sop_uid}:{sha256}".encode())
        return self.root / key[:2] / f"{key}-{digest.hexdigest()[:32]}.json.gz"

    @staticmethod
    def _used(target: Path) -> bool:
        """Whether `target` exists with contents, marking it used now (the last to go in
        a trim). An empty one is what a power cut leaves of a file written before its
        contents were synced (by an older version): it is built again."""
        try:
            if not os.stat(target).st_size:
                return False
            os.utime(target)
        except FileNotFoundError:
            return False
        return True

    def trim(self) -> int:
        """Remove the least recently used series files until the cache fits `max_bytes`,
        sparing those used in the last IN_USE_SECONDS; returns how many went."""
        entries: list[tuple[float, int, str]] = []
        with contextlib.suppress(FileNotFoundError), os.scandir(self.root) as folders:
            for folder in folders:
                if not folder.is_dir(follow_symlinks=False):
                    continue
                with contextlib.suppress(FileNotFoundError), os.scandir(folder.path) as files:
                    for entry in files:
                        if entry.name.endswith(".json.gz"):
                            with contextlib.suppress(FileNotFoundError):
                                stat = entry.stat(follow_symlinks=False)
                                entries.append((stat.st_mtime, stat.st_size, entry.path))
        total = sum(size for _, size, _ in entries)
        recent = time.time() - IN_USE_SECONDS
        removed = 0
        for mtime, size, path in sorted(entries):
            if total <= self.max_bytes or mtime >= recent:
                break
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
                removed += 1
            total -= size
        if removed:
            log.info("metadata cache trimmed files=%d bytes_left=%d", removed, total)
        return removed
