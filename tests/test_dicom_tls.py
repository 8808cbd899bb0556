"""DICOM TLS with real dcmtk peers: the BCP 195 profile works, everything else is refused.

The edge listens with TLS on its own port; clients get their key and
certificate from `pacs-edge certs issue`. A silent TLS client (connects, never
sends a ClientHello) must not block anyone else's handshake.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import select
import shutil
import socket
import ssl
import subprocess
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import dcmtk
import dicomgen
import pytest
import rawpdu
from conftest import EdgeServer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

TLS_PROFILE = "--profile-bcp195-nd"


@pytest.fixture
def tls_edge(edge_server_factory: Callable[..., EdgeServer], free_port: Callable[[], int],
             tmp_path: Path) -> tuple[EdgeServer, int, Path]:
    server = edge_server_factory(start=False)
    tls_port = free_port()
    server.configure(dicom={"tls_port": tls_port})
    server.start()
    # The certificate of the peer "testscu" (the default peer, AE title TESTSCU).
    server.cli("certs", "issue", "testscu", "--out", str(tmp_path / "testscu"))
    return server, tls_port, tmp_path / "testscu"


def tls_args(client: Path, *, ca: Path | None = None, cert: bool = True) -> list[str]:
    """dcmtk's TLS options with the key and certificate in `client` (named after the folder)."""
    name = client.name
    args = ["+tls", str(client / f"{name}.key"), str(client / f"{name}.pem")] if cert \
        else ["+tla"]
    return [*args, "+cf", str(ca or client / "ca.pem"), TLS_PROFILE]


def client_context(client: Path) -> ssl.SSLContext:
    """A raw TLS client of `testscu`'s certificate (from `certs issue` into `client`)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(client / "ca.pem")
    context.load_cert_chain(client / "testscu.pem", client / "testscu.key")
    return context


def other_ca(folder: Path) -> tuple[Path, Path, Path]:
    """A CA the edge does not trust, with a client certificate of its own."""
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    def make(name: str, issuer_key: ec.EllipticCurvePrivateKey | None,
             issuer: x509.Name | None, ca: bool) -> tuple[ec.EllipticCurvePrivateKey,
                                                          x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        cert = (x509.CertificateBuilder().subject_name(subject)
                .issuer_name(issuer or subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
                .sign(issuer_key or key, hashes.SHA256()))
        return key, cert

    ca_key, ca_cert = make("rogue CA", None, None, True)
    key, cert = make("ws1", ca_key, ca_cert.subject, False)
    paths = folder / "ws1.key", folder / "ws1.pem", folder / "ca.pem"
    paths[0].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    paths[0].chmod(0o600)
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    return paths


def test_bcp195_echo_store_find_succeed(
    tls_edge: tuple[EdgeServer, int, Path], small_study: list[dicomgen.GeneratedInstance]
) -> None:
    _server, port, client = tls_edge
    dcmtk.echoscu(port, args=tls_args(client)).check()
    stored = dcmtk.storescu(port, [i.path for i in small_study],
                            args=["-v", *tls_args(client)]).check()
    assert stored.store_responses() == ["Success"] * len(small_study)
    found = dcmtk.findscu(port, {"StudyInstanceUID": small_study[0].study_uid},
                          args=tls_args(client)).check()
    assert found.values("StudyInstanceUID") == [small_study[0].study_uid]


def test_client_without_certificate_is_refused(tls_edge: tuple[EdgeServer, int, Path]) -> None:
    server, port, client = tls_edge
    assert not dcmtk.echoscu(port, args=tls_args(client, cert=False)).ok
    server.wait_for_log("TLS handshake failed")
    assert server.echo().ok
    # A Security Alert (Node Authentication), written before the refusal returns.
    alerts = [r["EventIdentification"] for r in (
        json.loads(line)["record"] for line in
        (server.home / "audit" / "audit.log").read_text().splitlines())
        if {c["csd-code"] for c in r["EventIdentification"].get("EventTypeCode", ())}
        == {"110126"}]
    assert [(a["EventID"]["csd-code"], a["EventOutcomeIndicator"]) for a in alerts] == [
        ("110113", 4)]


def test_certificate_from_another_ca_is_refused(
    tls_edge: tuple[EdgeServer, int, Path], tmp_path: Path
) -> None:
    server, port, client = tls_edge
    key, cert, _ = other_ca(tmp_path / "rogue")
    args = ["+tls", str(key), str(cert), "+cf", str(client / "ca.pem"), TLS_PROFILE]
    assert not dcmtk.echoscu(port, args=args).ok
    server.wait_for_log("TLS handshake failed")


def test_client_trusting_another_ca_refuses_the_server(
    tls_edge: tuple[EdgeServer, int, Path], tmp_path: Path
) -> None:
    _server, port, client = tls_edge
    _, _, rogue_ca = other_ca(tmp_path / "rogue")
    assert not dcmtk.echoscu(port, args=tls_args(client, ca=rogue_ca)).ok


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1])
def test_old_tls_versions_are_refused(
    tls_edge: tuple[EdgeServer, int, Path], version: ssl.TLSVersion
) -> None:
    server, port, client = tls_edge
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():  # Python deprecates these versions, as we do
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = version
        context.maximum_version = version
    context.load_cert_chain(client / "testscu.pem", client / "testscu.key")
    with (socket.create_connection((server.host, port), timeout=10) as raw,
          pytest.raises((ssl.SSLError, ConnectionResetError))):
        context.wrap_socket(raw).do_handshake()
    assert dcmtk.echoscu(port, args=tls_args(client)).ok


def test_silent_tls_client_does_not_block_other_handshakes(
    tls_edge: tuple[EdgeServer, int, Path]
) -> None:
    server, port, client = tls_edge
    # Silent clients are dropped after tls_handshake_timeout: make that far longer than an
    # echo can take on a loaded machine, so "still connected" below tells the two apart.
    server.stop()
    server.configure(dicom={"tls_port": port, "tls_handshake_timeout": 300})
    server.start()
    silent = [socket.create_connection((server.host, port), timeout=10) for _ in range(5)]
    try:
        dcmtk.echoscu(port, args=tls_args(client)).check()
        # Answered while the silent clients are still connected: the echo did not wait
        # behind their handshakes.
        assert all(rawpdu.still_open(sock) for sock in silent)
    finally:
        for sock in silent:
            sock.close()


@contextlib.contextmanager
def tls_storescp(cert: Path, received: Path,
                 free_port: Callable[[], int]) -> Iterator[int]:
    """dcmtk's storescp as a TLS C-MOVE destination (AE TLSDEST) with the key and
    certificate in `cert` (from `certs issue`), on 127.0.0.1; yields its port. A port
    another process took between `free_port` and storescp's bind makes storescp exit at
    once: it is tried again on another port (three times at most)."""
    received.mkdir()
    log = received.parent / "tls-storescp.log"
    for _attempt in range(3):
        port = free_port()
        with log.open("wb") as out:
            scp = subprocess.Popen([dcmtk.dcmtk_tool("storescp"), *tls_args(cert), "-aet",
                                    "TLSDEST", "+B", "-od", str(received), str(port)],
                                   stdout=out, stderr=subprocess.STDOUT,
                                   env={**os.environ, "TCP_NODELAY": "1"})
        try:
            # Ready when it accepts a connection (a TLS echo would need a server certificate).
            deadline = time.monotonic() + 30
            while scp.poll() is None:
                with contextlib.suppress(OSError), \
                        socket.create_connection(("127.0.0.1", port), 1):
                    break
                assert time.monotonic() < deadline, "TLS storescp not ready:\n" + \
                    log.read_text(errors="replace")
                time.sleep(0.2)
            else:
                continue  # it exited before listening: another port
            yield port
            return
        finally:
            scp.terminate()
            scp.wait(10)
    raise AssertionError("TLS storescp did not start:\n" + log.read_text(errors="replace"))


def test_move_to_a_peer_marked_tls_goes_over_tls(
    tls_edge: tuple[EdgeServer, int, Path], small_study: list[dicomgen.GeneratedInstance],
    free_port: Callable[[], int], tmp_path: Path,
) -> None:
    server = tls_edge[0]
    dcmtk.storescu(server.port, [i.path for i in small_study]).check()
    received = _moved_over_tls(server, small_study[0].study_uid, tmp_path, free_port)
    assert {dicomgen.dataset_bytes(p) for p in received.iterdir()} == {
        dicomgen.dataset_bytes(i.path) for i in small_study}


def test_a_large_instance_moves_over_tls_byte_exact(
    tls_edge: tuple[EdgeServer, int, Path], free_port: Callable[[], int], tmp_path: Path,
) -> None:
    """A data set above store_lane.READ_WHOLE is sent from its file in chunks, each
    written to the TLS socket in pieces."""
    server = tls_edge[0]
    (large,) = dicomgen.make_studies(tmp_path / "large", seed=97, series_per_study=1,
                                     instances_per_series=1, modalities=("CT",),
                                     size=3072)  # 18 MiB
    dcmtk.storescu(server.port, [large.path]).check()
    (moved,) = _moved_over_tls(server, large.study_uid, tmp_path, free_port).iterdir()
    assert dicomgen.dataset_sha256(moved) == dicomgen.dataset_sha256(large.path)


def _moved_over_tls(server: EdgeServer, study_uid: str, tmp_path: Path,
                    free_port: Callable[[], int]) -> Path:
    """The folder a TLS storescp, added as a peer marked TLS, received the study in by
    a movescu to it."""
    received = tmp_path / "received"
    server.cli("certs", "issue", "tlsdest", "--server", "--san", "127.0.0.1",
               "--out", str(tmp_path / "tlsdest"))
    with tls_storescp(tmp_path / "tlsdest", received, free_port) as port:
        server.cli("peers", "add", "tlsdest", "--ae-title", "TLSDEST", "--host", "127.0.0.1",
                   "--port", str(port), "--allow", "store", "--tls")
        dcmtk.movescu(server.port, {"StudyInstanceUID": study_uid}, "TLSDEST").check()
    return received


def test_move_refuses_a_destination_whose_certificate_is_not_for_servers(
    tls_edge: tuple[EdgeServer, int, Path], small_study: list[dicomgen.GeneratedInstance],
    free_port: Callable[[], int], tmp_path: Path,
) -> None:
    """A client certificate (clientAuth only) does not authenticate a TLS server:
    the box's handshake to such a destination fails, and nothing is sent."""
    server = tls_edge[0]
    dcmtk.storescu(server.port, [i.path for i in small_study]).check()
    received = tmp_path / "received"
    server.cli("certs", "issue", "tlsdest", "--out", str(tmp_path / "tlsdest"))
    with tls_storescp(tmp_path / "tlsdest", received, free_port) as port:
        server.cli("peers", "add", "tlsdest", "--ae-title", "TLSDEST", "--host", "127.0.0.1",
                   "--port", str(port), "--allow", "store", "--tls")
        moved = dcmtk.movescu(server.port, {"StudyInstanceUID": small_study[0].study_uid},
                              "TLSDEST", args=("-d",))
    assert moved.dimse_statuses() and moved.dimse_statuses()[-1] != 0x0000
    assert list(received.iterdir()) == []


# --- identity: a certificate names its peer ---------------------------------------------


def test_certificate_of_one_peer_cannot_call_as_another(
    tls_edge: tuple[EdgeServer, int, Path], small_study: list[dicomgen.GeneratedInstance],
    tmp_path: Path,
) -> None:
    server, port, testscu = tls_edge
    dcmtk.storescu(port, [i.path for i in small_study], args=tls_args(testscu)).check()
    server.add_peer("ct1", "CT1", 104, allow="store")
    server.cli("certs", "issue", "ct1", "--out", str(tmp_path / "ct1"))
    ct1 = tmp_path / "ct1"
    # ct1's certificate calling as TESTSCU (which may find and retrieve): refused.
    assert not dcmtk.echoscu(port, aet=dcmtk.TEST_AE, args=tls_args(ct1)).ok
    assert not dcmtk.findscu(port, {"StudyInstanceUID": small_study[0].study_uid},
                             aet=dcmtk.TEST_AE, args=tls_args(ct1)).ok
    server.wait_for_log("association rejected calling=TESTSCU address=127.0.0.1 reason=TLS"
                        " certificate of 'ct1' may not call as peer 'testscu'")
    # The box's own node certificate (CN = its host name) is no peer's either.
    node = tmp_path / "node"
    node.mkdir()
    shutil.copy(server.home / "tls/node.pem", node / "node.pem")
    shutil.copy(server.home / "secrets/node.key", node / "node.key")
    shutil.copy(server.home / "tls/ca.pem", node / "ca.pem")
    assert not dcmtk.echoscu(port, aet=dcmtk.TEST_AE, args=tls_args(node)).ok
    # Each certificate still works for its own peer, and what was stored is there.
    dcmtk.echoscu(port, aet="CT1", args=tls_args(ct1)).check()
    found = dcmtk.findscu(port, {"StudyInstanceUID": small_study[0].study_uid},
                          args=tls_args(testscu)).check()
    assert found.values("StudyInstanceUID") == [small_study[0].study_uid]


def test_tls_only_peer_is_refused_on_the_plain_port(
    tls_edge: tuple[EdgeServer, int, Path], tmp_path: Path,
) -> None:
    server, port, _ = tls_edge
    server.cli("peers", "add", "ws2", "--ae-title", "WS2", "--host", "127.0.0.1", "--port",
               "104", "--allow", "find", "--tls-only")
    server.cli("certs", "issue", "ws2", "--out", str(tmp_path / "ws2"))
    refused = dcmtk.echoscu(server.port, aet="WS2")
    # An A-ASSOCIATE-RJ reaches the peer (it saw the connection close without one).
    assert "Reason: Calling AE Title Not Recognized" in refused.output, refused.output
    server.wait_for_log("association rejected calling=WS2 address=127.0.0.1 reason=peer is"
                        " TLS-only and called on the plain port")
    dcmtk.echoscu(port, aet="WS2", args=tls_args(tmp_path / "ws2")).check()
    assert server.echo().ok  # a peer that is not TLS-only keeps the plain port


def test_with_mutual_tls_off_a_tls_only_peer_gets_in_with_its_certificate_alone(
    edge_server_factory: Callable[..., EdgeServer], free_port: Callable[[], int],
    tmp_path: Path,
) -> None:
    """With `tls_require_client_cert = false` the server asked for no certificate at all
    (CERT_NONE): a --tls-only peer, admitted only with a certificate naming it, could
    never get in, however it was set up. The certificate is asked for, not required."""
    server = edge_server_factory(start=False)
    tls_port = free_port()
    server.configure(dicom={"tls_port": tls_port, "tls_require_client_cert": False})
    server.start()
    server.cli("peers", "add", "ws2", "--ae-title", "WS2", "--host", "127.0.0.1", "--port",
               "104", "--allow", "find", "--tls-only")
    server.cli("certs", "issue", "ws2", "--out", str(tmp_path / "ws2"))
    dcmtk.echoscu(tls_port, aet="WS2", args=tls_args(tmp_path / "ws2")).check()
    refused = dcmtk.echoscu(tls_port, aet="WS2", args=tls_args(tmp_path / "ws2", cert=False))
    assert not refused.ok
    server.wait_for_log("reason=peer is TLS-only and presented no client certificate")
    dcmtk.echoscu(tls_port, args=tls_args(tmp_path / "ws2", cert=False)).check()  # TESTSCU


def test_a_trickled_pdu_over_tls_is_aborted_within_network_timeout(
    edge_server_factory: Callable[..., EdgeServer], free_port: Callable[[], int],
    tmp_path: Path, small_study: list[dicomgen.GeneratedInstance],
) -> None:
    # The TLS port's sockets get the same per-PDU deadline as the plain port's.
    server = edge_server_factory(start=False)
    tls_port = free_port()
    server.configure(dicom={"tls_port": tls_port, "network_timeout": 2.0, "acse_timeout": 2.0})
    server.start()
    # The certificate names the peer the client calls as (TESTSCU is the peer `testscu`).
    server.cli("certs", "issue", "testscu", "--out", str(tmp_path / "testscu"))
    client = tmp_path / "testscu"
    dcmtk.storescu(tls_port, [small_study[0].path], args=tls_args(client)).check()
    context = client_context(client)
    with context.wrap_socket(rawpdu.connect(tls_port)) as sock:
        sock.sendall(rawpdu.associate_rq(dcmtk.TEST_AE, server.ae_title))
        assert rawpdu.read_pdu(sock)[0] == rawpdu.A_ASSOCIATE_AC
        sock.sendall(rawpdu.pdu_header(rawpdu.P_DATA, 1000))
        # Trickle a byte every 0.2 s (never silent for network_timeout) until the
        # server answers: the A-ABORT, then the close.
        deadline = time.monotonic() + 30.0
        while not select.select([sock], [], [], 0.2)[0] and not sock.pending():
            assert time.monotonic() < deadline, "trickling TLS association left open"
            sock.sendall(b"\0")
        assert rawpdu.read_pdu(sock)[0] == rawpdu.A_ABORT
        assert rawpdu.read_pdu(sock) == (0, b"")
    server.wait_for_log("aborting association: PDU not complete within network_timeout=2s")
    dcmtk.echoscu(tls_port, args=tls_args(client)).check()
    assert dcmtk.findscu(tls_port, {"StudyInstanceUID": small_study[0].study_uid},
                         args=tls_args(client)).check().values("StudyInstanceUID") == [
        small_study[0].study_uid]


def test_a_tls_error_on_an_association_is_one_warning_with_the_address(
    tls_edge: tuple[EdgeServer, int, Path],
) -> None:
    # A record that fails its integrity check (as a forged or tampered one does) was
    # logged as an ERROR naming neither the peer nor what it was doing.
    server, port, client = tls_edge
    context = client_context(client)
    with context.wrap_socket(rawpdu.connect(port)) as sock:
        sock.sendall(rawpdu.associate_rq(dcmtk.TEST_AE, server.ae_title))
        assert rawpdu.read_pdu(sock)[0] == rawpdu.A_ASSOCIATE_AC
        with socket.socket(fileno=os.dup(sock.fileno())) as raw:
            raw.sendall(b"\x17\x03\x03\x00\x20" + b"\0" * 32)  # application data, bad MAC
        with contextlib.suppress(OSError):
            while sock.recv(4096):
                pass
    log = server.wait_for_log("aborting association: TLS error")
    assert "address=127.0.0.1" in log, log
    assert " ERROR " not in log, log
    server.echo().check()


def test_a_box_clock_before_the_certificates_is_named_at_start_and_per_handshake(
        edge_server_factory: Callable[..., EdgeServer], free_port: Callable[[], int],
        tmp_path: Path) -> None:
    # A dead RTC battery: serve starts ten years back, before every certificate's start
    # (libfaketime), and every peer's certificate is "not yet valid" to it.
    libfaketime = sorted(Path("/usr/lib").glob("*/faketime/libfaketime.so.1"))
    assert libfaketime, "libfaketime missing: run scripts/setup-test-deps.sh"
    server = edge_server_factory(start=False)
    tls_port = free_port()
    server.configure(dicom={"tls_port": tls_port})
    server.cli("certs", "issue", "testscu", "--out", str(tmp_path / "testscu"))
    server.start(prefix=("env", f"LD_PRELOAD={libfaketime[0]}", "FAKETIME=-10y"))
    assert "clock outside the certificate's validity cert=node" in server.log()
    assert not dcmtk.echoscu(tls_port, args=tls_args(tmp_path / "testscu")).ok
    server.wait_for_log("verify='certificate is not yet valid'")
