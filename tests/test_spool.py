"""SpoolFile: hashes only the dataset bytes as they arrive, and survives a full disk."""

from __future__ import annotations

import errno
import hashlib
import io
import os
from pathlib import Path

import pytest
from pydicom.filewriter import write_file_meta_info
from pynetdicom.dsutils import create_file_meta

from appliance.store.spool import SpoolFile, dataset_offset


def _meta_bytes() -> bytes:
    buffer = io.BytesIO()
    buffer.write(b"\x00" * 128 + b"DICM")
    meta = create_file_meta(
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        sop_instance_uid="1.2.3.4",
        transfer_syntax="1.2.840.10008.1.2.1",
    )
    write_file_meta_info(buffer, meta, enforce_standard=True)  # type: ignore[arg-type]
    return buffer.getvalue()


@pytest.mark.parametrize("chunk", [1, 7, 144, 145, 4096, 1 << 20])
def test_dataset_hash_ignores_file_meta_whatever_the_chunking(tmp_path: Path, chunk: int) -> None:
    meta = _meta_bytes()
    dataset = bytes(range(256)) * 300
    stream = meta + dataset
    spool = SpoolFile(tmp_path)
    for start in range(0, len(stream), chunk):
        spool.write(stream[start : start + chunk])
    spool.sync()
    assert spool.meta_end == len(meta) == dataset_offset(stream[:144])
    assert spool.dataset_sha256 == hashlib.sha256(dataset).hexdigest()
    assert Path(spool.name).read_bytes() == stream
    spool.discard()
    assert not Path(spool.name).exists()


def test_bytes_the_caller_may_change_are_hashed_as_written(tmp_path: Path) -> None:
    """Hashing waits for the fsync only for bytes that cannot change (`bytes`, or
    `owned`): a reused buffer is hashed as it was when written."""
    meta, dataset = _meta_bytes(), bytes(range(256)) * 64
    spool = SpoolFile(tmp_path)
    spool.write(meta)
    buffer = bytearray(dataset)
    spool.write(buffer)
    buffer[:] = b"\xff" * len(buffer)  # the caller reuses its buffer
    owned = bytearray(dataset)
    spool.write(memoryview(owned)[:100], owned=True)
    spool.write(memoryview(owned)[100:], owned=True)
    assert spool.dataset_sha256 == hashlib.sha256(dataset + dataset).hexdigest()
    spool.discard()


@pytest.mark.parametrize("mb", [1, 5])
def test_owned_bytes_beyond_the_deferred_share_are_hashed_in_order(tmp_path: Path,
                                                                   mb: int) -> None:
    meta, block = _meta_bytes(), os.urandom(1 << 17)
    spool = SpoolFile(tmp_path)
    spool.write(meta)
    for _ in range(mb * 8):
        spool.write(bytearray(block), owned=True)
    assert spool.dataset_sha256 == hashlib.sha256(block * (mb * 8)).hexdigest()
    spool.discard()


def test_non_part10_stream_has_no_dataset_hash(tmp_path: Path) -> None:
    spool = SpoolFile(tmp_path)
    spool.write(b"this is not DICOM" * 20)
    assert spool.dataset_sha256 is None
    spool.discard()


def test_disk_full_is_recorded_not_raised(tmp_path: Path) -> None:
    spool = SpoolFile(tmp_path)
    # /dev/full answers every write with ENOSPC: the kernel's own disk-full error.
    spool._fh.close()
    spool._fh = open("/dev/full", "wb", buffering=0)  # noqa: SIM115
    assert spool.write(b"x" * 10) == 10
    assert spool.error is not None and spool.error.errno == errno.ENOSPC
    assert spool.write(b"more") == 4  # later fragments are dropped quietly
    with pytest.raises(OSError):
        spool.sync()
    spool.discard()


def test_spool_that_cannot_be_created_refuses_instead_of_raising(tmp_path: Path) -> None:
    missing = tmp_path / "gone"
    spool = SpoolFile(missing)
    assert spool.error is not None
    assert spool.write(b"data") == 4
    with pytest.raises(OSError):
        spool.sync()
    spool.discard()


def test_a_sync_started_early_is_the_one_ingest_joins_and_close_waits_for_it(
        tmp_path: Path) -> None:
    spool = SpoolFile(tmp_path)
    spool.write(_meta_bytes() + b"dataset")
    started = spool.start_sync()
    assert spool.start_sync() is started  # a second call shares the running fsync
    spool.close()
    assert started.done() and started.exception() is None
    assert Path(spool.name).read_bytes().endswith(b"dataset")


def test_an_early_sync_of_a_failed_spool_carries_its_error(tmp_path: Path) -> None:
    spool = SpoolFile(tmp_path / "missing")  # cannot be created: recorded, not raised
    failed = spool.start_sync()
    spool.close()
    assert isinstance(failed.exception(), OSError)


def test_read_fd_reads_what_was_written_and_is_none_once_closed(tmp_path: Path) -> None:
    spool = SpoolFile(tmp_path)
    spool.write(_meta_bytes() + b"dataset")
    fd = spool.read_fd
    assert fd is not None
    assert os.pread(fd, 7, spool.size - 7) == b"dataset"
    spool.close()
    assert spool.read_fd is None
    spool.discard()
