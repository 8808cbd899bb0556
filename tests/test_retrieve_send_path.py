"""The C-STORE send path of C-MOVE and C-GET (appliance/dimse/store_lane.py) against
real peers: a `pacs-edge serve` subprocess, pynetdicom and dcmtk.

What is proven here: the command sets the lane encodes (C-STORE-RQ, the Pending
C-MOVE/C-GET responses written straight to the socket) are the ones pydicom decodes;
instances arrive byte-identical whatever maximum PDU the peer announces (4096 and
16384 split each dataset into many PDVs); a destination that aborts mid-study gets
the instance again on a fresh association, counted once; a C-GET requestor that
aborts mid-study ends that C-GET alone, one that never answers a C-STORE or floods the
box with responses to requests never sent is ended at the timeout, and the server
keeps serving. A peer that does not accept a stored transfer syntax (nothing is
transcoded: those instances fail alone) is covered in test_retrieve_move.py and
test_retrieve_get.py, which also send every stored syntax through the lane.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from io import BytesIO
from pathlib import Path

import dcmtk
import dicomgen
import pytest
from conftest import HOST, TEST_AE, EdgeServer
from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import decode
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)
from storepeer import StorePeer

from appliance.base.dicom_wire import command_elements
from appliance.dimse.store_lane import c_store_rq, pending_rsp

MOVE, GET = StudyRootQueryRetrieveInformationModelMove, StudyRootQueryRetrieveInformationModelGet
SUCCESS, PENDING = 0x0000, 0xFF00


@pytest.fixture(autouse=True)
def dcmtk_without_nagle(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TCP_NODELAY", "1")


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> list[dicomgen.GeneratedInstance]:
    """Eight 128 x 128 images (32 KiB of pixels each: many PDVs at a 4 KiB PDU)."""
    return dicomgen.make_study(tmp_path_factory.mktemp("send-path"), seed=71,
                               series_per_study=2, instances_per_series=4, size=128)


@pytest.fixture
def edge(edge_server_factory: Callable[..., EdgeServer],
         study: list[dicomgen.GeneratedInstance]) -> Iterator[EdgeServer]:
    server = edge_server_factory(start=False)
    server.configure(dicom={"suboperation_timeout": 2.0, "dimse_timeout": 2.0})
    server.start()
    result = dcmtk.storescu(server.port, [i.path for i in study], aec=server.ae_title).check()
    assert result.store_responses() == ["Success"] * len(study)
    yield server


def identifier(instance: dicomgen.GeneratedInstance) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = instance.study_uid
    return ds


def c_move(edge: EdgeServer, instance: dicomgen.GeneratedInstance, destination: str) -> Dataset:
    ae = AE(TEST_AE)
    ae.add_requested_context(MOVE)
    assoc = ae.associate(HOST, edge.port, ae_title=edge.ae_title)
    assert assoc.is_established
    try:
        statuses = [status for status, _ in assoc.send_c_move(identifier(instance), destination,
                                                              MOVE)]
    finally:
        assoc.release()
    return statuses[-1]


class Getter:
    """A pynetdicom C-GET requestor; `on_store(uid, nth, event)` may stall or abort."""

    def __init__(self, instances: Sequence[dicomgen.GeneratedInstance], *, max_pdu: int = 0,
                 on_store: Callable[[str, int, evt.Event], None] | None = None) -> None:
        self.instances = instances
        self.max_pdu = max_pdu
        self.on_store = on_store
        self.arrivals: dict[str, list[bytes]] = defaultdict(list)

    def _store(self, event: evt.Event) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        self.arrivals[uid].append(event.encoded_dataset(include_meta=False))
        if self.on_store is not None:
            self.on_store(uid, len(self.arrivals[uid]), event)
        return SUCCESS

    def get(self, edge: EdgeServer) -> list[Dataset]:
        ae = AE(TEST_AE)
        ae.maximum_pdu_size = self.max_pdu
        ae.dimse_timeout = 10  # how long a requestor that aborted waits on its own C-GET
        ae.add_requested_context(GET)
        pairs = dict.fromkeys((i.sop_class_uid, i.transfer_syntax) for i in self.instances)
        for sop_class, ts in pairs:
            ae.add_requested_context(sop_class, [ts])
        roles = [build_role(sop, scp_role=True) for sop in dict.fromkeys(s for s, _ in pairs)]
        assoc = ae.associate(HOST, edge.port, ae_title=edge.ae_title, ext_neg=roles,
                             evt_handlers=[(evt.EVT_C_STORE, self._store)])
        assert assoc.is_established
        try:
            return [status for status, _ in assoc.send_c_get(identifier(self.instances[0]), GET)
                    if "Status" in status]
        finally:
            if assoc.is_established:
                assoc.release()


def assert_byte_exact(arrivals: dict[str, list[bytes]],
                      instances: Sequence[dicomgen.GeneratedInstance]) -> None:
    assert set(arrivals) == {i.sop_instance_uid for i in instances}
    for inst in instances:
        for received in arrivals[inst.sop_instance_uid]:
            assert received == dicomgen.dataset_bytes(inst.path), inst.path.name


def counts(status: Dataset) -> tuple[int, int, int]:
    return (int(status.NumberOfCompletedSuboperations), int(status.NumberOfFailedSuboperations),
            int(status.NumberOfWarningSuboperations))


def test_the_encoded_c_store_request_is_the_command_set_pydicom_decodes() -> None:
    encoded = c_store_rq(msg_id=7, sop_class="1.2.840.10008.5.1.4.1.1.2",
                         sop_instance="1.2.3.45", originator_aet="MOVER", originator_id=3)
    command = decode(BytesIO(encoded), True, True)
    assert command.CommandGroupLength == len(encoded) - 12
    assert (command.CommandField, command.MessageID, command.Priority) == (1, 7, 0)
    assert command.CommandDataSetType != 0x0101
    assert command.AffectedSOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
    assert command.AffectedSOPInstanceUID == "1.2.3.45"
    assert command.MoveOriginatorApplicationEntityTitle.strip() == "MOVER"
    assert command.MoveOriginatorMessageID == 3
    assert command_elements(encoded)[0x0110] == b"\x07\x00"


def test_the_encoded_pending_response_is_the_command_set_pydicom_decodes() -> None:
    encoded = pending_rsp(command_field=0x8021, sop_class=MOVE, responding_to=9, remaining=5,
                          completed=3, failed=1, warning=2)
    command = decode(BytesIO(encoded), True, True)
    assert command.CommandGroupLength == len(encoded) - 12
    assert (command.CommandField, command.MessageIDBeingRespondedTo) == (0x8021, 9)
    assert (command.CommandDataSetType, command.Status) == (0x0101, PENDING)
    assert command.AffectedSOPClassUID == MOVE
    assert (command.NumberOfRemainingSuboperations, command.NumberOfCompletedSuboperations,
            command.NumberOfFailedSuboperations, command.NumberOfWarningSuboperations) == (
        5, 3, 1, 2)


@pytest.mark.parametrize("max_pdu", [4096, 16384])
def test_move_is_byte_exact_at_a_small_peer_maximum_pdu(
        edge: EdgeServer, study: list[dicomgen.GeneratedInstance], max_pdu: int) -> None:
    with StorePeer("SENDPEER", max_pdu=max_pdu) as peer:
        edge.add_peer("peer", peer.ae_title, peer.port, allow="store")
        status = c_move(edge, study[0], peer.ae_title)
    assert int(status.Status) == SUCCESS
    assert counts(status) == (len(study), 0, 0)
    assert_byte_exact(peer.arrivals, study)
    assert all(len(got) == 1 for got in peer.arrivals.values())


@pytest.mark.parametrize("max_pdu", [4096, 16384])
def test_get_is_byte_exact_at_a_small_peer_maximum_pdu(
        edge: EdgeServer, study: list[dicomgen.GeneratedInstance], max_pdu: int) -> None:
    getter = Getter(study, max_pdu=max_pdu)
    statuses = getter.get(edge)
    assert int(statuses[-1].Status) == SUCCESS
    assert counts(statuses[-1]) == (len(study), 0, 0)
    assert [int(s.Status) for s in statuses[:-1]] == [PENDING] * len(study)
    assert_byte_exact(getter.arrivals, study)


def test_getscu_at_a_4096_byte_pdu_gets_the_study_byte_exact(
        edge: EdgeServer, study: list[dicomgen.GeneratedInstance], tmp_path: Path) -> None:
    out = tmp_path / "got"
    dcmtk.getscu(edge.port, {"StudyInstanceUID": study[0].study_uid}, out,
                 aec=edge.ae_title, args=("-v", "+B", "-pdu", "4096")).check()
    received = {str(dicomgen.read_header(p).SOPInstanceUID): dicomgen.dataset_bytes(p)
                for p in out.iterdir() if p.is_file()}
    assert received == {i.sop_instance_uid: dicomgen.dataset_bytes(i.path) for i in study}


def test_destination_aborting_mid_study_gets_the_instance_again_on_a_fresh_association(
        edge: EdgeServer, study: list[dicomgen.GeneratedInstance]) -> None:
    victim = study[3].sop_instance_uid
    with StorePeer("SENDPEER", max_pdu=16384,
                   abort_on=lambda uid, nth: uid == victim and nth == 1) as peer:
        edge.add_peer("peer", peer.ae_title, peer.port, allow="store")
        status = c_move(edge, study[0], peer.ae_title)
    assert int(status.Status) == SUCCESS
    assert counts(status) == (len(study), 0, 0)
    assert_byte_exact(peer.arrivals, study)
    assert {uid: len(got) for uid, got in peer.arrivals.items()} == (
        {i.sop_instance_uid: 1 for i in study} | {victim: 2})
    assert "move sub-operation got no C-STORE response attempt=1 of 3" in edge.log()
    assert "Traceback" not in edge.log()


def test_get_requestor_aborting_mid_study_ends_that_get_and_the_server_serves_on(
        edge: EdgeServer, study: list[dicomgen.GeneratedInstance]) -> None:
    def abort_third(uid: str, nth: int, event: evt.Event) -> None:
        if uid == study[2].sop_instance_uid:
            event.assoc.abort()

    Getter(study, on_store=abort_third).get(edge)
    assert _eventually(lambda: "get stopped: requesting association ended" in edge.log())
    getter = Getter(study)
    assert int(getter.get(edge)[-1].Status) == SUCCESS
    assert_byte_exact(getter.arrivals, study)
    assert "Traceback" not in edge.log()


def test_get_requestor_that_never_answers_a_store_is_aborted_after_the_timeout(
        edge: EdgeServer, study: list[dicomgen.GeneratedInstance]) -> None:
    def stall_second(uid: str, nth: int, event: evt.Event) -> None:
        if uid == study[1].sop_instance_uid:
            time.sleep(4.0)  # dimse_timeout is 2 s

    statuses = Getter(study, on_store=stall_second).get(edge)
    assert all(int(s.Status) == PENDING for s in statuses)  # no final response
    assert _eventually(lambda: "no c-store response within timeout=2s" in edge.log())
    getter = Getter(study)
    assert int(getter.get(edge)[-1].Status) == SUCCESS
    assert_byte_exact(getter.arrivals, study)
    assert "Traceback" not in edge.log()


def test_get_requestor_flooding_other_responses_is_aborted_after_the_timeout(
        edge: EdgeServer, study: list[dicomgen.GeneratedInstance]) -> None:
    """C-STORE responses to requests never sent, back to back: the socket is never idle,
    yet none of it is the response awaited. The box ends the sub-operation at the timeout
    (2 s) rather than when the peer stops sending (30 s here)."""
    outcome: list[str] = []

    def flood_second(uid: str, nth: int, event: evt.Event) -> None:
        if uid != study[1].sop_instance_uid:
            return
        burst = b"".join(_responses_to_nothing(event.context.context_id, event.request)) * 2000
        sock = event.assoc.dul.socket.socket
        end = time.monotonic() + 30.0
        try:
            while time.monotonic() < end:
                sock.sendall(burst)
            outcome.append("the flood ran its course")
        except TimeoutError:
            outcome.append("the box stopped reading")
        except OSError:
            outcome.append("the box ended the association")

    Getter(study, on_store=flood_second).get(edge)
    assert outcome == ["the box ended the association"]
    assert "no c-store response within timeout=2s" in edge.log()
    getter = Getter(study)
    assert int(getter.get(edge)[-1].Status) == SUCCESS
    assert_byte_exact(getter.arrivals, study)
    assert "Traceback" not in edge.log()


def _responses_to_nothing(context_id: int, request: C_STORE) -> list[bytes]:
    """A Success C-STORE-RSP for `request`'s instance but to Message ID 65535 (a request
    never sent), as P-DATA-TF PDUs."""
    response = C_STORE()
    response.MessageIDBeingRespondedTo = 65535
    response.AffectedSOPClassUID = request.AffectedSOPClassUID
    response.AffectedSOPInstanceUID = request.AffectedSOPInstanceUID
    response.Status = SUCCESS
    message = C_STORE_RSP()
    message.primitive_to_message(response)
    pdus = []
    for primitive in message.encode_msg(context_id, 16384):
        pdu = P_DATA_TF()
        pdu.from_primitive(primitive)
        pdus.append(pdu.encode())
    return pdus


def _eventually(check: Callable[[], bool], deadline: float = 10.0) -> bool:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if check():
            return True
        time.sleep(0.05)
    return check()


# A peer with Nagle's algorithm on (dcmtk's default) writes each C-STORE-RSP in pieces and
# holds the later ones until the box acknowledges the first, which the box's kernel delayed
# (40 ms on Linux) since it had nothing to send: ~45 ms an instance, 228 s for a 5,000-
# instance study. Compared with the same retrieve by a peer with Nagle off, measured in the
# same test (a slow machine slows both), not with a fixed time.
NAGLE_INSTANCES = 200
STALL_FACTOR, STALL_SLACK_SECONDS = 4.0, 1.0


@pytest.mark.parametrize("retrieve", ["move", "get"])
def test_a_peer_with_nagle_on_gets_the_study_without_delayed_ack_stalls(
        edge_server_factory: Callable[..., EdgeServer], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, retrieve: str) -> None:
    """C-MOVE of 1,000 8x8 instances to a dcmtk storescp left as installed took 45 s
    (0.5 s to one started with TCP_NODELAY=1); the lane acknowledges at once now."""
    many = dicomgen.make_studies(tmp_path / "many", seed=72, series_per_study=1,
                                 instances_per_series=NAGLE_INSTANCES, modalities=("CT",),
                                 size=8)
    edge = edge_server_factory()
    dcmtk.storescu(edge.port, [i.path for i in many], aec=edge.ae_title).check()
    keys = {"StudyInstanceUID": many[0].study_uid}
    seconds = {}
    for nagle in ("off", "on"):  # the peers as installed: Nagle on
        if nagle == "on":
            monkeypatch.delenv("TCP_NODELAY", raising=False)
        else:
            monkeypatch.setenv("TCP_NODELAY", "1")
        if retrieve == "move":
            with dcmtk.StoreSCP(tmp_path / f"workstation-{nagle}") as workstation:
                edge.add_peer(f"workstation-{nagle}", workstation.ae_title, workstation.port,
                              allow="store")
                result = dcmtk.movescu(edge.port, keys, workstation.ae_title,
                                       aec=edge.ae_title).check()
                received = workstation.files()
                edge.cli("peers", "remove", f"workstation-{nagle}")
        else:
            got = tmp_path / f"got-{nagle}"
            result = dcmtk.getscu(edge.port, keys, got, aec=edge.ae_title).check()
            received = [p for p in got.iterdir() if p.is_file()]
        assert len(received) == NAGLE_INSTANCES
        seconds[nagle] = result.seconds
    assert seconds["on"] < STALL_FACTOR * seconds["off"] + STALL_SLACK_SECONDS, seconds
