"""Every place the appliance reaches into a library's internals, in one module.

Each patch below was read against one upstream version (PINNED, the same pins
as pyproject.toml) and says why no public API does the job. Library code that
is patched is private: a new release may rename, move or change it without
notice, and some patches (assigning a module attribute) would then silently
do nothing. tests/test_compat.py fails when an installed version differs from
its pin or a patched name is gone or changed shape: read the new upstream code
(the names are listed here) before moving a pin.

What is touched, and who uses it:

    pynetdicom 3.0.4
      dimse_messages.NamedTemporaryFile     receive spool of C-STORE (dimse/spooling.py)
      association.uid_to_service_class      our C-MOVE/C-GET SCP     (dimse/move_get.py)
      Association._reactor_checkpoint       lost C-STORE-RSP race    (dimse/move_get.py)
      DULServiceProvider._run_loop_delay    idle poll before A-ASSOCIATE-RQ (dimse/transport.py)
      DULServiceProvider._is_transport_event, _decode_pdu, _recv_pdu, _idle_timer,
      event_queue, AssociationSocket.send   C-STORE send lane        (dimse/store_lane.py)
      subclassed hooks (overridden, not assigned; their signatures are checked too):
      RequestHandler._create_association    (dimse/transport.py)
      QueryRetrieveServiceClass._move_scp/_get_scp (dimse/move_get.py)
      ServiceClass._c_find_scp              (dimse/find_scp.py)
    aiosqlite 0.22.1
      Connection._execute, Connection._conn several statements in one thread hop
                                            (store/database.py run_sync)
    pydicom 3.0.2
      filereader._read_file_meta_info       where the dataset starts (services/ingest.py,
                                            services/dicom_header.py)

pynetdicom's `_config` flags (STORE_RECV_CHUNKED_DATASET, ...) are its documented
configuration module, not a patch; tests/test_compat.py still checks that the
flags the appliance sets exist, since setting a renamed one would do nothing.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection
from typing import Any, BinaryIO, TypeVar

import aiosqlite
from pydicom.dataset import FileMetaDataset
from pydicom.filereader import _read_file_meta_info

T = TypeVar("T")

PINNED = {"pynetdicom": "3.0.4", "pydicom": "3.0.2", "aiosqlite": "0.22.1"}

_route_lock = threading.Lock()


# --- pynetdicom 3.0.4 ---------------------------------------------------------------


def set_receive_spool(factory: Callable[..., Any]) -> None:
    """Spool every received C-STORE dataset, undecoded, into what `factory` returns.

    With `_config.STORE_RECV_CHUNKED_DATASET`, pynetdicom writes a dataset as its
    P-DATA arrives into `NamedTemporaryFile(delete=False, mode="wb", suffix=".dcm")`,
    looked up as the module-level name `pynetdicom.dimse_messages.NamedTemporaryFile`
    (imported there from tempfile). No option says where that file goes; replacing
    the name does. `factory` gets the same arguments and returns an object with
    `name`, `write`, `file.flush()` and `close()` (the subset pynetdicom uses).
    """
    from pynetdicom import _config, dimse_messages  # not at import: the store imports compat

    _config.STORE_RECV_CHUNKED_DATASET = True
    dimse_messages.NamedTemporaryFile = factory  # type: ignore[assignment]


def route_service_classes(uids: Collection[str], service_class: type) -> None:
    """Serve the SOP classes `uids` with `service_class` in every association.

    `Association._serve_request` picks the service class of a request through the
    module-level function `pynetdicom.association.uid_to_service_class`; AE offers no
    hook for it. The name is wrapped once per process; later calls add their SOP
    classes to the same table (C-MOVE/C-GET, Storage Commitment); every other SOP
    class keeps pynetdicom's own class.
    """
    import pynetdicom.association  # not at import: the store imports compat

    with _route_lock:
        _ROUTES.update(dict.fromkeys(uids, service_class))
        original = pynetdicom.association.uid_to_service_class
        if getattr(original, "pacs_edge_routed", False):
            return

        def pick(uid: str) -> Any:
            routed = _ROUTES.get(uid)
            return routed if routed is not None else original(uid)

        pick.pacs_edge_routed = True  # type: ignore[attr-defined]
        pynetdicom.association.uid_to_service_class = pick


_ROUTES: dict[str, type] = {}


def replace_reactor_checkpoint(assoc: Any, checkpoint: Any) -> bool:
    """Put `checkpoint` where the association's reactor thread parks; False if it cannot.

    `Association._reactor_checkpoint` is the threading.Event the reactor waits on
    at the top of each loop while a `send_*()` call waits for its response;
    `checkpoint` must offer Event's set/clear/is_set/wait. When the attribute is
    missing or no longer an Event nothing is replaced (the caller's retry then
    covers the race alone; see appliance/dimse/move_get.py).
    """
    if not isinstance(getattr(assoc, "_reactor_checkpoint", None), threading.Event):
        return False
    assoc._reactor_checkpoint = checkpoint
    return True


def set_poll_delay(dul: Any, seconds: float) -> None:
    """How long the DUL thread sleeps between polls of its socket and queues.

    pynetdicom polls every `DULServiceProvider._run_loop_delay` seconds (0.001,
    ~2% of a core per connection); it has no setting for it.
    """
    dul._run_loop_delay = seconds


def share_send_lock(dul: Any) -> threading.Lock:
    """A lock every write of the DUL's socket takes; the store lane writes under it too.

    pynetdicom writes a PDU with `AssociationSocket.send(bytes)`, from its DUL
    thread only. The store lane (dimse/store_lane.py) writes C-STORE messages to
    the same socket from another thread; holding this lock for a whole message
    keeps the DUL's PDUs (a C-GET pending response, an A-ABORT) from landing
    inside it. `send` is wrapped on this socket object only; a second call
    returns the same lock.
    """
    sock = dul.socket
    lock: threading.Lock | None = getattr(sock, "pacs_edge_send_lock", None)
    if lock is not None:
        return lock
    lock = threading.Lock()
    unlocked = sock.send

    def send(bytestream: bytes) -> None:
        with lock:
            unlocked(bytestream)

    sock.send = send
    sock.pacs_edge_send_lock = lock
    return lock


def gate_transport_reads(dul: Any, gate: threading.Lock) -> None:
    """The DUL reads its socket only while it can take `gate` (the lane holds it while
    it reads the C-STORE responses itself).

    `DULServiceProvider._is_transport_event()` is the DUL loop's one place that
    reads a PDU off the socket (it returns False when nothing was read). It is
    replaced on this DUL object only: while another thread holds `gate` it
    reads nothing, and a PDU it is in the middle of reading finishes first.
    """
    if getattr(dul, "pacs_edge_read_gate", None) is gate:
        return
    reads = dul._is_transport_event

    def gated() -> bool:
        if not gate.acquire(blocking=False):
            return False
        try:
            return bool(reads())
        finally:
            gate.release()

    dul._is_transport_event = gated
    dul.pacs_edge_read_gate = gate


def note_transport_activity(dul: Any) -> None:
    """Restart the DUL's idle timer, as its own read of a PDU does: the association's
    network timeout must not fire while the lane is the one reading."""
    dul._idle_timer.restart()


def hand_pdu_to_dul(dul: Any, raw: bytes) -> None:
    """Give a PDU the lane read but does not handle (an A-ABORT, a C-CANCEL, an
    A-RELEASE-RQ) to the DUL's state machine, as `_read_pdu_data()` does with one it
    read: decode, event on `event_queue`, PDU on `_recv_pdu`; Evt19 if undecodable."""
    try:
        pdu, event = dul._decode_pdu(bytearray(raw))
    except Exception:
        dul.event_queue.put("Evt19")
        return
    dul.event_queue.put(event)
    dul._recv_pdu.put(pdu)


def transport_closed(dul: Any) -> None:
    """Tell the DUL its connection is gone (Evt17), as its own read does on EOF."""
    dul.event_queue.put("Evt17")


# --- aiosqlite 0.22.1 ---------------------------------------------------------------


async def run_in_connection_thread(conn: aiosqlite.Connection, fn: Callable[..., T],
                                   *args: Any) -> T:
    """Run `fn(sqlite3_connection, *args)` in `conn`'s own thread: one hop for many statements.

    aiosqlite has no public call for this; `_execute` is the queue every public
    method goes through, and `_conn` is the sqlite3 connection its thread owns
    (created there, used nowhere else).
    """
    return await conn._execute(fn, conn._conn, *args)  # type: ignore[no-any-return]


# --- pydicom 3.0.2 ------------------------------------------------------------------


def read_file_meta(fp: BinaryIO) -> FileMetaDataset:
    """The File Meta group at `fp` (just after the preamble); leaves `fp` at the dataset.

    pydicom's public `read_file_meta_info()` takes a path and does not say where
    the dataset starts; its private reader leaves the file positioned there,
    which is what ingest needs to copy the dataset bytes as they are.
    """
    return _read_file_meta_info(fp)
