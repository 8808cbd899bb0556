"""The node certificate serve presents, recorded at its start and at each reload.

serve builds its TLS contexts (DICOM TLS and the client context of its outgoing
associations, HL7 over TLS, HTTPS) when it starts and keeps them: `pacs-edge
certs renew` replaces tls/node.pem, but peers see the certificate serve loaded
until it reloads (SIGHUP, `systemctl reload pacs-edge`: appliance.process.node_tls)
or restarts. The health report (appliance.services.box_health) must tell of that
one, not only of the file, or a renewal without a reload clears the expiry warning
while the certificate peers see runs out. So serve, holding the home's serve lock,
records the node certificate before it loads a context, and records the new one
once every process of the service loaded it (`record_served`):

`<home>/run/served-node-cert.json` (0600, replaced atomically; no secret)::

    {"not_after": <epoch seconds>, "sha256": "<64 hex: the certificate's fingerprint>"}

removed when serve stops (a killed serve leaves it: then the report compares
with the certificate serve last presented, and a restart clears it).

Recorded before the contexts load, not after: a renewal between the two leaves
the record of the older certificate (a restart asked for that was not needed),
never of a newer one than serve presents. For the same reason a worker that its
supervisor restarts (process/workers.py), which loads the file anew, records
nothing: the supervisor's record names the oldest certificate any worker may
present until the service reloads or restarts.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from appliance.base.durable import atomic_write
from provisioning.certs import TlsPaths

RECORD_FILE = "served-node-cert.json"  # under <home>/run/
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class NodeCertificate:
    """Which node certificate: its SHA-256 fingerprint, and when it expires."""

    sha256: str
    not_after: float  # epoch seconds

    @classmethod
    def of(cls, cert: x509.Certificate) -> NodeCertificate:
        return cls(cert.fingerprint(hashes.SHA256()).hex(), cert.not_valid_after_utc.timestamp())


def record_path(home: Path) -> Path:
    return Path(home) / "run" / RECORD_FILE


@contextlib.contextmanager
def serving_node_certificate(home: Path, *, presented: bool) -> Iterator[None]:
    """For serve's run (the block): record tls/node.pem as the certificate serve presents,
    before any TLS context loads it; with `presented` False (serve loads no TLS context)
    record none. Removed at the end."""
    path = record_path(home)
    try:
        cert = x509.load_pem_x509_certificate(TlsPaths(Path(home)).node_cert.read_bytes())
    except (OSError, ValueError):
        cert = None  # serve's own load fails and says why; nothing is presented
    try:
        if presented and cert is not None:
            record_served(home, NodeCertificate.of(cert))
        else:
            path.unlink(missing_ok=True)
        yield
    finally:
        path.unlink(missing_ok=True)


def record_served(home: Path, served: NodeCertificate) -> None:
    """Record `served` as the certificate serve presents (at its start, and once a
    reload loaded it into every TLS context of the service)."""
    atomic_write(record_path(home), (json.dumps({"not_after": served.not_after,
                                                 "sha256": served.sha256}) + "\n").encode(),
                 mode=0o600)


def served_node_certificate(home: Path) -> NodeCertificate | None:
    """The certificate serve presents (or last presented, if it was killed); None when
    serve does not run, presents none, or the record cannot be read."""
    with contextlib.suppress(OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        record = json.loads(record_path(home).read_text(encoding="utf-8"))
        sha256, not_after = record["sha256"], float(record["not_after"])
        if isinstance(sha256, str) and _SHA256.match(sha256):
            return NodeCertificate(sha256, not_after)
    return None
