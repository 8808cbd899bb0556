"""The DICOM TLS server context: BCP 195 (RFC 8996 profile) with mutual authentication.

TLS 1.2 and 1.3 only; for TLS 1.2 only ECDHE key exchange with AEAD ciphers
(AES-GCM, ChaCha20-Poly1305), TLS 1.3 suites are all AEAD. The box presents
its node certificate (`pacs-edge init`, `pacs-edge certs renew`); with mutual
TLS (the default) a peer must present a certificate issued by the site CA
(`pacs-edge certs issue NAME`), and `peer_identity` reads the names in it
so that the association can be bound to the peer NAME (appliance.services.peers).
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

from appliance.base.errors import PacsEdgeError
from appliance.base.reloadable_tls import ReloadableContext
from appliance.services.peers import CertificateIdentity

BCP195_TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


def server_context(*, cert: Path, key: Path, ca: Path, require_client_cert: bool
                   ) -> ReloadableContext:
    context = ReloadableContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(BCP195_TLS12_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    try:
        context.load_cert_chain(cert, key)
        context.load_verify_locations(ca)
    except (OSError, ssl.SSLError) as exc:
        raise PacsEdgeError(
            f"DICOM TLS cannot load its certificate, key or CA ({type(exc).__name__}: {exc})",
            hint="run `pacs-edge init` (creates them) or `pacs-edge certs renew`; or set"
                 " [dicom] tls_port = 0 to turn TLS off") from exc
    # Off: a certificate is still asked for (and checked against the CA when sent), or a
    # --tls-only peer, admitted only with a certificate that names it, never gets in.
    context.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    return context


def client_context(*, cert: Path, key: Path, ca: Path) -> ReloadableContext:
    """For C-MOVE sub-associations to peers marked TLS: the same profile, the node
    certificate as client certificate, and the peer's certificate checked against
    the site CA (peers are addressed by IP as often as by name: no host-name check)."""
    context = ReloadableContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(BCP195_TLS12_CIPHERS)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_cert_chain(cert, key)
    context.load_verify_locations(ca)
    return context


def is_tls(sock: Any) -> bool:
    return isinstance(sock, ssl.SSLSocket)


def peer_identity(sock: Any) -> CertificateIdentity | None:
    """The names of the client certificate the handshake verified; None without one.

    `getpeercert()` returns the parsed certificate only once it was verified
    against the site CA (mutual TLS); a plain socket, or TLS without a
    client certificate, has no identity.
    """
    if not is_tls(sock):
        return None
    cert = sock.getpeercert()
    if not cert:
        return None
    common = [value for rdn in cert.get("subject", ()) for key, value in rdn
              if key == "commonName"]
    dns = frozenset(value for kind, value in cert.get("subjectAltName", ()) if kind == "DNS")
    expiry = cert.get("notAfter")
    return CertificateIdentity(common[-1] if common else "", dns,
                               ssl.cert_time_to_seconds(expiry) if expiry else 0.0)
