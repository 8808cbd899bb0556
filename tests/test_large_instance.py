"""Large single instances (breast tomosynthesis, whole-slide images, long cines: 1-5 GB,
some above 4 GiB) go through the box without ever being held whole in memory.

In the default suite: a 128 MiB cine, sent back by C-GET and C-MOVE, byte-exact, while
serve's peak resident memory (VmHWM) grows by much less than the instance. The C-STORE
sub-operations read each stored file whole before sending it (+256 MiB here: the read
and its slice; +8.6 GiB for a 4.3 GiB instance). And WADO-RS re-encoding an Implicit VR
Little Endian instance for a client that wants Explicit VR Little Endian copies the
pixel value from the file, byte-exact to pydicom's own whole-instance transcoding,
which held three copies of the instance (+192 MiB for a 64 MiB one).

In `make soak` (PACS_EDGE_LARGE_INSTANCE_MIB, 4400 there: past 2^32 bytes, where
32-bit lengths and offsets wrap): one cine of that size end to end through real
processes: dcmtk storescu, `pacs-edge sync --once` packing it into the local-folder
cloud, eviction, a C-GET that recalls it, a C-MOVE, WADO-RS frames on both sides of
4 GiB and the whole instance over WADO-RS, each byte-exact; and the peak resident
memory of serve, the sync pass and the agent stays far below the instance's size.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import signal
import struct
import subprocess
import threading
import time
from pathlib import Path

import dcmtk
import dicomgen
import pydicom
import pytest
import webpeer
from conftest import EDGE_AE, HOST, TEST_AE, EdgeServer, pacs_edge_command
from pydicom.encaps import encapsulate
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    generate_uid,
)
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet  # type: ignore[attr-defined]
from storepeer import StorePeer
from syncagent import SyncAgent, evict, import_files, tier_state

from appliance.base.dicom_wire import UNLIMITED_PDU
from appliance.dimse.store_lane import READ_WHOLE, STREAM_CHUNK, read_payload
from appliance.services.transcode import Transcoded, explicit_little
from sync import reader_client
from sync.pack.manifest import InstanceAttributes, ManifestEntry, SeriesAttributes

MIB = 1 << 20
LARGE_MIB = int(os.environ.get("PACS_EDGE_LARGE_INSTANCE_MIB", "0") or 0)
FRAME_BYTES = 2 * MIB
# What each process may reach at its peak, whatever the instance's size.
PEAK_RSS_LIMIT = 512 * MIB
OCTETS = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'


def _peak_rss(pid: int) -> int:
    """The process's peak resident set size (VmHWM), bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) << 10
    raise AssertionError("no VmHWM in /proc status")


@pytest.fixture(scope="module")
def cine(tmp_path_factory: pytest.TempPathFactory) -> dicomgen.GeneratedInstance:
    """A 128 MiB JPEG cine: 64 frames of 2 MiB, encapsulated with undefined length."""
    return dicomgen.make_large_cine(tmp_path_factory.mktemp("large"), frames=64)


def test_get_and_move_send_a_large_instance_from_its_file_not_from_memory(
        edge_server: EdgeServer, cine: dicomgen.GeneratedInstance, tmp_path: Path,
        storescp: dcmtk.StoreSCP) -> None:
    size = cine.path.stat().st_size
    dcmtk.storescu(edge_server.port, [cine.path]).check()
    sent = dicomgen.dataset_sha256(cine.path)
    keys = {"StudyInstanceUID": cine.study_uid}
    before = _peak_rss(edge_server.pid)

    got = tmp_path / "got"
    dcmtk.getscu(edge_server.port, keys, got, args=("-v", "+B", "+xy")).check()
    (received,) = [p for p in got.iterdir() if p.is_file()]
    assert dicomgen.dataset_sha256(received) == sent

    edge_server.add_peer("dest", storescp.ae_title, storescp.port, allow="store")
    dcmtk.movescu(edge_server.port, keys, storescp.ae_title).check()
    (moved,) = storescp.files()
    assert dicomgen.dataset_sha256(moved) == sent

    growth = _peak_rss(edge_server.pid) - before
    assert growth < size // 4, f"serve's peak RSS grew by {growth // MIB} MiB for an " \
                               f"instance of {size // MIB} MiB"


@pytest.mark.skipif(not LARGE_MIB, reason="soak only: PACS_EDGE_LARGE_INSTANCE_MIB (make soak)")
def test_an_instance_above_4_gib_goes_through_store_pack_evict_recall_and_retrieve_byte_exact(
        tmp_path: Path) -> None:
    frames = -(-LARGE_MIB * MIB // FRAME_BYTES)
    cine = dicomgen.make_large_cine(tmp_path / "source", frames=frames)
    size = cine.path.stat().st_size
    sent = dicomgen.dataset_sha256(cine.path)
    home = webpeer.web_home(tmp_path / "home", dcmtk.free_port())
    server = EdgeServer(home)
    server.configure(sync={"stable_after_seconds": 3600.0, "recall_poll_seconds": 0.2,
                           "evict_after_days": 0.0, "recall_timeout_seconds": 3600.0})
    server.start()
    agent: SyncAgent | None = None
    took: dict[str, float] = {}
    try:
        webpeer.add_user(server, "rad", "radiologist")
        agent = SyncAgent(home).start()
        clock = time.monotonic()
        dcmtk.storescu(server.port, [cine.path], timeout=3600).check()
        took["store"] = time.monotonic() - clock
        cine.path.unlink()  # the disk holds the store, the cloud and one retrieved copy

        clock = time.monotonic()
        packed, sync_peak = _measured([*pacs_edge_command(), "sync", "--once",
                                       "--stable-after", "0", "--home", str(home)])
        took["pack"] = time.monotonic() - clock
        assert "replicated 1 study version" in packed, packed
        evict(home, cine.study_uid)
        assert tier_state(server, cine.study_uid) == "evicted"

        clock = time.monotonic()
        got = tmp_path / "got"
        dcmtk.getscu(server.port, {"StudyInstanceUID": cine.study_uid}, got,
                     args=("-v", "+B", "+xy"), timeout=3600).check()
        took["recall and get"] = time.monotonic() - clock
        (received,) = [p for p in got.iterdir() if p.is_file()]
        assert dicomgen.dataset_sha256(received) == sent
        received.unlink()
        assert "recalled study=" in agent.log()

        with dcmtk.StoreSCP(tmp_path / "moved") as scp:
            server.add_peer("dest", scp.ae_title, scp.port, allow="store")
            clock = time.monotonic()
            dcmtk.movescu(server.port, {"StudyInstanceUID": cine.study_uid}, scp.ae_title,
                          timeout=3600).check()
            took["move"] = time.monotonic() - clock
            (moved,) = scp.files()
        assert dicomgen.dataset_sha256(moved) == sent
        moved.unlink()

        http = webpeer.session(server, "rad")
        url = (f"{webpeer.base_url(server)}/dicom-web/studies/{cine.study_uid}/series/"
               f"{cine.series_uid}/instances/{cine.sop_instance_uid}")
        past_4_gib = (1 << 32) // (FRAME_BYTES + 8) + 2
        numbers = [1, *([past_4_gib] if past_4_gib < frames else []), frames]
        answer = http.get(f"{url}/frames/{','.join(map(str, numbers))}",
                          headers={"Accept": OCTETS}, timeout=600)
        assert answer.status_code == 200, answer.text
        payloads = [p for _, p in webpeer.parts(answer.headers["Content-Type"], answer.content)]
        assert payloads == [dicomgen.large_cine_frame(280, n, FRAME_BYTES) for n in numbers]

        clock = time.monotonic()
        whole = tmp_path / "wado.multipart"
        with http.get(url, headers={"Accept": 'multipart/related; type="application/dicom";'
                                                  ' transfer-syntax=*'},
                      stream=True, timeout=3600) as answer, whole.open("wb") as out:
            assert answer.status_code == 200, answer.text
            for chunk in answer.iter_content(8 * MIB):
                out.write(chunk)
        took["wado-rs instance"] = time.monotonic() - clock
        assert _part_dataset_sha256(whole) == sent
        whole.unlink()

        peaks = {"serve": _peak_rss(server.pid), "sync --once": sync_peak,
                 "sync agent": _peak_rss(agent.proc.pid)}  # type: ignore[union-attr]
    finally:
        if agent is not None:
            agent.stop()
        server.stop()
    print(f"instance {size} bytes; seconds {took}; peak RSS MiB "
          f"{ {name: peak // MIB for name, peak in peaks.items()} }")
    assert all(peak < PEAK_RSS_LIMIT for peak in peaks.values()), peaks
    assert not server.unclean_stops, server.unclean_stops


def _measured(argv: list[str], timeout: float = 3600) -> tuple[str, int]:
    """Run `argv`; its output and its peak resident set size (bytes), from wait4."""
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"measured-{os.getpid()}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT)
    timer = threading.Timer(timeout, lambda: os.kill(proc.pid, signal.SIGKILL))
    timer.start()
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    finally:
        timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    text = log.read_text(errors="replace")
    log.unlink()
    assert proc.returncode == 0, text
    return text, usage.ru_maxrss << 10


def _part_dataset_sha256(path: Path) -> str:
    """dataset_sha256 of the one part of the multipart/related answer saved at `path`."""
    with path.open("rb") as fh:
        head = fh.read(1 << 16)
    boundary = re.match(rb"--([^\r\n]+)\r\n", head)
    assert boundary is not None, head[:200]
    closing = b"\r\n--" + boundary.group(1) + b"--\r\n"
    end = path.stat().st_size - len(closing)
    with path.open("rb") as fh:
        fh.seek(end)
        assert fh.read() == closing
    return dicomgen.dataset_sha256(path, head.index(b"\r\n\r\n") + 4, end)


def test_a_large_payload_is_sent_from_the_file_opened_before_an_eviction_unlinked_it(
        cine: dicomgen.GeneratedInstance, tmp_path: Path) -> None:
    copy = tmp_path / "stored.dcm"
    copy.write_bytes(cine.path.read_bytes())
    payload = read_payload(copy)
    assert payload.dataset is None and payload.size > READ_WHOLE
    copy.unlink()
    digest = hashlib.sha256()
    for chunk in payload.chunks(STREAM_CHUNK):
        assert len(chunk) <= STREAM_CHUNK
        digest.update(chunk)
    payload.close()
    assert digest.hexdigest() == dicomgen.dataset_sha256(cine.path)


def test_a_payload_whose_file_was_cut_short_fails_as_unreadable_not_as_sent(
        cine: dicomgen.GeneratedInstance, tmp_path: Path) -> None:
    copy = tmp_path / "stored.dcm"
    copy.write_bytes(cine.path.read_bytes())
    payload = read_payload(copy)
    os.truncate(copy, copy.stat().st_size // 2)
    with pytest.raises(Exception, match="stored file ended early"):
        for _ in payload.chunks(STREAM_CHUNK):
            pass
    payload.close()


def _implicit_instance(folder: Path, *, tag: int, bits: int, length: int,
                       trailing: bool = False) -> Path:
    """An Implicit VR Little Endian image whose pixel element (`tag`: Pixel Data or Float
    Pixel Data) holds `length` bytes, an odd count too (written by hand: pydicom would
    pad it), followed by a Data Set Trailing Padding element when `trailing`."""
    (made,) = dicomgen.make_studies(folder / "made", seed=93, series_per_study=1,
                                    instances_per_series=1, modalities=("CT",),
                                    transfer_syntax=ImplicitVRLittleEndian)
    ds = pydicom.dcmread(made.path)
    del ds.PixelData
    ds.BitsAllocated = ds.BitsStored = bits
    ds.HighBit = bits - 1
    path = folder / f"implicit-{tag:08x}-{bits}-{length}-{trailing}.dcm"
    ds.save_as(path, enforce_file_format=True)
    with path.open("ab") as fh:
        fh.write(struct.pack("<HHI", tag >> 16, tag & 0xFFFF, length))
        fh.write((bytes(range(251)) * (length // 251 + 1))[:length])
        if trailing:
            fh.write(struct.pack("<HHI", 0xFFFC, 0xFFFC, 6) + b"\0" * 6)
    return path


def _pydicom_transcoding(path: Path) -> bytes:
    """The whole instance re-encoded by pydicom in memory: what the box answered before."""
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True, implicit_vr=False, little_endian=True)
    return out.getvalue()


def _assembled(transcoded: Transcoded, path: Path) -> bytes:
    with path.open("rb") as fh:
        fh.seek(transcoded.value_offset)
        return transcoded.head + fh.read(transcoded.value_length) + transcoded.tail


@pytest.mark.parametrize(("tag", "bits", "length", "trailing"), [
    (0x7FE00010, 16, 2 * MIB, False),  # Pixel Data, OW
    (0x7FE00010, 8, 2 * MIB + 1, False),  # an odd length: pydicom pads it
    (0x7FE00010, 16, 2 * MIB, True),  # an element after the pixels
    (0x7FE00008, 32, 2 * MIB, False),  # Float Pixel Data, OF
], ids=["ow", "odd", "trailing", "float"])
def test_transcoding_copies_the_pixel_value_from_the_file_and_equals_pydicoms_own(
        tmp_path: Path, tag: int, bits: int, length: int, trailing: bool) -> None:
    path = _implicit_instance(tmp_path, tag=tag, bits=bits, length=length, trailing=trailing)
    with path.open("rb") as fh:
        transcoded = explicit_little(fh, ImplicitVRLittleEndian)
    assert transcoded is not None and transcoded.value_length == length
    assert _assembled(transcoded, path) == _pydicom_transcoding(path)


def test_wado_rs_reencodes_a_large_implicit_instance_byte_exact_without_holding_it(
        tmp_path: Path) -> None:
    # An uncompressed tomosynthesis of 2 GB was read and encoded whole for a client
    # wanting Explicit VR LE (PS3.18's default): three copies of it in serve's memory.
    path = _implicit_instance(tmp_path, tag=0x7FE00010, bits=16, length=64 * MIB,
                              trailing=True)
    instance = dicomgen.GeneratedInstance(path, dicomgen.read_header(path))
    with webpeer.running_web_server(tmp_path / "web") as server:
        import_files(server.home, instance)
        http = webpeer.session(server, "rad")
        url = (f"{webpeer.base_url(server)}/dicom-web/studies/{instance.study_uid}/series/"
               f"{instance.series_uid}/instances/{instance.sop_instance_uid}")
        # As stored first: a first answer's own start-up costs (~32 MiB) are not measured.
        assert http.get(url, headers={"Accept": 'multipart/related; type="application/dicom";'
                                                ' transfer-syntax=*'}).status_code == 200
        before = _peak_rss(server.pid)
        got = http.get(url, headers={"Accept": 'multipart/related; type="application/dicom"'})
        growth = _peak_rss(server.pid) - before
    assert got.status_code == 200, got.text
    assert growth < 16 * MIB, f"serve's peak RSS grew by {growth // MIB} MiB for 64 MiB"
    ((headers, part),) = webpeer.parts(got.headers["Content-Type"], got.content)
    assert headers["content-type"] == f"application/dicom; transfer-syntax={ExplicitVRLittleEndian}"
    # The File Meta is the box's own (import writes it), the data set pydicom's encoding.
    (received := tmp_path / "received.dcm").write_bytes(part)
    (expected := tmp_path / "expected.dcm").write_bytes(_pydicom_transcoding(path))
    assert dicomgen.dataset_bytes(received) == dicomgen.dataset_bytes(expected)


def test_reader_send_cuts_a_large_instance_into_bounded_pdus_for_a_workstation_without_maximum(
        cine: dicomgen.GeneratedInstance) -> None:
    """A workstation may announce no maximum PDU length (0). pynetdicom then sends a
    data set read from its file as one PDU: a 128 MiB instance read whole into memory,
    and past 4 GiB a PDU whose 32-bit length cannot say its size. The box's own sends
    cut at UNLIMITED_PDU in that case (store_lane.py); `reader pull --send` now does too."""
    header = cine.header
    series = SeriesAttributes(header.SeriesInstanceUID, "US", None, "", "", "", "")
    entry = ManifestEntry(InstanceAttributes(series, cine.sop_instance_uid,
                                             cine.sop_class_uid, None, cine.transfer_syntax),
                          offset=0, length=cine.path.stat().st_size, dataset_offset=0,
                          sha256="")
    with StorePeer("WORKSTATION", max_pdu=0) as workstation:
        report = reader_client.send_files([(cine.path, entry)],
                                          f"WORKSTATION@127.0.0.1:{workstation.port}",
                                          calling_ae="PEREADER")
        (arrived,) = workstation.arrivals[cine.sop_instance_uid]
        largest = workstation.largest_pdu
    assert report == reader_client.SendReport(1, [])
    assert hashlib.sha256(arrived).hexdigest() == dicomgen.dataset_sha256(cine.path)
    assert largest <= UNLIMITED_PDU, f"a PDU of {largest // MIB} MiB"


def _sibling(large: dicomgen.GeneratedInstance, folder: Path, number: int) -> Path:
    """A one-frame instance of `large`'s series, numbered `number`."""
    ds = pydicom.dcmread(large.path, stop_before_pixels=True)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.InstanceNumber, ds.NumberOfFrames = number, 1
    ds.add_new(0x7FE00010, "OB", encapsulate([b"\xff\xd8\xff\xd9"]))
    path = folder / f"sibling-{number}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def _wait_open_by(pid: int, path: Path, deadline: float) -> None:
    """Until process `pid` holds `path` open (/proc/PID/fd)."""
    while time.monotonic() < deadline:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                if Path(os.readlink(fd)) == path:
                    return
        time.sleep(0.01)
    raise AssertionError(f"serve never opened {path.name}")


def test_a_large_file_unreadable_before_its_c_store_began_fails_that_sub_operation_alone(
        edge_server: EdgeServer, tmp_path: Path) -> None:
    # A large stored file is opened ahead (read_payload) and read only as it is sent. One
    # whose first read failed (a bad sector; here cut to nothing once serve opened it)
    # left the lane broken as if the C-STORE had been cut half-way: the workstation's
    # whole C-GET association was aborted and the instances after it never came.
    # Nothing had been sent, so only that sub-operation fails, as for a small file.
    large = dicomgen.make_large_cine(tmp_path / "large", frames=9)
    assert large.path.stat().st_size > READ_WHOLE
    before, after = _sibling(large, tmp_path, 0), _sibling(large, tmp_path, 2)
    dcmtk.storescu(edge_server.port, [before, large.path, after]).check()
    (stored,) = [p for p in edge_server.home.rglob("*.dcm") if p.stat().st_size > READ_WHOLE
                 and p.resolve() != large.path.resolve()]
    arrived: list[str] = []

    def on_store(event: evt.Event) -> int:
        if not arrived:  # the first instance: serve opens the large one meanwhile
            _wait_open_by(edge_server.pid, stored.resolve(), time.monotonic() + 60)
            os.truncate(stored, 0)
        arrived.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    ae = AE(TEST_AE)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(large.header.SOPClassUID, [JPEGBaseline8Bit])
    assoc = ae.associate(HOST, edge_server.port, ae_title=EDGE_AE,
                         ext_neg=[build_role(large.header.SOPClassUID, scp_role=True)],
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    identifier = pydicom.Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = large.study_uid
    try:
        final = [status for status, _ in assoc.send_c_get(
            identifier, StudyRootQueryRetrieveInformationModelGet)][-1]
        assert assoc.is_established, "serve aborted the C-GET's association"
    finally:
        if assoc.is_established:
            assoc.release()
    assert arrived == [pydicom.dcmread(p).SOPInstanceUID for p in (before, after)]
    assert (final.Status, final.NumberOfFailedSuboperations,
            final.NumberOfCompletedSuboperations) == (0xB000, 1, 2)
