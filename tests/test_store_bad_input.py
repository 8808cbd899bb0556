"""Bad input gets the right DICOM status or rejection, and the server keeps serving."""

from __future__ import annotations

import json
import socket
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import dicomgen
import pydicom
import pytest
from conftest import EdgeServer
from pydicom.filereader import read_file_meta_info
from pynetdicom import AE

SUCCESS = 0x0000
CANNOT_UNDERSTAND = 0xC000
DOES_NOT_MATCH_SOP_CLASS = 0xA900
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def send_raw(server: EdgeServer, path: Path) -> int:
    return int(store_response(server, path).Status)


def store_response(server: EdgeServer, path: Path) -> pydicom.Dataset:
    """The C-STORE response pynetdicom gets for the file at `path`, sent as it is."""
    return store_responses(server, path, times=1)[0]


def send_raw_repeatedly(server: EdgeServer, path: Path, *, times: int) -> list[int]:
    """The statuses of `times` C-STOREs of `path`'s dataset bytes on one association."""
    return [int(response.Status) for response in store_responses(server, path, times=times)]


def store_responses(server: EdgeServer, path: Path, *, times: int) -> list[pydicom.Dataset]:
    """The responses to `times` C-STOREs of the file at `path`, sent as it is, on one
    association."""
    with pydicom.config.disable_value_validation():
        meta = read_file_meta_info(path)
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
        assoc = ae.associate(server.host, server.port, ae_title=server.ae_title)
        assert assoc.is_established
        try:
            return [assoc.send_c_store(path) for _ in range(times)]
        finally:
            assoc.release()


def make_cut_instance(folder: Path, *, cut: int) -> Path:
    """A small Explicit VR LE image, its last `cut` bytes cut off. Its Pixel Data (16
    bytes, 28 with its header) comes last, after Pixel Representation (US): 30 cuts
    leave Pixel Representation's header without its value, 1 leaves Pixel Data one
    byte short."""
    ds = pydicom.Dataset()
    ds.SOPClassUID = SECONDARY_CAPTURE
    ds.SOPInstanceUID = dicomgen.make_uid(410, "cut", cut)
    ds.StudyInstanceUID = dicomgen.make_uid(410, "study")
    ds.SeriesInstanceUID = dicomgen.make_uid(410, "series")
    ds.PatientName, ds.PatientID, ds.Modality = "CUT^LAST", "CUT410", "OT"
    ds.Rows = ds.Columns = 4
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.PixelData = bytes(16)
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = SECONDARY_CAPTURE
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    whole = folder / "whole.dcm"
    ds.save_as(whole, enforce_file_format=True)
    path = folder / f"cut-{cut}.dcm"
    path.write_bytes(whole.read_bytes()[:-cut])
    return path


def instance_count(server: EdgeServer) -> int:
    return int(json.loads(server.cli("status", "--json").stdout)["instances"])


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda d: dicomgen.make_bad_uid_instance(d, kind="traversal"), CANNOT_UNDERSTAND),
        (lambda d: dicomgen.make_bad_uid_instance(d, kind="letters"), CANNOT_UNDERSTAND),
        (lambda d: dicomgen.make_bad_uid_instance(d, kind="letters",
                                                  keyword="StudyInstanceUID"), CANNOT_UNDERSTAND),
        (dicomgen.make_truncated_instance, CANNOT_UNDERSTAND),
        (lambda d: make_cut_instance(d, cut=30), CANNOT_UNDERSTAND),
        (lambda d: make_cut_instance(d, cut=1), CANNOT_UNDERSTAND),
        (dicomgen.make_garbage_payload, CANNOT_UNDERSTAND),
        (dicomgen.make_deeply_nested_instance, CANNOT_UNDERSTAND),
    ],
    ids=["uid-traversal", "uid-letters", "study-uid-letters", "truncated",
         "cut-in-last-element-header", "cut-in-last-element-value", "non-dicom",
         "sequences-nested-1000-deep"],
)
def test_unusable_dataset_is_refused_and_nothing_is_kept(
    refusing_edge_server: EdgeServer, raw_sender: None, tmp_path: Path, make: object,
    expected: int,
) -> None:
    server = refusing_edge_server
    refusals = server.log().count("cannot understand")
    path = make(tmp_path)  # type: ignore[operator]
    assert send_raw(server, path) == expected
    assert instance_count(server) == 0
    assert not any((server.home / "store").rglob("*.dcm"))
    assert server.log().count("cannot understand") > refusals
    assert not Path("/tmp/pacs-edge-escape").exists()
    assert server.echo().ok


def test_dataset_that_contradicts_its_request_is_refused(
    edge_server: EdgeServer, raw_sender: None, tmp_path: Path,
    small_study: list[dicomgen.GeneratedInstance],
) -> None:
    forged = dicomgen.forged_copy(small_study[0].path, tmp_path / "forged.dcm")
    assert send_raw(edge_server, forged) == DOES_NOT_MATCH_SOP_CLASS
    assert instance_count(edge_server) == 0
    assert send_raw(edge_server, small_study[0].path) == SUCCESS


@pytest.mark.parametrize(
    "payload",
    [
        b"GET / HTTP/1.1\r\nHost: pacs\r\n\r\n",
        b"\x09\x00\x00\x00\x00\x04abcd",  # unknown PDU type
        b"\x04\x00\x00\x00\x00\x10\x00\x00",  # P-DATA before any association
        b"\x01\x00",  # truncated header, then close
    ],
    ids=["http", "unknown-pdu", "pdata-first", "truncated-header"],
)
def test_malformed_traffic_is_dropped_and_the_server_keeps_serving(
    edge_server: EdgeServer, payload: bytes
) -> None:
    with socket.create_connection((edge_server.host, edge_server.port), timeout=10) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(10)
        while sock.recv(4096):  # the server answers (A-ABORT) or just closes; never hangs
            pass
    assert edge_server.echo().ok


def test_an_instance_whose_series_belongs_to_another_study_is_refused_saying_so(
    edge_server: EdgeServer, tmp_path: Path,
) -> None:
    """It was filed under the other study (the series row kept its study): the C-STORE
    succeeded, a C-GET of its own study found nothing, one of the other study found it.
    Then its 0xC000 came without an Error Comment: to the sender, a well-formed
    instance refused as if it could not be parsed."""
    first = dicomgen.make_study(tmp_path / "first", seed=91, series_per_study=1,
                                instances_per_series=1, size=16)[0]
    other = dicomgen.make_study(tmp_path / "other", seed=92, series_per_study=1,
                                instances_per_series=1, size=16)[0]
    dataset = pydicom.dcmread(other.path)
    dataset.SeriesInstanceUID = first.header.SeriesInstanceUID
    borrowed = tmp_path / "borrowed-series.dcm"
    dataset.save_as(borrowed, enforce_file_format=True)
    assert send_raw(edge_server, first.path) == SUCCESS
    refused = store_response(edge_server, borrowed)
    assert (refused.Status, refused.ErrorComment) == (
        CANNOT_UNDERSTAND, "Series Instance UID belongs to another study on this box")
    assert instance_count(edge_server) == 1
    assert len(list((edge_server.home / "store").rglob("*.dcm"))) == 1
    assert "Series Instance UID belongs to another study" in edge_server.log()
    fsck = edge_server.cli("fsck")
    assert "consistent" in fsck.stdout


def test_truncated_instances_arriving_alongside_whole_ones_refuse_only_themselves(
    edge_server: EdgeServer, raw_sender: None, tmp_path: Path,
) -> None:
    """pydicom reads both (a Patient's Name outside ASCII; Pixel Data cut before its
    sequence delimiter, which pydicom remarks on). Each association's reads once
    swapped the process's warnings filters and hook (warnings.catch_warnings) and put
    back what another had set: a whole instance was refused as truncated (the other's
    remark reached its list), and after the storm a filter stayed installed for good."""
    whole = dicomgen.make_non_ascii_instance(tmp_path).path
    cine = dicomgen.make_fragmented_cine(tmp_path / "cine").path
    truncated = tmp_path / "truncated-cine.dcm"
    truncated.write_bytes(cine.read_bytes()[:-5000])
    senders, sends = 6, 300
    start = threading.Barrier(senders)

    def sender(number: int) -> list[int]:
        start.wait()
        return send_raw_repeatedly(edge_server, truncated if number % 2 else whole,
                                   times=sends)

    with ThreadPoolExecutor(senders) as pool:
        statuses = list(pool.map(sender, range(senders)))
    answered = [Counter(answers) for answers in statuses]
    assert answered == [{SUCCESS: sends}, {CANNOT_UNDERSTAND: sends}] * (senders // 2)
    assert instance_count(edge_server) == 1
