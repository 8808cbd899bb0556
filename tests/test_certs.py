"""The site PKI from `pacs-edge init`, `certs issue` and `certs renew`.

Certificates are checked by what uses them: a real mutual-TLS handshake with
Python's ssl (OpenSSL) between the node certificate and an issued client
certificate, both trusting only the site CA.
"""

from __future__ import annotations

import json
import os
import re
import socket
import ssl
import stat
import subprocess
import threading
import time
from pathlib import Path

import dcmtk
import pytest
from conftest import EdgeServer, init_home, pacs_edge_command, run_pacs_edge
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from provisioning import certs
from provisioning.provisioning_errors import CertificateError

SECRET_FILES = ("ca.key", "node.key", "site.key", "names.key", "log.key")


def _init(home: Path, *args: str) -> str:
    return run_pacs_edge("init", "--home", str(home), "--dicom-port", "0", *args).stdout


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _sans(cert: x509.Certificate) -> set[str]:
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {f"DNS:{v}" for v in ext.get_values_for_type(x509.DNSName)} | {
        f"IP:{v}" for v in ext.get_values_for_type(x509.IPAddress)}


def test_init_creates_site_id_ca_and_node_certificate_once(tmp_path: Path) -> None:
    home = tmp_path / "home"
    first = _init(home, "--cert-days", "30", "--ca-days", "400", "--san", "pacs.example.org",
                  "--san", "10.9.8.7")
    for name in ("site-id", "secrets/ca.key", "tls/ca.pem", "secrets/node.key", "tls/node.pem"):
        assert f"created {home / name}" in first
    for name in SECRET_FILES:
        assert stat.S_IMODE((home / "secrets" / name).stat().st_mode) == 0o600, name
    site = (home / "site-id").read_text().strip()
    ca, node = _cert(home / "tls/ca.pem"), _cert(home / "tls/node.pem")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert f"site {site}" in ca.subject.rfc4514_string()
    node.verify_directly_issued_by(ca)
    assert isinstance(node.public_key(), ec.EllipticCurvePublicKey)
    assert node.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
    assert node.signature_hash_algorithm is not None
    assert node.signature_hash_algorithm.name == "sha256"
    assert (node.not_valid_after_utc - node.not_valid_before_utc).days == 30
    assert (ca.not_valid_after_utc - ca.not_valid_before_utc).days == 400
    assert {"DNS:localhost", "IP:127.0.0.1", "IP:::1", f"DNS:{socket.gethostname().lower()}",
            "DNS:pacs.example.org", "IP:10.9.8.7"} <= _sans(node)
    usages = node.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(usages) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}

    before = {p: p.read_bytes() for p in home.rglob("*") if p.is_file()}
    again = _init(home)
    assert "nothing changed" in again
    assert {p: p.read_bytes() for p in home.rglob("*") if p.is_file()} == before


def test_issued_client_and_node_certificates_complete_a_mutual_tls_handshake(
        tmp_path: Path) -> None:
    home = tmp_path / "home"
    _init(home)
    out = tmp_path / "ct1"
    issued = run_pacs_edge("certs", "issue", "ct-scanner-1", "--out", str(out), "--home",
                           str(home)).stdout
    assert "issued client certificate for ct-scanner-1" in issued
    assert stat.S_IMODE((out / "ct-scanner-1.key").stat().st_mode) == 0o600
    assert (out / "ca.pem").read_bytes() == (home / "tls/ca.pem").read_bytes()
    client_cert = _cert(out / "ct-scanner-1.pem")
    assert list(client_cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH]

    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(home / "tls/node.pem", home / "secrets/node.key")
    server_ctx.load_verify_locations(home / "tls/ca.pem")
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    client_ctx = ssl.create_default_context(cafile=out / "ca.pem")
    client_ctx.load_cert_chain(out / "ct-scanner-1.pem", out / "ct-scanner-1.key")
    peer: dict[str, object] = {}
    left, right = socket.socketpair()

    def serve() -> None:
        with server_ctx.wrap_socket(left, server_side=True) as tls:
            peer.update(tls.getpeercert() or {})
            tls.sendall(b"ok")

    thread = threading.Thread(target=serve)
    thread.start()
    with client_ctx.wrap_socket(right, server_hostname="localhost") as tls:
        assert tls.recv(2) == b"ok"
    thread.join(10)
    assert ((("commonName", "ct-scanner-1"),) in peer["subject"])  # type: ignore[operator]

    again = run_pacs_edge("certs", "issue", "ct-scanner-1", "--out", str(out), "--home",
                          str(home), check=False)
    assert again.returncode == 2 and "would overwrite" in again.stderr


def test_server_certificate_adds_server_auth_and_its_sans(tmp_path: Path) -> None:
    """For a TLS C-MOVE destination: serverAuth (TLS clients refuse a server
    certificate without it) beside clientAuth, and the names it is reached by."""
    home = tmp_path / "home"
    _init(home)
    out = tmp_path / "ws1"
    issued = run_pacs_edge("certs", "issue", "ws1", "--server", "--san", "ws1.example.org",
                           "--san", "10.0.0.7", "--out", str(out), "--home", str(home)).stdout
    assert "issued client and server certificate for ws1" in issued
    cert = _cert(out / "ws1.pem")
    cert.verify_directly_issued_by(_cert(home / "tls/ca.pem"))
    assert set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == {
        ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert _sans(cert) == {"DNS:ws1.example.org", "IP:10.0.0.7"}
    proc = run_pacs_edge("certs", "issue", "ws2", "--san", "ws2.example.org", "--out",
                         str(tmp_path / "ws2"), "--home", str(home), check=False)
    assert proc.returncode == 2 and "--san applies to server certificates only" in proc.stderr
    assert not (tmp_path / "ws2").exists()


def test_renew_reissues_from_the_same_ca_and_says_what_changed(tmp_path: Path) -> None:
    home = tmp_path / "home"
    _init(home, "--cert-days", "90", "--san", "old.example.org")
    old = _cert(home / "tls/node.pem")
    key_before = (home / "secrets/node.key").read_bytes()
    report = run_pacs_edge("certs", "renew", "--home", str(home), "--san",
                           "new.example.org").stdout
    new = _cert(home / "tls/node.pem")
    new.verify_directly_issued_by(_cert(home / "tls/ca.pem"))
    assert f"serial: {old.serial_number:x} -> {new.serial_number:x}" in report
    assert "subjectAltName added: DNS:new.example.org" in report
    assert "subjectAltName removed: DNS:old.example.org" in report
    assert "key: kept" in report and (home / "secrets/node.key").read_bytes() == key_before
    assert (new.not_valid_after_utc - new.not_valid_before_utc).days == 90  # lifetime kept

    report = run_pacs_edge("certs", "renew", "--home", str(home), "--new-key",
                           "--days", "10").stdout
    assert "key: new node key" in report and "public key: changed" in report
    assert stat.S_IMODE((home / "secrets/node.key").stat().st_mode) == 0o600
    newest = _cert(home / "tls/node.pem")
    assert (newest.not_valid_after_utc - newest.not_valid_before_utc).days == 10


def test_renew_without_san_keeps_the_names_the_certificate_has(tmp_path: Path) -> None:
    """The expiry warning says `pacs-edge certs renew`: that must not drop the name
    browsers and peers use, given at init and not detectable on the host."""
    home = tmp_path / "home"
    _init(home, "--san", "pacs.example.org", "--san", "10.9.8.7")
    report = run_pacs_edge("certs", "renew", "--home", str(home)).stdout
    assert "subjectAltNames: unchanged" in report
    names = _cert(home / "tls/node.pem").extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    assert x509.DNSName("pacs.example.org") in names
    assert "10.9.8.7" in {str(ip) for ip in names.get_values_for_type(x509.IPAddress)}


def test_unsafe_ca_key_and_bad_names_fail_with_a_hint(tmp_path: Path) -> None:
    home = tmp_path / "home"
    _init(home)
    (home / "secrets/ca.key").chmod(0o644)
    proc = run_pacs_edge("certs", "issue", "ws1", "--out", str(tmp_path / "ws1"), "--home",
                         str(home), check=False)
    assert proc.returncode == 2 and "mode 0644" in proc.stderr and "chmod 600" in proc.stderr
    (home / "secrets/ca.key").chmod(0o600)
    proc = run_pacs_edge("certs", "issue", "../evil", "--out", str(tmp_path / "x"), "--home",
                         str(home), check=False)
    assert proc.returncode == 2 and "is not 1-64 letters" in proc.stderr
    proc = run_pacs_edge("certs", "renew", "--san", "not a name!", "--home", str(home),
                         check=False)
    assert proc.returncode == 2 and "neither an IP address nor a DNS name" in proc.stderr
    with pytest.raises(CertificateError, match="--days 0 is out of range"):
        certs.issue_client(home, "ws1", tmp_path / "ws1", days=0)


def test_certificates_never_outlive_the_ca(tmp_path: Path) -> None:
    home = tmp_path / "home"
    refused = run_pacs_edge("init", "--home", str(home), "--cert-days", "365",
                            "--ca-days", "5", check=False)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "--cert-days 365 is longer than --ca-days 5" in refused.stderr
    assert not home.exists(), "nothing is written before the lifetimes are checked"
    certs.provision_tls(home, ca_days=5, node_days=5)
    certs.issue_client(home, "ws1", tmp_path / "ws1", days=365)
    ca, client = _cert(home / "tls/ca.pem"), _cert(tmp_path / "ws1/ws1.pem")
    assert client.not_valid_after_utc == ca.not_valid_after_utc


def test_status_warns_before_a_certificate_a_peer_presented_expires(tmp_path: Path) -> None:
    """A device that calls over TLS with a certificate the box has no copy of (issued
    before `certs issue` kept copies) is warned about 30 days ahead, as an issued one is:
    the index keeps what it presented, and `status` reads it (JSON:
    presented_certificates). The box's own copy of the same certificate warns once."""
    home = init_home(tmp_path / "home")
    server = EdgeServer(home)
    server.configure(dicom={"tls_port": dcmtk.free_port()})
    client = tmp_path / "testscu"
    server.cli("certs", "issue", "testscu", "--out", str(client), "--days", "10")
    copy = home / "tls" / "issued" / "testscu.pem"
    kept = copy.read_bytes()
    copy.unlink()  # as for a certificate issued before the copies
    server.start()
    try:
        tls_port = int(re.search(r"tls_port=(\d+)", server.log()).group(1))  # type: ignore[union-attr]
        dcmtk.echoscu(tls_port, args=["+tls", str(client / "testscu.key"),
                                      str(client / "testscu.pem"), "+cf", str(client / "ca.pem"),
                                      "--profile-bcp195-nd"]).check()
        deadline = time.monotonic() + 30  # the association does not wait for the write
        report = json.loads(server.cli("status", "--json").stdout)
        while "testscu" not in report.get("presented_certificates", {}) \
                and time.monotonic() < deadline:
            time.sleep(0.2)
            report = json.loads(server.cli("status", "--json").stdout)
        warnings = server.cli("status").stderr
        copy.write_bytes(kept)
        again = server.cli("status").stderr
    finally:
        server.stop()
    not_after = _cert(client / "testscu.pem").not_valid_after_utc.timestamp()
    assert report["presented_certificates"] == {"testscu": not_after}
    assert "peer_certificate_expiring" in {w["code"] for w in report["warnings"]}
    assert ("warning: the certificate peer testscu presented over TLS expires in 10 days"
            in warnings), warnings
    assert "pacs-edge certs issue testscu --out DIR" in warnings
    assert "presented over TLS" not in again, again  # the copy warns: not twice for one
    assert "the certificate issued to peer testscu expires in 10 days" in again


def test_status_warns_before_a_certificate_issued_to_a_peer_expires(tmp_path: Path) -> None:
    """`certs issue` keeps a public copy: `status` warns 30 days ahead for a peer still on
    the allowlist (not for a removed one), a new certificate ends the warning, and
    `certs list` shows the latest of each name."""
    home = tmp_path / "home"
    _init(home)

    def cli(*args: str) -> tuple[str, str]:
        result = run_pacs_edge(*args, "--home", str(home))
        return result.stdout, result.stderr

    cli("peers", "add", "ct1", "--ae-title", "CT1", "--host", "127.0.0.1", "--port", "104",
        "--allow", "store")
    cli("certs", "issue", "ct1", "--out", str(tmp_path / "ct1-a"), "--days", "10")
    cli("certs", "issue", "gone", "--out", str(tmp_path / "gone"), "--days", "5")
    table, warnings = cli("status")
    assert "warning: the certificate issued to peer ct1 expires in 10 days" in warnings
    assert "pacs-edge certs issue ct1 --out DIR" in warnings
    assert "gone" not in warnings  # not a peer: nobody's concern
    assert "1 issued, the first to expire: ct1 on" in table
    report = json.loads(cli("status", "--json")[0])
    assert set(report["peer_certificates"]) == {"ct1"}
    assert "peer_certificate_expiring" in {w["code"] for w in report["warnings"]}

    cli("certs", "issue", "ct1", "--out", str(tmp_path / "ct1-b"), "--days", "400")
    _, warnings = cli("status")
    assert "peer ct1" not in warnings
    listed = {c["name"]: c for c in json.loads(cli("certs", "list", "--json")[0])}
    renewed = _cert(tmp_path / "ct1-b" / "ct1.pem")
    assert listed["ct1"]["not_after"] == renewed.not_valid_after_utc.timestamp()
    assert listed["ct1"]["serial"] == f"{renewed.serial_number:x}"
    assert (listed["ct1"]["peer"], listed["gone"]["peer"]) == (True, False)
    assert [c["name"] for c in listed.values()] == ["gone", "ct1"]  # first to expire first
    table, _ = cli("certs", "list")
    rows = {cells[1]: cells for cells in ([c.strip() for c in line.split("│")]
                                          for line in table.splitlines()) if len(cells) > 5}
    assert (rows["gone"][-2], rows["ct1"][-2]) == ("no", "yes")
    assert rows["ct1"][3] == "client"
    copy = home / "tls" / "issued" / "ct1.pem"
    assert copy.read_bytes() == (tmp_path / "ct1-b" / "ct1.pem").read_bytes()
    assert stat.S_IMODE(copy.stat().st_mode) == 0o644  # public: no key is kept
    assert not list((home / "tls" / "issued").glob("*.key"))
    # Each issue is a Security Alert (Security Configuration) in the audit trail.
    alerts = [r for r in (json.loads(line)["record"] for line in
                          (home / "audit" / "audit.log").read_text().splitlines())
              if r["EventIdentification"]["EventID"]["csd-code"] == "110113"
              and {c["csd-code"] for c in r["EventIdentification"]["EventTypeCode"]}
              == {"110129"}]
    assert [o["ParticipantObjectID"] for r in alerts
            for o in r["ParticipantObjectIdentification"]] == [
        "certificate issued to peer ct1", "certificate issued to peer gone",
        "certificate issued to peer ct1"]


def test_init_on_a_clock_decades_back_refuses_and_writes_nothing(tmp_path: Path) -> None:
    # A dead RTC battery, before NTP has set the clock (libfaketime: 2000-01-01).
    libfaketime = sorted(Path("/usr/lib").glob("*/faketime/libfaketime.so.1"))
    assert libfaketime, "libfaketime missing: run scripts/setup-test-deps.sh"
    home = tmp_path / "home"
    proc = subprocess.run(
        [*pacs_edge_command(), "init", "--home", str(home)], capture_output=True, text=True,
        timeout=60, stdin=subprocess.DEVNULL,
        env={**os.environ, "LD_PRELOAD": str(libfaketime[0]), "FAKETIME": "@2000-01-01 00:00:00"})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "the clock says 2000-01-01" in proc.stderr and "timedatectl" in proc.stderr
    assert not home.exists(), "nothing is written before the clock is checked"
