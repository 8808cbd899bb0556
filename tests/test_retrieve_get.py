"""C-GET end to end: a real `pacs-edge serve`, dcmtk getscu and pynetdicom as clients.

The instances come back over the requesting association, on the storage contexts
the client proposed with the SCP role (role selection), in the transfer syntax
they were stored in and byte-identical (dataset after the File Meta group).
An instance whose stored syntax has no such context fails on its own, with a
clear log line; the `get` permission gates the service; C-CANCEL stops it.

getscu proposes one context per storage SOP class listing several syntaxes; the
server accepts, for such a C-GET context, the syntax most stored instances of
that SOP class are in (appliance/dimse/negotiation.py), so a study stored in one
syntax comes back whole. pynetdicom covers every other syntax, with one context
per syntax.

dcmtk tools leave Nagle on unless the environment says TCP_NODELAY=1.
"""

from __future__ import annotations

import io
import struct
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

import dcmtk
import dicomgen
import pydicom
import pytest
import rawpdu
from conftest import HOST, TEST_AE, EdgeServer
from pydicom import config as pydicom_config
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_role, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelGet,
)

MODELS = {
    "patient": PatientRootQueryRetrieveInformationModelGet,
    "study": StudyRootQueryRetrieveInformationModelGet,
}
SUCCESS, PENDING, CANCEL = 0x0000, 0xFF00, 0xFE00
REFUSED_NOT_AUTHORIZED, IDENTIFIER_DOES_NOT_MATCH = 0x0124, 0xA900
ALL_FAILED, SOME_FAILED = 0xA702, 0xB000
MANY = 240
# Every syntax dcmtk's storescu can send (HTJ2K it cannot; test_store_syntaxes covers it).
SYNTAXES = ("implicit-le", "explicit-le", "explicit-be", "deflated", "jpeg-baseline",
            "jpeg-lossless", "jpeg-ls-lossless", "rle", "jpeg2000-lossless")


@pytest.fixture(autouse=True)
def dcmtk_without_nagle(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TCP_NODELAY", "1")


@pytest.fixture(scope="module")
def implicit_study(tmp_path_factory: pytest.TempPathFactory) -> list[dicomgen.GeneratedInstance]:
    return dicomgen.make_study(tmp_path_factory.mktemp("implicit"), seed=41,
                               transfer_syntax=ImplicitVRLittleEndian)


@pytest.fixture(scope="module")
def many_instances(tmp_path_factory: pytest.TempPathFactory) -> list[dicomgen.GeneratedInstance]:
    return dicomgen.make_study(tmp_path_factory.mktemp("many-get"), seed=42, series_per_study=2,
                               instances_per_series=MANY // 2, size=8)


class GetResult:
    def __init__(self) -> None:
        self.responses: list[tuple[Dataset, Dataset | None]] = []
        self.arrivals: dict[str, list[bytes]] = defaultdict(list)

    @property
    def status(self) -> int:
        return int(self.responses[-1][0].Status)

    def counts(self) -> tuple[int, int, int]:
        """(completed, failed, warning) of the final response."""
        rsp = self.responses[-1][0]
        return (int(rsp.NumberOfCompletedSuboperations), int(rsp.NumberOfFailedSuboperations),
                int(rsp.NumberOfWarningSuboperations))

    def failed_list(self) -> set[str]:
        ident = self.responses[-1][1]
        assert ident is not None, "final response without an identifier"
        value = ident.get("FailedSOPInstanceUIDList", [])
        return {str(v) for v in ([value] if isinstance(value, str) else value)}

    def arrival_counts(self) -> dict[str, int]:
        return {uid: len(got) for uid, got in self.arrivals.items()}


def c_get(edge: EdgeServer, keys: dict[str, object],
          storage: Sequence[tuple[str, str]], *, model: str = "study", aet: str = TEST_AE,
          on_pending: Callable[[object, int, int], None] | None = None,
          store_delay: float = 0.0) -> GetResult:
    """C-GET from pynetdicom, proposing one storage context (with the SCP role) per
    (SOP class, transfer syntax) pair in `storage`."""
    result = GetResult()

    def on_store(event: evt.Event) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        result.arrivals[uid].append(event.encoded_dataset(include_meta=False))
        if store_delay:
            time.sleep(store_delay)
        return SUCCESS

    ae = AE(aet)
    ae.dimse_timeout = 60
    ae.maximum_pdu_size = 0
    ae.add_requested_context(MODELS[model])
    for sop_class, ts in dict.fromkeys(storage):
        ae.add_requested_context(sop_class, [ts])
    roles = [build_role(sop_class, scp_role=True)
             for sop_class in dict.fromkeys(sop for sop, _ in storage)]
    assoc = ae.associate(HOST, edge.port, ae_title=edge.ae_title, ext_neg=roles,
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established, "association with pacs-edge refused"
    identifier = Dataset()
    with pydicom_config.disable_value_validation():
        for keyword, value in keys.items():
            setattr(identifier, keyword, value)
    cx_id = next(cx.context_id for cx in assoc.accepted_contexts
                 if cx.abstract_syntax == MODELS[model])
    try:
        for status, ident in assoc.send_c_get(identifier, MODELS[model]):
            result.responses.append((status, ident))
            if on_pending and status.get("Status") == PENDING:
                on_pending(assoc, cx_id, len(result.responses))
    finally:
        if assoc.is_established:
            assoc.release()
    assert result.responses and "Status" in result.responses[-1][0], "no final C-GET response"
    return result


def pairs(instances: Sequence[dicomgen.GeneratedInstance]) -> list[tuple[str, str]]:
    return [(i.sop_class_uid, i.transfer_syntax) for i in instances]


def study_keys(instance: dicomgen.GeneratedInstance) -> dict[str, object]:
    return {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": instance.study_uid}


def store(edge: EdgeServer, instances: Sequence[dicomgen.GeneratedInstance]) -> None:
    result = dcmtk.storescu(edge.port, [i.path for i in instances], aec=edge.ae_title).check()
    assert result.store_responses() == ["Success"] * len(instances)


def assert_arrived_as_sent(result: GetResult,
                           instances: Sequence[dicomgen.GeneratedInstance]) -> None:
    assert result.arrival_counts() == {i.sop_instance_uid: 1 for i in instances}
    for inst in instances:
        assert result.arrivals[inst.sop_instance_uid][0] == dicomgen.dataset_bytes(inst.path), (
            inst.path.name)


# --- dcmtk getscu ------------------------------------------------------------------------

@pytest.mark.parametrize("syntax", ["explicit", "implicit"])
def test_getscu_retrieves_a_study_byte_exact(
    syntax: str, edge_server: EdgeServer, tmp_path: Path,
    small_study: list[dicomgen.GeneratedInstance],
    implicit_study: list[dicomgen.GeneratedInstance],
) -> None:
    study = small_study if syntax == "explicit" else implicit_study
    store(edge_server, study)
    out = tmp_path / "got"
    result = dcmtk.getscu(edge_server.port, {"StudyInstanceUID": study[0].study_uid},
                          out, aec=edge_server.ae_title, args=("-v", "+B")).check()

    assert "Received C-GET Response (Success)" in result.output
    assert result.output.count("Sending C-STORE Response (Success)") == len(study)
    received = {str(dicomgen.read_header(p).SOPInstanceUID): p
                for p in out.iterdir() if p.is_file()}
    assert set(received) == {i.sop_instance_uid for i in study}
    for inst in study:
        assert dicomgen.dataset_bytes(received[inst.sop_instance_uid]) == dicomgen.dataset_bytes(
            inst.path)
    assert f"get finished status=0x0000 completed={len(study)} failed=0" in edge_server.log()


def test_getscu_without_get_permission_is_refused(
    edge_server: EdgeServer, tmp_path: Path, implicit_study: list[dicomgen.GeneratedInstance],
) -> None:
    store(edge_server, implicit_study)
    edge_server.add_peer("viewer", "VIEWER", 1, allow="find,move")
    out = tmp_path / "got"
    result = dcmtk.getscu(edge_server.port, {"StudyInstanceUID": implicit_study[0].study_uid},
                          out, aet="VIEWER", aec=edge_server.ae_title, args=("-d",))
    assert result.dimse_statuses()[-1] == REFUSED_NOT_AUTHORIZED
    assert list(out.iterdir()) == []
    assert "get refused reason=peer lacks permission 'get' calling=VIEWER" in edge_server.log()


def test_a_peer_allowed_get_but_not_store_still_gets_the_study(
    edge_server: EdgeServer, tmp_path: Path, small_study: list[dicomgen.GeneratedInstance],
) -> None:
    # Storage contexts are refused to a peer without `store` (it cannot send a dataset),
    # except in the SCP role that C-GET needs (the box sends, the peer receives).
    store(edge_server, small_study)
    edge_server.add_peer("viewer", "VIEWER", 1, allow="find,get")
    out = tmp_path / "got"
    dcmtk.getscu(edge_server.port, {"StudyInstanceUID": small_study[0].study_uid}, out,
                 aet="VIEWER", aec=edge_server.ae_title).check()
    assert len([p for p in out.iterdir() if p.is_file()]) == len(small_study)
    result = c_get(edge_server, study_keys(small_study[0]), pairs(small_study), aet="VIEWER")
    assert result.status == SUCCESS
    assert_arrived_as_sent(result, small_study)


# --- pynetdicom client -------------------------------------------------------------------

def test_every_stored_syntax_comes_back_byte_exact_on_its_own_context(
    edge_server: EdgeServer, syntax_set: dict[str, dicomgen.GeneratedInstance],
) -> None:
    chosen = [syntax_set[str(dicomgen.TRANSFER_SYNTAXES[name])] for name in SYNTAXES]
    store(edge_server, chosen)

    result = c_get(edge_server, study_keys(chosen[0]), pairs(chosen))

    assert result.status == SUCCESS
    assert result.counts() == (len(chosen), 0, 0)
    pending = [s for s, _ in result.responses[:-1]]
    assert [int(s.NumberOfRemainingSuboperations) for s in pending] == list(
        range(len(chosen) - 1, -1, -1))
    assert_arrived_as_sent(result, chosen)


@pytest.mark.parametrize(("model", "level"), [("patient", "PATIENT"), ("patient", "SERIES"),
                                               ("study", "IMAGE")])
def test_identifier_selects_by_level(
    model: str, level: str, edge_server: EdgeServer,
    small_study: list[dicomgen.GeneratedInstance],
) -> None:
    store(edge_server, small_study)
    first = small_study[0]
    keys: dict[str, object] = {"QueryRetrieveLevel": level}
    expected = list(small_study)
    if model == "patient":
        keys["PatientID"] = first.patient_id
    if level in ("SERIES", "IMAGE"):
        keys["StudyInstanceUID"] = first.study_uid
        keys["SeriesInstanceUID"] = first.series_uid
        expected = [i for i in small_study if i.series_uid == first.series_uid]
    if level == "IMAGE":
        expected = expected[1:]
        keys["SOPInstanceUID"] = [i.sop_instance_uid for i in expected]

    result = c_get(edge_server, keys, pairs(small_study), model=model)

    assert result.status == SUCCESS
    assert result.counts() == (len(expected), 0, 0)
    assert_arrived_as_sent(result, expected)


def test_stored_syntax_without_an_scp_role_context_fails_that_instance_only(
    edge_server: EdgeServer, syntax_set: dict[str, dicomgen.GeneratedInstance],
) -> None:
    chosen = [syntax_set[str(dicomgen.TRANSFER_SYNTAXES[name])]
              for name in ("implicit-le", "explicit-le", "rle")]
    store(edge_server, chosen)
    explicit = syntax_set[str(ExplicitVRLittleEndian)]
    ct = explicit.sop_class_uid

    some = c_get(edge_server, study_keys(explicit), [(ct, str(ExplicitVRLittleEndian))])
    assert some.status == SOME_FAILED
    assert some.counts() == (1, 2, 0)
    assert some.failed_list() == {i.sop_instance_uid for i in chosen if i is not explicit}
    assert_arrived_as_sent(some, [explicit])
    assert "get sub-operation failed: no storage context with SCP role for the stored " \
           "transfer syntax (not transcoding)" in edge_server.log()

    # The storage context proposed without the SCP role: nothing can be sent.
    none = c_get(edge_server, study_keys(explicit), [])
    assert none.status == ALL_FAILED
    assert none.counts() == (0, 3, 0)
    assert none.failed_list() == {i.sop_instance_uid for i in chosen}


def test_peer_without_get_permission_is_refused(
    edge_server: EdgeServer, small_study: list[dicomgen.GeneratedInstance],
) -> None:
    store(edge_server, small_study)
    edge_server.add_peer("viewer", "VIEWER", 1, allow="find,move,store")
    result = c_get(edge_server, study_keys(small_study[0]), pairs(small_study), aet="VIEWER")
    assert result.status == REFUSED_NOT_AUTHORIZED
    assert result.arrivals == {}


def test_identifier_without_the_level_key_is_refused_with_a900(edge_server: EdgeServer) -> None:
    result = c_get(edge_server, {"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": "1.2.3"},
                   [])
    assert result.status == IDENTIFIER_DOES_NOT_MATCH
    assert "get refused reason=SeriesInstanceUID is required at the SERIES level" in (
        edge_server.log())


def test_cancel_stops_the_get_with_fe00_and_counts(
    edge_server: EdgeServer, small_study: list[dicomgen.GeneratedInstance],
) -> None:
    store(edge_server, small_study)

    def cancel_after_first(assoc: object, context_id: int, n: int) -> None:
        if n == 1:
            assoc.send_c_cancel(1, context_id)  # type: ignore[attr-defined]

    result = c_get(edge_server, study_keys(small_study[0]), pairs(small_study),
                   on_pending=cancel_after_first, store_delay=0.2)

    assert result.status == CANCEL
    final = result.responses[-1][0]
    remaining = int(final.NumberOfRemainingSuboperations)
    completed, failed, _ = result.counts()
    assert remaining >= 1
    assert completed + failed + remaining == len(small_study)
    assert sum(result.arrival_counts().values()) == completed


def test_hundreds_of_suboperations_each_arrive_exactly_once(
    edge_server: EdgeServer, many_instances: list[dicomgen.GeneratedInstance],
) -> None:
    store(edge_server, many_instances)
    result = c_get(edge_server, study_keys(many_instances[0]), pairs(many_instances))
    assert result.status == SUCCESS
    assert result.counts() == (MANY, 0, 0)
    assert_arrived_as_sent(result, many_instances)


def test_a_data_set_that_starts_with_a_group_2_element_comes_back_byte_exact(
    edge_server: EdgeServer, small_study: list[dicomgen.GeneratedInstance],
) -> None:
    # Group 0002 is the File Meta's (PS3.5 7.1), yet some modalities send (0002,0016)
    # Source AE Title inside the data set. Stored as sent, it was left out of the
    # retrieve: the send path found the data set with pydicom's File Meta reader, which
    # takes every leading group-2 element for File Meta.
    ct = next(i for i in small_study if i.sop_class_uid == rawpdu.CT_IMAGE_STORAGE)
    encoded = encode(pydicom.dcmread(ct.path), True, True)  # Implicit VR LE, as proposed
    assert encoded is not None
    source_ae = b"MODALITY1 "
    sent = struct.pack("<HHL", 0x0002, 0x0016, len(source_ae)) + source_ae + encoded
    request = C_STORE()
    request.MessageID = 1
    request.AffectedSOPClassUID = rawpdu.CT_IMAGE_STORAGE
    request.AffectedSOPInstanceUID = ct.sop_instance_uid
    request.Priority = 2
    request.DataSet = io.BytesIO(sent)
    sock = rawpdu.established(edge_server.port, TEST_AE, edge_server.ae_title,
                              contexts=((1, rawpdu.CT_IMAGE_STORAGE),))
    try:
        sock.sendall(b"".join(rawpdu.dimse_pdus(request, 1)))
        pdu_type, body = rawpdu.read_pdu(sock)
        assert pdu_type == rawpdu.P_DATA
        response = pydicom.filereader.read_dataset(io.BytesIO(body[6:]), is_implicit_VR=True,
                                                   is_little_endian=True)
        assert response.Status == SUCCESS
        sock.sendall(rawpdu.release_rq())
        assert rawpdu.read_pdu(sock)[0] == rawpdu.A_RELEASE_RP
    finally:
        sock.close()

    result = c_get(edge_server, study_keys(ct), [(ct.sop_class_uid, str(ImplicitVRLittleEndian))])

    assert result.status == SUCCESS
    assert result.arrival_counts() == {ct.sop_instance_uid: 1}
    got = result.arrivals[ct.sop_instance_uid][0]
    assert len(got) == len(sent), "the leading group-2 element was left out"
    assert got == sent
