"""TLS contexts whose certificate and key can be replaced while they serve.

`pacs-edge serve` keeps its TLS contexts (DICOM TLS, HL7 over TLS, HTTPS, and the
client context of its outgoing associations) for its whole run; on SIGHUP it loads
the renewed node certificate into those same objects (appliance.process.node_tls).
OpenSSL copies a context's certificate and key into each connection when the
connection is made (SSL_new), so a new pair changes new handshakes only: an
established connection keeps the pair it began with.

Two platform quirks decide the shape of this module:

- `load_cert_chain` on a live context is not atomic. It sets the certificate, then
  the key, then checks that they match; a key that does not match leaves the context
  without a usable pair. So a pair is loaded into a scratch context first
  (`check_pair`), and into the live ones only when it loaded there.
- OpenSSL does not lock a context's certificate: a connection made (SSL_new copies
  the certificate with a reference) while a reload frees the old certificate could
  use freed memory, and CPython runs both without the GIL. `ReloadableContext`
  makes each connection's SSL object under a lock that a reload holds too. The lock
  covers only the creation of the SSL object, never a handshake.

The PEM bytes go to OpenSSL through memory files (memfd, by their /proc/self/fd
path; `load_cert_chain` takes paths only): the scratch check and the live load read
the same bytes, whatever replaces the files on disk in between, and the private key
is never written anywhere else.
"""

from __future__ import annotations

import contextlib
import os
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class PemFiles:
    """A certificate chain, its key and (optionally) a CA bundle, as paths OpenSSL reads."""

    cert: Path
    key: Path
    ca: Path | None


class ReloadableContext(ssl.SSLContext):
    """An SSLContext whose pair `replace_pair` swaps between two connections."""

    def __init__(self, protocol: int) -> None:  # ssl.SSLContext.__new__ takes the protocol
        super().__init__()
        self._pair_lock = threading.Lock()

    # SSLSocket._create and SSLObject._create make the SSL object through these two
    # (ssl.py); the handshake happens after they return.
    def _wrap_socket(self, *args: Any, **kwargs: Any) -> Any:
        with self._pair_lock:
            return super()._wrap_socket(*args, **kwargs)  # type: ignore[misc]

    def _wrap_bio(self, *args: Any, **kwargs: Any) -> Any:
        with self._pair_lock:
            return super()._wrap_bio(*args, **kwargs)  # type: ignore[misc]

    def replace_pair(self, files: PemFiles, *, trust_ca: bool) -> None:
        """Load a pair `check_pair` accepted; with `trust_ca`, add the CA bundle's
        certificates to the ones peers are verified against (OpenSSL adds, never
        removes: a CA dropped from the bundle stays trusted until serve restarts)."""
        with self._pair_lock:
            self.load_cert_chain(files.cert, files.key)
            if trust_ca and files.ca is not None:
                self.load_verify_locations(files.ca)


def check_pair(files: PemFiles) -> None:
    """Raise ssl.SSLError or OSError when the pair or the CA bundle does not load: a
    key that does not match the certificate, a file that is not PEM."""
    scratch = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    scratch.load_cert_chain(files.cert, files.key)
    if files.ca is not None:
        scratch.load_verify_locations(files.ca)


@contextlib.contextmanager
def memory_files(cert: bytes, key: bytes, ca: bytes | None) -> Iterator[PemFiles]:
    """The three PEM texts as memory files, closed at the end of the block."""
    descriptors: list[int] = []

    def memory_file(name: str, data: bytes) -> Path:
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        descriptors.append(fd)
        with os.fdopen(os.dup(fd), "wb") as file:
            file.write(data)
        return Path(f"/proc/self/fd/{fd}")

    try:
        yield PemFiles(memory_file("node-cert", cert), memory_file("node-key", key),
                       memory_file("ca", ca) if ca is not None else None)
    finally:
        for fd in descriptors:
            os.close(fd)
