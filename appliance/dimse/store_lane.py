"""StoreLane: C-STORE sub-operations written straight from the stored files.

pynetdicom's `send_c_store(path)` (even with STORE_SEND_CHUNKED_DATASET)
reads the File Meta with pydicom, encodes the command set with pydicom, and
hands every fragment of the dataset to the DUL thread as a P-DATA primitive
that is queued, run through the state machine, turned into a PDU object and
encoded: ~3.5 ms of CPU per instance sent, most of a retrieve's cost. Its
response then travels back through the DUL's 1 ms poll and the DIMSE queue.

The lane instead, on an established association:

- frames each C-STORE-RQ itself: the command set is encoded here (Implicit
  VR Little Endian, PS3.7 6.3.1), the file's dataset bytes (everything after
  its File Meta group, exactly as stored) go out in PDVs as large as the
  peer's maximum PDU allows, the whole message in one `sendmsg()`;
- reads the next file while the previous C-STORE is in flight (`store(...,
  upcoming=...)`);
- never holds a large instance whole: a dataset above READ_WHOLE (a
  tomosynthesis or whole-slide image, a long cine: GBs) is sent from its open
  file, STREAM_CHUNK at a time; it is opened before anything is sent, so an
  eviction that unlinks it meanwhile takes nothing away. A read that fails
  half-way through the message leaves the lane `broken` (the C-STORE cannot be
  finished on that association);
- asks the kernel for an immediate ACK (TCP_QUICKACK) before each response: a
  peer with Nagle on sends its response in pieces and waits for that ACK
  between them (~45 ms an instance otherwise);
- reads the C-STORE-RSPs itself. While the lane is open the DUL does not
  read the socket (compat.gate_transport_reads); a PDU the lane reads that
  is not its response (an A-ABORT, an A-RELEASE-RQ, a C-CANCEL-RQ on a
  C-GET association) goes to the DUL's state machine as if the DUL had read
  it (compat.hand_pdu_to_dul), so everything but the C-STORE exchange still
  runs through pynetdicom;
- keeps the DUL waiting on its gate while it reads for it (LANE_POLL at a time);
- writes under the lock the DUL's own writes take (compat.share_send_lock),
  so a PDU the DUL sends meanwhile (a C-GET pending response) never lands
  inside a C-STORE message. Reads take it too: an SSL socket must not be
  read and written by two threads at once.

A send that gets no response within `timeout`, or whose connection broke,
returns None and leaves the lane `broken`; `ended` when it was the peer
that ended the association (its A-ABORT or close went to the DUL), else
the caller aborts it (and a C-MOVE retries on a fresh one, move_get.py). Reading a
file can fail before anything is sent (OSError from `payload()`): the
association is still good.

Where the lane reads: the socket itself, exactly the bytes of one PDU at a
time (a 6-byte header, then its length), so no byte meant for the DUL is
consumed. This relies on the association socket not buffering ahead of what
pynetdicom asked for (appliance/dimse/pdu_socket.py reads exactly too).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

from appliance.base import compat
from appliance.base.dicom_wire import (
    COMMAND,
    LAST,
    NO_DATA_SET,
    P_DATA_TF,
    PDU_HEADER,
    UNLIMITED_PDU,
    command_elements,
    command_pdu,
    command_set,
    element,
    pdv_frame,
    split_pdvs,
    ui,
    us,
)
from appliance.base.metrics import SENT_BYTES
from appliance.dimse.pdu_socket import quick_ack
from appliance.store.spool import dataset_offset as spool_dataset_offset

log = logging.getLogger(__name__)

C_STORE_RQ, C_STORE_RSP = 0x0001, 0x8001
C_GET_RSP, C_MOVE_RSP = 0x8010, 0x8021
PENDING = 0xFF00
_IOV_BATCH = 512  # buffers per sendmsg() call (IOV_MAX is 1024 on Linux)
_TLS_WRITE = 1 << 18  # bytes joined per TLS write
# How long the DUL's read waits for the lane's gate per pass of its loop: it has nothing
# to read while the lane reads for it, and pynetdicom's 1 ms loop would cost ~2% of a
# core per association; it resumes as soon as the lane lets go.
LANE_POLL = 0.02
_META_HEAD = 144  # preamble, "DICM" and the File Meta group length element


# The largest PDU read before the association is refused as broken; never below this.
MIN_READ_LIMIT = 1 << 18
# Datasets up to this size are read whole (and read ahead: most instances, a CT slice is
# 0.5 MB); a larger one is sent from its open file, STREAM_CHUNK bytes at a time.
READ_WHOLE = 16 << 20
STREAM_CHUNK = 4 << 20


class _ReadFailed(Exception):
    """Reading a stored file failed after its C-STORE-RQ began: the message is cut short."""


@dataclass(frozen=True)
class Payload:
    """A stored file's dataset bytes, exactly as stored after its File Meta group: in
    `dataset` when at most READ_WHOLE, else in `file`, open at its first byte. `close()`
    once sent (StoreLane.store does)."""

    path: Path
    size: int
    dataset: bytes | None = None
    file: BinaryIO | None = None

    def close(self) -> None:
        if self.file is not None:
            self.file.close()

    def chunks(self, chunk: int) -> Iterator[bytes]:
        """The dataset bytes, `chunk` at a time; _ReadFailed when the file cannot give
        them all."""
        if self.dataset is not None:
            yield self.dataset
            return
        assert self.file is not None
        left = self.size
        while left:
            try:
                data = self.file.read(min(chunk, left))
            except OSError as exc:
                raise _ReadFailed(exc.strerror or type(exc).__name__) from exc
            if not data:
                raise _ReadFailed("stored file ended early")
            left -= len(data)
            yield data


def read_payload(path: Path) -> Payload:
    """The dataset of the stored Part 10 file at `path`, read whole or opened (raises
    OSError or ValueError)."""
    fp = open(path, "rb", buffering=0)  # noqa: SIM115 - a large one stays open in the Payload
    try:
        file_size = os.fstat(fp.fileno()).st_size
        offset = _dataset_offset(fp.read(_META_HEAD), file_size, path)
        size = file_size - offset
        fp.seek(offset)
        if size > READ_WHOLE:
            return Payload(path, size, file=fp)
        data = fp.read()
        fp.close()
        return Payload(path, size, dataset=data)
    except BaseException:
        fp.close()
        raise


def _dataset_offset(head: bytes, size: int, path: Path) -> int:
    """Where the dataset starts: right after the File Meta group as its (0002,0000) group
    length says, the rule ingest hashed and indexed by (`instances.dataset_offset`).

    The box wrote every stored file's File Meta with that element, so there is no other
    rule to fall back to. pydicom's File Meta reader must not be one: it reads every
    leading group-2 element as File Meta, and a modality may send its data set starting
    with one ((0002,0016) Source AE Title, say); those bytes were stored and would be
    left out of the retrieve."""
    offset = spool_dataset_offset(head)
    if offset < 0:
        raise ValueError(f"no File Meta group length: {path.name}")
    if offset > size:
        raise ValueError(f"File Meta group length beyond the end of the file: {path.name}")
    return offset


def c_store_rq(*, msg_id: int, sop_class: str, sop_instance: str, priority: int = 0,
               originator_aet: str | None = None, originator_id: int | None = None) -> bytes:
    """An encoded C-STORE-RQ command set (PS3.7 9.3.1.1), with a data set to follow."""
    body = [
        element(0x0002, ui(sop_class)),
        element(0x0100, us(C_STORE_RQ)),
        element(0x0110, us(msg_id)),
        element(0x0700, us(priority)),
        element(0x0800, us(0x0001)),  # any value but 0x0101: a data set follows
        element(0x1000, ui(sop_instance)),
    ]
    if originator_aet:
        aet = originator_aet.encode("ascii")
        body.append(element(0x1030, aet + b" " * (len(aet) % 2)))
    if originator_id is not None:
        body.append(element(0x1031, us(originator_id)))
    return command_set(*body)


def pending_rsp(*, command_field: int, sop_class: str, responding_to: int, remaining: int,
                completed: int, failed: int, warning: int) -> bytes:
    """An encoded Pending C-MOVE-RSP or C-GET-RSP command set, no identifier
    (PS3.7 9.3.3.2, 9.3.4.2): what pynetdicom would encode, ~1 ms cheaper."""
    return command_set(
        element(0x0002, ui(sop_class)),
        element(0x0100, us(command_field)),
        element(0x0120, us(responding_to)),
        element(0x0800, us(NO_DATA_SET)),
        element(0x0900, us(PENDING)),
        element(0x1020, us(remaining)),
        element(0x1021, us(completed)),
        element(0x1022, us(failed)),
        element(0x1023, us(warning)),
    )


def write_command(assoc: Any, cx_id: int, command: bytes, *, reads_gated: bool) -> bool:
    """Write a command-only message straight to the association's socket, under the
    DUL's send lock; False when it must go through pynetdicom instead: an SSL socket
    whose reads the DUL still does (one SSL object, two threads), or a command
    larger than the peer's maximum PDU."""
    peer = assoc.acceptor if assoc.is_requestor else assoc.requestor
    max_pdu = int(peer.maximum_length or 0) or UNLIMITED_PDU
    sock = getattr(assoc.dul.socket, "socket", None)
    if sock is None or len(command) + 12 > max_pdu:
        return False
    if isinstance(sock, ssl.SSLSocket) and not reads_gated:
        return False
    with compat.share_send_lock(assoc.dul):
        sock.sendall(command_pdu(cx_id, command))
    return True


class StoreLane:
    """C-STORE requests over one established association; see the module docstring.

    Use as a context manager: the DUL does not read the socket in between.
    `contexts` maps (SOP class UID, transfer syntax UID) to the presentation
    context ID to send in (only contexts in which this side is the Storage SCU).
    """

    def __init__(self, assoc: Any, contexts: dict[tuple[str, str], int], *,
                 timeout: float | None) -> None:
        self.assoc = assoc
        self.contexts = contexts
        self.timeout = timeout
        self.broken = False
        self.ended = False  # the peer ended the association (A-ABORT, release, close)
        dul = assoc.dul
        self._dul = dul
        self._sock: socket.socket = dul.socket.socket
        self._tls = isinstance(self._sock, ssl.SSLSocket)
        peer = assoc.acceptor if assoc.is_requestor else assoc.requestor
        max_pdu = int(peer.maximum_length or 0) or UNLIMITED_PDU
        # A PDU of one PDV: 6 bytes of PDU header, 6 of PDV header, then data.
        self._fragment = max(min(max_pdu, UNLIMITED_PDU) - 12, 1)
        ours = assoc.requestor if assoc.is_requestor else assoc.acceptor
        self._read_limit = max(int(ours.maximum_length or 0), MIN_READ_LIMIT)
        self._gate = threading.Lock()
        self._wire = compat.share_send_lock(dul)
        self._held: list[bytes] = []  # PDUs of a command message not (yet) known ours
        self._command = bytearray()
        self._upcoming: Payload | None = None
        self._saved_timeout: float | None = None

    def __enter__(self) -> StoreLane:
        self.open()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def open(self) -> None:
        """Take over reading the socket from the DUL."""
        compat.gate_transport_reads(self._dul, self._gate, wait=LANE_POLL)
        self._gate.acquire()
        self._saved_timeout = self._sock.gettimeout()
        # Bounded writes: pynetdicom leaves a requested association's socket blocking
        # without a timeout, and a peer that stops reading would hold a send for ever.
        self._sock.settimeout(float(self.assoc.network_timeout or 60.0))

    def close(self) -> None:
        """Give reading back to the DUL (with any PDU read but not handled)."""
        if self._upcoming is not None:
            self._upcoming.close()
            self._upcoming = None
        for raw in self._held:  # part of a message that is the DUL's to finish
            compat.hand_pdu_to_dul(self._dul, raw)
        self._held.clear()
        with contextlib.suppress(OSError):
            self._sock.settimeout(self._saved_timeout)
        self._gate.release()

    # --- sending ------------------------------------------------------------------------

    def payload(self, path: Path) -> Payload:
        """The file's dataset, read ahead by the previous `store()` if it could."""
        upcoming, self._upcoming = self._upcoming, None
        if upcoming is not None and upcoming.path == path:
            return upcoming
        if upcoming is not None:
            upcoming.close()
        return read_payload(path)

    def store(self, payload: Payload, *, sop_class: str, transfer_syntax: str,
              sop_instance: str, msg_id: int, originator_aet: str | None = None,
              originator_id: int | None = None, upcoming: Path | None = None) -> int | None:
        """Send one C-STORE-RQ and return the response's Status; None when there was none
        (the lane is then `broken`). `upcoming` is read while the peer stores. The
        payload is closed once sent. Raises OSError when a streamed payload's first read
        fails: nothing was sent, the lane is fine, and the sub-operation fails alone (a
        dataset read whole failed the same way, in `payload()`)."""
        try:
            cx_id = self.contexts[(sop_class, transfer_syntax)]
            command = c_store_rq(msg_id=msg_id, sop_class=sop_class,
                                 sop_instance=sop_instance, originator_aet=originator_aet,
                                 originator_id=originator_id)
            batches = self._frames(cx_id, command, payload)
            try:
                first = next(batches)  # its data read before anything is written
            except _ReadFailed as exc:
                raise OSError(errno.EIO, str(exc)) from exc
        except BaseException:
            payload.close()
            raise
        try:
            self._send(itertools.chain((first,), batches))
        except _ReadFailed as exc:
            log.warning("c-store send cut short: the stored file could not be read error=%s",
                        exc)
            self._fail(closed=False)  # the message is unfinished: the caller aborts
            return None
        except OSError as exc:
            log.warning("c-store send failed error=%s", type(exc).__name__)
            self._fail(closed=True)
            return None
        finally:
            payload.close()
        compat.note_transport_activity(self._dul)
        quick_ack(self._sock)  # a peer with Nagle on sends its response in pieces
        SENT_BYTES.labels("dicom").inc(payload.size)
        if upcoming is not None:
            with contextlib.suppress(OSError, ValueError):  # payload() reads it again, and fails
                self._upcoming = read_payload(upcoming)
        return self._response(msg_id)

    def _frames(self, cx_id: int, command: bytes, payload: Payload
                ) -> Iterator[list[bytes | memoryview]]:
        """The message's PDUs as batches of buffers: the command in one PDV, the dataset
        in PDVs of at most `_fragment` bytes, one PDV per P-DATA-TF PDU; one batch for a
        dataset read whole, one per STREAM_CHUNK (whole PDVs) for a streamed one."""
        frames: list[bytes | memoryview] = [pdv_frame(cx_id, COMMAND | LAST, len(command)),
                                            command]
        if not payload.size:  # an empty data set: one empty last PDV
            yield [*frames, pdv_frame(cx_id, LAST, 0)]
            return
        left = payload.size
        chunk = max(STREAM_CHUNK // self._fragment, 1) * self._fragment
        for data in payload.chunks(chunk):
            view = memoryview(data)
            left -= len(data)
            for start in range(0, len(data), self._fragment):
                piece = view[start:start + self._fragment]
                last = not left and start + len(piece) == len(data)
                frames.append(pdv_frame(cx_id, LAST if last else 0, len(piece)))
                frames.append(piece)
            yield frames
            frames = []

    def _send(self, batches: Iterator[list[bytes | memoryview]]) -> None:
        """Write the message, every batch under one hold of the wire: the DUL's PDUs
        never land inside it."""
        sock = self._sock
        with self._wire:
            for frames in batches:
                if self._tls:
                    self._send_tls(frames)
                    continue
                pending = [memoryview(frame) for frame in frames]
                while pending:
                    sent = sock.sendmsg(pending[:_IOV_BATCH])
                    while sent:
                        if sent >= len(pending[0]):
                            sent -= len(pending.pop(0))
                        else:
                            pending[0] = pending[0][sent:]
                            sent = 0

    def _send_tls(self, frames: list[bytes | memoryview]) -> None:
        chunk: list[bytes | memoryview] = []
        size = 0
        for frame in frames:
            chunk.append(frame)
            size += len(frame)
            if size >= _TLS_WRITE:
                self._sock.sendall(b"".join(chunk))
                chunk, size = [], 0
        if chunk:
            self._sock.sendall(b"".join(chunk))

    # --- receiving ----------------------------------------------------------------------

    def _response(self, msg_id: int) -> int | None:
        """Read PDUs until the C-STORE-RSP to `msg_id`; hand every other PDU to the DUL."""
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while True:
            try:
                raw = self._read_pdu(deadline)
            except TimeoutError:
                log.warning("no c-store response within timeout=%gs", self.timeout or 0)
                self._fail(closed=False)
                return None
            except OSError as exc:
                log.warning("connection ended while waiting for a c-store response error=%s",
                            type(exc).__name__)
                self._fail(closed=True)
                return None
            compat.note_transport_activity(self._dul)
            if raw[0] != P_DATA_TF:  # A-ABORT, A-RELEASE-RQ, ...: the association is ending
                self._release_held()
                compat.hand_pdu_to_dul(self._dul, raw)
                self._fail(closed=False)
                self.ended = True
                return None
            status = self._take(raw, msg_id)
            if status is not None:
                return status

    def _take(self, raw: bytes, msg_id: int) -> int | None:
        """Collect a P-DATA-TF's command fragments; the Status once they make our response."""
        try:
            pdvs = _pdvs(raw)
        except ValueError:
            pdvs = []
        if not pdvs or any(not control & COMMAND for control, _ in pdvs):
            self._release_held()  # a data set: not a C-STORE-RSP, which has none
            compat.hand_pdu_to_dul(self._dul, raw)
            return None
        self._held.append(raw)
        for control, data in pdvs:
            self._command += data
            if not control & LAST:
                continue
            try:
                values = command_elements(bytes(self._command), ordered=False)
                field = struct.unpack("<H", values[0x0100])[0]
                responding_to = struct.unpack("<H", values.get(0x0120, b"\0\0"))[0]
                status = values.get(0x0900)
            except (ValueError, KeyError, struct.error):
                field, responding_to, status = None, None, None
            if field != C_STORE_RSP:
                self._release_held()
                return None
            self._held.clear()
            self._command.clear()
            if responding_to == msg_id and status is not None and len(status) == 2:
                return int(struct.unpack("<H", status)[0])
            log.warning("c-store response ignored: not for the request in flight")
        return None

    def _release_held(self) -> None:
        for held in self._held:
            compat.hand_pdu_to_dul(self._dul, held)
        self._held.clear()
        self._command.clear()

    def _read_pdu(self, deadline: float | None) -> bytes:
        """One whole PDU; TimeoutError when none started before `deadline`, or when a
        started one is not whole by `deadline` or `network_timeout` after its first
        byte, whichever is later: a peer sending a byte now and then (each within the
        socket's timeout) would otherwise hold the sub-operation for ever."""
        self._wait_readable(deadline)
        network = float(self.assoc.network_timeout or 60.0)
        until = max(deadline or 0.0, time.monotonic() + network)
        try:
            with self._wire:
                header = self._read_exactly(6, until)
                length = PDU_HEADER.unpack(header)[2]
                if length > self._read_limit:
                    raise ConnectionAbortedError(f"PDU of {length} bytes")
                return header + self._read_exactly(length, until)
        finally:
            with contextlib.suppress(OSError):
                self._sock.settimeout(network)

    def _read_exactly(self, count: int, until: float) -> bytes:
        buffer = bytearray(count)
        view = memoryview(buffer)
        received = 0
        while received < count:
            left = until - time.monotonic()
            if left <= 0:
                raise TimeoutError
            self._sock.settimeout(left)
            got = self._sock.recv_into(view[received:], count - received)
            if not got:
                raise ConnectionResetError("peer closed the connection")
            received += got
        return bytes(buffer)

    def _wait_readable(self, deadline: float | None) -> None:
        """TimeoutError once `deadline` has passed, even with PDUs waiting: a peer that
        keeps sending (none of it our response) would otherwise hold the lane for ever."""
        if deadline is not None and time.monotonic() >= deadline:
            raise TimeoutError
        sock = self._sock
        if self._tls and sock.pending():  # type: ignore[attr-defined]
            return
        poller = select.poll()  # not select(): it fails on descriptors >= 1024
        poller.register(sock, select.POLLIN)
        while True:
            wait = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            if poller.poll(None if wait is None else wait * 1000):
                return
            if wait is not None and deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError

    def _fail(self, *, closed: bool) -> None:
        self.broken = True
        self._release_held()
        if closed:
            self.ended = True
            compat.transport_closed(self._dul)


def _pdvs(raw: bytes) -> list[tuple[int, bytes]]:
    """(message control header, fragment) of each PDV in a P-DATA-TF PDU."""
    return [(data[0], data[1:]) for _, data in split_pdvs(raw[6:])]


def storage_contexts(assoc: Any) -> dict[tuple[str, str], int]:
    """(SOP class, transfer syntax) -> context ID of the accepted contexts in which this
    side may send C-STORE requests."""
    return {(str(cx.abstract_syntax), str(cx.transfer_syntax[0])): int(cx.context_id)
            for cx in assoc.accepted_contexts if cx.as_scu}

