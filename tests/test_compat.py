"""The library internals appliance/base/compat.py patches are still there, as it read them.

Each test fails when upstream changes under a patch: a version other than the
one the patch was checked against, a patched name gone, or a different shape
(signature, type, the call site the patch relies on). Fix compat.py against the
new upstream code, then move the pin in compat.PINNED and pyproject.toml together.
"""

from __future__ import annotations

import inspect
import queue
import re
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import tomllib
import types
import warnings
from importlib.metadata import version
from io import BytesIO
from pathlib import Path

import aiosqlite
import pydicom
import pynetdicom.acse
import pynetdicom.association
import pynetdicom.dul
import pytest
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.schedulers.base import BaseScheduler
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import read_preamble
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage
from pynetdicom import AE, _config, dimse_messages, fsm, sop_class
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.service_class import QueryRetrieveServiceClass, VerificationServiceClass
from pynetdicom.transport import AssociationSocket, RequestHandler

from appliance.base import compat

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"
# How each patch reaches into its library; only appliance/base/compat.py may.
PATCH_PATTERNS = [
    r"\._execute\(", r"\b_read_file_meta_info\b", r"\._reactor_checkpoint\s*=",
    r"\._run_loop_delay\b", r"dimse_messages\.NamedTemporaryFile\s*=",
    r"\buid_to_service_class\s*=", r"\._accepted_cx\b", r"(?<!self)\._conn\b",
    r"\._is_transport_event\b", r"\._decode_pdu\b", r"\._recv_pdu\b", r"\._idle_timer\b",
    r"\.set_uid\s*=", r"\.add_transfer_syntax\s*=", r"\._transfer_syntax\b",
    r"\b_init_value\b", r"\b_INITIAL_MMAP_SIZE\b", r"\.to_user_queue\.queue\b",
    r"\bdul\.Timer\s*=", r"\._data_set_path\b",
]


def _parameters(func: object) -> list[str]:
    return list(inspect.signature(func).parameters)  # type: ignore[arg-type]


@pytest.mark.parametrize(("name", "pinned"), sorted(compat.PINNED.items()))
def test_installed_libraries_are_the_versions_the_patches_were_checked_against(
        name: str, pinned: str) -> None:
    assert version(name) == pinned
    dependencies = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    assert f"{name}=={pinned}" in dependencies, "compat.PINNED and pyproject.toml differ"


def test_library_internals_are_patched_only_in_compat() -> None:
    compat_path = ROOT / "appliance" / "base" / "compat.py"
    found = []
    for path in sorted([*ROOT.glob("appliance/**/*.py"), *ROOT.glob("sync/**/*.py"),
                        *ROOT.glob("provisioning/**/*.py")]):
        if path == compat_path:
            continue
        text = path.read_text(encoding="utf-8")
        found += [f"{path.relative_to(ROOT)}: {pattern}" for pattern in PATCH_PATTERNS
                  if re.search(pattern, text)]
    assert not found


def test_importing_the_store_does_not_load_pynetdicom() -> None:
    """compat imports pynetdicom only when a pynetdicom patch is applied: the sync
    agent and most commands import the store and never speak DIMSE."""
    code = ("import sys, appliance.store.database, appliance.base.compat; "
            "sys.exit('pynetdicom' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=False).returncode == 0


# --- pynetdicom ---------------------------------------------------------------------


def test_pynetdicom_spools_received_datasets_through_the_patched_name() -> None:
    source = inspect.getsource(dimse_messages)
    assert re.search(r"^from tempfile import NamedTemporaryFile$", source, re.M)
    assert 'NamedTemporaryFile(delete=False, mode="wb", suffix=".dcm")' in source
    assert dimse_messages.NamedTemporaryFile in (tempfile.NamedTemporaryFile, *_installed())


def test_pynetdicom_writes_the_file_meta_through_the_two_patched_names() -> None:
    source = inspect.getsource(dimse_messages.DIMSEMessage.decode_msg)
    assert "write_file_meta_info(" in source and "create_file_meta(" in source
    for keyword in ("sop_class_uid=", "sop_instance_uid=", "transfer_syntax="):
        assert keyword in source, keyword
    assert re.search(r"^from pydicom.filewriter import write_file_meta_info$",
                     inspect.getsource(dimse_messages), re.M)


def test_negotiation_modules_convert_uids_through_their_own_set_uid_name() -> None:
    import pynetdicom.pdu_items
    import pynetdicom.pdu_primitives
    import pynetdicom.presentation
    from pynetdicom import utils

    assert _parameters(getattr(utils.set_uid, "upstream", utils.set_uid)) == [
        "value", "name", "allow_empty", "allow_none", "validate"]
    for module in (pynetdicom.pdu_items, pynetdicom.pdu_primitives, pynetdicom.presentation):
        assert re.search(r"^from pynetdicom.utils import .*\bset_uid\b", inspect.getsource(module),
                         re.M), module.__name__
        assert "set_uid(value" in inspect.getsource(module), module.__name__


# getscu's A-ASSOCIATE-RQ in miniature: a few contexts, one SOP class proposed twice, and
# one syntax in two contexts.
_CONTEXTS = [("1.2.840.10008.5.1.4.1.1.2", ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]),
             ("1.2.840.10008.5.1.4.1.1.4", ["1.2.840.10008.1.2.1"]),
             ("1.2.840.10008.5.1.4.1.1.2", ["1.2.840.10008.1.2.4.50"])]


def _association_request() -> bytes:
    from pynetdicom.pdu import A_ASSOCIATE_RQ
    from pynetdicom.pdu_primitives import A_ASSOCIATE
    from pynetdicom.presentation import build_context

    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title, primitive.called_ae_title = "SCU", "EDGE"
    primitive.presentation_context_definition_list = [
        build_context(sop, syntaxes) for sop, syntaxes in _CONTEXTS]
    for n, context in enumerate(primitive.presentation_context_definition_list):
        context.context_id = 2 * n + 1
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return pdu.encode()


def _negotiated(raw: bytes) -> list[tuple[int, str, list[str]]]:
    from pynetdicom.pdu import A_ASSOCIATE_RQ

    pdu = A_ASSOCIATE_RQ()
    pdu.decode(raw)
    return [(cx.context_id, cx.abstract_syntax, list(cx.transfer_syntax))
            for cx in pdu.to_primitive().presentation_context_definition_list]


def test_cached_negotiation_uids_decode_an_association_request_as_upstream_does() -> None:
    import pynetdicom.presentation
    from pydicom.uid import UID

    raw = _association_request()
    proposed = [(2 * n + 1, sop, syntaxes) for n, (sop, syntaxes) in enumerate(_CONTEXTS)]
    compat.cache_negotiation_uids()
    compat.cache_negotiation_uids()
    cached = pynetdicom.presentation.set_uid
    assert not hasattr(cached.upstream, "upstream")  # type: ignore[attr-defined]
    assert _negotiated(raw) == _negotiated(raw) == proposed
    first = cached(b"1.2.840.10008.1.2.1", "Transfer Syntax Name")
    assert type(first) is UID and cached(b"1.2.840.10008.1.2.1", "Transfer Syntax Name") is first
    assert cached(UID(first), "Transfer Syntax Name") == first
    too_long = b"1.2." + b"3" * 64
    for _ in range(2):  # a value that fails validation raises every time, never cached
        with warnings.catch_warnings(), \
                pytest.raises(ValueError, match="must not exceed 64 characters"):
            warnings.simplefilter("ignore")  # pydicom's, if its validation mode warns
            cached(too_long, "Abstract Syntax Name")
    private = UID("1.2.3.4")
    private.set_private_encoding(False, True)
    converted = cached(private, "Transfer Syntax Name")  # converted as upstream, uncached
    assert converted == private and converted.__dict__ == private.__dict__


def test_known_transfer_syntaxes_are_added_to_a_context_as_upstream_adds_them(
        caplog: pytest.LogCaptureFixture) -> None:
    from pydicom.uid import UID
    from pynetdicom import ALL_TRANSFER_SYNTAXES
    from pynetdicom.presentation import PresentationContext

    compat.cache_negotiation_uids()
    fast = PresentationContext.add_transfer_syntax
    upstream = fast.upstream  # type: ignore[attr-defined]
    for step in ("validate_uid(syntax)", "syntax.is_valid", "syntax.is_private",
                 "syntax.is_transfer_syntax", "self._transfer_syntax.append(syntax)",
                 "syntax not in self._transfer_syntax"):
        assert step in inspect.getsource(upstream), step
    private = UID("1.2.3.4")
    private.set_private_encoding(False, True)
    values: list[object] = [
        *ALL_TRANSFER_SYNTAXES, *(str(uid) for uid in ALL_TRANSFER_SYNTAXES[:3]),
        ALL_TRANSFER_SYNTAXES[0], b"1.2.840.10008.1.2", " 1.2.840.10008.1.2.1 ", "",
        "1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", "1.2.03.4", private, None]
    outcomes = []
    for add in (upstream, fast):
        context = PresentationContext()
        caplog.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom's, for the non-conformant values
            raised = []
            for value in values:
                try:
                    add(context, value)
                except ValueError as exc:
                    raised.append((value, str(exc)))
        outcomes.append(([(str(uid), type(uid), uid.__dict__) for uid in context.transfer_syntax],
                         [(r.levelname, r.getMessage()) for r in caplog.records], raised))
    assert outcomes[1] == outcomes[0]
    assert any("not a transfer syntax" in message for _, message in outcomes[0][1])
    assert [value for value, _ in outcomes[0][2]] == [""]  # an empty UID is invalid


def test_the_association_requests_primitive_is_built_once_to_check_and_to_act_on(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from pynetdicom.pdu import A_ASSOCIATE_RQ

    for action in (fsm.AE_3, fsm.AE_4, fsm.AE_6):  # each takes the PDU's primitive once
        assert inspect.getsource(action).count(".to_primitive()") == 1, action.__name__
    builds: list[object] = []
    upstream = A_ASSOCIATE_RQ.to_primitive

    def counted(self: A_ASSOCIATE_RQ) -> object:
        builds.append(upstream(self))
        return builds[-1]

    monkeypatch.setattr(A_ASSOCIATE_RQ, "to_primitive", counted)
    dul = Association(AE(), "acceptor").dul
    compat.hand_pdu_to_dul(dul, _association_request())
    assert dul.event_queue.get_nowait() == "Evt6"
    pdu = dul._recv_pdu.get_nowait()
    assert len(builds) == 1  # the check
    assert pdu.to_primitive() is builds[0]  # the action's: the same, not built again
    again = pdu.to_primitive()
    assert again is builds[1] and again is not builds[0]  # later calls build, as upstream
    assert [cx.context_id for cx in again.presentation_context_definition_list] == [1, 3, 5]


def _installed() -> tuple[object, ...]:
    """A spool factory another test of this process may have set (serve in process)."""
    current = dimse_messages.NamedTemporaryFile
    return (current,) if current is not tempfile.NamedTemporaryFile else ()


def test_pynetdicom_picks_service_classes_through_the_wrapped_name() -> None:
    assert "uid_to_service_class(" in inspect.getsource(Association._serve_request)
    assert "from pynetdicom.sop_class import" in inspect.getsource(pynetdicom.association)
    assert _parameters(sop_class.uid_to_service_class) == ["uid"]


def test_route_service_classes_wraps_once_and_serves_every_routed_uid(
        monkeypatch: pytest.MonkeyPatch) -> None:
    class Marker(QueryRetrieveServiceClass):
        pass

    # pynetdicom's own lookup for this test; the monkeypatch puts back what was there.
    monkeypatch.setattr(pynetdicom.association, "uid_to_service_class",
                        sop_class.uid_to_service_class)
    compat.route_service_classes({"1.2.3.4.5"}, Marker)
    lookup = pynetdicom.association.uid_to_service_class
    compat.route_service_classes({"1.2.3.4.6"}, Marker)  # adds to the table, wraps no more
    assert pynetdicom.association.uid_to_service_class is lookup
    assert lookup("1.2.3.4.5") is Marker
    assert lookup("1.2.3.4.6") is Marker
    assert lookup("1.2.840.10008.1.1") is VerificationServiceClass


def test_the_reactor_parks_on_an_event_the_gate_can_replace() -> None:
    assoc = Association(AE(), "requestor")
    assert isinstance(assoc._reactor_checkpoint, threading.Event)
    source = inspect.getsource(Association)
    assert "self._reactor_checkpoint.wait()" in source
    gate = threading.Event()
    assert compat.replace_reactor_checkpoint(assoc, gate)
    assert assoc._reactor_checkpoint is gate
    assert not compat.replace_reactor_checkpoint(object(), gate)


def test_a_sender_that_pauses_the_reactor_as_it_passes_keeps_its_response() -> None:
    """pynetdicom's race (compat.run_association_reactor): the checkpoint was open when
    the reactor passed it, a sender closes it at once and its response arrives. The
    reactor must park again, not read the DIMSE queue."""
    assoc = Association(AE(), "requestor")

    class SenderArrivesAsTheReactorPasses(threading.Event):
        def wait(self, timeout: float | None = None) -> bool:
            if self.is_set():
                self.clear()
                assoc.dimse.msg_queue.put((1, "the sender's response"))
            else:
                assoc._kill = True  # parked on the closed checkpoint: end the test's loop
            return True

    checkpoint = SenderArrivesAsTheReactorPasses()
    checkpoint.set()
    assert compat.replace_reactor_checkpoint(assoc, checkpoint)
    compat.run_association_reactor(assoc, threading.Event(), idle_wait=0.001)
    assert assoc.dimse.msg_queue.get_nowait() == (1, "the sender's response")


def test_requested_associations_get_the_race_free_reactor() -> None:
    compat.close_requestor_reactor_race()
    compat.close_requestor_reactor_race()
    upstream = Association._run_reactor.upstream  # type: ignore[attr-defined]
    assert not hasattr(upstream, "upstream")
    assert "compat.run_association_reactor" not in inspect.getsource(upstream)


def test_association_timers_count_monotonic_seconds_where_upstream_counts_wall_clock_ones(
        monkeypatch: pytest.MonkeyPatch) -> None:
    compat.steady_association_timers()
    compat.steady_association_timers()
    upstream = pynetdicom.dul.Timer.upstream  # type: ignore[attr-defined]
    assert not hasattr(upstream, "upstream")
    source = inspect.getsource(upstream)
    assert "time.time() - self._start_time" in source and "self._end_time = None" in source
    assert {"remaining", "start", "stop", "restart", "expired"} <= set(dir(upstream))
    built = inspect.getsource(DULServiceProvider.__init__)
    assert "self._idle_timer = Timer(" in built and "self.artim_timer = Timer(" in built
    dul = DULServiceProvider(Association(AE(), "requestor"))
    for timer in (dul._idle_timer, dul.artim_timer):
        assert isinstance(timer, pynetdicom.dul.Timer)
        timer.timeout = 60
        timer.start()
        monkeypatch.setattr(compat.time, "time", lambda: 1e12)  # the wall clock steps
        assert 59 < timer.remaining <= 60 and not timer.expired
        monkeypatch.undo()


def test_a_requestor_whose_socket_closed_after_ready_aborts_leaving_the_answer_queued() -> None:
    """The race recover_rejection mends: the ACSE checks the socket after `_ready` and
    aborts without reading the DUL's queue, where a rejection may already be."""
    source = inspect.getsource(pynetdicom.acse.ACSE._negotiate_as_requestor)
    ready, check = source.index("socket._ready.wait()"), source.index("if not socket._is_connected")
    receive = source.index("self.dul.receive_pdu(")
    assert ready < check < receive
    assert isinstance(DULServiceProvider(Association(AE(), "requestor")).to_user_queue,
                      queue.Queue)


def test_a_killed_association_looks_every_ms_whether_its_dul_has_stopped(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A release's confirmation arrives before the DUL is back in Sta1: upstream's kill
    then slept 10 ms, on the path of a C-MOVE's final response."""
    upstream = getattr(Association.kill, "upstream", Association.kill)
    assert "time.sleep(0.01)" in inspect.getsource(upstream)
    for step in ("self._reactor_checkpoint.set()", "self._kill = True",
                 "self.is_established = False", "self._is_paused = True",
                 "while self.dul.is_alive() and not self.dul.stop_dul():"):
        assert step in inspect.getsource(upstream), step
    compat.close_requestor_reactor_race()
    slept: list[float] = []
    monkeypatch.setattr(compat, "time", types.SimpleNamespace(sleep=slept.append))
    assoc = Association(AE(), "requestor")
    answers = iter([False, True])  # not yet in Sta1, then stopped
    monkeypatch.setattr(assoc.dul, "is_alive", lambda: True)
    monkeypatch.setattr(assoc.dul, "stop_dul", lambda: next(answers))
    assoc.kill()
    assert slept == [0.001]
    assert assoc._kill and assoc._is_paused and not assoc.is_established
    assert assoc._reactor_checkpoint.is_set()


def test_a_gated_dul_read_resumes_when_the_lane_lets_go_not_after_its_wait() -> None:
    """The lane's gate is what the DUL waits on: a wait far longer than the test's
    bound shows the read returned because the gate was released, not on a timer."""
    dul = Association(AE(), "requestor").dul
    reads: list[str] = []
    dul._is_transport_event = lambda: reads.append("read") or True
    gate, later_gate = threading.Lock(), threading.Lock()
    compat.gate_transport_reads(dul, gate, wait=600)
    gate.acquire()
    reader = threading.Thread(target=lambda: reads.append(str(dul._is_transport_event())))
    reader.start()
    reader.join(0.05)
    assert reader.is_alive() and reads == []  # waiting on the lane, not reading
    gate.release()
    reader.join(30)
    assert not reader.is_alive() and reads == ["read", "True"]
    compat.gate_transport_reads(dul, later_gate, wait=0.001)
    with gate:  # the earlier lane's gate is not in the way of the next one's DUL
        assert dul._is_transport_event() is True
    with later_gate:
        assert dul._is_transport_event() is False


def test_the_reactors_replaced_do_what_the_blocking_loops_repeat() -> None:
    """run_dul_reactor and run_association_reactor repeat upstream's passes; these are
    the steps and names they copy."""
    dul_loop = inspect.getsource(DULServiceProvider.run_reactor)
    for step in ("self._idle_timer.start()", "self.assoc._dul_ready.set()",
                 "time.sleep(self._run_loop_delay)", "if self._kill_thread:",
                 'self.event_queue.put("Evt18")', "self._process_recv_primitive()",
                 "elif self._is_transport_event():", "self._idle_timer.restart()",
                 "self.event_queue.get(block=False)", "self.state_machine.do_action(event)"):
        assert step in dul_loop, step
    assert "target=make_target(self.run_reactor)" in inspect.getsource(DULServiceProvider)
    assert "self._kill_thread = True" in inspect.getsource(DULServiceProvider.stop_dul)
    assert "self._kill_thread = True" in inspect.getsource(DULServiceProvider.kill_dul)
    upstream = getattr(Association._run_reactor, "upstream", Association._run_reactor)
    assoc_loop = inspect.getsource(upstream)
    for step in ("time.sleep(0.001)", "self._reactor_checkpoint.wait()",
                 "self.dimse.get_msg(block=False)", "self._serve_request(msg",
                 "self.acse.is_release_requested()", "self.acse.send_release(is_response=True)",
                 "evt.EVT_RELEASED", "self.acse.is_aborted()", "evt.EVT_ABORTED",
                 "self.dul.is_alive()", "self.dul.idle_timer_expired()",
                 'self.network_timeout_response == "A-RELEASE"'):
        assert step in assoc_loop, step
    assert "self._run_reactor()" in inspect.getsource(Association.run_reactor)
    assoc = Association(AE(), "acceptor")
    for name in ("_kill", "_is_paused", "_dul_ready", "_reactor_checkpoint"):
        assert hasattr(assoc, name), name
    for name in ("_kill_thread", "_idle_timer", "event_queue", "to_user_queue"):
        assert hasattr(assoc.dul, name), name
    # compat.read_pdu looks at the primitives waiting to be sent as upstream does
    assert "self.to_provider_queue.queue[0]" in inspect.getsource(
        DULServiceProvider._process_recv_primitive)
    assert isinstance(assoc.dul.to_provider_queue, queue.Queue)
    assert isinstance(assoc.dimse.msg_queue, queue.Queue)


def test_a_local_primitive_after_the_end_has_no_action_and_its_actions_dequeue_it() -> None:
    """compat._dropped_after_end takes a primitive off the queue, as its actions do, only
    for (event, state) pairs that upstream's table has no action for."""
    for event in ("Evt7", "Evt8", "Evt9", "Evt11", "Evt14", "Evt15"):
        for state in ("Sta1", "Sta13"):
            assert (event, state) not in fsm.TRANSITION_TABLE, (event, state)
    for action in (fsm.AE_7, fsm.AE_8, fsm.DT_1, fsm.AR_1, fsm.AR_4):
        assert "dul.to_provider_queue.get(False)" in inspect.getsource(action), action


def test_a_p_data_in_sta6_is_what_read_pdu_hands_to_dimse_directly() -> None:
    """compat.read_pdu skips DT-2 for a P-DATA-TF in Sta6: that is all DT-2 does."""
    assert fsm.TRANSITION_TABLE[("Evt10", "Sta6")] == "DT-2"
    dt_2 = inspect.getsource(fsm.DT_2)
    assert "dul.assoc.dimse.receive_primitive(" in dt_2 and 'return "Sta6"' in dt_2
    read = inspect.getsource(DULServiceProvider._read_pdu_data)
    for step in ("self.socket.recv(6)", "self.socket.recv(pdu_length)",
                 "self._decode_pdu(bytestream)", "self._recv_pdu.put(pdu)"):
        assert step in read, step
    primitive = P_DATA()
    assert primitive._presentation_data_value_list == []
    decode = inspect.getsource(dimse_messages.DIMSEMessage.decode_msg)
    assert "in primitive.presentation_data_value_list:" in decode
    assert "self._data_set_file.write(data[1:])" in decode  # the spool read_pdu hands on
    receive = inspect.getsource(DIMSEServiceProvider.receive_primitive)
    assert "self.message._data_set_file = None" in receive  # hence read before the call
    assert "self.message = None" in receive
    # The spool of a C-STORE the association's end cuts off (unfinished_receive_spool).
    assert "self._data_set_path = Path(self._data_set_file.name)" in decode
    # A message's context, checked at its start (compat._check_message_start).
    assert "self._accepted_cx: dict[int, PresentationContext] = {}" in inspect.getsource(
        Association.__init__)


def test_a_wakeup_set_after_close_touches_no_descriptor() -> None:
    wakeup = compat.Wakeup()
    wakeup.set()
    wakeup.drain()
    wakeup.close()
    wakeup.set()
    wakeup.drain()
    wakeup.close()


def test_the_dul_reads_pdus_in_one_gated_place_and_writes_through_socket_send() -> None:
    loop = inspect.getsource(DULServiceProvider.run_reactor)
    assert "self._is_transport_event()" in loop
    reader = inspect.getsource(DULServiceProvider._read_pdu_data)
    assert "pdu, event = self._decode_pdu(bytestream)" in reader
    assert "self.event_queue.put(event)" in reader
    assert "self._recv_pdu.put(pdu)" in reader
    assert "self.socket.send(" in inspect.getsource(DULServiceProvider._send)
    assert _parameters(AssociationSocket.send) == ["self", "bytestream"]
    assoc = Association(AE(), "requestor")
    dul = assoc.dul
    assert hasattr(dul._idle_timer, "restart")
    gate = threading.Lock()
    compat.gate_transport_reads(dul, gate, wait=0.001)
    with gate:
        assert dul._is_transport_event() is False  # held: the DUL reads nothing
    compat.note_transport_activity(dul)
    compat.hand_pdu_to_dul(dul, bytes.fromhex("070000000004" "00000200"))  # A-ABORT
    assert dul.event_queue.get_nowait() == "Evt16"
    assert type(dul._recv_pdu.get_nowait()).__name__ == "A_ABORT_RQ"
    compat.hand_pdu_to_dul(dul, b"\x07\x00")
    assert dul.event_queue.get_nowait() == "Evt19"
    compat.transport_closed(dul)
    assert dul.event_queue.get_nowait() == "Evt17"


def test_dimse_sends_in_pdus_of_the_acceptors_negotiated_maximum_length_item() -> None:
    """cap_peer_maximum_pdu changes that item in place after negotiation."""
    assert "self.assoc.acceptor.maximum_length" in inspect.getsource(
        DIMSEServiceProvider.maximum_pdu_size.fget)  # type: ignore[attr-defined]
    getter = inspect.getsource(pynetdicom.association.ServiceUser.maximum_length.fget)
    assert "self.user_information" in getter and "maximum_length_received" in getter


def test_share_send_lock_wraps_one_socket_once() -> None:
    assoc = Association(AE(), "requestor")
    near, far = socket.socketpair()
    sock = AssociationSocket(assoc, client_socket=near)
    try:
        assoc.dul.socket = sock
        lock = compat.share_send_lock(assoc.dul)
        assert compat.share_send_lock(assoc.dul) is lock
        sock.send(b"pdu")
        assert far.recv(16) == b"pdu" and not lock.locked()
    finally:
        near.close()
        far.close()


@pytest.mark.parametrize(("owner", "hook", "parameters"), [
    (RequestHandler, "_create_association", ["self"]),
    (Association, "_run_reactor", ["self"]),
    (Association, "kill", ["self"]),
    (DULServiceProvider, "run", ["self"]),
    (DULServiceProvider, "send_pdu", ["self", "primitive"]),
    (DULServiceProvider, "_read_pdu_data", ["self"]),
    (DULServiceProvider, "stop_dul", ["self"]),
    (DULServiceProvider, "kill_dul", ["self"]),
    (DIMSEServiceProvider, "send_msg", ["self", "primitive", "context_id"]),
    (QueryRetrieveServiceClass, "_move_scp", ["self", "req", "context"]),
    (QueryRetrieveServiceClass, "_c_find_scp", ["self", "req", "context"]),
    (QueryRetrieveServiceClass, "_get_scp", ["self", "req", "context"]),
])
def test_overridden_pynetdicom_hooks_keep_their_signatures(
        owner: type, hook: str, parameters: list[str]) -> None:
    assert _parameters(getattr(owner, hook)) == parameters


def test_the_query_retrieve_class_answers_c_find_through_the_overridden_hook() -> None:
    assert "self._c_find_scp(req, context)" in inspect.getsource(QueryRetrieveServiceClass.SCP)


@pytest.mark.parametrize(("owner", "hook", "parameters"), [
    (BaseScheduler, "_process_jobs", ["self"]),
    (AsyncIOScheduler, "_start_timer", ["self", "wait_seconds"]),
])
def test_overridden_apscheduler_hooks_keep_their_signatures(
        owner: type, hook: str, parameters: list[str]) -> None:
    assert _parameters(getattr(owner, hook)) == parameters


def test_the_asyncio_scheduler_times_its_wakeups_through_the_overridden_hooks() -> None:
    source = inspect.getsource(AsyncIOScheduler.wakeup)
    assert "self._process_jobs()" in source and "self._start_timer(wait_seconds)" in source


@pytest.mark.parametrize("flag", [
    "STORE_RECV_CHUNKED_DATASET", "STORE_SEND_CHUNKED_DATASET",
    "LOG_REQUEST_IDENTIFIERS", "LOG_RESPONSE_IDENTIFIERS",
])
def test_configuration_flags_the_appliance_sets_exist(flag: str) -> None:
    assert isinstance(getattr(_config, flag), bool)


def test_the_log_handler_level_flag_still_decides_the_default_handlers() -> None:
    assert isinstance(_config.LOG_HANDLER_LEVEL, str)
    assert '_config.LOG_HANDLER_LEVEL == "standard"' in inspect.getsource(Association)


# --- aiosqlite ----------------------------------------------------------------------


async def test_run_in_connection_thread_runs_on_aiosqlites_own_connection() -> None:
    assert _parameters(aiosqlite.Connection._execute) == ["self", "fn", "args", "kwargs"]
    loop_thread = threading.get_ident()

    def work(conn: sqlite3.Connection, value: int) -> tuple[int, bool]:
        (row,) = conn.execute("SELECT ? + 1", (value,)).fetchall()
        return row[0], threading.get_ident() != loop_thread

    async with aiosqlite.connect(":memory:") as conn:
        assert isinstance(conn._conn, sqlite3.Connection)
        assert await compat.run_in_connection_thread(conn, work, 41) == (42, True)


# --- pydicom ------------------------------------------------------------------------


def test_read_file_meta_leaves_the_file_at_the_dataset() -> None:
    assert _parameters(pydicom.filereader._read_file_meta_info) == ["fp"]
    ds = Dataset()
    ds.PatientID = "COMPAT"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.preamble = b"\0" * 128
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    encoded = buffer.getvalue()
    fp = BytesIO(encoded)
    read_preamble(fp, force=False)
    meta = compat.read_file_meta(fp)
    assert meta.TransferSyntaxUID == ExplicitVRLittleEndian
    # The rest is the dataset: (0010,0020) Patient ID, explicit VR little endian.
    assert encoded[fp.tell():].startswith(b"\x10\x00\x20\x00LO")


# --- prometheus-client -------------------------------------------------------------


def test_mmaped_dict_creates_files_and_series_as_back_metric_pages_expects() -> None:
    """back_metric_pages allocates before MmapedDict writes: a file it made non-empty
    must be mapped as it is (only an empty one is truncated), and a new series is packed
    and the file grown by doubling exactly as it computes."""
    from prometheus_client import mmap_dict

    cls = mmap_dict.MmapedDict
    create = getattr(cls.__init__, "upstream", cls.__init__)
    add_series = getattr(cls._init_value, "upstream", cls._init_value)
    assert _parameters(create) == ["self", "filename", "read_mode"]
    assert _parameters(add_series) == ["self", "key"]
    assert "if capacity == 0:" in inspect.getsource(create)
    assert isinstance(mmap_dict._INITIAL_MMAP_SIZE, int)
    source = inspect.getsource(add_series)
    assert "padded = encoded + (b' ' * (8 - (len(encoded) + 4) % 8))" in source
    assert "struct.pack(f'i{len(padded)}sdd'.encode()" in source
    assert "self._capacity *= 2" in source and "self._f.truncate(self._capacity)" in source


def test_write_metric_file_keeps_what_the_collector_reads_from_the_files_it_folds(
        tmp_path: Path) -> None:
    """A counter and a histogram folded from two processes' files read back, through
    multiprocess mode's own collector, as those files did (buckets not accumulated twice)."""
    from prometheus_client import mmap_dict, multiprocess

    def key(name: str, sample: str, **labels: str) -> str:
        return mmap_dict.mmap_key(name, sample, list(labels), list(labels.values()), "h")

    for pid, n in ((11, 1.0), (12, 2.0)):
        for kind, entries in (("counter", [key("c", "c_total", outcome="ok")]),
                              ("histogram", [key("h", "h_bucket", le="0.5"),
                                             key("h", "h_bucket", le="+Inf"),
                                             key("h", "h_sum")])):
            values = mmap_dict.MmapedDict(str(tmp_path / f"{kind}_{pid}.db"))
            for entry in entries:
                values.write_value(entry, n, 0.0)
            values.close()

    def read(files: list[Path]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for metric in multiprocess.MultiProcessCollector.merge([str(f) for f in files])
                for s in metric.samples}

    for kind in ("counter", "histogram"):
        compat.write_metric_file(str(tmp_path / f"{kind}_gone.db"),
                                 [str(tmp_path / f"{kind}_{pid}.db") for pid in (11, 12)])
    folded = read([tmp_path / "counter_gone.db", tmp_path / "histogram_gone.db"])
    assert folded == read(sorted(p for p in tmp_path.glob("*_1?.db")))
    assert folded[("h_bucket", (("le", "+Inf"),))] == 6.0  # 3 per bucket, accumulated once
