"""A retrieve whose study is evicted under it: the files gone since the plan are recalled.

A C-MOVE or C-GET plans its instances, then reads their files one by one; the sync
agent's eviction (its commit, then the deletes, 64 files a transaction) may come in
between. Those files were reported as failed sub-operations, though a retrieve of a
study that was already evicted when it began recalls it. Now the retrieve asks for the
recall once it has sent what it could, waits as that one does (Pending responses,
`[sync] recall_timeout_seconds`) and sends the recalled files; a file missing from a
study on local disk (a damaged store) still fails, an fsck matter.

Real peers: `pacs-edge serve`, a `pacs-edge sync` agent serving the recall, `pacs-edge
evict` run from the destination's (or the C-GET requestor's) C-STORE handler while it
holds the first sub-operation's response, so the eviction commits and deletes mid-retrieve;
for WADO-RS, while an HTTPS client holds the rest of a streaming answer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import dicomgen
import pytest
import webpeer
from conftest import HOST, TEST_AE, EdgeServer
from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelGet,
)
from storepeer import StorePeer
from syncagent import SyncAgent, evict, import_files, sync_once, tier_state
from test_retrieve_move import (
    assert_arrived_as_sent,
    c_move,
    failed_list,
    final,
    index_rows,
    store,
)

SUCCESS, SOME_FAILED = 0x0000, 0xB000


@pytest.fixture
def agent_edge(edge_server_factory: Callable[..., EdgeServer],
               small_study: list[dicomgen.GeneratedInstance]) -> Iterator[EdgeServer]:
    """A serving box holding the small study, replicated, with an agent that serves recall
    requests and evicts nothing by itself."""
    edge = edge_server_factory(start=False)
    edge.configure(sync={"stable_after_seconds": 3600.0, "recall_poll_seconds": 0.2,
                         "evict_after_days": 0.0, "recall_timeout_seconds": 60.0})
    edge.start()
    store(edge, small_study)
    sync_once(edge.home)
    agent = SyncAgent(edge.home).start()
    yield edge
    assert agent.stop() == 0, agent.log()


def evict_at_first_arrival(edge: EdgeServer, study_uid: str) -> Callable[[str, int], float]:
    """A StorePeer stall that runs `pacs-edge evict` to its end at the first instance that
    arrives, holding its answer meanwhile."""
    done: list[bool] = []

    def stall(uid: str, nth: int) -> float:
        if not done:
            done.append(True)
            evict(edge.home, study_uid)
            assert tier_state(edge, study_uid) == "evicted"
        return 0.0
    return stall


def test_a_move_whose_study_is_evicted_under_it_recalls_it_and_completes(
    agent_edge: EdgeServer, small_study: list[dicomgen.GeneratedInstance],
) -> None:
    study_uid = small_study[0].study_uid
    stall = evict_at_first_arrival(agent_edge, study_uid)

    with StorePeer(stall=stall) as dest:
        agent_edge.add_peer("dest", dest.ae_title, dest.port, allow="store")
        responses = c_move(agent_edge, {"QueryRetrieveLevel": "STUDY",
                                        "StudyInstanceUID": study_uid}, dest.ae_title)

    status, counts = final(responses)
    assert (status, counts["completed"], counts["failed"]) == (SUCCESS, len(small_study), 0)
    assert_arrived_as_sent(dest, small_study)
    assert tier_state(agent_edge, study_uid) == "replicated"
    assert "files gone since the plan, their study evicted meanwhile" in agent_edge.log()


def test_a_get_whose_study_is_evicted_under_it_recalls_it_and_completes(
    agent_edge: EdgeServer, small_study: list[dicomgen.GeneratedInstance],
) -> None:
    study_uid = small_study[0].study_uid
    evict_now = evict_at_first_arrival(agent_edge, study_uid)  # called as a stall
    arrived: dict[str, list[bytes]] = {}

    def on_store(event: evt.Event) -> int:
        arrived.setdefault(str(event.request.AffectedSOPInstanceUID), []).append(
            event.encoded_dataset(include_meta=False))
        evict_now("", 0)
        return SUCCESS

    ae = AE(TEST_AE)
    ae.dimse_timeout = 120
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    pairs = sorted({(i.sop_class_uid, i.transfer_syntax) for i in small_study})
    for sop_class, syntax in pairs:
        ae.add_requested_context(sop_class, [syntax])
    roles = [build_role(sop_class, scp_role=True) for sop_class in {s for s, _ in pairs}]
    assoc = ae.associate(HOST, agent_edge.port, ae_title=agent_edge.ae_title, ext_neg=roles,
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = study_uid
    try:
        responses = list(assoc.send_c_get(identifier, StudyRootQueryRetrieveInformationModelGet))
    finally:
        assoc.release()

    status, counts = final(responses)
    assert (status, counts["completed"], counts["failed"]) == (SUCCESS, len(small_study), 0)
    assert arrived == {i.sop_instance_uid: [dicomgen.dataset_bytes(i.path)]
                       for i in small_study}
    assert tier_state(agent_edge, study_uid) == "replicated"


def test_a_file_gone_from_a_study_on_local_disk_mid_move_still_fails_alone(
    edge_server: EdgeServer, small_study: list[dicomgen.GeneratedInstance],
) -> None:
    """No eviction: a file deleted under the move from a study still on local disk is a
    damaged store, not a recall matter; it fails, and the log says fsck."""
    store(edge_server, small_study)
    lost = small_study[-1]
    [(path,)] = index_rows(edge_server, "SELECT path FROM instances WHERE sop_uid ="
                                        f" '{lost.sop_instance_uid}'")
    deleted: list[bool] = []

    def stall(uid: str, nth: int) -> float:
        if not deleted:
            deleted.append(True)
            (edge_server.home / "store" / str(path)).unlink()
        return 0.0

    with StorePeer(stall=stall) as dest:
        edge_server.add_peer("dest", dest.ae_title, dest.port, allow="store")
        responses = c_move(edge_server, {"QueryRetrieveLevel": "STUDY",
                                         "StudyInstanceUID": lost.study_uid}, dest.ae_title)

    status, counts = final(responses)
    assert (status, counts["completed"], counts["failed"]) == (
        SOME_FAILED, len(small_study) - 1, 1)
    assert failed_list(responses) == {lost.sop_instance_uid}
    assert "stored files missing from studies on local disk" in edge_server.log()
    assert "waits for a recall" not in edge_server.log()


def test_a_recall_that_does_not_finish_fails_the_files_an_eviction_took_mid_move(
    edge_server_factory: Callable[..., EdgeServer],
    small_study: list[dicomgen.GeneratedInstance],
) -> None:
    """No agent runs: the retrieve waits for the recall as long as one of a study evicted
    before it would ([sync] recall_timeout_seconds), then those files fail as they did."""
    edge = edge_server_factory(start=False)
    edge.configure(sync={"recall_timeout_seconds": 1.0})
    edge.start()
    store(edge, small_study)
    sync_once(edge.home)
    study_uid = small_study[0].study_uid
    stall = evict_at_first_arrival(edge, study_uid)

    with StorePeer(stall=stall) as dest:
        edge.add_peer("dest", dest.ae_title, dest.port, allow="store")
        responses = c_move(edge, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study_uid},
                           dest.ae_title)

    status, counts = final(responses)
    assert status == SOME_FAILED
    assert counts["failed"] > 0 and counts["completed"] + counts["failed"] == len(small_study)
    assert responses[-1][0].ErrorComment == "recall of an evicted study from the cloud timed out"
    assert "move: recall not finished after 1 s" in edge.log()


def test_a_wado_retrieve_whose_study_is_evicted_under_it_sends_every_instance(
    tmp_path: Path, free_port: Callable[[], int],
    edge_server_factory: Callable[..., EdgeServer],
) -> None:
    """The answer streams one stored file after the other: the client reads the first
    bytes and holds the rest (the box waits on its socket, the first file open), the
    study is evicted, then the client reads on. Each file gone meanwhile is recalled
    (within [http] recall_wait_seconds) and sent; the answer was cut off after the first."""
    edge = edge_server_factory(webpeer.web_home(tmp_path / "home", free_port()), start=False)
    edge.configure(sync={"stable_after_seconds": 3600.0, "recall_poll_seconds": 0.2,
                         "evict_after_days": 0.0}, http={"recall_wait_seconds": 60.0})
    edge.start()
    webpeer.add_user(edge, "rad", "radiologist")
    # Files larger than the loopback socket buffers: the box is held inside the first.
    big = dicomgen.make_study(tmp_path / "big", seed=7, series_per_study=1,
                              instances_per_series=3, modalities=("CT",), size=3000)
    study_uid = big[0].study_uid
    import_files(edge.home, *big)
    sync_once(edge.home)
    agent = SyncAgent(edge.home).start()
    try:
        with webpeer.session(edge, "rad").get(
                f"{webpeer.base_url(edge)}/dicom-web/studies/{study_uid}",
                headers={"Accept": 'multipart/related; type="application/dicom";'
                                   ' transfer-syntax=*'}, stream=True) as got:
            assert got.status_code == 200
            first = got.raw.read(64 * 1024)
            evict(edge.home, study_uid)
            body = first + got.raw.read()
    finally:
        assert agent.stop() == 0, agent.log()
    received = []
    for n, (_, payload) in enumerate(webpeer.parts(got.headers["Content-Type"], body)):
        (tmp_path / f"part{n}.dcm").write_bytes(payload)
        received.append(dicomgen.dataset_bytes(tmp_path / f"part{n}.dcm"))
    assert received == [dicomgen.dataset_bytes(i.path) for i in big]
    assert tier_state(edge, study_uid) == "replicated"
