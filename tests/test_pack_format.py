"""The cloud pack format (sync.pack): round trips, range reads, tamper detection,
bounded memory and PHI-free names. Pure unit tests with real cryptography."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import struct
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.store.instance_header import InstanceHeader
from sync.pack import naming
from sync.pack.data_keys import new_data_key, new_pack_id
from sync.pack.manifest import (
    InstanceAttributes,
    Manifest,
    SeriesAttributes,
    StudyAttributes,
    open_manifest,
    seal_manifest,
)
from sync.pack.pack_errors import (
    PackFormatError,
    PackIntegrityError,
    PackSourceError,
    TruncatedPackError,
)
from sync.pack.reader import (
    decrypt_pack,
    iter_instance,
    read_instance,
    unpack_instances,
    verify_instance,
)
from sync.pack.segments import (
    HEADER_SIZE,
    TAG_SIZE,
    PackHeader,
    decrypt_range,
    pack_size,
    plaintext_size_of,
    plan_range,
    segment_blob_offset,
    segment_count,
)
from sync.pack.writer import PackWriter

STUDY_UID = "1.2.826.0.1.3680043.8.498.10123456789012345678"
STUDY = StudyAttributes(
    patient_id="PID-4711", issuer_of_patient_id="HOSP", patient_name="Müller^Jürgen",
    birth_date="19700101", sex="M", study_uid=STUDY_UID, study_date="20240102",
    study_time="101500", accession_number="ACC123", study_id="S1",
    study_description="CT Thorax", referring_physician="Smith^Anna",
    character_set="ISO_IR 192",
)


# (0002,0010) Transfer Syntax UID, the only File Meta element after the group length
META_REST = b"\x02\x00\x10\x00UI\x14\x00" + b"1.2.840.10008.1.2.1\x00"
META = 128 + 4 + 12 + len(META_REST)  # where the dataset starts


def part10_bytes(n: int, dataset_size: int) -> bytes:
    """A synthetic Part 10 file: preamble, DICM, a File Meta group, random dataset bytes."""
    group_length = b"\x02\x00\x00\x00UL\x04\x00" + struct.pack("<I", len(META_REST))
    return b"\x00" * 128 + b"DICM" + group_length + META_REST + os.urandom(dataset_size)


def attrs(n: int, series: int = 1) -> InstanceAttributes:
    return InstanceAttributes(
        SeriesAttributes(series_uid=f"{STUDY_UID}.{series}", modality="CT",
                         series_number=series, series_description="Axial",
                         body_part="CHEST", series_date="20240102", series_time="101600"),
        sop_uid=f"{STUDY_UID}.{series}.{n}", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        instance_number=n, transfer_syntax="1.2.840.10008.1.2.1",
        received_at=1_700_000_000.0 + n, source_ae="CTSCANNER",
    )


@pytest.fixture
def files(tmp_path: Path) -> list[Path]:
    """Instance files of assorted sizes (one 4096 bytes long, one with an empty dataset)."""
    sizes = [0, 1, 1000, 4096 - META, 10_000, 70_000, 5]
    paths = []
    for n, size in enumerate(sizes):
        path = tmp_path / f"i{n}.dcm"
        path.write_bytes(part10_bytes(n, size))
        paths.append(path)
    return paths


def write_pack(files: list[Path], segment_size: int, *, data_key: bytes | None = None,
               pack_id: bytes | None = None) -> tuple[bytes, Manifest, bytes]:
    data_key = data_key or new_data_key()
    writer = PackWriter(data_key, pack_id or new_pack_id(), segment_size)
    for n, path in enumerate(files):
        writer.feed_file(path, attrs(n, series=1 + n % 2))
    blob = b"".join(writer.chunks())
    return blob, writer.manifest(STUDY, study_version=1, created_at=1_700_000_100.0), data_key


def rechunk(blob: bytes, size: int) -> Iterator[bytes]:
    for start in range(0, len(blob), size):
        yield blob[start:start + size]


def unpack_files(data_key: bytes, blob: bytes, manifest: Manifest,
                 chunk: int = 777) -> list[bytes]:
    out: list[bytes] = []
    current = bytearray()
    for piece in unpack_instances(data_key, rechunk(blob, chunk), manifest):
        current += piece.data
        if piece.last:
            out.append(bytes(current))
            current.clear()
    return out


def segments(blob: bytes, segment_size: int) -> list[bytes]:
    stride = segment_size + TAG_SIZE
    return [blob[i:i + stride] for i in range(HEADER_SIZE, len(blob), stride)]


# --- round trips ----------------------------------------------------------------


@pytest.mark.parametrize("segment_size", [64, 4096, 1 << 20])
def test_pack_round_trip_streams_every_instance_byte_identical(files, segment_size):
    blob, manifest, key = write_pack(files, segment_size)
    plaintext = b"".join(p.read_bytes() for p in files)
    assert len(blob) == pack_size(len(plaintext), segment_size) == manifest.pack_size
    assert manifest.pack_sha256 == hashlib.sha256(blob).hexdigest()
    assert plaintext_size_of(len(blob), segment_size) == len(plaintext)

    sealed = seal_manifest(manifest, key)
    opened = open_manifest(sealed, key, expected_pack_id=manifest.pack_id)
    assert opened == manifest
    assert unpack_files(key, blob, opened) == [p.read_bytes() for p in files]
    assert b"".join(decrypt_pack(key, rechunk(blob, 5000))) == plaintext


def test_manifest_offsets_and_hashes_match_the_files(files):
    _, manifest, _ = write_pack(files, 4096)
    offset = 0
    for path, entry in zip(files, manifest.instances, strict=True):
        data = path.read_bytes()
        assert (entry.offset, entry.length, entry.dataset_offset) == (offset, len(data), META)
        assert entry.sha256 == hashlib.sha256(data[META:]).hexdigest()
        verify_instance(entry, data)
        offset += len(data)


def test_plaintext_multiple_of_segment_size_ends_on_a_full_final_segment(tmp_path):
    path = tmp_path / "a.dcm"
    path.write_bytes(part10_bytes(0, 4096 * 3 - META))
    blob, manifest, key = write_pack([path], 4096)
    assert segment_count(4096 * 3, 4096) == 3
    assert len(blob) == HEADER_SIZE + 3 * (4096 + TAG_SIZE)
    assert unpack_files(key, blob, manifest) == [path.read_bytes()]


def test_empty_pack_is_one_authenticated_empty_segment():
    key, pack_id = new_data_key(), new_pack_id()
    writer = PackWriter(key, pack_id, 4096)
    blob = b"".join(writer.chunks())
    assert len(blob) == HEADER_SIZE + TAG_SIZE
    assert b"".join(decrypt_pack(key, [blob])) == b""
    with pytest.raises(TruncatedPackError):
        list(decrypt_pack(key, [blob[:HEADER_SIZE]]))


def test_writer_refuses_a_file_that_differs_from_the_index(files):
    writer = PackWriter(new_data_key(), new_pack_id(), 4096)
    writer.feed_file(files[2], attrs(2), dataset_sha256="0" * 64)
    with pytest.raises(PackSourceError, match="SHA-256 differs"):
        b"".join(writer.chunks())


def test_writer_refuses_a_file_that_changed_size(files):
    writer = PackWriter(new_data_key(), new_pack_id(), 4096)
    writer.feed_file(files[3], attrs(3))
    with files[3].open("ab") as fh:
        fh.write(b"more")
    with pytest.raises(PackSourceError, match="grew"):
        b"".join(writer.chunks())


def test_writer_accepts_the_index_hash_and_offset(files):
    data = files[4].read_bytes()
    writer = PackWriter(new_data_key(), new_pack_id(), 4096)
    digest = hashlib.sha256(data[META:]).hexdigest()
    slot = writer.feed_file(files[4], attrs(4), dataset_offset=META,
                            dataset_sha256=digest.upper())
    b"".join(writer.chunks())
    assert (slot.offset, slot.length, slot.dataset_offset) == (0, len(data), META)
    assert writer.result.dataset_sha256 == (digest,)


# --- range reads ----------------------------------------------------------------


class RecordingBlob:
    """A blob with an open_range that records what was fetched."""

    def __init__(self, blob: bytes) -> None:
        self.blob = blob
        self.ranges: list[tuple[int, int]] = []

    def fetch(self, offset: int, length: int) -> bytes:
        self.ranges.append((offset, length))
        return self.blob[offset:offset + length]


@pytest.mark.parametrize("segment_size", [64, 4096])
def test_range_read_fetches_only_the_segments_of_one_instance(files, segment_size):
    blob, manifest, key = write_pack(files, segment_size)
    entry = manifest.instances[5]  # 70 kB, in the middle of the pack
    store = RecordingBlob(blob)
    assert read_instance(store.fetch, key, manifest, entry) == files[5].read_bytes()

    stride = segment_size + TAG_SIZE
    first = entry.offset // segment_size
    last = (entry.offset + entry.length - 1) // segment_size
    allowed = range(segment_blob_offset(first, segment_size),
                    segment_blob_offset(last, segment_size) + stride)
    fetched = sum(length for _, length in store.ranges)
    assert fetched == (last - first + 1) * stride
    for offset, length in store.ranges:
        assert offset in allowed and offset + length <= allowed.stop
    assert fetched <= entry.length + 2 * segment_size + (last - first + 1) * TAG_SIZE


def test_range_read_of_first_last_and_empty_instances(files):
    blob, manifest, key = write_pack(files, 4096)
    store = RecordingBlob(blob)
    for n in (0, 1, len(files) - 1):
        assert read_instance(store.fetch, key, manifest, manifest.instances[n]) \
            == files[n].read_bytes()


def test_range_read_in_bounded_steps_yields_the_same_bytes(files):
    blob, manifest, key = write_pack(files, 64)
    store = RecordingBlob(blob)
    pieces = list(iter_instance(store.fetch, key, manifest, manifest.instances[5],
                                segments_per_fetch=3))
    assert b"".join(pieces) == files[5].read_bytes()
    assert max(length for _, length in store.ranges) <= 3 * (64 + TAG_SIZE)
    ends = [o + n for o, n in store.ranges]
    assert all(a <= b for a, b in zip(ends, [o for o, _ in store.ranges][1:], strict=False))


def test_plan_range_arithmetic_worked_example():
    # The example of docs/cloud-format.md: 1 MiB segments, an instance at
    # plaintext offset 3,000,000 of 524,288 bytes in a 5,000,000-byte pack.
    plan = plan_range(3_000_000, 524_288, segment_size=1 << 20, plaintext_size=5_000_000)
    assert (plan.first_segment, plan.last_segment, plan.final_segment) == (2, 3, 4)
    assert plan.blob_offset == 32 + 2 * (1_048_576 + 16) == 2_097_216
    assert plan.blob_length == 2 * (1_048_576 + 16) == 2_097_184
    assert plan.skip == 3_000_000 - 2 * 1_048_576 == 902_848
    last = plan_range(4_999_000, 1_000, segment_size=1 << 20, plaintext_size=5_000_000)
    assert (last.first_segment, last.last_segment) == (4, 4)
    assert last.blob_length == 5_000_000 - 4 * 1_048_576 + 16


def test_range_read_from_a_tampered_segment_fails(files):
    blob, manifest, key = write_pack(files, 4096)
    entry = manifest.instances[5]
    plan = plan_range(entry.offset, entry.length, segment_size=4096,
                      plaintext_size=manifest.plaintext_size)
    bad = bytearray(blob)
    bad[plan.blob_offset + 100] ^= 0x01
    with pytest.raises(PackIntegrityError):
        read_instance(RecordingBlob(bytes(bad)).fetch, key, manifest, entry)
    with pytest.raises(PackIntegrityError, match="range read returned"):
        decrypt_range(key, PackHeader(manifest.pack_id, 4096), plan,
                      blob[plan.blob_offset:plan.blob_offset + plan.blob_length - 1])


# --- tamper detection -----------------------------------------------------------


def test_pack_with_its_last_segment_dropped_is_truncated(files):
    blob, manifest, key = write_pack(files, 4096)
    last = segments(blob, 4096)[-1]
    with pytest.raises(TruncatedPackError, match="not its final segment"):
        list(decrypt_pack(key, [blob[:-len(last)]]))
    with pytest.raises(PackIntegrityError):
        unpack_files(key, blob[:-len(last)], manifest)


def test_pack_cut_mid_segment_fails(files):
    blob, manifest, key = write_pack(files, 4096)
    for cut in (1, 100, 4096):
        with pytest.raises(PackIntegrityError):
            list(decrypt_pack(key, [blob[:-cut]]))
        with pytest.raises(PackIntegrityError):
            unpack_files(key, blob[:-cut], manifest)
    with pytest.raises(PackIntegrityError):
        plaintext_size_of(HEADER_SIZE + 4096 + TAG_SIZE + 3, 4096)


def test_pack_with_reordered_segments_fails(files):
    blob, _, key = write_pack(files, 4096)
    segs = segments(blob, 4096)
    swapped = blob[:HEADER_SIZE] + segs[1] + segs[0] + b"".join(segs[2:])
    with pytest.raises(PackIntegrityError, match="segment 0"):
        list(decrypt_pack(key, [swapped]))


def test_segment_swapped_in_from_another_pack_fails_even_under_the_same_key(files):
    key = new_data_key()
    blob_a, _, _ = write_pack(files, 4096, data_key=key)
    blob_b, _, _ = write_pack(files, 4096, data_key=key)  # a reused key: worst case
    segs_a, segs_b = segments(blob_a, 4096), segments(blob_b, 4096)
    mixed = blob_a[:HEADER_SIZE] + segs_a[0] + segs_b[1] + b"".join(segs_a[2:])
    with pytest.raises(PackIntegrityError, match="segment 1"):
        list(decrypt_pack(key, [mixed]))
    # and a header swapped from the other pack breaks every segment
    with pytest.raises(PackIntegrityError):
        list(decrypt_pack(key, [blob_b[:HEADER_SIZE] + blob_a[HEADER_SIZE:]]))


@pytest.mark.parametrize("where", [HEADER_SIZE - 5, HEADER_SIZE + 10, -1, -20])
def test_flipped_byte_anywhere_fails(files, where):
    blob, manifest, key = write_pack(files, 4096)
    bad = bytearray(blob)
    bad[where] ^= 0x40
    with pytest.raises(PackIntegrityError):
        unpack_files(key, bytes(bad), manifest)


def test_pack_header_with_another_magic_or_reserved_bits_is_damage(files):
    blob, _, key = write_pack(files, 4096)
    for magic in (b"XXPACK01", b"PEPACK00", b"PEPACK0x"):
        with pytest.raises(PackIntegrityError, match="modified or damaged"):
            list(decrypt_pack(key, [magic + blob[8:]]))
    with pytest.raises(PackIntegrityError, match="reserved"):
        list(decrypt_pack(key, [blob[:31] + b"\x01" + blob[32:]]))


def test_a_magic_of_a_newer_format_version_asks_for_an_upgrade(files):
    blob, manifest, key = write_pack(files, 4096)
    with pytest.raises(PackFormatError, match=r"format 02.*upgrade"):
        list(decrypt_pack(key, [b"PEPACK02" + blob[8:]]))
    sealed = seal_manifest(manifest, key)
    with pytest.raises(PackFormatError, match=r"format 13.*upgrade"):
        open_manifest(b"PEMANI13" + sealed[8:], key)
    with pytest.raises(PackIntegrityError, match="modified or damaged"):
        open_manifest(b"PEMANI00" + sealed[8:], key)


def test_pack_of_another_pack_id_than_the_manifest_is_refused(files):
    key = new_data_key()
    blob_a, _, _ = write_pack(files, 4096, data_key=key)
    _, manifest_b, _ = write_pack(files, 4096, data_key=key)
    with pytest.raises(PackIntegrityError, match="pack id"):
        unpack_files(key, blob_a, manifest_b)


def test_manifest_from_another_pack_is_refused(files):
    _, manifest_a, key_a = write_pack(files, 4096)
    _, manifest_b, key_b = write_pack(files, 4096)
    sealed_b = seal_manifest(manifest_b, key_b)
    with pytest.raises(PackIntegrityError, match="another pack"):
        open_manifest(sealed_b, key_a, expected_pack_id=manifest_a.pack_id)
    # its envelope relabelled with pack A's id: the AAD catches it
    relabelled = sealed_b[:8] + manifest_a.pack_id + sealed_b[24:]
    with pytest.raises(PackIntegrityError):
        open_manifest(relabelled, key_b, expected_pack_id=manifest_a.pack_id)
    with pytest.raises(PackIntegrityError):
        open_manifest(sealed_b, key_a)


def test_manifest_with_a_flipped_byte_fails(files):
    _, manifest, key = write_pack(files, 4096)
    sealed = bytearray(seal_manifest(manifest, key))
    sealed[-30] ^= 0x01
    with pytest.raises(PackIntegrityError):
        open_manifest(bytes(sealed), key)


# --- manifest content -----------------------------------------------------------


def test_manifest_json_round_trip_keeps_text_and_missing_numbers(files):
    _, manifest, key = write_pack(files, 4096)
    entry = manifest.instances[0]
    odd = dataclasses.replace(entry, instance=dataclasses.replace(
        entry.instance, instance_number=None, received_at=None,
        series=dataclasses.replace(entry.instance.series, series_number=None)))
    manifest = dataclasses.replace(manifest, instances=(odd, *manifest.instances[1:]))
    opened = open_manifest(seal_manifest(manifest, key), key)
    assert opened == manifest
    assert opened.study.patient_name == "Müller^Jürgen"
    assert opened.to_json()["study"]["PatientID"] == "PID-4711"


def test_manifest_from_json_names_the_bad_field(files):
    _, manifest, _ = write_pack(files, 4096)
    data = manifest.to_json()
    with pytest.raises(PackFormatError, match="version 2"):
        Manifest.from_json({**data, "version": 2})
    broken = {**data, "study": {**data["study"], "PatientName": 5}}
    with pytest.raises(PackFormatError, match="PatientName"):
        Manifest.from_json(broken)
    gap = [{**data["instances"][0], "offset": 3}, *data["instances"][1:]]
    with pytest.raises(PackFormatError, match="contiguous"):
        Manifest.from_json({**data, "instances": gap})
    assert Manifest.from_json({**data, "added_later": [1]}) == manifest


def _seal_text(text: str, data_key: bytes, pack_id: bytes) -> bytes:
    """A manifest blob around any JSON text, made from the spec (docs/cloud-format.md)."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    aad, nonce = b"PEMANI01" + pack_id, os.urandom(12)
    return aad + nonce + AESGCM(data_key).encrypt(nonce, zlib.compress(text.encode()), aad)


def _one_segment(segment_size: int) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """The manifest with another segment size, its pack_size as for one segment."""
    return lambda data: {**data, "segment_size": segment_size,
                         "pack_size": HEADER_SIZE + data["plaintext_size"] + TAG_SIZE}


def _text(old: str, new: str) -> Callable[[str], str]:
    return lambda text: text.replace(old, new)


@pytest.mark.parametrize("edit_json, edit_text", [
    (_one_segment(0), None),
    (_one_segment(-5), None),
    (_one_segment(1 << 40), None),
    (None, _text('"created_at":1700000100.0', '"created_at":1' + "0" * 400)),
    (None, _text('"received_at":1700000000.0', '"received_at":Infinity')),
    (None, _text('"study_version":1', '"study_version":1' + "0" * 5000)),
    (None, lambda text: text[:-1] + ',"later":' + "[" * 100_000 + "]" * 100_000 + "}"),
], ids=["segment size 0", "negative segment size", "segment size over 64 MiB",
        "created_at beyond a float", "infinite received_at", "5,000-digit integer",
        "deep nesting"])
def test_an_authentic_manifest_outside_the_format_is_a_format_error_not_a_crash(
        files, edit_json, edit_text):
    """A manifest sealed with the right key but not as the format allows (a second
    writer's bug; against a reader, anyone who can write the container: reader key
    objects carry no origin) raised ZeroDivisionError, OverflowError, ValueError or
    RecursionError, which `reader list` does not catch, or was accepted with a segment
    size outside 1..64 MiB. Each is a PackFormatError now."""
    _, manifest, key = write_pack(files, 4096)
    data = manifest.to_json()
    text = json.dumps(edit_json(data) if edit_json else data, separators=(",", ":"))
    edited = edit_text(text) if edit_text else text
    assert edited != json.dumps(data, separators=(",", ":"))
    with pytest.raises(PackFormatError):
        open_manifest(_seal_text(edited, key, manifest.pack_id), key)


def test_manifest_lists_withdrawn_instances_only_when_there_are_some(files):
    """`withdrawn` (docs/cloud-format.md) round-trips; a manifest without any has no
    such key, so every manifest written before it reads and writes as it did."""
    _, manifest, key = write_pack(files, 4096)
    assert "withdrawn" not in manifest.to_json()
    withdrawing = dataclasses.replace(manifest, withdrawn=("1.2.3.4", "1.2.3.5"))
    assert withdrawing.to_json()["withdrawn"] == ["1.2.3.4", "1.2.3.5"]
    assert open_manifest(seal_manifest(withdrawing, key), key) == withdrawing
    with pytest.raises(PackFormatError, match="withdrawn"):
        Manifest.from_json({**manifest.to_json(), "withdrawn": [1]})
    with pytest.raises(PackFormatError, match="withdrawn"):
        Manifest.from_json({**manifest.to_json(), "withdrawn": "1.2.3.4"})


def test_manifest_carries_every_attribute_of_the_index_header():
    """A lost box is rebuilt from manifests: nothing InstanceHeader holds may be missing."""
    carried = {f.name for cls in (StudyAttributes, SeriesAttributes, InstanceAttributes)
               for f in dataclasses.fields(cls)}
    assert {f.name for f in dataclasses.fields(InstanceHeader)} <= carried


# --- bounded memory -------------------------------------------------------------


def test_writing_and_reading_200_mb_keeps_memory_bounded():
    """A correctness check, not a timing: streaming must never hold the pack."""
    total = 200 << 20
    piece = os.urandom(1 << 16)

    def generate() -> Iterator[bytes]:
        for _ in range(total // len(piece)):
            yield piece

    key, pack_id = new_data_key(), new_pack_id()
    writer = PackWriter(key, pack_id)  # default 1 MiB segments
    writer.feed(generate(), total, attributes=None, dataset_offset=0)
    tracemalloc.start()
    try:
        plain_bytes = 0
        for block in decrypt_pack(key, writer.chunks(), expected_pack_id=pack_id):
            plain_bytes += len(block)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert plain_bytes == total
    assert writer.result.pack_size == pack_size(total, 1 << 20)
    # A few 1 MiB segments in flight on each side (about 6 MiB measured), never the pack.
    assert peak < 8 << 20, f"peak {peak / 2**20:.1f} MiB"


# --- names ----------------------------------------------------------------------


def test_names_hold_no_uid_digits_and_only_allowed_characters():
    secret = b"\x07" * 32
    key = naming.study_key(secret, STUDY_UID)
    reader = naming.reader_id(b"\x01" * 32)
    names = [naming.pack_name(key, 1), naming.manifest_name(key, 1),
             naming.site_key_name(key, 12), naming.reader_key_name(key, 999_999, reader)]
    long_parts = [p for p in STUDY_UID.split(".") if len(p) >= 5]
    for name in names:
        assert re.fullmatch(r"[a-z0-9/._-]+", name)
        assert STUDY_UID not in name
        assert not any(part in name for part in long_parts)
        assert naming.parse_blob_name(name) is not None
    assert names[0] == f"studies/{key}/v000001.pack"
    assert names[3] == f"studies/{key}/v999999.keys/reader-{reader}"
    assert naming.parse_blob_name(names[3]) == naming.BlobName(key, 999_999, "reader-key",
                                                               reader)
    assert naming.parse_blob_name("studies/x/v1.pack") is None


def test_study_key_depends_on_the_secret_and_refuses_padded_uids():
    a = naming.study_key(b"a" * 32, STUDY_UID)
    assert a != naming.study_key(b"b" * 32, STUDY_UID)
    assert a == naming.study_key(b"a" * 32, STUDY_UID)
    assert len(a) == 32
    with pytest.raises(ValueError):
        naming.study_key(b"a" * 32, STUDY_UID + "\x00")
    with pytest.raises(ValueError):
        naming.pack_name(a, 0)


def test_known_answer_vectors_of_the_spec():
    """The test vectors printed in docs/cloud-format.md, for a second reader."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from sync.pack.segments import encrypt_segment, segment_aad, segment_nonce

    uid = "1.2.840.113619.2.55.3.604688119.969.1268071029.320"
    key = naming.study_key(bytes(range(32)), uid)
    assert key == "baead581801757bea8d4d977569fcb0a"
    assert naming.pack_name(key, 3) == f"studies/{key}/v000003.pack"
    assert naming.reader_id(bytes(range(32))) == "630dcd2966c43366"
    header = PackHeader(bytes(range(16)), 1 << 20).to_bytes()
    assert header == b"PEPACK01" + bytes(range(16)) + bytes.fromhex("0010000000000000")
    assert segment_nonce(2).hex() == "000000000000000000000002"
    assert segment_aad(header, 4, True) == header + bytes.fromhex("000000000000000401")
    segment = encrypt_segment(AESGCM(bytes(range(32))), header, 0, True, b"hello")
    assert segment.hex() == "66d9d9b2dae367c5e3b6ae9f6aabad381c71dd3e54"
    assert b"".join(decrypt_pack(bytes(range(32)), [header + segment])) == b"hello"
