"""The plain DICOM port survives random hostile PDUs: a seeded fuzz of a real `pacs-edge serve`.

The promise under test: bad input gets a clear error or the right DICOM
status, never a crash, a hang, unbounded memory or a lost study. Each step is
drawn from one seeded generator (PACS_EDGE_FUZZ_SEED replays a failure; the
suite runs PACS_EDGE_FUZZ_STEPS steps, `make soak` many more):

- most steps open a connection from the hostile address and send a sequence
  of PDUs built valid (an A-ASSOCIATE-RQ with random contexts and user
  information items, P-DATA-TFs carrying C-ECHO / C-STORE / C-FIND / C-MOVE /
  C-GET requests and their data sets, an A-RELEASE-RQ or A-ABORT), then
  mutated: bit flips, truncation, PDU and PDV lengths too small, too big or
  huge, repeated, dropped and reordered PDUs or items, unknown PDU types,
  garbage; written in random pieces with pauses (now and then one longer than
  the network timeout), then closed, reset, half-closed or left open for a
  few steps;
- the others C-STORE a real instance from the legitimate address (pynetdicom,
  or dcmtk's storescu), and the model keeps what was acknowledged.

After every step the server runs, a C-ECHO is answered within a few seconds
and the log has no traceback and no ERROR line but those naming a peer's protocol
error. At the end every
acknowledged instance comes back by C-GET byte-identical, `fsck` is clean, the
server's threads are back to where they were and its RSS grew by less than a
budget that a leak per connection would exceed.
"""

from __future__ import annotations

import contextlib
import io
import random
import re
import socket
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import dcmtk
import dicomgen
import pytest
import rawpdu
from conftest import EDGE_AE, HOST, TEST_AE, EdgeServer
from fuzzing import SEED, rss_kb, steps, threads, unhandled, wait_for_threads
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.dimse_primitives import C_ECHO, C_FIND, C_GET, C_MOVE, C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from syncagent import assert_fsck_clean

STEPS = steps(40)
HOSTILE = "127.0.0.2"  # the fuzzer's address; the legitimate peer calls from 127.0.0.1
# Short limits so that stalled connections end within the run; the defaults are 60 s / 30 s.
NETWORK_TIMEOUT = 2.0
ACSE_TIMEOUT = 2.0
DIMSE_TIMEOUT = 5.0
ECHO_WITHIN = 5.0  # seconds a C-ECHO may take after a step
LINGERING = 4  # hostile connections left open at once, at most
# RSS growth after the warm-up: bounded memory per connection keeps it far below this;
# a leak of 32 KiB per hostile connection exceeds it within `make soak`'s 2000 steps.
RSS_BUDGET_KB = 64 * 1024
# A thread pool the server grows on demand (asyncio's default executor) may add threads
# after the baseline; a thread per connection left behind exceeds this within the run.
THREAD_SLACK = 8
VALID_STORE_SHARE = 0.2
# What the log must not have after a step, besides what fuzzing.unhandled finds (a
# traceback): a CRITICAL line, an ERROR line that names an exception or an invalid state
# machine event, or any ERROR line of the appliance (what a peer did wrong, a malformed
# PDU or a reset mid-PDU, is a WARNING). pynetdicom's own ERROR lines name a peer's
# protocol error (an unsupported protocol version, an AE title that is not valid) and
# stay allowed.
_UNEXPECTED = re.compile(r"Exception in thread| CRITICAL | ERROR .*([Ee]xception|Invalid event)")
_APPLIANCE_ERROR = re.compile(r" ERROR appliance\.")

FIND_MODELS = ("1.2.840.10008.5.1.4.1.2.1.1", "1.2.840.10008.5.1.4.1.2.2.1",
               "1.2.840.10008.5.1.4.31")
MOVE_MODELS = ("1.2.840.10008.5.1.4.1.2.1.2", "1.2.840.10008.5.1.4.1.2.2.2")
GET_MODELS = ("1.2.840.10008.5.1.4.1.2.1.3", "1.2.840.10008.5.1.4.1.2.2.3")
STORAGE = (rawpdu.CT_IMAGE_STORAGE, "1.2.840.10008.5.1.4.1.1.4")
ABSTRACT_SYNTAXES = (rawpdu.VERIFICATION, *STORAGE, *FIND_MODELS, *MOVE_MODELS, *GET_MODELS,
                     "1.2.840.10008.1.20.1", "1.2.3.4.5.6.7")
TRANSFER_SYNTAXES = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99",
                     "1.2.840.10008.1.2.4.50", "1.2.3.4")
# Instances the fuzzer makes up: a root no generated (acknowledged) instance has, so a
# made-up C-STORE that the server takes can never replace one of them.
FUZZ_ROOT = "1.2.826.0.1.3680043.9.9.77."


# -- building valid PDU sequences ---------------------------------------------------------

def _sub_item(rng: random.Random, sop_classes: list[str]) -> bytes:
    """A user information sub-item other than maximum length and implementation class."""
    sop = rng.choice(sop_classes).encode()
    kind = rng.choice(("version", "async", "role", "extended", "identity"))
    if kind == "version":
        return rawpdu.item(0x55, b"FUZZ_" + str(rng.randrange(1000)).encode())
    if kind == "async":
        return rawpdu.item(0x53, struct.pack(">HH", rng.randrange(4), rng.randrange(4)))
    if kind == "role":
        return rawpdu.item(0x54, struct.pack(">H", len(sop)) + sop
                           + bytes([rng.randrange(2), rng.randrange(2)]))
    if kind == "extended":
        return rawpdu.item(0x56, struct.pack(">H", len(sop)) + sop + bytes(rng.randrange(4)))
    secret = b"user" * rng.randrange(3)
    return rawpdu.item(0x58, bytes([rng.choice((1, 2, 3)), rng.randrange(2)])
                       + struct.pack(">H", len(secret)) + secret + b"\0\0")


def associate_items(rng: random.Random) -> tuple[list[bytes], dict[int, str]]:
    """The variable items of a random A-ASSOCIATE-RQ, and its contexts (ID -> abstract
    syntax). Implicit VR Little Endian comes first in every context: the data sets the
    requests carry are encoded in it."""
    contexts = {2 * n + 1: rng.choice(ABSTRACT_SYNTAXES) for n in range(rng.randint(1, 6))}
    items = [rawpdu.item(0x10, rawpdu.APPLICATION_CONTEXT.encode())]
    for context_id, abstract in contexts.items():
        syntaxes = [rawpdu.IMPLICIT_VR_LE, *rng.sample(TRANSFER_SYNTAXES, rng.randrange(3))]
        items.append(rawpdu.presentation_context_item(context_id, abstract, syntaxes))
    max_pdu = rng.choice((0, 4096, 16384, 1 << 20, 0xFFFFFFFF))
    extra = [_sub_item(rng, list(contexts.values())) for _ in range(rng.randrange(4))]
    items.append(rawpdu.user_information_item(max_pdu, extra))
    return items, contexts


def _fuzz_uid(rng: random.Random) -> str:
    return FUZZ_ROOT + str(rng.randrange(1, 10**12))


def _identifier(rng: random.Random, level: str) -> bytes:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    ds.PatientName = rng.choice(("*", "DOE*", "", "?"))
    ds.PatientID = ""
    ds.StudyInstanceUID = rng.choice(("", _fuzz_uid(rng)))
    ds.StudyDate = rng.choice(("", "20200101-", "19000101-20991231"))
    return encode(ds, True, True)  # type: ignore[no-any-return]


def _instance(rng: random.Random, sop_class: str, sop_instance: str) -> bytes:
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_instance
    ds.StudyInstanceUID = _fuzz_uid(rng)
    ds.SeriesInstanceUID = _fuzz_uid(rng)
    ds.PatientID = "FUZZ"
    ds.PatientName = "FUZZ^PEER"
    ds.Modality = "OT"
    ds.Rows = ds.Columns = 4
    ds.BitsAllocated = 8
    ds.PixelData = bytes(rng.randrange(256) for _ in range(16))
    return encode(ds, True, True)  # type: ignore[no-any-return]


def request_pdus(rng: random.Random, context_id: int, abstract: str, message_id: int
                 ) -> list[bytes]:
    """A DIMSE request fitting the context's abstract syntax (or a random one), as P-DATA-TFs
    fragmented to a random maximum length."""
    kind = {rawpdu.VERIFICATION: "echo", **dict.fromkeys(STORAGE, "store"),
            **dict.fromkeys(FIND_MODELS, "find"), **dict.fromkeys(MOVE_MODELS, "move"),
            **dict.fromkeys(GET_MODELS, "get")}.get(abstract)
    kind = kind or rng.choice(("echo", "store", "find", "move", "get"))
    request: C_ECHO | C_STORE | C_FIND | C_MOVE | C_GET
    if kind == "echo":
        request = C_ECHO()
        request.AffectedSOPClassUID = rawpdu.VERIFICATION
    elif kind == "store":
        request = C_STORE()
        request.AffectedSOPClassUID = abstract if abstract in STORAGE else STORAGE[0]
        request.AffectedSOPInstanceUID = _fuzz_uid(rng)
        request.Priority = 2
        request.DataSet = io.BytesIO(_instance(rng, str(request.AffectedSOPClassUID),
                                               str(request.AffectedSOPInstanceUID)))
    else:
        request = {"find": C_FIND, "move": C_MOVE, "get": C_GET}[kind]()
        request.AffectedSOPClassUID = abstract
        request.Priority = 2
        request.Identifier = io.BytesIO(_identifier(rng, rng.choice(("STUDY", "SERIES"))))
        if isinstance(request, C_MOVE):
            request.MoveDestination = rng.choice((TEST_AE, "NOBODY", "X"))
    request.MessageID = message_id
    return rawpdu.dimse_pdus(request, context_id, max_pdu=rng.choice((64, 512, 16384)))


def valid_sequence(rng: random.Random) -> list[bytes]:
    """An association as a well-behaved peer would run it: request, messages, end."""
    items, contexts = associate_items(rng)
    calling = TEST_AE if rng.random() < 0.9 else rng.choice(("NOBODY", "", "A" * 16))
    called = EDGE_AE if rng.random() < 0.95 else "ELSEWHERE"
    if rng.random() < 0.2:  # repeated, dropped or reordered items
        _mutate_list(rng, items)
    pdus = [rawpdu.associate_rq_pdu(calling, called, items)]
    for message_id in range(1, rng.randint(1, 4)):
        context_id, abstract = rng.choice(sorted(contexts.items()))
        pdus += request_pdus(rng, context_id, abstract, message_id)
    ending = rng.random()
    if ending < 0.6:
        pdus.append(rawpdu.release_rq())
    elif ending < 0.8:
        pdus.append(rawpdu.abort_pdu())
    return pdus


# -- mutations ------------------------------------------------------------------------------

def _mutate_list(rng: random.Random, parts: list[bytes]) -> str:
    """Repeat, drop or swap elements of `parts` in place; says what it did."""
    i, j = rng.randrange(len(parts)), rng.randrange(len(parts))
    how = rng.choice(("repeat", "drop", "swap"))
    if how == "repeat":
        parts.insert(j, parts[i])
    elif how == "drop" and len(parts) > 1:
        del parts[i]
    else:
        parts[i], parts[j] = parts[j], parts[i]
    return f"{how} {i},{j}"


def _length(rng: random.Random, actual: int, bits: int) -> int:
    top = (1 << bits) - 1
    return rng.choice((0, 1, max(actual - 1, 0), actual + 1, actual + rng.randrange(1, 1000),
                       top, top >> 1, rng.randrange(top + 1))) & top


def _item_offsets(pdu: bytes) -> list[int]:
    """Where the variable items of an association PDU start (as far as they parse)."""
    offsets, offset = [], 74
    while offset + 4 <= len(pdu):
        offsets.append(offset)
        offset += 4 + struct.unpack_from(">H", pdu, offset + 2)[0]
    return offsets


def mutate(rng: random.Random, pdus: list[bytes]) -> str:
    """One random mutation of the PDU sequence, in place; says what it did."""
    i = rng.randrange(len(pdus))
    pdu = bytearray(pdus[i])
    how = rng.choice(("flip", "flip", "truncate", "length", "pdv-length", "item-length",
                      "list", "type", "garbage")) if pdu else "garbage"  # cut to nothing
    if how == "flip":
        for _ in range(rng.randint(1, 8)):
            pdu[rng.randrange(len(pdu))] ^= 1 << rng.randrange(8)
    elif how == "truncate":
        del pdu[rng.randrange(len(pdu)):]
        if rng.random() < 0.5:
            del pdus[i + 1:]  # and the peer stops there
    elif how == "length" and len(pdu) >= 6:  # else, cut short, it gets garbage below
        struct.pack_into(">L", pdu, 2, _length(rng, len(pdu) - 6, 32))
    elif how == "pdv-length" and pdu[0] == rawpdu.P_DATA and len(pdu) >= 10:
        struct.pack_into(">L", pdu, 6, _length(rng, len(pdu) - 10, 32))
    elif how == "item-length" and pdu[0] == rawpdu.A_ASSOCIATE_RQ and _item_offsets(bytes(pdu)):
        offset = rng.choice(_item_offsets(bytes(pdu)))
        struct.pack_into(">H", pdu, offset + 2, _length(rng, 0, 16))
    elif how == "list":
        return f"{how} {_mutate_list(rng, pdus)}"
    elif how == "type":
        pdu[0] = rng.choice((0x00, 0x08, 0x09, 0x0A, 0x10, 0x7F, 0xFF))
    else:
        pdus.insert(i, bytes(rng.randrange(256) for _ in range(rng.randint(1, 200))))
        return f"garbage before {i}"
    pdus[i] = bytes(pdu)
    return f"{how} pdu {i}"


# -- playing the hostile peer -----------------------------------------------------------------

@dataclass
class Fuzzer:
    """One seeded run against one server: the generator, the model, the journal."""

    server: EdgeServer
    rng: random.Random
    pool: list[dicomgen.GeneratedInstance]
    acknowledged: dict[str, dicomgen.GeneratedInstance] = field(default_factory=dict)
    lingering: list[socket.socket] = field(default_factory=list)
    journal: list[str] = field(default_factory=list)
    log_offset: int = 0

    def step(self) -> None:
        if self.rng.random() < VALID_STORE_SHARE:
            self.valid_store()
        else:
            self.hostile_association()

    def valid_store(self) -> None:
        unsent = [i for i in self.pool if i.sop_instance_uid not in self.acknowledged]
        instance = unsent[0] if unsent else self.rng.choice(self.pool)
        if self.rng.random() < 0.25:
            result = dcmtk.storescu(self.server.port, [instance.path], timeout=60)
            # -v names the status; only "Success" is an acknowledgement.
            status = 0x0000 if result.ok and result.store_responses() == ["Success"] else -1
            how = f"storescu {result.store_responses()}"
        else:
            status, how = c_store(self.server, instance), "pynetdicom"
        self.journal.append(f"valid store ({how}) {instance.path.name} -> {status:#06x}")
        if status == 0x0000:
            self.acknowledged[instance.sop_instance_uid] = instance

    def hostile_association(self) -> None:
        pdus = valid_sequence(self.rng)
        done = [mutate(self.rng, pdus) for _ in range(self.rng.choice((0, 1, 1, 2, 3)))]
        stream = b"".join(pdus)
        sock = rawpdu.connect(self.server.port, source=HOSTILE)
        sock.settimeout(NETWORK_TIMEOUT)
        cuts = sorted(self.rng.sample(range(1, len(stream)), max(0, min(len(stream) - 1,
                                                                        self.rng.randrange(8)))))
        pauses = 0.0
        with contextlib.suppress(OSError):  # the server may end it at any point
            for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
                sock.sendall(stream[start:end])
                if self.rng.random() < 0.15:
                    pause = (NETWORK_TIMEOUT * 1.25 if self.rng.random() < 0.04
                             else self.rng.uniform(0, 0.2))
                    pauses += pause
                    time.sleep(pause)
        received = _drain(sock, quiet=0.2, at_most=1.0)
        ending = self.end(sock)
        self.journal.append(
            f"hostile: {len(pdus)} pdu(s) {len(stream)} bytes in {len(cuts) + 1} piece(s)"
            f" paused {pauses:.2f}s, mutations {done or 'none'}, got {_pdu_types(received)},"
            f" {ending}")

    def end(self, sock: socket.socket) -> str:
        how = self.rng.choice(("close", "reset", "half-close", "linger"))
        if how == "linger":
            self.lingering.append(sock)
            if len(self.lingering) > LINGERING:
                self.lingering.pop(0).close()
            return how
        if how == "reset":  # SO_LINGER 0: close() sends an RST
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        elif how == "half-close":
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)
                _drain(sock, quiet=0.5, at_most=1.0)
        sock.close()
        return how

    def check(self, number: int) -> None:
        """The server is up, answers a C-ECHO in time, and logged nothing unexpected."""
        context = f"seed {SEED} step {number}:\n" + "\n".join(self.journal[-5:])
        assert self.server.running, f"server exited; {context}\n{self.new_log()}"
        started = time.monotonic()
        status = c_echo(self.server)
        took = time.monotonic() - started
        assert status == 0x0000 and took < ECHO_WITHIN, (
            f"C-ECHO {status:#06x} after {took:.1f}s; {context}\n{self.new_log()}")
        text = self.new_log()
        bad = unhandled(self.server, self.log_offset) + [
            line for line in text.splitlines()
            if _UNEXPECTED.search(line) or _APPLIANCE_ERROR.search(line)]
        assert not bad, f"{context}\nlog:\n{text[-6000:]}"
        self.log_offset += len(text)

    def new_log(self) -> str:
        return self.server.log()[self.log_offset:]

    def close_lingering(self) -> None:
        while self.lingering:
            self.lingering.pop().close()


def _drain(sock: socket.socket, *, quiet: float, at_most: float) -> bytes:
    """What the server sends until it closes, is `quiet` seconds silent, or `at_most` passed."""
    received = b""
    deadline = time.monotonic() + at_most
    with contextlib.suppress(OSError):
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(min(quiet, left))
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
    return received


def _pdu_types(received: bytes) -> str:
    """The PDU types in what the server sent (as far as it arrived), e.g. "02 04 06"."""
    types, offset = [], 0
    while offset + 6 <= len(received):
        types.append(f"{received[offset]:02x}")
        offset += 6 + struct.unpack_from(">L", received, offset + 2)[0]
    return " ".join(types) or "nothing"


def c_echo(server: EdgeServer) -> int:
    """A C-ECHO from the legitimate peer, every wait bounded; -1 if not associated."""
    ae = AE(TEST_AE)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ECHO_WITHIN
    ae.add_requested_context(Verification)
    assoc = ae.associate(HOST, server.port, ae_title=server.ae_title)
    if not assoc.is_established:
        return -1
    try:
        return int(assoc.send_c_echo().get("Status", -1))
    finally:
        if assoc.is_established:
            assoc.release()


def c_store(server: EdgeServer, instance: dicomgen.GeneratedInstance) -> int:
    """A C-STORE from the legitimate peer; -1 without an association or a response."""
    ae = AE(TEST_AE)
    ae.acse_timeout = ae.network_timeout = 30
    ae.dimse_timeout = 60
    ae.add_requested_context(instance.sop_class_uid, [instance.transfer_syntax])
    assoc = ae.associate(HOST, server.port, ae_title=server.ae_title)
    if not assoc.is_established:
        return -1
    try:
        return int(assoc.send_c_store(instance.path).get("Status", -1))
    finally:
        if assoc.is_established:
            assoc.release()


def retrieved(server: EdgeServer, study_uid: str, folder: Path) -> dict[str, bytes]:
    """SOP Instance UID -> dataset bytes of what a C-GET of the study brings back."""
    folder.mkdir(parents=True)
    dcmtk.getscu(server.port, {"StudyInstanceUID": study_uid}, folder).check()
    return {str(dicomgen.read_header(p).SOPInstanceUID): dicomgen.dataset_bytes(p)
            for p in folder.iterdir()}


@pytest.fixture
def fuzz_server(edge_server_factory: Callable[..., EdgeServer]) -> EdgeServer:
    server = edge_server_factory(start=False)
    server.configure(dicom={"network_timeout": NETWORK_TIMEOUT, "acse_timeout": ACSE_TIMEOUT,
                            "dimse_timeout": DIMSE_TIMEOUT, "workers": 1})
    return server.start()


@pytest.fixture
def pool(tmp_path: Path) -> list[dicomgen.GeneratedInstance]:
    """Instances the legitimate peer sends: enough that most valid stores are new ones."""
    return dicomgen.make_studies(tmp_path / "pool", seed=SEED % 1000, patients=2,
                                 studies_per_patient=2, series_per_study=1,
                                 instances_per_series=max(2, STEPS // 20), size=16)


@pytest.fixture
def fuzzer(fuzz_server: EdgeServer, pool: list[dicomgen.GeneratedInstance]
           ) -> Iterator[Fuzzer]:
    run = Fuzzer(fuzz_server, random.Random(SEED), pool)
    run.log_offset = len(fuzz_server.log())
    yield run
    run.close_lingering()


def test_dicom_edge_survives_random_pdus(fuzzer: Fuzzer, tmp_path: Path) -> None:
    server = fuzzer.server
    baseline_threads = threads(server.pid)
    warm_up = min(10, STEPS)
    baseline_rss = peak_rss = rss_kb(server.pid)
    for number in range(1, STEPS + 1):
        fuzzer.step()
        fuzzer.check(number)
        if number == warm_up:
            baseline_rss = rss_kb(server.pid)
        peak_rss = max(peak_rss, rss_kb(server.pid))
    fuzzer.close_lingering()

    # Nothing is held after the connections are gone: threads end, memory stays bounded.
    assert wait_for_threads(server.pid, baseline_threads + THREAD_SLACK) <= (
        baseline_threads + THREAD_SLACK), f"seed {SEED}: threads left behind"
    growth = rss_kb(server.pid) - baseline_rss
    assert growth < RSS_BUDGET_KB, (
        f"seed {SEED}: RSS grew {growth} KiB over {STEPS} steps (peak {peak_rss} KiB)")
    # Every acknowledged instance comes back byte-identical; the index matches the files.
    assert fuzzer.acknowledged, "no valid store in the run: raise PACS_EDGE_FUZZ_STEPS"
    for study_uid in sorted({i.study_uid for i in fuzzer.acknowledged.values()}):
        got = retrieved(server, study_uid, tmp_path / "got" / study_uid)
        want = {uid: dicomgen.dataset_bytes(i.path) for uid, i in fuzzer.acknowledged.items()
                if i.study_uid == study_uid}
        assert {uid: got.get(uid) for uid in want} == want, f"seed {SEED}: {study_uid}"
    assert_fsck_clean(server.home)
    fuzzer.check(STEPS + 1)
