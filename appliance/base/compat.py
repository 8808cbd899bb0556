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
      dimse_messages.create_file_meta, write_file_meta_info
                                            its File Meta from a template (dimse/file_meta.py)
      association.uid_to_service_class      our C-MOVE/C-GET SCP     (dimse/move_get.py)
      pdu_items.set_uid, pdu_primitives.set_uid, presentation.set_uid (assigned: the
        name each imported from utils), PresentationContext.add_transfer_syntax
        (assigned; its checks skipped for known syntaxes, through
        PresentationContext._transfer_syntax)
                                            negotiation's UIDs converted once
                                            (cache_negotiation_uids, dimse/server.py)
      Association._reactor_checkpoint       lost C-STORE-RSP race    (dimse/move_get.py)
      DULServiceProvider.run_reactor, Association._run_reactor: replaced by loops that
        block until there is work (run_dul_reactor, run_association_reactor), read
        through DULServiceProvider._kill_thread, _idle_timer, _process_recv_primitive,
        _is_transport_event, Association._kill, _is_paused, _dul_ready; a local
        primitive after the association's end is dropped as fsm.TRANSITION_TABLE has
        no action for it (_dropped_after_end, through DULServiceProvider.to_provider_queue)
                                            reactors               (dimse/reactors.py)
      ServiceUser.user_information's MaximumLengthNotification (changed in place)
                                            PDUs of at most 4 MiB to a peer that
                                            announced no maximum (cap_peer_maximum_pdu:
                                            sync/reader_client.py)
      DULServiceProvider.socket, AssociationSocket.socket
                                            TCP_NODELAY on associations we request
                                            (set_nodelay: dimse/scu.py, move_get.py,
                                            commitment_report.py, sync/reader_client.py)
      AssociationSocket.send (wrapped on one object)
                                            quick ACKs on associations we request
                                            (ack_after_sends: dimse/scu.py,
                                            sync/reader_client.py)
      Association._run_reactor, Association.kill (assigned)
                                            requestors' checkpoint race, and a kill
                                            that polls every 1 ms, not 10
                                            (close_requestor_reactor_race)
      dul.Timer (assigned: the name DULServiceProvider builds its ARTIM and
        network-timeout timers with), read through Timer._start_time, _end_time
                                            timers on the monotonic clock
                                            (steady_association_timers: dimse/server.py
                                            configure_pynetdicom, close_requestor_reactor_race)
      DULServiceProvider._is_transport_event, _decode_pdu, _recv_pdu, _idle_timer,
      event_queue, AssociationSocket.send   C-STORE send lane        (dimse/store_lane.py)
      to_primitive of a decoded association PDU (assigned on that object): the fsm's
        action takes the primitive built to check the PDU (hand_pdu_to_dul)
      DULServiceProvider._read_pdu_data (overridden: read_pdu), P_DATA's
        _presentation_data_value_list, DIMSEServiceProvider.receive_primitive,
        Association._accepted_cx (a message's context checked at its start),
        DIMSEMessage._data_set_path (the spool of a C-STORE cut off by the
        association's end: unfinished_receive_spool),
        DIMSEServiceProvider.message, DULServiceProvider._kill_thread, _idle_timer,
        to_provider_queue.queue             P-DATA straight to DIMSE, or to the
                                            C-STORE receiver (dimse/reactors.py,
                                            dimse/store_receiver.py)
      DULServiceProvider._process_recv_primitive (assigned on one DUL object: counts
        the passes that find nothing to send), to_provider_queue, _kill_thread
                                            C-FIND send backlog     (dimse/send_queue.py)
      subclassed hooks (overridden, not assigned; their signatures are checked too):
      RequestHandler._create_association    (dimse/transport.py)
      QueryRetrieveServiceClass._move_scp/_get_scp (dimse/move_get.py)
      ServiceClass._c_find_scp              (dimse/find_scp.py)
    aiosqlite 0.22.1
      Connection._execute, Connection._conn several statements in one thread hop
                                            (store/database.py run_sync), group
                                            commits from other threads (Writer)
    pydicom 3.0.2
      filereader._read_file_meta_info       where the dataset starts (services/ingest.py,
                                            services/dicom_header.py)
    prometheus-client 0.26.0
      mmap_dict.MmapedDict.__init__, _init_value (assigned), read through _used,
        _capacity, _f and _INITIAL_MMAP_SIZE
                                            metric files' pages backed by blocks before
                                            they are written (back_metric_pages,
                                            base/metrics_dir.py)
      mmap_dict.MmapedDict.write_value, close, mmap_key; multiprocess's file names
        (`<type>_<anything>.db`, the type read from the name)
                                            the counts of processes that are gone,
                                            kept in one file (write_metric_file,
                                            base/metrics_dir.py)
    APScheduler 3.11.3
      subclassed hooks (overridden, not assigned; their signatures are checked too):
      BaseScheduler._process_jobs, AsyncIOScheduler._start_timer, as
      AsyncIOScheduler.wakeup calls them
                                            the sync agent's jobs run on after a
                                            wall-clock step (sync/steady_scheduler.py)

pynetdicom's `_config` flags (STORE_RECV_CHUNKED_DATASET, ...) are its documented
configuration module, not a patch; tests/test_compat.py still checks that the
flags the appliance sets exist, since setting a renamed one would do nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import select
import socket
import sqlite3
import ssl
import struct
import threading
import time
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar

from appliance.base.dicom_wire import PDV_OVERHEAD, split_pdvs
from appliance.base.errors import TransportAborted

if TYPE_CHECKING:  # each command imports compat (metrics_dir): pydicom only where it reads
    import aiosqlite
    from pydicom.dataset import FileMetaDataset

T = TypeVar("T")
log = logging.getLogger(__name__)

PINNED = {"pynetdicom": "3.0.4", "pydicom": "3.0.2", "aiosqlite": "0.22.1",
          "prometheus-client": "0.26.0", "APScheduler": "3.11.3"}

_route_lock = threading.Lock()


# --- pynetdicom 3.0.4 ---------------------------------------------------------------


class _EncodedFileMeta(bytes):
    """A File Meta group already encoded (see set_receive_spool)."""


def set_receive_spool(factory: Callable[..., Any],
                      encode_file_meta: Callable[[Any, Any, Any], bytes | None]) -> None:
    """Spool every received C-STORE dataset, undecoded, into what `factory` returns,
    behind a File Meta group that `encode_file_meta` encodes.

    With `_config.STORE_RECV_CHUNKED_DATASET`, pynetdicom writes a dataset as its
    P-DATA arrives into `NamedTemporaryFile(delete=False, mode="wb", suffix=".dcm")`,
    looked up as the module-level name `pynetdicom.dimse_messages.NamedTemporaryFile`
    (imported there from tempfile). No option says where that file goes; replacing
    the name does. `factory` gets the same arguments and returns an object with
    `name`, `write`, `file.flush()` and `close()` (the subset pynetdicom uses).

    Ahead of the dataset, `DIMSEMessage.decode_msg` writes
    `write_file_meta_info(file, create_file_meta(sop_class_uid=..., sop_instance_uid=...,
    transfer_syntax=...))`, both module-level names in dimse_messages. They are
    replaced by a pair that writes `encode_file_meta(sop_class, sop_instance, syntax)`
    in one piece, and falls back to upstream's pair where it returns None.
    """
    from pynetdicom import _config, dimse_messages  # not at import: the store imports compat

    _config.STORE_RECV_CHUNKED_DATASET = True
    dimse_messages.NamedTemporaryFile = factory  # type: ignore[assignment]
    create = getattr(dimse_messages.create_file_meta, "upstream", dimse_messages.create_file_meta)
    write = getattr(dimse_messages.write_file_meta_info, "upstream",
                    dimse_messages.write_file_meta_info)

    def create_file_meta(*, sop_class_uid: Any, sop_instance_uid: Any,
                         transfer_syntax: Any) -> Any:
        encoded = encode_file_meta(sop_class_uid, sop_instance_uid, transfer_syntax)
        if encoded is None:
            return create(sop_class_uid=sop_class_uid, sop_instance_uid=sop_instance_uid,
                          transfer_syntax=transfer_syntax)
        return _EncodedFileMeta(encoded)

    def write_file_meta_info(fp: Any, file_meta: Any, *args: Any, **kwargs: Any) -> None:
        if isinstance(file_meta, _EncodedFileMeta):
            fp.write(file_meta)
        else:
            write(fp, file_meta, *args, **kwargs)

    create_file_meta.upstream = create  # type: ignore[attr-defined]
    write_file_meta_info.upstream = write  # type: ignore[attr-defined]
    dimse_messages.create_file_meta = create_file_meta  # type: ignore[assignment]
    dimse_messages.write_file_meta_info = write_file_meta_info  # type: ignore[assignment]


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


# Distinct UIDs a process keeps converted for association negotiation: the SOP
# classes and transfer syntaxes peers propose (a few hundred); a peer sending
# random ones only churns the cache.
UID_CACHE_SIZE = 4096
# Where pynetdicom builds association PDUs and their primitives from UIDs.
_NEGOTIATION_MODULES = ("pynetdicom.pdu_items", "pynetdicom.pdu_primitives",
                        "pynetdicom.presentation")


def cache_negotiation_uids() -> None:
    """Convert each distinct UID of association negotiation once per process.

    Decoding an A-ASSOCIATE-RQ takes pynetdicom through `utils.set_uid` for every
    abstract and transfer syntax, several times each (the PDU item, its
    primitive, the presentation context), and each call builds a pydicom UID and
    validates it with two regular expressions: 12 ms of CPU for the 121 contexts
    getscu proposes, before the association can be answered (C-GET, C-MOVE and
    any modality that proposes many SOP classes pay it per association). The
    modules that negotiate import `set_uid` by name; their name is replaced by one
    that remembers its results (4.5 ms for the same request).

    `set_uid` is a function of its arguments: a UID that fails validation raises
    ValueError every time (nothing is cached for it), and a valid one is a pydicom
    UID, an immutable `str` that associations can share. A UID object carrying
    attributes of its own (a private transfer syntax's encoding) is converted as
    before, uncached. pynetdicom's "non-conformant value" warning is logged the
    first time a value is seen. Idempotent.
    """
    import functools
    import importlib

    from pynetdicom import utils

    upstream = utils.set_uid
    cached = functools.lru_cache(maxsize=UID_CACHE_SIZE)(upstream)

    def set_uid(value: Any, name: str, allow_empty: bool = True, allow_none: bool = True,
                validate: bool = True) -> Any:
        key = value if type(value) is bytes else _plain_uid_text(value)
        if key is None:
            return upstream(value, name, allow_empty, allow_none, validate)
        return cached(key, name, allow_empty, allow_none, validate)

    set_uid.upstream = upstream  # type: ignore[attr-defined]
    for name in _NEGOTIATION_MODULES:
        module = importlib.import_module(name)
        if not hasattr(module.set_uid, "upstream"):
            module.set_uid = set_uid
    _add_known_transfer_syntaxes_unchecked()


def _add_known_transfer_syntaxes_unchecked() -> None:
    """`PresentationContext.add_transfer_syntax` without its checks for the transfer
    syntaxes they always pass.

    Upstream builds a pydicom UID from the value and checks it four ways (two regular
    expressions, private, a transfer syntax) every time a syntax is added to a
    context: ~11 us each, and an association of getscu's 121 contexts adds about 800
    (decoding the request, the appliance's own ordering, negotiation's results): ~9
    ms. For a value equal to one of pynetdicom's ALL_TRANSFER_SYNTAXES that passes
    every check (established here, with upstream's own checks, once), the outcome is
    known: no warning, and the UID appended unless the context has it already. Any
    other value, or a UID object with attributes of its own, goes through upstream.
    """
    from pydicom.uid import UID
    from pynetdicom import ALL_TRANSFER_SYNTAXES
    from pynetdicom.presentation import PresentationContext
    from pynetdicom.utils import validate_uid

    upstream = PresentationContext.add_transfer_syntax
    if hasattr(upstream, "upstream"):
        return
    known = {str(uid): uid for uid in map(UID, map(str, ALL_TRANSFER_SYNTAXES))
             if validate_uid(uid) and uid.is_valid and uid.is_transfer_syntax
             and not uid.is_private}

    def add_transfer_syntax(self: Any, syntax: Any) -> None:
        text = _plain_uid_text(syntax)
        uid = known.get(text) if text is not None else None
        if uid is None:
            upstream(self, syntax)
        elif uid not in self._transfer_syntax:
            self._transfer_syntax.append(uid)

    add_transfer_syntax.upstream = upstream  # type: ignore[attr-defined]
    PresentationContext.add_transfer_syntax = add_transfer_syntax  # type: ignore[method-assign]


def _plain_uid_text(value: Any) -> str | None:
    """The text of a `str` or of a pydicom UID without attributes of its own (a private
    transfer syntax's encoding), which a cached or shared UID may stand for; else None."""
    from pydicom.uid import UID

    kind = type(value)
    if kind is str or (kind is UID and not value.__dict__):
        return str(value)
    return None


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


class Wakeup:
    """An eventfd a DUL reactor blocks on, beside its socket, until another thread has
    work for it (a primitive to send, a PDU handed over). `set()` after `close()` does
    nothing: the descriptor number could already belong to another file."""

    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._lock = threading.Lock()
        self._closed = False

    def set(self) -> None:
        with self._lock:
            if not self._closed:
                os.eventfd_write(self.fd, 1)

    def drain(self) -> None:
        with self._lock:
            if not self._closed:
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(self.fd)

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                os.close(self.fd)


# How long an idle reactor blocks before it looks at its timers again (ARTIM, the
# network timeout); every other reason to wake up wakes it at once.
REACTOR_IDLE_WAIT = 0.25
# How often stop_dul_reactor looks whether the DUL thread has ended (upstream's poll
# delay). Where blocking is impossible (no socket yet or any more) or pointless (the
# socket is readable but another reader holds it: the C-STORE send lane's gate, which
# the read itself waits on, see gate_transport_reads) the reactor sleeps the DUL's own
# poll delay, as upstream.
_POLL_DELAY = 0.001


def run_dul_reactor(dul: Any, wakeup: Wakeup) -> None:
    """`DULServiceProvider.run_reactor`, blocking while idle instead of sleeping 1 ms.

    pynetdicom's loop sleeps `_run_loop_delay` (1 ms) whenever a pass found nothing
    to do: ~2% of a core per connection, and up to 1 ms of latency for every PDU
    sent or received. This loop does what one pass of upstream's does, in the same
    order, but when idle it blocks in poll() on the socket and `wakeup` (set when a
    primitive is queued or a PDU handed over) for at most REACTOR_IDLE_WAIT or the
    ARTIM timer's remaining time. The DUL thread's `run()` calls it in place of
    `run_reactor` (whose bound method pynetdicom made the thread's target).
    """
    from pynetdicom.pdu import A_ABORT_RQ  # not at import: the store imports compat

    dul._idle_timer.start()
    idle = False
    readable = False
    try:
        while True:
            if not dul.assoc._dul_ready.is_set():
                dul.assoc._dul_ready.set()
            if idle:
                readable = _wait_for_work(dul, wakeup, stalled=readable)
            if dul._kill_thread:
                break
            if dul.artim_timer.expired:
                dul.event_queue.put("Evt18")
            try:
                if dul._process_recv_primitive():
                    readable = False
                elif dul._is_transport_event():
                    dul._idle_timer.restart()
                    readable = False
            except Exception as exc:  # upstream's handling, unchanged
                log.error("Exception in DUL.run(), aborting association")
                log.exception(exc)
                abort_pdu = A_ABORT_RQ()
                abort_pdu.source = 0x02
                abort_pdu.reason_diagnostic = 0x00
                dul.socket.send(abort_pdu.encode())
                dul.assoc.is_aborted = True
                dul.assoc.is_established = False
                dul.assoc._kill = True
                dul._kill_thread = True
                return
            try:
                event = dul.event_queue.get(block=False)
            except queue.Empty:
                idle = True
                continue
            if not _dropped_after_end(dul, event):
                dul.state_machine.do_action(event)
            idle = False
            readable = False
    finally:
        wakeup.close()


# Events for primitives from the local user (PS3.8 9.2.1): an association request or
# response, P-DATA, a release request or response, an abort.
_LOCAL_PRIMITIVE_EVENTS = frozenset({"Evt1", "Evt7", "Evt8", "Evt9", "Evt11", "Evt14", "Evt15"})
# States in which no association exists: idle, and waiting for the transport to close.
_NO_ASSOCIATION = frozenset({"Sta1", "Sta13"})


def _dropped_after_end(dul: Any, event: str) -> bool:
    """Drop a local primitive that arrives after the association has ended; True if dropped.

    The DUL reads on while the association thread decides or answers, so the peer
    can end the association (a bad PDU: A-ABORT sent, Sta13; a closed connection:
    Sta1) between the user's decision and its primitive reaching the state machine:
    an A-ASSOCIATE-AC for a request whose connection already sent garbage, a C-ECHO
    response after an A-ABORT. pynetdicom's table has no such (event, state) pair;
    its state machine raises InvalidEventError, which ended the DUL thread with a
    traceback and left the connection to the garbage collector. PS3.8 has nothing to
    do for them either: the primitive is taken off the queue, as its action would.
    """
    state = dul.state_machine.current_state
    if event not in _LOCAL_PRIMITIVE_EVENTS or state not in _NO_ASSOCIATION:
        return False  # every event of a live association: no import, no table lookup
    from pynetdicom.fsm import TRANSITION_TABLE  # not at import: the store imports compat

    if (event, state) in TRANSITION_TABLE:
        return False
    with contextlib.suppress(queue.Empty):
        dul.to_provider_queue.get(block=False)
    log.debug("primitive dropped: the association has ended event=%s state=%s", event, state)
    return True


def _wait_for_work(dul: Any, wakeup: Wakeup, *, stalled: bool) -> bool:
    """Block until the socket has data, `wakeup` is set or a timer may have expired;
    True when the socket was readable. `stalled`: the socket was readable last time and
    nothing could be read (another reader holds it): sleep like upstream instead."""
    sock = getattr(dul.socket, "socket", None) if dul.socket is not None else None
    if sock is None or stalled:
        # Upstream's poll delay (1 ms); while the C-STORE send lane holds the socket's
        # reads, the read itself waited for the lane (gate_transport_reads).
        time.sleep(dul._run_loop_delay)
        return False
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True  # decrypted bytes already buffered: poll() cannot see them
    try:
        fd = sock.fileno()
    except OSError:
        fd = -1
    if fd < 0:
        time.sleep(dul._run_loop_delay)
        return False
    timeout = max(0.0, min(REACTOR_IDLE_WAIT, float(dul.artim_timer.remaining)))
    poller = select.poll()  # not select(): it fails on descriptors >= 1024
    poller.register(fd, select.POLLIN | select.POLLPRI)
    poller.register(wakeup.fd, select.POLLIN)
    events = poller.poll(timeout * 1000)
    readable = False
    for ready, _ in events:
        if ready == fd:
            readable = True
        else:
            wakeup.drain()
    return readable


def run_association_reactor(assoc: Any, wake: threading.Event,
                            idle_wait: float = REACTOR_IDLE_WAIT) -> None:
    """`Association._run_reactor`, blocking on `wake` (for at most `idle_wait`
    seconds) between passes instead of sleeping 1 ms, and without upstream's race.

    `wake` must be set whenever the DIMSE message queue or the DUL's user queue gets
    an item, the DUL thread ends, or the association is killed (see
    dimse/reactors.py). Each pass does upstream's checks in upstream's order; while
    it waits it counts as paused (`_is_paused`), so a `send_*()` call that pauses the
    reactor through `_reactor_checkpoint` does not wait for the timeout.

    The race (pynetdicom 3.0.4, upstream issue 875): `send_*()` clears the
    checkpoint and then only waits for `_is_paused`, which upstream's reactor
    sets on its way *through* an open checkpoint too; when the sender reads it in
    that moment, its request goes out while the reactor is about to read the
    DIMSE queue, and under load (a descheduled reactor thread) the reactor takes
    the response: "Received unexpected C-STORE service message", then a DIMSE
    timeout and an abort. Here the reactor looks at the checkpoint again once it
    no longer counts as paused, and parks again if a sender closed it meanwhile.
    """
    from pynetdicom import evt  # not at import: the store imports compat

    assoc._is_paused = False
    while not assoc._kill:
        wake.clear()
        assoc._is_paused = True
        assoc._reactor_checkpoint.wait()
        assoc._is_paused = False
        if not assoc._reactor_checkpoint.is_set():
            continue
        context_id, msg = assoc.dimse.get_msg(block=False)
        if msg:
            assoc._serve_request(msg, context_id)
            continue
        if assoc.is_established and assoc.acse.is_release_requested():
            assoc.acse.send_release(is_response=True)
            log.info("Association Released")
            assoc.is_released = True
            assoc.is_established = False
            evt.trigger(assoc, evt.EVT_RELEASED, {})
            assoc.kill()
            return
        if assoc.acse.is_aborted():
            message = "Association Aborted"
            if assoc.acse.is_aborted("a-p-abort"):
                message += " (A-P-ABORT)"
            log.info(message)
            assoc.dul.receive_pdu(wait=False)  # EVT_ACSE_RECV fires for subscribers
            assoc.is_aborted = True
            assoc.is_established = False
            evt.trigger(assoc, evt.EVT_ABORTED, {})
            assoc.kill()
            return
        if not assoc.dul.is_alive():
            assoc.kill()
            return
        if assoc.dul.idle_timer_expired():
            # A peer's silence, not the box's error: the abort's EVT_ABORTED handler logs
            # one warning naming the peer and the limit (dimse/transport.py).
            log.debug("network timeout reached")
            if assoc.network_timeout_response == "A-RELEASE":
                assoc._is_paused = True
                assoc._reactor_checkpoint.wait()
                assoc.release()
                assoc._is_paused = False
            else:
                assoc.abort()
            assoc.kill()
            return
        assoc._is_paused = True
        wake.wait(idle_wait)
        assoc._is_paused = False


def recover_rejection(assoc: Any) -> None:
    """Mark a requested association rejected when the peer's A-ASSOCIATE-RJ is still
    in its DUL's queue, unread.

    After sending its request, pynetdicom's ACSE waits for the socket to be ready and
    then takes an association whose socket is no longer connected for a failed connect,
    and aborts it. A peer that rejects at once and closes (dcmtk's dcmqrscp, for an AE
    title it does not know) often has its rejection read, and the connection closed,
    by the DUL before that check: about one association in five here. The association
    then looked aborted, and why the peer refused it was lost."""
    from pynetdicom.pdu_primitives import A_ASSOCIATE  # not at import: see above

    if assoc.is_established or assoc.is_rejected:
        return
    for primitive in list(assoc.dul.to_user_queue.queue):
        if isinstance(primitive, A_ASSOCIATE) and primitive.result in (0x01, 0x02):
            assoc.acceptor.primitive = primitive
            assoc.is_rejected, assoc.is_aborted = True, False
            return


def cap_peer_maximum_pdu(assoc: Any, limit: int) -> None:
    """On an association we requested whose acceptor announced no maximum PDU length
    (0), send PDUs of at most `limit` bytes all the same. pynetdicom sends a data set
    read from a file (STORE_SEND_CHUNKED_DATASET) in PDUs of the peer's maximum, which
    for 0 is one PDU of the whole data set: read whole into memory, and past 4 GiB a
    PDU whose 32-bit length field cannot hold it. Its DIMSE provider reads the maximum
    from the acceptor's negotiated Maximum Length item each send, and no public call
    changes it once negotiated (ServiceUser.maximum_length refuses), so the item is
    changed in place."""
    from pynetdicom.pdu_primitives import MaximumLengthNotification

    for item in assoc.acceptor.user_information:
        if isinstance(item, MaximumLengthNotification) and not item.maximum_length_received:
            item.maximum_length_received = limit


def set_nodelay(assoc: Any) -> None:
    """TCP_NODELAY on an association we requested: pynetdicom leaves Nagle on, and a
    C-STORE-RQ goes out as two writes (command, then dataset), so every message waits
    for the peer's delayed ACK of the first (40 ms on Linux) before the second leaves."""
    sock = getattr(assoc.dul.socket, "socket", None)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def ack_after_sends(assoc: Any) -> None:
    """After each PDU this side writes on an association it requested, ask the kernel to
    acknowledge what arrives next at once (TCP_QUICKACK).

    A peer with Nagle's algorithm on (dcmtk's default) writes each DIMSE message in
    pieces and holds the later ones until the first is acknowledged; Linux delays
    that ACK by 40 ms (it re-enters delayed-ACK mode whenever we send right after
    receiving, so asking once is not enough): ~45 ms for every C-STORE a workstation
    answers or a legacy PACS sends over a C-GET. pynetdicom's DUL thread does the
    reads, so the mode is asked for after our writes: `send` is wrapped on this
    association's socket object only, like share_send_lock's.
    """
    transport = assoc.dul.socket
    sock = getattr(transport, "socket", None)
    if sock is None:
        return
    send = transport.send

    def send_then_ack_at_once(bytestream: bytes) -> None:
        send(bytestream)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)

    transport.send = send_then_ack_at_once


def steady_association_timers() -> None:
    """Every association's ARTIM and network-timeout timers on the monotonic clock.

    pynetdicom 3.0.4's Timer counts with `time.time()`, which steps when NTP corrects
    the box's clock. Stepped ahead (a box that booted with a dead RTC battery), every
    open association looked silent for the size of the step: each one, a modality's
    transfer included, was aborted at once ("no PDU within network_timeout"). Stepped
    back, a silent peer's association, and a connection that never sends its
    A-ASSOCIATE-RQ, stayed open for as long as the step (years), each holding an
    association slot until max_associations refused every modality. DUL objects
    built afterwards get this Timer (the name DULServiceProvider builds them with is
    assigned); upstream's stays reachable as `SteadyTimer.upstream`. Idempotent.
    """
    from pynetdicom import dul

    if hasattr(dul.Timer, "upstream"):
        return
    upstream = dul.Timer

    class SteadyTimer(upstream):  # type: ignore[misc, valid-type]
        """pynetdicom's Timer, with `time.monotonic()` where upstream reads the wall clock."""

        @property
        def remaining(self) -> float:
            if self.timeout is None:
                return 1
            if self._start_time is None:
                return float(self.timeout)
            end = time.monotonic() if self._end_time is None else self._end_time
            return float(self.timeout - (end - self._start_time))

        def start(self) -> None:
            self._start_time = time.monotonic()
            self._end_time = None

        def stop(self) -> None:
            self._end_time = time.monotonic()

    SteadyTimer.upstream = upstream  # type: ignore[attr-defined]
    dul.Timer = SteadyTimer


def close_requestor_reactor_race() -> None:
    """Give every requested association (`AE.associate()`) in this process the race-free
    loop of run_association_reactor, polling every 1 ms as upstream's does, and every
    association the kill of kill_association (and steady_association_timers).

    Idempotent; called before the appliance's own SCUs associate (the acceptor's
    associations have their own reactor, dimse/transport.py) and by the tests for
    their pynetdicom clients. Upstream's loop stays reachable as
    `Association._run_reactor.upstream` (tests/test_compat.py reads its steps).
    """
    from pynetdicom.association import Association

    steady_association_timers()
    if hasattr(Association._run_reactor, "upstream"):
        return
    upstream = Association._run_reactor

    def _run_reactor(self: Any) -> None:
        run_association_reactor(self, threading.Event(), idle_wait=_POLL_DELAY)

    _run_reactor.upstream = upstream  # type: ignore[attr-defined]
    Association._run_reactor = _run_reactor  # type: ignore[method-assign]
    upstream_kill = Association.kill

    def kill(self: Any) -> None:
        kill_association(self)

    kill.upstream = upstream_kill  # type: ignore[attr-defined]
    Association.kill = kill  # type: ignore[method-assign]


def kill_association(assoc: Any) -> None:
    """`Association.kill`, looking every 1 ms rather than every 10 ms whether its DUL
    has stopped.

    A release's confirmation can reach the association before its DUL has closed the
    connection and gone back to Sta1, the only state its `stop_dul()` accepts; then
    upstream's kill sleeps 10 ms. An accepted association's kill did so after every
    release; a C-MOVE sub-association's about once in 20, and the C-MOVE's final
    response waited for it. Every association in this process takes this one
    (close_requestor_reactor_race; the acceptor's EdgeAssociation.kill calls it).
    """
    assoc._reactor_checkpoint.set()  # upstream's steps, in upstream's order
    assoc._kill = True
    assoc.is_established = False
    assoc._is_paused = True
    while assoc.dul.is_alive() and not assoc.dul.stop_dul():
        time.sleep(_POLL_DELAY)


def stop_dul_reactor(dul: Any, wakeup: Wakeup) -> bool:
    """`DULServiceProvider.stop_dul` for a reactor that blocks: stop it in Sta1 only (as
    upstream), waking it so it sees `_kill_thread` now rather than after its wait."""
    if dul.state_machine.current_state != "Sta1":
        return False
    dul._kill_thread = True
    wakeup.set()
    while dul.is_alive() and dul is not threading.current_thread():
        time.sleep(_POLL_DELAY)
    return True


def kill_dul_reactor(dul: Any, wakeup: Wakeup) -> None:
    """`DULServiceProvider.kill_dul`, waking the reactor."""
    dul._kill_thread = True
    wakeup.set()


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


def gate_transport_reads(dul: Any, gate: threading.Lock, *, wait: float) -> None:
    """The DUL reads its socket only while it can take `gate` (the lane holds it while
    it reads the C-STORE responses itself).

    `DULServiceProvider._is_transport_event()` is the DUL loop's one place that
    reads a PDU off the socket (it returns False when nothing was read). It is
    replaced on this DUL object only: while another thread holds `gate` it waits
    for it, at most `wait` seconds, and reads nothing if it stays held; a PDU it is
    in the middle of reading finishes first. Waiting on the gate rather than
    sleeping between passes puts the DUL back to work the moment the lane lets go:
    the primitive queued next (a C-GET's final response, a sub-association's
    A-RELEASE-RQ) goes out at once, not after the rest of a sleep (20 ms of each
    retrieve, when the lane slowed the DUL's poll loop instead). Each new gate
    wraps the DUL's own read, not the previous gate.
    """
    if getattr(dul, "pacs_edge_read_gate", None) is gate:
        return
    reads = getattr(dul, "pacs_edge_ungated_reads", None) or dul._is_transport_event

    def gated() -> bool:
        if not gate.acquire(timeout=wait):
            return False
        try:
            return bool(reads())
        finally:
            gate.release()

    dul._is_transport_event = gated
    dul.pacs_edge_ungated_reads = reads
    dul.pacs_edge_read_gate = gate


def note_transport_activity(dul: Any) -> None:
    """Restart the DUL's idle timer, as its own read of a PDU does: the association's
    network timeout must not fire while the lane is the one reading."""
    dul._idle_timer.restart()


# The events of A-ASSOCIATE-AC, -RJ and -RQ and A-ABORT PDUs: their state machine
# actions (AE-3, AE-4, AE-6, AA-3) turn them into primitives, which validates what
# decoding did not (an even context ID, an A-ABORT source other than 0, 1 or 2).
_ASSOCIATION_PDU_EVENTS = frozenset({"Evt3", "Evt4", "Evt6", "Evt16"})


def hand_pdu_to_dul(dul: Any, raw: bytes) -> None:
    """Give a PDU the lane read but does not handle (an A-ABORT, a C-CANCEL, an
    A-RELEASE-RQ) to the DUL's state machine, as `_read_pdu_data()` does with one it
    read: decode, event on `event_queue`, PDU on `_recv_pdu`; Evt19 if undecodable.

    An association or abort PDU counts as undecodable also when its primitive cannot
    be built: pynetdicom decodes an even presentation context ID, or an A-ABORT from
    source 128, and only its action refused it, by raising in the state machine: the
    DUL thread ended with a traceback (and the peer of a request got no answer). So
    does a request whose proposed context lacks its abstract syntax or every transfer
    syntax (PS3.8 9.3.2.2: one, and one or more): the acceptor's negotiation raised on
    it; and one announcing a maximum PDU length too small for any P-DATA-TF (1 to 6
    bytes): the first response failed with a traceback. The primitive built here is the
    one the action takes (_keep_primitive)."""
    try:
        pdu, event = dul._decode_pdu(bytearray(raw))
        if event in _ASSOCIATION_PDU_EVENTS:
            primitive = pdu.to_primitive()
            if event == "Evt6":
                _check_request(primitive)
            _keep_primitive(pdu, primitive)
    except Exception as exc:
        log.warning("invalid PDU from the peer: %s", exc)
        dul.event_queue.put("Evt19")
        return
    dul.event_queue.put(event)
    dul._recv_pdu.put(pdu)


def _check_request(request: Any) -> None:
    """ValueError unless every proposed presentation context has an abstract syntax and
    at least one transfer syntax, and the maximum PDU length announced is 0 (none) or
    leaves room for a PDV."""
    from pynetdicom.pdu_primitives import MaximumLengthNotification

    for item in request.user_information:
        if isinstance(item, MaximumLengthNotification):
            length = item.maximum_length_received
            if length and length <= PDV_OVERHEAD:
                raise ValueError(f"a maximum PDU length of {length} bytes, too small for"
                                 " any P-DATA-TF")
    for context in request.presentation_context_definition_list:
        if context.abstract_syntax is None:
            raise ValueError(f"presentation context {context.context_id} proposes no"
                             " abstract syntax")
        if not context.transfer_syntax:
            raise ValueError(f"presentation context {context.context_id} proposes no"
                             " transfer syntax")


def _keep_primitive(pdu: Any, primitive: Any) -> None:
    """Hand `primitive`, built from `pdu` to check it, to the state machine's action
    (AE-3, AE-4, AE-6 call `pdu.to_primitive()` once) instead of building it again:
    for getscu's A-ASSOCIATE-RQ of 121 presentation contexts that is half of what
    decoding the request costs. A later call builds a new one, as upstream."""
    build = pdu.to_primitive

    def built_once() -> Any:
        pdu.to_primitive = build
        return primitive

    pdu.to_primitive = built_once


# What one DIMSE message that DIMSE assembles in memory may hold: pynetdicom appends each
# fragment of a command set, and of a data set other than a C-STORE's (spooled to a file:
# STORE_RECV_CHUNKED_DATASET), to a BytesIO without limit, so a peer that never sends the
# last fragment would fill the box's memory. A command set is a few hundred bytes; 16 MiB
# of data set is a C-MOVE of ~250,000 UIDs, or a Storage Commitment or MPPS naming
# ~120,000 instances.
MAX_COMMAND_SET_BYTES = 64 << 10
MAX_DATA_SET_IN_MEMORY_BYTES = 16 << 20


def read_pdu(dul: Any, receive: Callable[[list[tuple[int, Any]]], bool],
             receiving: Callable[[], bool] = lambda: False) -> None:
    """`DULServiceProvider._read_pdu_data` (read one PDU and act on it), with a
    P-DATA-TF in Sta6 handed straight to `receive` or DIMSE.

    Upstream copies each P-DATA-TF into `bytes`, fires EVT_DATA_RECV, decodes it
    into a PDU object with a PDV item object per fragment (slicing out copies),
    queues it with Evt10 for the state machine, whose DT-2 action turns it into a
    P-DATA primitive for `DIMSEServiceProvider.receive_primitive`. In Sta6, Evt10
    always means DT-2 and Sta6 again, so this reads the PDU into one buffer and
    splits its PDVs as views of it (EVT_DATA_RECV, EVT_PDU_RECV and
    EVT_FSM_TRANSITION are not fired for these PDUs; the appliance binds none).
    While DIMSE is not in the middle of a message (`DIMSEServiceProvider.message`
    is None), `receive(pdvs)` may take them (dimse/store_receiver.py) and return
    True; otherwise they go to `receive_primitive` in a P-DATA primitive.
    Stricter than upstream: a PDV whose length runs past its PDU, or is shorter
    than its two header bytes, is an invalid PDU (Evt19: A-ABORT), and so is
    what `receive` raises ValueError for. Every other PDU, and a P-DATA-TF in any
    other state, goes upstream's way (hand_pdu_to_dul).

    While `receiving()` says a message `receive` took is still arriving, the
    next PDU is read here at once if the socket has one and the DUL has nothing
    else to do (not killed, no primitive to send, no event): what the reactor's
    next pass would do, without the pass (its poll, timer checks and empty-queue
    exceptions: ~10 us per PDU, five PDUs per 0.5 MB instance from storescu).
    """
    while _read_one(dul, receive) and receiving():
        if (dul._kill_thread or dul.to_provider_queue.queue or not dul.event_queue.empty()
                or not dul.socket.ready):
            return
        dul._idle_timer.restart()


def _read_one(dul: Any, receive: Callable[[list[tuple[int, Any]]], bool]) -> bool:
    """One PDU of `read_pdu`; True when it was a P-DATA-TF that `receive` took. What a
    peer did wrong (a PDU type that does not exist, a reset mid-PDU, a malformed P-DATA)
    is a warning: pynetdicom logs it as an ERROR, which reads as the box failing."""
    from pynetdicom.pdu_primitives import P_DATA  # not at import: the store imports compat

    try:
        header = bytes(dul.socket.recv(6))
        if len(header) != 6:
            dul.event_queue.put("Evt17")  # the peer closed the connection
            return False
        pdu_type, _, length = struct.unpack(">BBL", header)
        if not 0x01 <= pdu_type <= 0x07:
            log.warning("unknown PDU type 0x%02X received", pdu_type)
            dul.event_queue.put("Evt19")
            return False
        body = dul.socket.recv(length)
    except TransportAborted:  # the edge's own socket ended it, and logged why
        dul.event_queue.put("Evt17")
        return False
    except OSError as exc:
        log.warning("connection closed before the entire PDU was received: %s", exc)
        dul.event_queue.put("Evt17")
        return False
    if len(body) != length:
        dul.event_queue.put("Evt17")  # the peer closed the connection mid-PDU
        return False
    if pdu_type != 0x04 or dul.state_machine.current_state != "Sta6":
        hand_pdu_to_dul(dul, header + bytes(body))
        return False
    dimse = dul.assoc.dimse
    try:
        pdvs = split_pdvs(memoryview(body))
        if dimse.message is None:
            if receive(pdvs):
                return True
            _check_message_start(dul.assoc, *pdvs[0])
    except ValueError as exc:
        log.warning("invalid P-DATA-TF PDU: %s", exc)
        dul.event_queue.put("Evt19")
        return False
    primitive = P_DATA()
    primitive._presentation_data_value_list = pdvs  # views: the setter wants bytes
    try:
        dimse.receive_primitive(primitive)
    except Exception as exc:
        # The command set, the peer's bytes, cannot be decoded (pydicom's error, or
        # pynetdicom's on a command set without a Command Field): A-ABORT, as for any
        # invalid PDU. Upstream's DT-2 fails and kills the DUL: the connection closed
        # without one, logged as the box's ERROR.
        log.warning("invalid P-DATA-TF PDU: a command set that cannot be decoded: %s", exc)
        dul.event_queue.put("Evt19")
        return False
    if dimse.message is not None and _over_memory_bound(dimse.message):
        dul.event_queue.put("Evt19")  # A-ABORT; the message goes with the association
    return False


def _check_message_start(assoc: Any, context_id: int, data: Any) -> None:
    """ValueError unless the PDV that starts a DIMSE message is a command fragment on an
    accepted presentation context (PS3.8 9.3.5.1, Annex E: a message starts with its
    command set). pynetdicom took a data set fragment for the start of a message, and
    logged its failure to decode it as an ERROR with a traceback; a message on a context
    not accepted was aborted with nothing logged above INFO. Looked at only for
    messages left to pynetdicom (not the C-STOREs compat.read_pdu's `receive` takes)."""
    if not data[0] & 0x01:
        raise ValueError("a data set fragment before its command set")
    if context_id not in assoc._accepted_cx:
        raise ValueError(f"a message on presentation context {context_id}, which was not"
                         " accepted")


def unfinished_receive_spool(dimse: Any) -> Any:
    """The path of the spool that pynetdicom is writing the data set of a C-STORE-RQ
    into (`DIMSEMessage._data_set_path`, see set_receive_spool) while the message is
    still arriving (`DIMSEServiceProvider.message`); None when there is none."""
    message = dimse.message
    return None if message is None else message._data_set_path


def _over_memory_bound(message: Any) -> bool:
    """Whether the DIMSE message being assembled holds more than its bounds (above),
    which it says in a warning (sizes only)."""
    command = message.encoded_command_set.tell()
    data_set = message.data_set.tell() if message.data_set is not None else 0
    if command <= MAX_COMMAND_SET_BYTES and data_set <= MAX_DATA_SET_IN_MEMORY_BYTES:
        return False
    log.warning("DIMSE message larger than the box holds in memory, association aborted"
                " command_bytes=%d data_set_bytes=%d (limits %d, %d)", command, data_set,
                MAX_COMMAND_SET_BYTES, MAX_DATA_SET_IN_MEMORY_BYTES)
    return True


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


def sqlite_connection(conn: aiosqlite.Connection) -> sqlite3.Connection:
    """The sqlite3 connection under `conn`, for a caller in another thread.

    `Connection._conn` (see run_in_connection_thread). The caller must keep
    `conn`'s own thread off it meanwhile and must have opened it with
    check_same_thread=False (the index writer: store/database.py Writer).
    """
    return conn._conn


# --- pydicom 3.0.2 ------------------------------------------------------------------


def read_file_meta(fp: BinaryIO) -> FileMetaDataset:
    """The File Meta group at `fp` (just after the preamble); leaves `fp` at the dataset.

    pydicom's public `read_file_meta_info()` takes a path and does not say where
    the dataset starts; its private reader leaves the file positioned there,
    which is what ingest needs to copy the dataset bytes as they are.
    """
    from pydicom.filereader import _read_file_meta_info  # not at import: see TYPE_CHECKING

    return _read_file_meta_info(fp)


# --- prometheus-client 0.26.0 -------------------------------------------------------


def back_metric_pages() -> None:
    """Make prometheus-client's multiprocess files reserve the blocks of their pages
    before it writes them. MmapedDict makes a file with truncate (sparse) and writes
    each new series into its shared mapping; a page never written before needs a block
    then, and on a full file system (the data home's disk, which ingest may fill) the
    kernel answers that write with SIGBUS: serve died at the first C-GET or new status
    after the disk filled. No public API sizes or allocates these files.

    A new file is allocated whole; a new series first allocates the file up to the size
    it will have (posix_fallocate; a growth doubles it, as _init_value does). A full
    disk is then an OSError (ENOSPC) where a file or a series is created, never a
    signal. Only those pay the system call: updates write pages that have blocks.
    Call after $PROMETHEUS_MULTIPROC_DIR is set (prometheus-client reads it at import)."""
    from prometheus_client import mmap_dict

    cls: Any = mmap_dict.MmapedDict
    if getattr(cls, "_pages_backed", False):
        return
    create, add_series = cls.__init__, cls._init_value

    def backed_create(self: Any, filename: str, read_mode: bool = False) -> None:
        if not read_mode:
            fd = os.open(filename, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            try:
                if os.fstat(fd).st_size == 0:  # else __init__ maps it as it is
                    os.posix_fallocate(fd, 0, mmap_dict._INITIAL_MMAP_SIZE)
            except OSError as exc:
                # Named, so that a command that starts on a disk with too little room
                # says so in one line (cli.common.expected_errors), not in a traceback.
                raise OSError(exc.errno, exc.strerror, filename) from exc
            finally:
                os.close(fd)
        create(self, filename, read_mode)

    def backed_add_series(self: Any, key: str) -> None:
        length = len(key.encode("utf-8"))
        # An entry as _init_value packs it: length, key padded to 8 bytes, two doubles.
        needed = self._used + 4 + length + (8 - (length + 4) % 8) + 16
        capacity = self._capacity
        while needed > capacity:
            capacity *= 2
        os.posix_fallocate(self._f.fileno(), 0, capacity)
        add_series(self, key)

    backed_create.upstream, backed_add_series.upstream = create, add_series  # type: ignore[attr-defined]
    cls.__init__, cls._init_value = backed_create, backed_add_series
    cls._pages_backed = True


def metric_file_readable(path: str) -> bool:
    """Whether multiprocess mode can read the counter or histogram file at `path`. A
    power cut can leave one empty or half written: its folder's entry reached the disk
    and its pages, written through a memory map and never fsynced, did not (reading
    one raised struct.error and serve did not start)."""
    from prometheus_client import multiprocess

    try:
        multiprocess.MultiProcessCollector.merge([path], accumulate=False)
    # RuntimeError: what it raises for an entry said to reach past the file's end.
    except (struct.error, ValueError, KeyError, IndexError, OSError, RuntimeError):
        return False
    return True


def write_metric_file(path: str, files: list[str]) -> None:
    """Write the values of the counter or histogram files `files`, added up, to `path`
    (made new) in the form prometheus-client's multiprocess mode reads: the type comes
    from the name (`counter_*.db`), each series is keyed as its processes key it, and
    histogram buckets stay per bucket (merge(accumulate=False), as its docstring asks
    of a merge written back to a file). No public API writes such a file."""
    from prometheus_client import mmap_dict, multiprocess

    merged = multiprocess.MultiProcessCollector.merge(files, accumulate=False)
    out = mmap_dict.MmapedDict(path)
    try:
        for metric in merged:
            for sample in metric.samples:
                names = sorted(sample.labels)
                key = mmap_dict.mmap_key(metric.name, sample.name, names,
                                         [sample.labels[n] for n in names],
                                         metric.documentation)
                out.write_value(key, sample.value, 0.0)
    finally:
        out.close()
