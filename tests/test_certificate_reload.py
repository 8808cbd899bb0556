"""`systemctl reload pacs-edge` (SIGHUP) presents a renewed node certificate, no restart.

A real `pacs-edge serve` with DICOM TLS, HTTPS and HL7 over TLS; `pacs-edge certs
renew`; SIGHUP. New TLS connections (Python's ssl, dcmtk's echoscu, a pynetdicom
association) get the new certificate's serial; an association opened before the
reload goes on, with the certificate it began with. A pair serve must not load is
refused with one log line, and the old one is still presented.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import dcmtk
import dicomgen
import pytest
import tomlkit
from conftest import HOST, EdgeServer, pacs_edge_command
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from test_dicom_tls import client_context, tls_args
from webpeer import web_home

RELOADED = "node certificate reloaded serial="
REFUSED = "node certificate reload refused reason="


class TlsBox:
    """A running serve with every TLS edge on, and the peer testscu's certificate."""

    def __init__(self, server: EdgeServer, tls_port: int, hl7_port: int, client: Path) -> None:
        self.server = server
        self.tls_port = tls_port
        self.hl7_port = hl7_port
        self.client = client

    @property
    def node_cert(self) -> Path:
        return self.server.home / "tls" / "node.pem"

    def serial_on(self, port: int) -> int:
        """The serial of the certificate a new TLS connection to `port` is presented."""
        with socket.create_connection((HOST, port), timeout=30) as raw, \
                client_context(self.client).wrap_socket(raw) as tls:
            der = tls.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der).serial_number

    def serials(self) -> set[int]:
        """The serials new connections to the DICOM TLS, HTTPS and HL7 ports get."""
        return {self.serial_on(port) for port in
                (self.tls_port, self.server.http_port, self.hl7_port)}

    def reload(self, outcome: str) -> str:
        """SIGHUP, as `systemctl reload` sends it; then the log, once it says `outcome`."""
        os.kill(self.server.pid, signal.SIGHUP)
        return self.server.wait_for_log(outcome)


def _serial(path: Path) -> int:
    return x509.load_pem_x509_certificate(path.read_bytes()).serial_number


@pytest.fixture
def tls_box(tmp_path: Path, free_port: Callable[[], int]) -> Iterator[TlsBox]:
    home = web_home(tmp_path / "home", free_port())
    server = EdgeServer(home)
    tls_port, hl7_port = free_port(), free_port()
    server.configure(dicom={"tls_port": tls_port}, hl7={"port": hl7_port, "tls": True})
    server.start()
    try:
        server.cli("certs", "issue", "testscu", "--out", str(tmp_path / "testscu"))
        yield TlsBox(server, tls_port, hl7_port, tmp_path / "testscu")
    finally:
        assert server.stop() == 0


def test_reload_presents_the_renewed_certificate_and_open_associations_go_on(
        tls_box: TlsBox) -> None:
    old = _serial(tls_box.node_cert)
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(Verification)
    before = ae.associate(HOST, tls_box.tls_port, ae_title=tls_box.server.ae_title,
                          tls_args=(client_context(tls_box.client), None))
    assert before.is_established
    try:
        tls_box.server.cli("certs", "renew")
        new = _serial(tls_box.node_cert)
        assert new != old
        assert tls_box.serials() == {old}  # the renewal alone changes nothing served
        tls_box.reload(RELOADED)
        assert tls_box.serials() == {new}
        # dcmtk verifies the box against the site CA, with the new certificate.
        dcmtk.echoscu(tls_box.tls_port, args=tls_args(tls_box.client)).check()
        # The association opened before the reload is still served, on the old pair.
        assert before.send_c_echo().Status == 0x0000
        sock = before.dul.socket.socket
        assert x509.load_der_x509_certificate(
            sock.getpeercert(binary_form=True)).serial_number == old
    finally:
        before.release()
    report = json.loads(tls_box.server.cli("status", "--json").stdout)
    assert "certificate_restart_pending" not in {w["code"] for w in report["warnings"]}
    recorded = json.loads((tls_box.server.home / "run" / "served-node-cert.json").read_text())
    assert recorded["sha256"] == x509.load_pem_x509_certificate(
        tls_box.node_cert.read_bytes()).fingerprint(hashes.SHA256()).hex()


def _mismatched_key(box: TlsBox) -> str:
    key = box.server.home / "secrets" / "node.key"
    key.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return "the key does not match the certificate"


def _expired_certificate(box: TlsBox) -> str:
    """A certificate of the node's own key that ended yesterday."""
    key = serialization.load_pem_private_key(
        (box.server.home / "secrets" / "node.key").read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "expired")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=30))
            .not_valid_after(now - datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    box.node_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return "expired on"


def _missing_certificate(box: TlsBox) -> str:
    box.node_cert.unlink()
    return "unreadable (FileNotFoundError"


@pytest.mark.parametrize("spoil", [_mismatched_key, _expired_certificate, _missing_certificate],
                         ids=["key-mismatch", "expired", "unreadable"])
def test_reload_refuses_a_bad_pair_and_keeps_presenting_the_old_one(
        tls_box: TlsBox, spoil: Callable[[TlsBox], str]) -> None:
    old = _serial(tls_box.node_cert)
    tls_box.server.cli("certs", "renew")
    reason = spoil(tls_box)
    assert f"{REFUSED}{reason}" in tls_box.reload(REFUSED)
    assert tls_box.serials() == {old}
    dcmtk.echoscu(tls_box.tls_port, args=tls_args(tls_box.client)).check()
    assert tls_box.server.running


@contextlib.contextmanager
def tls_destination(cert: Path, free_port: Callable[[], int]) -> Iterator[tuple[int, list[int]]]:
    """A pynetdicom Storage SCP over mutual TLS (AE TLSDEST, the key and certificate in
    `cert`), which accepts every C-STORE; yields its port and the serials of the client
    certificates the box presented on each association, as they arrive."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert / "tlsdest.pem", cert / "tlsdest.key")
    context.load_verify_locations(cert / "ca.pem")
    context.verify_mode = ssl.CERT_REQUIRED
    serials: list[int] = []

    def stored(event: evt.Event) -> int:
        der = event.assoc.dul.socket.socket.getpeercert(binary_form=True)
        serials.append(x509.load_der_x509_certificate(der).serial_number)
        return 0x0000

    ae = AE(ae_title="TLSDEST")
    ae.supported_contexts = AllStoragePresentationContexts
    port = free_port()
    scp = ae.start_server((HOST, port), block=False, ssl_context=context,
                          evt_handlers=[(evt.EVT_C_STORE, stored)])
    try:
        yield port, serials
    finally:
        scp.shutdown()


def test_outgoing_move_presents_the_reloaded_certificate(
        tls_box: TlsBox, small_study: list[dicomgen.GeneratedInstance],
        free_port: Callable[[], int], tmp_path: Path) -> None:
    """The box's own associations (C-MOVE's C-STOREs to a peer marked TLS) present the
    node certificate as their client certificate: the renewed one after the reload."""
    server = tls_box.server
    dcmtk.storescu(server.port, [i.path for i in small_study]).check()
    server.cli("certs", "issue", "tlsdest", "--server", "--san", "127.0.0.1",
               "--out", str(tmp_path / "tlsdest"))
    study = {"StudyInstanceUID": small_study[0].study_uid}
    old = _serial(tls_box.node_cert)
    with tls_destination(tmp_path / "tlsdest", free_port) as (port, serials):
        server.cli("peers", "add", "tlsdest", "--ae-title", "TLSDEST", "--host", HOST,
                   "--port", str(port), "--allow", "store", "--tls")
        dcmtk.movescu(server.port, study, "TLSDEST").check()
        assert set(serials) == {old}
        server.cli("certs", "renew")
        tls_box.reload(RELOADED)
        serials.clear()
        dcmtk.movescu(server.port, study, "TLSDEST").check()
        assert set(serials) == {_serial(tls_box.node_cert)}


def test_reload_reaches_every_worker(tmp_path: Path, free_port: Callable[[], int],
                                     edge_server_factory: Callable[..., EdgeServer]) -> None:
    """With several workers, SIGHUP goes to the supervisor (systemd's $MAINPID) alone:
    every worker must load the new pair, and only then is it recorded as served."""
    server = edge_server_factory(start=False)
    tls_port = free_port()
    server.configure(dicom={"tls_port": tls_port})
    path = server.home / "pacs-edge.toml"
    doc = tomlkit.parse(path.read_text())
    doc["dicom"]["workers"] = 2  # type: ignore[index]
    path.write_text(tomlkit.dumps(doc))
    server.start()
    server.cli("certs", "issue", "testscu", "--out", str(tmp_path / "testscu"))
    box = TlsBox(server, tls_port, 0, tmp_path / "testscu")
    server.cli("certs", "renew")
    os.kill(server.pid, signal.SIGHUP)
    server.wait_for_log("node certificate reloaded by every worker count=2")
    assert server.log().count(RELOADED) == 2
    # The kernel spreads new connections over the workers (SO_REUSEPORT).
    assert {box.serial_on(tls_port) for _ in range(16)} == {_serial(box.node_cert)}
    report = json.loads(server.cli("status", "--json").stdout)
    assert "certificate_restart_pending" not in {w["code"] for w in report["warnings"]}



def _workers_of(pid: int) -> set[int]:
    """The supervisor's spawned workers (multiprocessing's spawn_main command line)."""
    found = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):
            for child in (task / "children").read_text().split():
                with contextlib.suppress(FileNotFoundError):
                    if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                        found.add(int(child))
    return found


def _wait_until(what: str, done: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"not {what} within {timeout:.0f}s"
        time.sleep(0.01)


def test_reload_while_a_worker_restarts_reaches_it_without_ending_it(
        tmp_path: Path, free_port: Callable[[], int],
        edge_server_factory: Callable[..., EdgeServer]) -> None:
    """A SIGHUP the supervisor passes on to a worker it has just restarted (its Python
    still starting, before serve's handler) is done once that worker is ready: the
    default action would end it, and the reload round would fail."""
    server = edge_server_factory(start=False)
    server.configure(dicom={"tls_port": free_port(), "workers": 2})
    server.start()
    server.cli("certs", "renew")
    first = _workers_of(server.pid)
    assert len(first) == 2
    os.kill(min(first), signal.SIGKILL)
    _wait_until("restarted", lambda: len(_workers_of(server.pid) - first) == 1)
    os.kill(server.pid, signal.SIGHUP)  # the round reaches the new worker as it starts
    log = server.wait_for_log("node certificate reloaded by every worker count=2",
                              timeout=60)
    assert "exitcode=-1" not in log  # no worker ended by SIGHUP
    assert server.log().count(RELOADED) == 2


def test_sighup_while_serve_starts_is_done_once_ready(
        edge_server_factory: Callable[..., EdgeServer]) -> None:
    """SIGHUP from the moment the serve command runs (before serve's handler, seconds of
    imports away) waits, and is acted on once serve is ready, instead of ending it."""
    server = edge_server_factory(start=False)
    args = [*pacs_edge_command(), "serve", "--home", str(server.home)]
    with open(server.log_path, "ab") as log:
        server.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=True)
    status = Path(f"/proc/{server.pid}/status")
    # The SigBlk mask: SIGHUP (1) is its lowest bit once the serve command runs.
    _wait_until("holding SIGHUP back", lambda: not server.running or int(
        status.read_text().split("SigBlk:")[1].split()[0], 16) & 1 == 1)
    os.kill(server.pid, signal.SIGHUP)
    server.wait_for_log("reload: no TLS context presents the node certificate", timeout=60)
    assert server.running
    assert server.stop() == 0
