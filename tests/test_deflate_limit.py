"""Deflated datasets are read with bounded memory; deflate bombs are refused on every path.

A Deflated Explicit VR Little Endian instance of 0.8 MB can inflate to 800 MB.
The server reads its header in bounded chunks and refuses it past
store.max_inflated_mb (0xA700 with an Error Comment over C-STORE, FailureReason
0xA700 over STOW-RS, rejected/ in the drop folder, a rejected line from
`pacs-edge import`). Each attack test
checks three things: memory stays bounded (the serve process's VmHWM, or the
import process's peak RSS), a legitimate peer is served during and after, and
nothing acknowledged before is lost.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import struct
import subprocess
import threading
import time
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import dcmtk
import dicomgen
import pydicom
import pytest
import webpeer
from conftest import EdgeServer, pacs_edge_command
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_file_meta_info
from pydicom.filewriter import write_file_meta_info
from pynetdicom import AE

from appliance.base.errors import InflateLimitExceeded, InvalidInstance
from appliance.services.deflated import MAX_DEPTH
from appliance.services.dicom_header import read_header

OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
EXPLICIT, DEFLATED = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99"
BOMB_BYTES = 800 << 20
MAX_GROWTH = 200 << 20  # what any attack may add to a process's peak memory
WAIT_SECONDS = 120.0


@pytest.fixture(scope="module")
def bombs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The three shapes of bomb: 800 MB of zeros in the Pixel Data or in a private element
    before the patient attributes, and 4 M empty sequence items (64 MB) before them."""
    folder = tmp_path_factory.mktemp("bombs")
    return {
        "pixels": dicomgen.make_deflate_bomb(folder, bulk="pixels", inflated_bytes=BOMB_BYTES),
        "private": dicomgen.make_deflate_bomb(folder, bulk="private", inflated_bytes=BOMB_BYTES),
        "items": dicomgen.make_deflate_bomb(folder, bulk="items", inflated_bytes=64 << 20),
    }


def send_file(server: EdgeServer, path: Path) -> Dataset:
    """C-STORE `path` in its own transfer syntax; the response's status dataset."""
    meta = read_file_meta_info(path)
    ae = AE(ae_title=dcmtk.TEST_AE)
    ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
    assoc = ae.associate(server.host, server.port, ae_title=server.ae_title)
    assert assoc.is_established
    try:
        return assoc.send_c_store(path)
    finally:
        assoc.release()


def peak_memory(pid: int) -> int:
    """The process's peak resident set size (VmHWM), bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc status")


def stored(home: Path) -> dict[str, str]:
    """sop_uid -> path in the store, from the server's index."""
    with sqlite3.connect(f"file:{home / 'index.sqlite3'}?mode=ro", uri=True) as db:
        return dict(db.execute("SELECT sop_uid, path FROM instances").fetchall())


def assert_stored_exactly(home: Path, sent: list[dicomgen.GeneratedInstance]) -> None:
    rows = stored(home)
    for inst in sent:
        assert inst.sop_instance_uid in rows
        kept = home / "store" / rows[inst.sop_instance_uid]
        assert dicomgen.dataset_bytes(kept) == dicomgen.dataset_bytes(inst.path)


def wait_until(what: str, check: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting until {what}", pytrace=False)
        time.sleep(0.1)


def deflated_instances(folder: Path, seed: int) -> list[dicomgen.GeneratedInstance]:
    return dicomgen.make_studies(folder, seed=seed, series_per_study=1, instances_per_series=2,
                                 modalities=("CT",), transfer_syntax="1.2.840.10008.1.2.1.99")


# --- the header reader -------------------------------------------------------------------


def test_deflated_header_reads_like_the_same_instance_uncompressed(tmp_path: Path) -> None:
    explicit = dicomgen.make_non_ascii_instance(tmp_path / "explicit")
    deflated = dicomgen.make_non_ascii_instance(tmp_path / "deflated",
                                                transfer_syntax="1.2.840.10008.1.2.1.99")
    plain, inflated = read_header(explicit.path), read_header(deflated.path)
    assert inflated.patient_name == "Müller^Jürgen"
    assert inflated.transfer_syntax == "1.2.840.10008.1.2.1.99"
    assert {**vars(inflated), "transfer_syntax": ""} == {**vars(plain), "transfer_syntax": ""}


def _element(group: int, element: int, vr: bytes, value: bytes) -> bytes:
    value += (b"\0" if vr == b"UI" else b" ") * (len(value) % 2)
    return struct.pack("<HH2sH", group, element, vr, len(value)) + value


def _part10(path: Path, dataset: bytes, syntax: str) -> Path:
    if syntax == DEFLATED:
        packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        dataset = packer.compress(dataset) + packer.flush()
        dataset += b"\0" * (len(dataset) % 2)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SECONDARY_CAPTURE
    meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.77.3"
    meta.TransferSyntaxUID = syntax
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_file_meta_info(buffer, meta, enforce_standard=True)
    path.write_bytes(b"\0" * 128 + b"DICM" + buffer.getvalue() + dataset)
    return path


@pytest.mark.parametrize("early", [None, "1.2.826.0.1.77.100"], ids=["late-only", "twice"])
@pytest.mark.parametrize("pad", [b"", b"\0" * 13], ids=["", "zero-padded"])
def test_a_deflated_header_given_out_of_tag_order_or_twice_reads_as_uncompressed(
        tmp_path: Path, early: str | None, pad: bytes) -> None:
    """Writers put elements out of tag order, and some give one twice: every syntax keeps
    the later (docs/conformance.md). The deflated walk stopped at the first tag past the
    highest indexed one, so a deflated instance was filed under the earlier Study UID,
    or refused 0xC000 ("StudyInstanceUID is missing") when its only one came late."""
    elements = [_element(0x0008, 0x0016, b"UI", SECONDARY_CAPTURE.encode()),
                _element(0x0008, 0x0018, b"UI", b"1.2.826.0.1.77.3"),
                _element(0x0010, 0x0020, b"LO", b"PID7")]
    if early:
        elements.append(_element(0x0020, 0x000D, b"UI", early.encode()))
    elements += [_element(0x0020, 0x000E, b"UI", b"1.2.826.0.1.77.2"),
                 _element(0x0028, 0x0010, b"US", b"\x01\x00"),
                 _element(0x0020, 0x000D, b"UI", b"1.2.826.0.1.77.200")]
    dataset = b"".join(elements) + pad
    plain = read_header(_part10(tmp_path / "explicit.dcm", dataset, EXPLICIT))
    inflated = read_header(_part10(tmp_path / "deflated.dcm", dataset, DEFLATED))
    assert inflated.study_uid == plain.study_uid == "1.2.826.0.1.77.200"
    assert {**vars(inflated), "transfer_syntax": ""} == {**vars(plain), "transfer_syntax": ""}


@pytest.mark.parametrize("bulk", ["pixels", "private"])
def test_read_header_refuses_past_the_inflate_limit(tmp_path: Path, bulk: str) -> None:
    bomb = dicomgen.make_deflate_bomb(tmp_path, bulk=bulk, inflated_bytes=8 << 20)
    with pytest.raises(InflateLimitExceeded, match="limit of 4 MB"):
        read_header(bomb, max_inflated=4 << 20)
    assert read_header(bomb, max_inflated=16 << 20).patient_id


def test_read_header_refuses_millions_of_empty_items_without_building_them(
    bombs: dict[str, Path],
) -> None:
    with pytest.raises(InvalidInstance, match="more than 1000000 elements"):
        read_header(bombs["items"])


def test_read_header_refuses_sequences_nested_too_deep(tmp_path: Path) -> None:
    source = dicomgen.make_syntax_set(tmp_path / "src", syntaxes=["explicit-le"])
    [inst] = source.values()
    ds = pydicom.dcmread(inst.path)
    inner = Dataset()
    for _ in range(MAX_DEPTH + 2):  # undefined lengths: nothing to skip by, all to walk
        inner.is_undefined_length_sequence_item = True
        outer = Dataset()
        outer.add_new(0x00091001, "SQ", [inner])
        outer[0x00091001].is_undefined_length = True
        inner = outer
    ds.add_new(0x00090010, "LO", "PE NEST")
    ds[0x00091001] = inner[0x00091001]
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1.99"
    path = tmp_path / "nested.dcm"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(InvalidInstance, match="nested more than"):
        read_header(path)


@pytest.mark.parametrize(("damage", "reason"), [
    (lambda meta, stream: meta + stream[: len(stream) * 2 // 3], "truncated"),
    # Block type 3 is reserved (RFC 1951 3.2.3): raw deflate has no checksum, but this
    # much zlib always refuses.
    (lambda meta, stream: meta + b"\x07" + stream[1:], "corrupt"),
])
def test_broken_deflate_stream_is_refused(
    tmp_path: Path, damage: Callable[[bytes, bytes], bytes], reason: str,
) -> None:
    [inst] = dicomgen.make_syntax_set(tmp_path / "src", syntaxes=["deflated"]).values()
    data = inst.path.read_bytes()
    stream = dicomgen.dataset_bytes(inst.path)
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(damage(data[: len(data) - len(stream)], stream))
    with pytest.raises(InvalidInstance, match=reason):
        read_header(broken)


# --- C-STORE -------------------------------------------------------------------------------


def test_deflate_bombs_over_c_store_are_refused_with_bounded_memory(
    edge_server: EdgeServer, bombs: dict[str, Path], raw_sender: None, tmp_path: Path,
) -> None:
    before = deflated_instances(tmp_path / "before", seed=61)
    assert dcmtk.storescu(edge_server.port, [i.path for i in before]).ok
    baseline = peak_memory(edge_server.pid)

    # Bombs are sent, round after round, until the legitimate peer is done.
    responses: list[tuple[str, Dataset]] = []
    done = threading.Event()

    def attack() -> None:
        while not done.is_set() or not responses:
            for bulk, path in bombs.items():
                responses.append((bulk, send_file(edge_server, path)))

    attacker = threading.Thread(target=attack, name="deflate-bomber")
    attacker.start()
    try:
        during = dicomgen.make_study(tmp_path / "during", seed=62)
        served = dcmtk.storescu(edge_server.port, [i.path for i in during])
    finally:
        done.set()
        attacker.join(WAIT_SECONDS)
    assert not attacker.is_alive()
    assert served.ok, served.output

    growth = peak_memory(edge_server.pid) - baseline
    assert growth < MAX_GROWTH, f"serve grew by {growth >> 20} MB"
    for bulk, response in responses:
        if bulk == "items":
            assert response.Status == CANNOT_UNDERSTAND
        else:
            assert response.Status == OUT_OF_RESOURCES
            assert "inflates beyond limit" in response.ErrorComment
    assert "store refused: deflated dataset inflates beyond the limit limit_mb=512" in (
        edge_server.log())

    after = deflated_instances(tmp_path / "after", seed=63)
    assert dcmtk.storescu(edge_server.port, [i.path for i in after[:1]]).ok
    assert send_file(edge_server, after[1].path).Status == 0x0000
    assert edge_server.running
    assert len(stored(edge_server.home)) == len(before) + len(during) + len(after)
    assert_stored_exactly(edge_server.home, before + during + after)


# --- drop folder and import -------------------------------------------------------------


def test_deflate_bombs_in_the_drop_folder_are_rejected_with_bounded_memory(
    edge_server_factory: Callable[..., EdgeServer], bombs: dict[str, Path], tmp_path: Path,
) -> None:
    server = edge_server_factory(start=False)
    server.configure(dropfolder={"stable_seconds": 0.5, "rescan_seconds": 2.0})
    server.start()
    incoming = server.home / "incoming"
    before = deflated_instances(tmp_path / "before", seed=64)
    for inst in before:
        shutil.copy(inst.path, incoming / inst.path.name)
    wait_until("the first drop is stored", lambda: len(stored(server.home)) == len(before))
    baseline = peak_memory(server.pid)

    during = deflated_instances(tmp_path / "during", seed=65)
    with zipfile.ZipFile(tmp_path / "bomb.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.write(bombs["pixels"], "IM1")
        zf.write(during[0].path, "IM2")
    shutil.copy(tmp_path / "bomb.zip", incoming / "bomb.zip")
    shutil.copy(bombs["private"], incoming / "bomb.dcm")
    shutil.copy(during[1].path, incoming / "IM3")
    rejected = server.home / "incoming.rejected"
    wait_until("both bombs are rejected", lambda: (rejected / "bomb.dcm.reason").exists()
               and (rejected / "bomb.zip.contents" / "IM1.reason").exists())
    wait_until("the legitimate files are stored",
               lambda: len(stored(server.home)) == len(before) + len(during))

    growth = peak_memory(server.pid) - baseline
    assert growth < MAX_GROWTH, f"serve grew by {growth >> 20} MB"
    reason = "deflated dataset inflates beyond the limit of 512 MB"
    assert (rejected / "bomb.dcm.reason").read_text().startswith(reason)
    assert (rejected / "bomb.zip.contents" / "IM1.reason").read_text().startswith(reason)
    assert (rejected / "bomb.dcm").read_bytes() == bombs["private"].read_bytes()
    assert_stored_exactly(server.home, before + during)
    assert server.echo().ok


def test_deflate_bombs_over_stow_rs_are_refused_with_bounded_memory(
    bombs: dict[str, Path], tmp_path: Path,
) -> None:
    """STOW-RS reads an upload's UIDs before its ingest: that read is bounded too."""
    with webpeer.running_web_server(tmp_path) as server:
        stow = webpeer.session(server, "rad")
        url = webpeer.base_url(server) + "/dicom-web/studies"

        def post(paths: list[Path]) -> tuple[int, list[int]]:
            body, content_type = webpeer.multipart_body(paths)
            answer = stow.post(url, data=body, headers={"Content-Type": content_type,
                                                        "Accept": "application/dicom+json"})
            failed = answer.json().get("00081198", {}).get("Value", [])
            return answer.status_code, [item["00081197"]["Value"][0] for item in failed]

        before = deflated_instances(tmp_path / "before", seed=68)
        assert post([i.path for i in before]) == (200, [])
        baseline = peak_memory(server.pid)

        after = deflated_instances(tmp_path / "after", seed=69)
        status, failures = post([bombs["pixels"], bombs["private"], bombs["items"],
                                 *(i.path for i in after)])
        growth = peak_memory(server.pid) - baseline
        assert growth < MAX_GROWTH, f"serve grew by {growth >> 20} MB"
        assert (status, failures) == (202, [OUT_OF_RESOURCES, OUT_OF_RESOURCES,
                                            CANNOT_UNDERSTAND])
        assert_stored_exactly(server.home, before + after)
        assert server.echo().ok


def import_peak_memory(home: Path, *paths: Path) -> tuple[int, str, int]:
    """Run `pacs-edge import` and return (exit code, output, its peak RSS in bytes)."""
    proc = subprocess.Popen([*pacs_edge_command(), "import", *map(str, paths), "--home",
                             str(home)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    with proc.stdout:
        output = proc.stdout.read()
    _pid, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, output, usage.ru_maxrss * 1024


def test_import_refuses_a_deflate_bomb_with_bounded_memory(
    edge_home: Path, bombs: dict[str, Path], tmp_path: Path,
) -> None:
    before = deflated_instances(tmp_path / "before", seed=66)
    code, output, baseline = import_peak_memory(edge_home, *(i.path for i in before))
    assert code == 0, output

    after = deflated_instances(tmp_path / "after", seed=67)
    code, output, peak = import_peak_memory(edge_home, bombs["pixels"], *(i.path for i in after))
    assert code == 1
    assert "deflated dataset inflates beyond the limit of 512 MB" in output
    assert peak - baseline < MAX_GROWTH, f"import grew by {(peak - baseline) >> 20} MB"
    assert_stored_exactly(edge_home, before + after)


def test_inflate_limit_is_the_configured_one(edge_home: Path, tmp_path: Path) -> None:
    bomb = dicomgen.make_deflate_bomb(tmp_path, bulk="pixels", inflated_bytes=4 << 20)
    config = edge_home / "pacs-edge.toml"
    config.write_text(config.read_text().replace("max_inflated_mb = 512", "max_inflated_mb = 2"))
    code, output, _peak = import_peak_memory(edge_home, bomb)
    assert code == 1 and "beyond the limit of 2 MB" in output
    config.write_text(config.read_text().replace("max_inflated_mb = 2", "max_inflated_mb = 8"))
    code, output, _peak = import_peak_memory(edge_home, bomb)
    assert code == 0, output
