"""/metrics counts a scripted load exactly, across serve's worker processes and the agent.

The box runs two DIMSE worker processes (the kernel spreads associations between
them) and the sync agent runs as its own process; each counts in its own files
and one scrape must add them up to what dcmtk's clients and the agent did.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

import dcmtk
import hl7peer
from conftest import EdgeServer, init_home, run_pacs_edge, serving
from dicomgen import dataset_bytes, make_studies
from prometheus_client.parser import text_string_to_metric_families
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from syncagent import SyncAgent
from webpeer import add_user, curl, dicomweb, web_home

STORE_RUNS = 3  # associations that store
FINDS = 4
REJECTED = 5
MAX_HELD = 24  # associations opened until one lands on the worker without the web
DEADLINE = 30.0


def scrape(server: EdgeServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    answer = curl(server, "/metrics")
    assert answer.status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(answer.body.decode())
            for s in family.samples}


def delta(after: dict, before: dict, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def test_counts_match_a_scripted_load_across_workers_and_the_agent(tmp_path: Path) -> None:
    studies = make_studies(tmp_path / "studies", patients=3, studies_per_patient=1,
                           series_per_study=1, instances_per_series=4)
    files = [i.path for i in studies]
    home = web_home(tmp_path / "home", dcmtk.free_port())
    server = EdgeServer(home)
    server.configure(dicom={"workers": 2})
    server.start()
    try:
        before = scrape(server)
        for run in range(STORE_RUNS):
            dcmtk.storescu(server.port, files[run::STORE_RUNS]).check()
        for _ in range(FINDS):
            dcmtk.findscu(server.port, {"PatientID": "*", "StudyInstanceUID": None}).check()
        # A worklist query from a peer not allowed `worklist`: refused (0x0124).
        dcmtk.findscu(server.port, {"PatientID": None}, model="worklist")
        for _ in range(REJECTED):
            assert not dcmtk.echoscu(server.port, aet="NOBODY").ok
        first = studies[0].study_uid
        dcmtk.getscu(server.port, {"StudyInstanceUID": first}, tmp_path / "got").check()
        add_user(server, "rad", "radiologist")
        retrieved = dicomweb(server, "rad").retrieve_study(first)
        server.cli("sync", "--once", "--stable-after", "0")
        after = scrape(server)
    finally:
        server.stop()

    assert delta(after, before, "pacs_edge_dimse_operations_total",
                 service="C-STORE", status="success") == len(files)
    assert delta(after, before, "pacs_edge_dimse_operations_total",
                 service="C-FIND", status="success") == FINDS
    assert delta(after, before, "pacs_edge_dimse_operations_total",
                 service="C-FIND-MWL", status="failure") == 1
    assert delta(after, before, "pacs_edge_dimse_duration_seconds_count",
                 service="C-STORE") == len(files)
    assert delta(after, before, "pacs_edge_associations_total",
                 outcome="accepted", reason="") == STORE_RUNS + FINDS + 2
    assert delta(after, before, "pacs_edge_associations_total",
                 outcome="rejected", reason="unknown-calling-ae") == REJECTED
    assert after[("pacs_edge_associations_active", ())] == 0
    assert delta(after, before, "pacs_edge_dimse_operations_total",
                 service="C-GET", status="success") == 1
    assert delta(after, before, "pacs_edge_sent_bytes_total", edge="dicom") == sum(
        len(dataset_bytes(i.path)) for i in studies if i.study_uid == first)
    # WADO-RS counts the Part 10 files it sends, as they are stored.
    assert len(retrieved) == sum(i.study_uid == first for i in studies)
    assert delta(after, before, "pacs_edge_sent_bytes_total", edge="dicomweb") == sum(
        p.stat().st_size for p in (home / "store" / first).rglob("*.dcm"))
    # The agent's pass, counted in its own process and file.
    assert delta(after, before, "pacs_edge_replications_total", outcome="ok") == len(
        {i.study_uid for i in studies})
    assert delta(after, before, "pacs_edge_sync_passes_total", outcome="ok") == 1
    assert delta(after, before, "pacs_edge_replicated_bytes_total") > 0
    # State derived from the index agrees.
    assert after[("pacs_edge_studies", (("state", "replicated"),))] == 3
    assert after[("pacs_edge_instances", ())] == len(files)
    assert after[("pacs_edge_replication_waiting_bytes", ())] == 0
    # Every instance received once, as the Part 10 file the box stored.
    assert delta(after, before, "pacs_edge_received_bytes_total", edge="dicom") == after[
        ("pacs_edge_store_bytes", ())]
    assert after[("pacs_edge_ingest_in_progress", ())] == 0


def test_a_restart_of_serve_keeps_every_count_while_the_agent_runs(tmp_path: Path) -> None:
    """Counts of ended processes (serve's workers, `sync --once`) stay in the sum when
    serve restarts. Dropping them made counters fall but not to zero, the running
    agent's counts left: Prometheus reads that as a reset plus that many new events."""
    studies = make_studies(tmp_path / "studies", patients=1, studies_per_patient=1,
                           series_per_study=1, instances_per_series=2)
    home = web_home(tmp_path / "home", dcmtk.free_port())
    server = EdgeServer(home)
    server.configure(dicom={"workers": 2}, sync={"replicate_interval_seconds": 3600})
    server.start()
    agent = SyncAgent(home)
    try:
        dcmtk.storescu(server.port, [i.path for i in studies]).check()
        server.cli("sync", "--once", "--stable-after", "0")  # counts, then ends
        agent.start()  # counts its first pass, and runs on
        deadline = time.monotonic() + DEADLINE
        while scrape(server).get(("pacs_edge_sync_passes_total", (("outcome", "ok"),))) != 2:
            assert time.monotonic() < deadline, agent.log()
            time.sleep(0.2)
        before = scrape(server)
        server.restart()
        after = scrape(server)
    finally:
        agent.stop()
        server.stop()
    for name, labels in [("pacs_edge_sync_passes_total", {"outcome": "ok"}),
                         ("pacs_edge_replications_total", {"outcome": "ok"}),
                         ("pacs_edge_replicated_bytes_total", {}),
                         ("pacs_edge_dimse_operations_total",
                          {"service": "C-STORE", "status": "success"}),
                         ("pacs_edge_dimse_duration_seconds_bucket",
                          {"service": "C-STORE", "le": "0.5"}),
                         ("pacs_edge_dimse_duration_seconds_count", {"service": "C-STORE"})]:
        assert delta(after, before, name, **labels) == 0, (name, labels)
    assert before[("pacs_edge_dimse_operations_total",
                   (("service", "C-STORE"), ("status", "success")))] == len(studies)


def test_a_prefetch_by_hand_counts_its_local_priors(tmp_path: Path) -> None:
    studies = make_studies(tmp_path / "studies", patients=1, studies_per_patient=2,
                           series_per_study=1, instances_per_series=1)
    home = web_home(tmp_path / "home", dcmtk.free_port())
    server = EdgeServer(home)
    server.configure(prefetch={"modalities": ["any"], "body_part": "any", "max_age_years": 0})
    server.start()
    try:
        dcmtk.storescu(server.port, [i.path for i in studies]).check()
        before = scrape(server)
        server.cli("prefetch", "--patient-id", studies[0].patient_id)
        after = scrape(server)
    finally:
        server.stop()
    assert delta(after, before, "pacs_edge_prefetch_priors_total",
                 source="local", outcome="done") == 2



def test_an_hl7_message_answered_ae_is_what_the_orders_refused_alert_counts(
        tmp_path: Path) -> None:
    """PacsEdgeOrdersRefused watches `pacs_edge_hl7_messages_total{ack="AE"}`: an order
    the box understood but could not apply (here a start date without a day) counts
    there, an applied one under AA."""
    home = web_home(tmp_path / "home", dcmtk.free_port())
    server = EdgeServer(home)
    hl7peer.listen(server, hl7_port := dcmtk.free_port())
    server.start()
    try:
        before = scrape(server)
        refused = hl7peer.send(hl7_port, hl7peer.orm("M1", accession="ACC1", start="202401"))
        applied = hl7peer.send(hl7_port, hl7peer.orm("M2", accession="ACC2"))
        after = scrape(server)
    finally:
        server.stop()
    assert (refused.code, applied.code) == ("AE", "AA")
    assert delta(after, before, "pacs_edge_hl7_messages_total", ack="AE") == 1
    assert delta(after, before, "pacs_edge_hl7_messages_total", ack="AA") == 1

def _socket_owners(port: int, state: str) -> dict[int, int]:
    """pid -> its sockets on local `port` in TCP `state` ("01" established, "0A"
    listening), from /proc."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == state:
            inodes.add(f"socket:[{fields[9]}]")
    owners: dict[int, int] = {}
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        with contextlib.suppress(OSError):
            held = sum(os.readlink(fd) in inodes for fd in fd_dir.iterdir())
            if held:
                owners[int(fd_dir.parent.name)] = held
    return owners


def test_a_killed_worker_takes_its_open_associations_out_of_the_gauge(tmp_path: Path) -> None:
    home = web_home(tmp_path / "home", dcmtk.free_port())
    server = EdgeServer(home)
    server.configure(dicom={"workers": 2})
    server.start()
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(Verification)
    held = []
    try:
        [web_worker] = _socket_owners(server.http_port, "0A")
        victim = 0
        while not victim:
            assert len(held) < MAX_HELD, "every association went to the same worker"
            assoc = ae.associate(server.host, server.port, ae_title=server.ae_title)
            assert assoc.is_established
            held.append(assoc)
            victim = next((pid for pid in _socket_owners(server.port, "01")
                           if pid != web_worker), 0)
        assert scrape(server)[("pacs_edge_associations_active", ())] == len(held)
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + DEADLINE
        while "worker exited unexpectedly" not in server.log():
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.1)
        for assoc in held:
            assoc.abort()
        while scrape(server)[("pacs_edge_associations_active", ())] != 0:
            assert time.monotonic() < deadline, "the dead worker's associations still count"
            time.sleep(0.2)
    finally:
        for assoc in held:
            assoc.abort()
        server.stop()


def test_serve_starts_when_a_power_cut_left_a_metric_file_empty(tmp_path: Path) -> None:
    """The metric files are written through memory maps and never fsynced: after a power
    cut one of an ended process may be there empty (its folder's entry reached the disk,
    its pages did not; tests/test_power_loss.py found it). serve failed to start on it
    (struct.error folding it). It starts, drops that file and keeps the readable counts."""
    from prometheus_client import mmap_dict, multiprocess

    home = init_home(tmp_path / "home")
    folder = home / "run" / "metrics"
    folder.mkdir(parents=True, mode=0o700)
    dead = 999_999_999  # above any pid_max: never a live process
    (folder / f"counter_{dead}.db").write_bytes(b"")
    (folder / f"histogram_{dead}.db").write_bytes(b"\x40\x00\x00\x00\x00\x00\x00\x00junk")
    readable = mmap_dict.MmapedDict(str(folder / f"counter_{dead - 1}.db"))
    readable.write_value(mmap_dict.mmap_key("c", "c_total", [], [], "c"), 3.0, 0.0)
    readable.close()
    server = EdgeServer(home)
    with serving(server):
        pass
    assert "metric files unreadable after a crash" in server.log()
    kept = multiprocess.MultiProcessCollector.merge([str(folder / "counter_gone.db")])
    assert [(s.name, s.value) for m in kept for s in m.samples] == [("c_total", 3.0)]
    assert not list(folder.glob(f"*_{dead}.db"))


def _dimse_listeners(server: EdgeServer) -> set[int]:
    return set(_socket_owners(server.port, "0A"))


def test_restarted_workers_leave_their_counts_and_no_files_behind(tmp_path: Path) -> None:
    """A worker that dies while serve runs keeps its counts in the sum, and its files go
    into counter_gone.db and histogram_gone.db: they stayed until serve restarted, so a
    worker dying over and over filled the data home's disk with files and every scrape
    read them all."""
    studies = make_studies(tmp_path / "studies", patients=1, studies_per_patient=1,
                           series_per_study=1, instances_per_series=2)
    home = web_home(tmp_path / "home", dcmtk.free_port())
    folder = home / "run" / "metrics"
    server = EdgeServer(home)
    server.configure(dicom={"workers": 2})
    server.start()
    try:
        for _ in range(4):  # the kernel spreads them over the workers
            dcmtk.storescu(server.port, [i.path for i in studies]).check()
        before = scrape(server)
        [web_worker] = _socket_owners(server.http_port, "0A")
        for _ in range(3):
            [victim] = _dimse_listeners(server) - {web_worker}
            os.kill(victim, signal.SIGKILL)
            deadline = time.monotonic() + DEADLINE
            while (list(folder.glob(f"*_{victim}.db"))
                   or len(_dimse_listeners(server) - {web_worker, victim}) != 1):
                assert time.monotonic() < deadline, sorted(p.name for p in folder.iterdir())
                time.sleep(0.2)
        after = scrape(server)
        alive = {server.pid, *_dimse_listeners(server)}
        left = {p.name for p in folder.glob("*.db") if not p.name.endswith("_gone.db")}
    finally:
        server.stop()
    assert {int(name.rsplit("_", 1)[1].removesuffix(".db")) for name in left} <= alive, left
    for name, labels in [("pacs_edge_dimse_operations_total",
                          {"service": "C-STORE", "status": "success"}),
                         ("pacs_edge_associations_total", {"outcome": "accepted", "reason": ""}),
                         ("pacs_edge_received_bytes_total", {"edge": "dicom"}),
                         ("pacs_edge_dimse_duration_seconds_count", {"service": "C-STORE"}),
                         ("pacs_edge_dimse_duration_seconds_bucket",
                          {"service": "C-STORE", "le": "+Inf"})]:
        assert delta(after, before, name, **labels) == 0, (name, labels)
    assert before[("pacs_edge_dimse_operations_total",
                   (("service", "C-STORE"), ("status", "success")))] == 4 * len(studies)


def test_each_command_that_counts_folds_the_files_of_ended_processes(tmp_path: Path) -> None:
    """Only serve's start folded the files of ended processes: a sync agent that systemd
    restarted every 5 s (one that failed at start, its site key missing) or `sync --once`
    run again and again left three files each time, which took the data home's disk and
    every scrape read. Each start folds them now, and the counts add up."""
    from prometheus_client import CollectorRegistry, multiprocess

    home = init_home(tmp_path / "home")
    folder = home / "run" / "metrics"
    runs = 3
    for _ in range(runs):
        run_pacs_edge("sync", "--once", "--home", str(home))
    left = {p.name.rsplit("_", 1)[1] for p in folder.glob("*.db")} - {"gone.db"}
    assert len(left) == 1, sorted(p.name for p in folder.iterdir())
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(folder))
    assert registry.get_sample_value("pacs_edge_sync_passes_total", {"outcome": "ok"}) == runs
