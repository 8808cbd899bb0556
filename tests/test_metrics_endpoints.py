"""/metrics, /healthz, /readyz and the admin's /status page, against a real `serve`.

Clients are curl (the HTTPS port, verifying the site CA) and plain urllib (the metrics
listener of a box whose web server is off); the text /metrics returns is parsed with
prometheus-client's own parser and checked by `promtool check metrics`.
"""

from __future__ import annotations

import json
import re
import socket
import sqlite3
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import dcmtk
import pytest
from conftest import EdgeServer, init_home
from cryptography import x509
from dicomgen import dataset_bytes, make_studies, read_header
from prometheus_client.parser import text_string_to_metric_families
from pydicom import dcmread
from syncagent import evict, sync_once
from webpeer import add_user, curl, metrics_listener_box, web_home

from appliance.base.human import human_size


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition by (name, sorted labels)."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def phi_or_uids(text: str, files: list[Path]) -> set[str]:
    """The patient names, IDs and UIDs of `files` that appear in `text`."""
    found = set()
    for path in files:
        ds = read_header(path)
        for value in (str(ds.PatientName), str(ds.PatientName).split("^")[0], ds.PatientID,
                      ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID):
            if value in text:
                found.add(value)
    return found


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("studies")
    return [i.path for i in make_studies(folder, patients=2, studies_per_patient=1,
                                         series_per_study=1, instances_per_series=2)]


@pytest.fixture(scope="module")
def web_box(tmp_path_factory: pytest.TempPathFactory, stored: list[Path]
            ) -> Iterator[EdgeServer]:
    home = web_home(tmp_path_factory.mktemp("web") / "home", dcmtk.free_port())
    server = EdgeServer(home).start()
    try:
        dcmtk.storescu(server.port, stored).check()
        add_user(server, "boss", "admin")
        add_user(server, "rad", "radiologist")
        yield server
    finally:
        server.stop()


def test_probes_answer_without_a_login(web_box: EdgeServer) -> None:
    assert curl(web_box, "/healthz").body == b"ok\n"
    ready = curl(web_box, "/readyz")
    assert (ready.status, ready.body) == (200, b"ready\n")
    assert ready.headers["cache-control"] == "no-store"


def test_metrics_show_the_stored_studies_and_no_uid(web_box: EdgeServer,
                                                    stored: list[Path]) -> None:
    answer = curl(web_box, "/metrics")
    assert answer.status == 200
    assert answer.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = answer.body.decode()
    values = samples(text)
    assert values[("pacs_edge_studies", (("state", "local"),))] == 2
    assert values[("pacs_edge_instances", ())] == 4
    # Whole Part 10 files as stored: the sent datasets plus the box's own File Meta.
    assert values[("pacs_edge_store_bytes", ())] > sum(len(dataset_bytes(p)) for p in stored)
    assert values[("pacs_edge_disk_free_bytes", ())] > 0
    assert values[("pacs_edge_certificate_expiry_timestamp_seconds", (("cert", "node"),))] > 0
    assert not phi_or_uids(text, stored)


def test_metrics_text_passes_promtool(web_box: EdgeServer, tmp_path: Path) -> None:
    exposition = tmp_path / "metrics.txt"
    exposition.write_bytes(curl(web_box, "/metrics").body)
    with exposition.open("rb") as text:
        check = subprocess.run(["promtool", "check", "metrics"], stdin=text,
                               capture_output=True, text=True, timeout=60, check=False)
    assert check.returncode == 0, check.stdout + check.stderr


def test_the_status_page_is_for_admins(web_box: EdgeServer, stored: list[Path]) -> None:
    page = curl(web_box, "/status", user="boss")
    assert page.status == 200
    text = page.body.decode()
    assert "Last 50 studies received" in text and text.count("<td>local</td>") == 2
    assert "the site key was never escrowed" in text  # the same warnings as `status`
    assert not phi_or_uids(text, stored)
    assert curl(web_box, "/status", user="rad").status == 403
    assert curl(web_box, "/status").status == 303  # anonymous: to the login page


def test_metrics_are_refused_to_addresses_not_allowed(tmp_path: Path) -> None:
    home = web_home(tmp_path / "home", dcmtk.free_port())
    server = EdgeServer(home)
    server.configure(metrics={"allow": ["10.0.0.0/8"]})
    server.start()
    try:
        assert curl(server, "/metrics").status == 403
        assert curl(server, "/healthz").status == 200
    finally:
        server.stop()


def test_readyz_says_why_the_box_cannot_take_studies(tmp_path: Path) -> None:
    home = web_home(tmp_path / "home", dcmtk.free_port())
    server = EdgeServer(home)
    server.configure(store={"reserve_mb": 1 << 30})  # more than any disk here has free
    server.start()
    try:
        ready = curl(server, "/readyz")
        assert ready.status == 503
        assert ready.body.decode().startswith("disk: ")
    finally:
        server.stop()


def test_metrics_show_an_index_that_takes_no_write_as_a_failed_readiness_check(
        tmp_path: Path) -> None:
    """Another process holding the index's write lock (a `sqlite3` shell left in a
    transaction): /readyz says index, and so does /metrics, which Prometheus scrapes."""
    index_check = ("pacs_edge_ready_check", (("check", "index"),))
    with metrics_listener_box(tmp_path) as base:
        def scrape() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
            with urllib.request.urlopen(f"{base}/metrics", timeout=30) as answer:
                return samples(answer.read().decode())

        assert scrape()[index_check] == 1
        holder = sqlite3.connect(tmp_path / "home" / "index.sqlite3", isolation_level=None)
        try:
            holder.execute("BEGIN EXCLUSIVE")
            assert scrape()[index_check] == 0
        finally:
            holder.close()
        assert scrape()[index_check] == 1


def test_a_box_without_web_server_serves_metrics_on_its_own_port(tmp_path: Path) -> None:
    with metrics_listener_box(tmp_path) as base:
        with urllib.request.urlopen(f"{base}/healthz", timeout=30) as answer:
            assert answer.read() == b"ok\n"
        with urllib.request.urlopen(f"{base}/readyz", timeout=30) as answer:
            assert answer.read() == b"ready\n"
        with urllib.request.urlopen(f"{base}/metrics", timeout=30) as answer:
            assert ("pacs_edge_studies", (("state", "local"),)) in samples(answer.read().decode())
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(f"{base}/status", timeout=30)
        missing.value.close()
        assert missing.value.code == 404  # the status page needs the web login


def test_status_warns_of_a_certificate_about_to_expire(edge_home: Path) -> None:
    edge = EdgeServer(edge_home)
    edge.cli("certs", "renew", "--days", "10")
    status = edge.cli("status")
    assert "warning: the node certificate expires in 10 days" in status.stderr
    assert "certs renew" in status.stderr
    report = edge.cli("status", "--json")
    assert '"code": "certificate_expiring"' in report.stdout


def test_a_renewal_while_serve_runs_keeps_the_presented_expiry_and_asks_for_a_restart(
        tmp_path: Path) -> None:
    """serve loads tls/node.pem at its start only. After `certs renew` while it runs,
    `status` and /metrics keep the expiry of the certificate serve still presents (its
    HTTPS port shows it), with the certificate_restart_pending warning: the expiry warning
    and alert must not clear while peers see the old one. A restart presents the new
    certificate, and then the report shows it and warns no more."""
    home = web_home(tmp_path / "home", dcmtk.free_port())
    server = EdgeServer(home)
    server.configure(dicom={"tls_port": dcmtk.free_port()})
    server.start()
    node = home / "tls" / "node.pem"
    old = x509.load_pem_x509_certificate(node.read_bytes())
    node_expiry = ("pacs_edge_certificate_expiry_timestamp_seconds", (("cert", "node"),))
    pending = ("pacs_edge_health_warning", (("code", "certificate_restart_pending"),))
    try:
        server.cli("certs", "renew", "--days", "400")
        renewed = (served_certificate(server), json.loads(server.cli("status", "--json").stdout),
                   samples(curl(server, "/metrics").body.decode()))
        server.restart()
        restarted = (served_certificate(server),
                     json.loads(server.cli("status", "--json").stdout),
                     samples(curl(server, "/metrics").body.decode()))
    finally:
        server.stop()
    new = x509.load_pem_x509_certificate(node.read_bytes())
    presented, report, metrics = renewed
    assert presented == old
    assert report["certificates"]["node"] == old.not_valid_after_utc.timestamp()
    assert metrics[node_expiry] == old.not_valid_after_utc.timestamp()
    assert metrics[pending] == 1
    [warning] = [w["message"] for w in report["warnings"]
                 if w["code"] == "certificate_restart_pending"]
    assert "expires in 365 days: reload pacs-edge" in warning
    presented, report, metrics = restarted
    assert presented == new
    assert report["certificates"]["node"] == new.not_valid_after_utc.timestamp()
    assert metrics[node_expiry] == new.not_valid_after_utc.timestamp()
    assert pending not in metrics
    assert "certificate_restart_pending" not in {w["code"] for w in report["warnings"]}


def served_certificate(server: EdgeServer) -> x509.Certificate:
    """The certificate the box presents on its HTTPS port, as a TLS client receives it."""
    pem = ssl.get_server_certificate((server.host, server.http_port), timeout=30)
    return x509.load_pem_x509_certificate(pem.encode())


def test_a_tls_peers_certificate_expiry_is_exported_after_it_calls_and_after_a_restart(
        tmp_path: Path) -> None:
    """The expiry of the certificate a peer presented is kept in the index: a restart of
    serve keeps it in /metrics without a new call (a peer whose certificate has expired
    cannot call: kept in memory, its alert went at the restart); a peer taken off the
    allowlist drops out."""
    home = web_home(tmp_path / "home", dcmtk.free_port())
    server = EdgeServer(home)
    server.configure(dicom={"tls_port": dcmtk.free_port()})
    server.start()
    presented = ("pacs_edge_peer_certificate_expiry_timestamp_seconds", (("peer", "testscu"),))
    try:
        client = tmp_path / "testscu"
        server.cli("certs", "issue", "testscu", "--out", str(client), "--days", "20")
        tls_port = int(re.search(r"tls_port=(\d+)", server.log()).group(1))  # type: ignore[union-attr]
        dcmtk.echoscu(tls_port, args=["+tls", str(client / "testscu.key"),
                                      str(client / "testscu.pem"), "+cf", str(client / "ca.pem"),
                                      "--profile-bcp195-nd"]).check()
        called = scrape_until(server, presented)
        server.stop()
        server.start()
        restarted = samples(curl(server, "/metrics").body.decode())
        server.cli("peers", "remove", "testscu")
        removed = samples(curl(server, "/metrics").body.decode())
    finally:
        server.stop()
    expiry = x509.load_pem_x509_certificate((client / "testscu.pem").read_bytes())
    not_after = expiry.not_valid_after_utc.timestamp()
    assert called[presented] == not_after
    assert restarted[presented] == not_after
    assert presented not in removed
    # The box's own copy of what it issued: known before the peer ever calls.
    assert called[("pacs_edge_issued_certificate_expiry_timestamp_seconds",
                   (("peer", "testscu"),))] == not_after


def scrape_until(server: EdgeServer, key: tuple[str, tuple[tuple[str, str], ...]], *,
                 timeout: float = 30.0) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """/metrics once it holds `key` (a write the association did not wait for)."""
    deadline = time.monotonic() + timeout
    while True:
        values = samples(curl(server, "/metrics").body.decode())
        if key in values or time.monotonic() > deadline:
            return values
        time.sleep(0.1)


def test_the_metrics_listener_drops_slow_heads_caps_connections_and_keeps_the_scrapers_in(
        tmp_path: Path) -> None:
    """A hostile client of the plain listener: a request head that never ends is closed
    at [http] head_timeout; one address holds at most 2 connections, and beyond 8 the
    next one gets 503 at once; but a `[metrics] allow` scraper still gets in (without
    it, idle connections from anywhere made Prometheus see the box as down)."""
    port = dcmtk.free_port()
    server = EdgeServer(init_home(tmp_path / "home"))
    server.configure(metrics={"port": port, "allow": ["127.0.0.1/32"]},
                     http={"head_timeout": 1.0})
    server.start()
    held: list[socket.socket] = []

    def connect(source: str) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", port), timeout=30,
                                        source_address=(source, 0))
        held.append(sock)
        return sock

    def kept_alive(source: str) -> None:
        sock = connect(source)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(1024).startswith(b"HTTP/1.1 200")  # kept alive, still open

    try:
        slow = connect("127.0.0.2")
        slow.sendall(b"GET /metr")
        assert slow.recv(1024) == b""  # closed by the box, not by our 30 s timeout
        for n in range(2, 6):
            kept_alive(f"127.0.0.{n}")
            kept_alive(f"127.0.0.{n}")
        assert connect("127.0.0.6").recv(1024).startswith(b"HTTP/1.1 503")  # 8 held
        kept_alive("127.0.0.1")  # the scraper's kept slots
        scrape = connect("127.0.0.1")
        scrape.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert scrape.recv(1024).startswith(b"HTTP/1.1 200")
    finally:
        for sock in held:
            sock.close()
        server.stop()


def test_one_address_holds_two_connections_of_the_metrics_listener(tmp_path: Path) -> None:
    port = dcmtk.free_port()
    with metrics_listener_box(tmp_path, port=port):
        held = [socket.create_connection(("127.0.0.1", port), timeout=30,
                                         source_address=("127.0.0.7", 0)) for _ in range(3)]
        try:
            held[0].sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert held[0].recv(1024).startswith(b"HTTP/1.1 200")
            assert held[2].recv(1024).startswith(b"HTTP/1.1 503")
        finally:
            for sock in held:
                sock.close()


def test_a_proxied_request_for_metrics_is_refused(web_box: EdgeServer) -> None:
    """Through a reverse proxy on the box every client comes from loopback, which the
    default [metrics] allow admits; a request a proxy forwarded says so in a header."""
    assert curl(web_box, "/metrics").status == 200
    for header in ({"X-Forwarded-For": "10.1.2.3"}, {"Forwarded": "for=10.1.2.3"}):
        assert curl(web_box, "/metrics", headers=header).status == 403
    assert curl(web_box, "/healthz", headers={"X-Forwarded-For": "10.1.2.3"}).status == 200


def on_disk(server: EdgeServer) -> str:
    page = curl(server, "/status", user="boss").body.decode()
    found = re.search(r"<tr><th>on disk</th><td>([^<]*)</td></tr>", page)
    assert found, page
    status = json.loads(server.cli("status", "--json").stdout)
    assert human_size(status["bytes_on_disk"]) == found[1]
    return found[1]


def test_the_status_page_counts_on_disk_the_files_that_are_there(tmp_path: Path) -> None:
    """The page said "on disk" for every indexed instance's bytes, evicted ones too, and
    `status` left out the files of prior versions kept on disk."""
    (first,) = make_studies(tmp_path / "sent", seed=351, patients=1, series_per_study=1,
                            instances_per_series=1)
    ds = dcmread(first.path)
    ds.ImageComments = "corrected"
    corrected = tmp_path / "corrected.dcm"
    ds.save_as(corrected, enforce_file_format=True)
    server = EdgeServer(web_home(tmp_path / "home", dcmtk.free_port()))
    server.start()
    try:
        add_user(server, "boss", "admin")
        dcmtk.storescu(server.port, [first.path, corrected]).check()
        files = list((server.home / "store").rglob("*.dcm"))
        assert len(files) == 2  # the prior version's and the current one's
        assert on_disk(server) == human_size(sum(p.stat().st_size for p in files))
        sync_once(server.home)
        evict(server.home, first.study_uid)
        (kept,) = (server.home / "store").rglob("*.dcm")  # the prior version's file stays
        assert on_disk(server) == human_size(kept.stat().st_size)
    finally:
        server.stop()

