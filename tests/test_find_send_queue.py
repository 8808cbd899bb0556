"""A C-FIND answer sent through the DUL's queue stays bounded, and a C-CANCEL stops it.

On a TLS association, or when a response is larger than the peer's maximum PDU,
every pending response of a Study Root C-FIND goes through the DUL's send queue
(dimse/find_scp.py); the Modality Worklist answer always does (pynetdicom's own
C-FIND SCP). pynetdicom's queue has no limit, and its DUL reads the socket only
when the queue is empty: a peer that asks for many matches and stops reading
made the server hold the whole answer (~19 MB for 800 responses of 24 KB), and
its C-CANCEL was read only after the last match (dimse/send_queue.py).

Study Root: the peer is a raw socket (rawpdu.py) with a small receive buffer, so
it can stop reading, over plain TCP with a small maximum PDU (responses split)
or over TLS, against a real `pacs-edge serve`. Observables: the server process's
resident memory (VmRSS) while the peer reads nothing, its thread count once the
network timeout has ended the association, and the final status and number of
pending responses after a C-CANCEL sent while the answer was queued.

Worklist: the seam itself (see the section below for why not a real peer).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import queue
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import dcmtk
import dicomgen
import pytest
import rawpdu
from conftest import HOST, TEST_AE, EdgeServer, init_home
from pydicom.datadict import DicomDictionary, keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom.dimse_messages import C_CANCEL_RQ
from pynetdicom.dimse_primitives import C_CANCEL, C_FIND
from pynetdicom.pdu import P_DATA_TF

from appliance.dimse.worklist_scp import WorklistScp
from appliance.services.dicom_header import read_header
from appliance.store.index import Index, StoredFile

STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
PENDING_CODES = (0xFF00, 0xFF01)
CANCEL = 0xFE00
MATCHES = 2000
EXTRA_KEYS = 1500  # at most; 930 found: ~7.5 KB per response identifier
SMALL_PDU = 4096  # the peer's maximum PDU: each response splits into ~4 PDUs
NETWORK_TIMEOUT = 5.0
# The unbounded server queued every response: +14 MB here (MATCHES x ~7.5 KB, and
# the primitives). Bounded, the queue holds 32 PDUs of at most SMALL_PDU (TLS: 32
# responses, ~240 KB): +0.8 MB with the index read and the rest.
RSS_GROWTH_LIMIT = 4 << 20
PAUSE = 2.0  # seconds the cancelling peer reads nothing before its C-CANCEL


def _extra_keys() -> list[str]:
    """Standard keywords the index does not answer (returned empty): acquisition and
    radiotherapy groups, short text VRs only, so the query stays valid."""
    keys = []
    for tag, entry in sorted(DicomDictionary.items()):
        if tag >> 16 in (0x0018, 0x0028, 0x0054, 0x3002, 0x3004, 0x3006, 0x3008, 0x300A) \
                and entry[0] in ("LO", "SH", "CS", "DS", "IS") and entry[3] == "":
            keys.append(keyword_for_tag(tag))
        if len(keys) == EXTRA_KEYS:
            break
    return [k for k in keys if k]


def _encoded(ds: Dataset) -> bytes:
    fp = DicomBytesIO()
    fp.is_implicit_VR, fp.is_little_endian = True, True
    write_dataset(fp, ds)
    return fp.getvalue()


def image_query() -> bytes:
    query = Dataset()
    query.QueryRetrieveLevel = "IMAGE"
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
                    *_extra_keys()):
        setattr(query, keyword, "")
    return _encoded(query)


# -- the raw peer ------------------------------------------------------------------------


@dataclass
class Answer:
    pending: int = 0
    final: int | None = None


class RawFinder:
    """An association whose peer reads only when told: one presentation context (ID 1)."""

    def __init__(self, sock: socket.socket | ssl.SSLSocket, sop_class: str, *,
                 calling: str, called: str, max_pdu: int) -> None:
        self.sock = sock
        sock.sendall(rawpdu.associate_rq_pdu(calling, called, [
            rawpdu.item(0x10, rawpdu.APPLICATION_CONTEXT.encode()),
            rawpdu.presentation_context_item(1, sop_class),
            rawpdu.user_information_item(max_pdu)]))
        pdu_type, body = rawpdu.read_pdu(sock)
        assert pdu_type == rawpdu.A_ASSOCIATE_AC, f"not accepted: PDU type {pdu_type:#x}"
        assert rawpdu.context_results(body) == {1: 0}
        self.sop_class = sop_class
        self.command = b""
        self.answer = Answer()

    def find(self, identifier: bytes) -> None:
        request = C_FIND()
        request.MessageID = 1
        request.AffectedSOPClassUID = self.sop_class
        request.Priority = 2
        request.Identifier = io.BytesIO(identifier)
        for pdu in rawpdu.dimse_pdus(request, 1):
            self.sock.sendall(pdu)

    def cancel(self) -> None:
        request = C_CANCEL()
        request.MessageIDBeingRespondedTo = 1
        message = C_CANCEL_RQ()
        message.primitive_to_message(request)
        for primitive in message.encode_msg(1, 16384):
            pdu = P_DATA_TF()
            pdu.from_primitive(primitive)
            self.sock.sendall(pdu.encode())

    def read(self, *, responses: int | None = None, deadline: float) -> Answer:
        """Read PDUs until the final response (or `responses` more pending ones)."""
        wanted = None if responses is None else self.answer.pending + responses
        while self.answer.final is None and (wanted is None or self.answer.pending < wanted):
            assert time.monotonic() < deadline, f"no final response in time: {self.answer}"
            pdu_type, body = rawpdu.read_pdu(self.sock)
            assert pdu_type == rawpdu.P_DATA, f"PDU type {pdu_type:#x}: {self.answer}"
            offset = 0
            while offset < len(body):
                length, _, header = struct.unpack(">LBB", body[offset:offset + 6])
                if header & 0x01:  # a command fragment
                    self.command += body[offset + 6:offset + 4 + length]
                    if header & 0x02:
                        self._response(self.command)
                        self.command = b""
                offset += 4 + length
        return self.answer

    def _response(self, command: bytes) -> None:
        offset = 0
        while offset < len(command):  # Implicit VR Little Endian (PS3.7 6.3.1)
            group, elem, length = struct.unpack("<HHL", command[offset:offset + 8])
            if (group, elem) == (0x0000, 0x0900):
                (status,) = struct.unpack("<H", command[offset + 8:offset + 10])
                if status in PENDING_CODES:
                    self.answer.pending += 1
                else:
                    self.answer.final = status
                return
            offset += 8 + length
        raise AssertionError("a response without a status")


@contextlib.contextmanager
def peer(port: int, sop_class: str, *, calling: str = TEST_AE, called: str = "EDGE",
         max_pdu: int = SMALL_PDU, tls: ssl.SSLContext | None = None) -> Iterator[RawFinder]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # A small window: a peer that stops reading stops the server's writes sooner.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    sock.settimeout(30)
    conn: socket.socket | ssl.SSLSocket = sock
    try:
        sock.connect((HOST, port))
        if tls is not None:
            conn = tls.wrap_socket(sock, server_hostname="edge")
        yield RawFinder(conn, sop_class, calling=calling, called=called, max_pdu=max_pdu)
    finally:
        with contextlib.suppress(OSError):
            conn.close()
        with contextlib.suppress(OSError):
            sock.close()


def _status(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def rss(pid: int) -> int:
    return _status(pid, "VmRSS") << 10


def threads(pid: int) -> int:
    return _status(pid, "Threads")


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what}: not within {timeout}s"
        time.sleep(0.05)


# -- servers -----------------------------------------------------------------------------


@dataclass
class Served:
    edge: EdgeServer
    plain_port: int
    tls_port: int
    tls: ssl.SSLContext


def _index_instances(home: Path, folder: Path) -> None:
    """MATCHES instances of one series, indexed straight from one generated header with
    its SOP Instance UID changed (C-FIND reads the index only; generating and storing
    1,000 files would take most of a minute)."""
    [made] = dicomgen.make_studies(folder, seed=73, series_per_study=1,
                                   instances_per_series=1, size=16)
    header = read_header(made.path)

    async def index_them() -> None:
        async with Index(home / "index.sqlite3") as index:
            await asyncio.gather(*(index.record_instance(
                dataclasses.replace(header, sop_uid=f"{made.sop_instance_uid}.{n}",
                                    instance_number=n + 1),
                StoredFile(f"{n}.dcm", 1000, 0, f"{made.sop_instance_uid}.{n}", 0.0))
                for n in range(MATCHES)))

    asyncio.run(index_them())


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One server (one worker process, so its VmRSS is the association's) with MATCHES
    instances, plain TCP and TLS ports."""
    root = tmp_path_factory.mktemp("send-queue")
    home = init_home(root / "home")
    edge = EdgeServer(home)
    tls_port = dcmtk.free_port()
    edge.configure(dicom={"tls_port": tls_port, "workers": 1,
                          "network_timeout": NETWORK_TIMEOUT})
    edge.start()
    try:
        edge.cli("certs", "issue", "testscu", "--out", str(root / "testscu"))
        edge.stop()
        _index_instances(home, root / "instances")
        edge.start()
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.load_verify_locations(root / "testscu" / "ca.pem")
        context.load_cert_chain(root / "testscu" / "testscu.pem",
                                root / "testscu" / "testscu.key")
        yield Served(edge, edge.port, tls_port, context)
    finally:
        edge.stop()
    assert not edge.unclean_stops, edge.unclean_stops


TRANSPORTS = ["plain-small-pdu", "tls"]


def _connect(served: Served, transport: str, sop_class: str, **kwargs: object
             ) -> contextlib.AbstractContextManager[RawFinder]:
    if transport == "tls":
        return peer(served.tls_port, sop_class, tls=served.tls, **kwargs)  # type: ignore[arg-type]
    return peer(served.plain_port, sop_class, **kwargs)  # type: ignore[arg-type]


# -- tests -------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_answer_to_a_peer_that_stops_reading_stays_bounded_and_ends(
        served: Served, transport: str) -> None:
    pid = served.edge.pid
    idle_threads = threads(pid)
    with _connect(served, transport, STUDY_ROOT_FIND) as finder:
        wait_for(lambda: threads(pid) > idle_threads, 5, "association threads started")
        before = rss(pid)
        finder.find(image_query())  # ... and never read
        peak = before
        deadline = time.monotonic() + 2.5
        while time.monotonic() < deadline and peak - before < RSS_GROWTH_LIMIT:
            peak = max(peak, rss(pid))
            time.sleep(0.05)
        growth = peak - before
        assert growth < RSS_GROWTH_LIMIT, \
            f"the server grew by {growth >> 10} KB for a peer that reads nothing"
        # The blocked write times out (network_timeout): the association ends, and the
        # thread waiting to queue the next response with it.
        wait_for(lambda: threads(pid) <= idle_threads, NETWORK_TIMEOUT + 5,
                 "association threads ended after the network timeout")


def cancel_while_queued(finder: RawFinder, query: bytes) -> Answer:
    """Ask, read the first response, stop reading for PAUSE (time enough for the
    unbounded server to queue the whole answer), send a C-CANCEL, read on."""
    started = time.monotonic()
    finder.find(query)
    finder.read(responses=1, deadline=started + 10)
    time.sleep(PAUSE)
    finder.cancel()
    return finder.read(deadline=started + 20)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_c_cancel_ends_a_long_study_root_answer(served: Served, transport: str) -> None:
    """Unbounded, the C-CANCEL was read after the whole answer: Success, MATCHES pending.
    Bounded, what is still sent after it is what the socket buffers held (loopback's
    grow to MBs: ~350 responses here) and SEND_BACKLOG PDUs."""
    with _connect(served, transport, STUDY_ROOT_FIND) as finder:
        answer = cancel_while_queued(finder, image_query())
    assert answer.final == CANCEL, answer
    assert answer.pending < MATCHES // 2, answer


# -- the worklist answer -----------------------------------------------------------------
#
# pynetdicom's worklist SCP makes a response per match in ~3 ms, of ~200 bytes: on
# loopback the kernel's send buffer (autotuned to MBs) takes a whole answer of
# MAX_ITEMS while the peer reads nothing, so a real peer cannot show the queue within
# seconds. The seam is tested instead: WorklistScp.on_find driven as pynetdicom drives
# it (each pending response queues two PDUs, command and data set, for the DUL),
# against a DUL that sends only when the test plays one of its reactor passes.

WORKLIST_ITEMS = 500
WORKLIST_QUEUE_LIMIT = 64  # PDUs; the appliance waits at 32 (send_queue.SEND_BACKLOG)


class SilentDUL:
    """The parts of a DUL the worklist answer sees; it sends nothing by itself."""

    def __init__(self) -> None:
        self.to_provider_queue: queue.Queue[bytes] = queue.Queue()
        self._kill_thread = False

    def is_alive(self) -> bool:
        return True

    def _process_recv_primitive(self) -> bool:
        return bool(self.to_provider_queue.queue)  # upstream: work when one is queued

    def reactor_pass(self) -> None:
        """Send everything queued, then the pass that finds nothing (and would read)."""
        while self._process_recv_primitive():
            self.to_provider_queue.get()


class WorklistAnswer:
    """WorklistScp.on_find in a thread, consumed as pynetdicom's C-FIND SCP does."""

    def __init__(self) -> None:
        self.dul = SilentDUL()
        self.assoc = SimpleNamespace(
            is_established=True, dul=self.dul,
            acse=SimpleNamespace(is_aborted=lambda: False),
            requestor=SimpleNamespace(ae_title="CT1"))
        self.cancelled = False
        self.statuses: list[int] = []
        query = Dataset()
        query.PatientID = ""
        event = _FindEvent(self, query)
        scp = WorklistScp(_WorklistService(), _Bridge(), _Audit())  # type: ignore[arg-type]
        self.thread = threading.Thread(target=self._run, args=(scp, event), daemon=True)
        self.thread.start()

    def _run(self, scp: WorklistScp, event: object) -> None:
        for status, _identifier in scp.on_find(event, "test"):
            self.statuses.append(int(status))
            if int(status) not in PENDING_CODES:
                return
            self.dul.to_provider_queue.put(b"command")  # as DIMSE send_msg queues them
            self.dul.to_provider_queue.put(b"data set")

    def queued_when_still(self) -> int:
        """The DUL's queue once it has stopped growing (the answer waits, or is done)."""
        last, since = -1, time.monotonic()
        deadline = since + 5
        while time.monotonic() - since < 0.3:
            assert time.monotonic() < deadline, "the queue kept changing"
            now = self.dul.to_provider_queue.qsize()
            if now != last:
                last, since = now, time.monotonic()
            time.sleep(0.02)
        return last


class _FindEvent:
    """pynetdicom's EVT_C_FIND event, as much as the worklist handler reads."""

    def __init__(self, answer: WorklistAnswer, query: Dataset) -> None:
        self.answer = answer
        self.assoc = answer.assoc
        self.identifier = query
        self.request = SimpleNamespace(Identifier=io.BytesIO(_encoded(query)))
        self.context = SimpleNamespace(transfer_syntax=ImplicitVRLittleEndian)

    @property
    def is_cancelled(self) -> bool:
        return self.answer.cancelled


class _WorklistService:
    def permitted(self, calling: str) -> None:
        return None

    async def find(self, calling: str, identifier: Dataset) -> list[Dataset]:
        matches = []
        for n in range(WORKLIST_ITEMS):
            item = Dataset()
            item.PatientID = f"P{n:05d}"
            matches.append(item)
        return matches


class _Bridge:
    def call(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run(coro)


class _Audit:
    def queried(self, *args: object, **kwargs: object) -> None:
        return None


def test_worklist_answer_waits_for_the_dul_and_sees_a_cancel_between_bursts() -> None:
    answer = WorklistAnswer()
    try:
        queued = answer.queued_when_still()
        assert answer.thread.is_alive(), \
            f"the whole answer was queued for a DUL that sent nothing: {queued} PDUs"
        assert queued <= WORKLIST_QUEUE_LIMIT
        sent = len(answer.statuses)
        answer.dul.reactor_pass()  # the queue goes out; the DUL's next pass would read
        answer.queued_when_still()
        assert len(answer.statuses) > sent  # the answer goes on after the read turn
        answer.cancelled = True  # what the DUL read in that turn: a C-CANCEL
        answer.dul.reactor_pass()
        answer.thread.join(5)
        assert not answer.thread.is_alive()
        assert answer.statuses[-1] == CANCEL
        assert len(answer.statuses) < WORKLIST_ITEMS
    finally:
        answer.assoc.is_established = False
        answer.thread.join(5)


def test_worklist_answer_waiting_for_the_dul_ends_with_its_association() -> None:
    answer = WorklistAnswer()
    answer.queued_when_still()
    assert answer.thread.is_alive(), "the whole answer was queued for a DUL that sent nothing"
    started = time.monotonic()
    answer.assoc.is_established = False  # aborted, released, timed out
    answer.thread.join(5)
    assert not answer.thread.is_alive()
    assert time.monotonic() - started < 1.0
    assert len(answer.statuses) < WORKLIST_ITEMS
