"""The node certificate's TLS contexts of one serve process, reloaded on SIGHUP.

serve makes every context that presents the node certificate here (DICOM TLS, the
client context of its outgoing C-MOVE / C-STORE / N-EVENT-REPORT associations, HL7
over TLS, HTTPS) and keeps them for its run. `pacs-edge certs renew` then
`systemctl reload pacs-edge` (SIGHUP) loads the renewed tls/node.pem, secrets/node.key
and tls/ca.pem into those same objects: new handshakes present the new certificate,
connections and associations already open go on with the old one to their end
(appliance.base.reloadable_tls says how, and why a pair is checked first).

A pair is refused, and the one loaded before keeps serving, when a file cannot be
read, the key does not match the certificate, or the certificate is outside its
validity (expired, or not valid yet: the clock, or a certificate from a box whose
clock runs ahead). The refusal is one warning line naming the reason; the
`certificate_restart_pending` warning of `pacs-edge status` stays until a good pair
is loaded.

The prefetch's remote-archive client (dimse/remote_archive.py) and the audit syslog
client make their context at each connection, so they pick a renewal up without
this. The key type is kept by `certs renew` (P-256): a pair of another type would sit
next to the old one in a context (OpenSSL keeps one per type) until serve restarts.
"""

from __future__ import annotations

import datetime
import logging
import ssl
from pathlib import Path

from cryptography import x509

from appliance.base.errors import PacsEdgeError
from appliance.base.reloadable_tls import ReloadableContext, check_pair, memory_files
from provisioning.certs import TlsPaths
from provisioning.served_cert import NodeCertificate

log = logging.getLogger(__name__)

RENEW_HINT = "fix the files (pacs-edge certs renew), then reload again"
# systemd/pacs-edge.service binds secrets/node.key into serve's view as the file was at
# the start: a key replaced since (`certs renew --new-key` renames a new file in) is not
# the one serve reads, and the new certificate does not match the old key.
NEW_KEY_HINT = ("after `pacs-edge certs renew --new-key`, restart pacs-edge instead: the"
                " unit's sandbox holds the key file serve started with")


class CertificateRefused(PacsEdgeError):
    """A renewed pair serve will not load; the message is the log line's reason."""

    def __init__(self, reason: str, *, hint: str = RENEW_HINT) -> None:
        super().__init__(reason, hint=hint)


class NodeTls:
    """The reloadable contexts of one process, and whether each verifies peers with
    the site CA (the HTTPS context does not: browsers present no certificate)."""

    def __init__(self, home: Path) -> None:
        self.paths = TlsPaths(home)
        self._contexts: list[tuple[ReloadableContext, bool]] = []

    def track(self, context: ReloadableContext, *, trust_ca: bool = True) -> ReloadableContext:
        self._contexts.append((context, trust_ca))
        return context

    @property
    def tracked(self) -> int:
        return len(self._contexts)

    def reload(self) -> NodeCertificate | None:
        """Load the pair on disk into every tracked context; the certificate now
        presented, or None when the pair was refused (logged) or nothing presents one."""
        if not self._contexts:
            log.info("reload: no TLS context presents the node certificate; nothing to load")
            return None
        try:
            cert_pem, key_pem, ca_pem, cert = self._read()
            with memory_files(cert_pem, key_pem, ca_pem) as files:
                try:
                    check_pair(files)
                except ssl.SSLError as exc:
                    if exc.reason == "KEY_VALUES_MISMATCH":
                        raise CertificateRefused("the key does not match the certificate",
                                                 hint=NEW_KEY_HINT) from exc
                    raise CertificateRefused(f"does not load ({exc.reason or exc})") from exc
                for context, trust_ca in self._contexts:
                    context.replace_pair(files, trust_ca=trust_ca)
        except (OSError, ssl.SSLError) as exc:  # memfd refused, say: never the end of serve
            log.error("node certificate reload failed error=%s: restart pacs-edge", exc)
            return None
        except CertificateRefused as refused:
            log.warning("node certificate reload refused reason=%s: the certificate loaded"
                        " before is still presented; %s", refused.message, refused.hint)
            return None
        served = NodeCertificate.of(cert)
        log.info("node certificate reloaded serial=%x not_after=%s contexts=%d",
                 cert.serial_number, f"{cert.not_valid_after_utc:%Y-%m-%d}",
                 len(self._contexts))
        return served

    def _read(self) -> tuple[bytes, bytes, bytes, x509.Certificate]:
        try:
            cert_pem = self.paths.node_cert.read_bytes()
            key_pem = self.paths.node_key.read_bytes()
            ca_pem = self.paths.ca_cert.read_bytes()
        except OSError as exc:
            raise CertificateRefused(f"unreadable ({type(exc).__name__}: {exc.strerror})") from exc
        try:
            cert = x509.load_pem_x509_certificate(cert_pem)
        except ValueError as exc:
            raise CertificateRefused("tls/node.pem is not a PEM certificate") from exc
        now = datetime.datetime.now(datetime.UTC)
        if now > cert.not_valid_after_utc:
            raise CertificateRefused(f"expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
        if now < cert.not_valid_before_utc:
            raise CertificateRefused(f"not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M}"
                              " UTC: check the clock (timedatectl)")
        return cert_pem, key_pem, ca_pem, cert

