"""The DICOM ports, held or checked before serve touches the home.

A port in use must stop `serve` before its start-up sweep of temp files and
its reconciliation: the program holding it may be another serve (one older
than the serve lock, during an upgrade) whose transfers in flight the sweep
would take. The supervisor of several workers reserves the ports for them;
one serve process checks them.
"""

from __future__ import annotations

import socket

from appliance.base.config import Config
from appliance.dimse.server import LISTEN_ERRNOS, listen_error


def reserve_port(host: str, port: int, key: str) -> socket.socket:
    """Bind (not listen) `[dicom] key` with SO_REUSEPORT so port 0 resolves once for
    every worker, and a port in use is refused once, by the supervisor."""
    return _bind(host, port, key, reuse_port=True)


def probe_ports(config: Config) -> None:
    """One serve process: refuse a DICOM port another program holds before the start-up
    sweep and reconciliation (the supervisor reserves them instead). The serve lock keeps
    a second serve of this version away, but a serve older than the lock, still running
    during an upgrade, would lose the transfers it had in flight to the sweep."""
    ports = [("port", config.dicom.port)] if config.dicom.plain_enabled else []
    ports.append(("tls_port", config.dicom.tls_port))
    for key, port in ports:
        if port:  # 0: none, or any free one
            _bind(config.dicom.host, port, key, reuse_port=False).close()


def _bind(host: str, port: int, key: str, *, reuse_port: bool) -> socket.socket:
    """A socket bound to `host:port`; a port in use (or one this process may not bind)
    is the one-line listen error naming `[dicom] key`."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno not in LISTEN_ERRNOS:
            raise
        raise listen_error(exc, host, port, key) from exc
    return sock
