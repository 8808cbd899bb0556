"""The DIMSE listener: a pynetdicom AE with the appliance's contexts, sockets and limits.

What this adds to pynetdicom (socket-level details in transport.py):
- the calling-AE allowlist read live from peers.toml (see AllowlistAE);
- a graceful stop: stop accepting, let running associations finish for a
  grace period, then abort what is left.
"""

from __future__ import annotations

import errno
import logging
import re
import socketserver
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, _config, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from appliance.base import compat
from appliance.base.config import DicomConfig
from appliance.base.errors import PacsEdgeError, TransportAborted
from appliance.dimse import find_scp, query_options
from appliance.dimse.negotiation import (
    QUERY_RETRIEVE_CONTEXTS,
    WORKFLOW_CONTEXTS,
    StoredCounts,
    StoringAE,
    check_extra_storage_classes,
    storage_classes,
)
from appliance.dimse.store_receiver import StoreTarget
from appliance.dimse.transport import (
    ConnectionGuard,
    EdgeAssociationServer,
    EdgeRequestHandler,
    SupportedContexts,
)
from appliance.services.peers import Allowlist

log = logging.getLogger(__name__)

# An AE title no peer can have (17 characters): pynetdicom reads an empty
# require_calling_aet as "admit everyone", the appliance as "admit no one".
_NOBODY = "~" * 17
# The accept loop's select timeout (socketserver's default is 0.5 s): a stop waits for
# the loop's next turn, so this bounds what stopping costs (systemctl stop, a restart);
# ten idle wake-ups a second cost nothing measurable.
ACCEPT_POLL_SECONDS = 0.1


# Binding errors that are the operator's to fix (a busy port, a privileged port, an
# address not on this box); any other is a bug and keeps its traceback.
LISTEN_ERRNOS = frozenset({errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL})


def listen_error(exc: OSError, host: str, port: int, key: str) -> PacsEdgeError:
    """The error for a DICOM listener that cannot bind `[dicom] key` ("port" or
    "tls_port"), worded as the HTTPS and HL7 listeners' own."""
    if exc.errno == errno.EACCES and port < 1024:
        hint = (f"a port below 1024 needs CAP_NET_BIND_SERVICE (install systemd/pacs-edge"
                f".service.d/privileged-port.conf: docs/deployment.md), or choose a"
                f" [dicom] {key} from 1024 up")
    elif exc.errno == errno.EADDRNOTAVAIL:
        hint = "set [dicom] host to an address of this box, or 0.0.0.0 for all of them"
    else:
        hint = f"choose another [dicom] {key}, or stop the program that listens on it"
    tls = " TLS" if key == "tls_port" else ""
    return PacsEdgeError(f"cannot listen for DICOM{tls} on {host}:{port}: {exc.strerror or exc}",
                         hint=hint)


class AllowlistAE(StoringAE):
    """An AE whose calling-AE allowlist is the live peers.toml."""

    def __init__(self, ae_title: str, allowlist: Allowlist,
                 storage_classes: Sequence[str]) -> None:
        super().__init__(ae_title, storage_classes)
        self._allowlist = allowlist

    @property  # type: ignore[override]
    def require_calling_aet(self) -> list[str]:
        return self._allowlist.ae_titles() or [_NOBODY]

    @require_calling_aet.setter
    def require_calling_aet(self, ae_titles: list[str]) -> None:
        raise AttributeError("the calling-AE allowlist comes from peers.toml")

    @property  # type: ignore[override]
    def maximum_associations(self) -> int:
        """The configured limit plus the acceptor threads that are no association:
        connections still waiting for their A-ASSOCIATE-RQ, and associations
        rejected, aborted or released that wait for their peer to close.

        pynetdicom checks the limit against every acceptor thread, and a thread
        starts with the TCP connection and ends with it: idle sockets (the
        connection guard's to bound, not this limit's) had real peers rejected as
        busy, and with `max_associations` at or below `idle_connection_limit` a
        port scanner locked every modality out. Likewise after the end (Sta13,
        until the peer closes or ARTIM expires): a stranger whose requests were
        rejected, left open, had every modality rejected as busy for as long as it
        kept calling. Only associations that asked and have not ended count."""
        uncounted = sum(1 for assoc in self.active_associations
                        if assoc.is_acceptor and (assoc.requestor.primitive is None
                                                  or assoc.is_rejected or assoc.is_aborted
                                                  or assoc.is_released))
        return int(self._maximum_associations) + uncounted

    @maximum_associations.setter
    def maximum_associations(self, value: int) -> None:
        AE.maximum_associations.fset(self, value)  # type: ignore[attr-defined]


def configure_pynetdicom() -> None:
    """Process-wide pynetdicom settings: never log identifiers (PHI), send from files raw,
    no per-message log handlers (they format at INFO/DEBUG what the WARNING level below
    drops: CPU on every PDU and DIMSE message for nothing), negotiation's UIDs
    converted once per process (compat.cache_negotiation_uids), association timers that
    a step of the wall clock leaves alone (compat.steady_association_timers)."""
    compat.cache_negotiation_uids()
    compat.steady_association_timers()
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_HANDLER_LEVEL = "none"
    _config.LOG_RESPONSE_IDENTIFIERS = False
    _config.STORE_SEND_CHUNKED_DATASET = True
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    for name, log_filter in _LOG_FILTERS:
        logger = logging.getLogger(name)
        if log_filter not in logger.filters:
            logger.addFilter(log_filter)


def _not_our_abort(record: logging.LogRecord) -> bool:
    """Drop the traceback pynetdicom logs for a connection the edge ended itself
    (EdgeAssociationSocket has already logged why, in one line)."""
    return not (record.exc_info and isinstance(record.exc_info[1], TransportAborted))


def _undecodable_text(record: logging.LogRecord) -> bool:
    """One warning line, not an ERROR with a traceback, for a peer's text that is not ASCII.

    pynetdicom's `utils.decode_bytes` logs the UnicodeDecodeError with its traceback
    for every AE title or UID from the peer with a byte above 0x7F, before it tries
    its fallback codecs and refuses the PDU (the association is aborted or rejected).
    The exception's message names the byte and its position, never the value."""
    if record.exc_info and isinstance(record.exc_info[1], UnicodeError):
        record.msg, record.args = "undecodable text from a peer: %s", (record.exc_info[1],)
        record.exc_info = record.exc_text = None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
    return True


def _request_for_another_service(record: logging.LogRecord) -> bool:
    """One warning line, not a traceback, for a DIMSE request its context's service does
    not have (a C-ECHO on the Storage Commitment context, say).

    pynetdicom's service class raises ValueError ("Invalid DIMSE primitive 'C_ECHO'
    used with Storage Commitment"); the association logs it with its traceback and
    aborts. The abort stays, as for a C-STORE on a context not accepted for storage."""
    exc = record.exc_info[1] if record.exc_info else None
    if isinstance(exc, ValueError) and str(exc).startswith("Invalid DIMSE primitive"):
        record.msg, record.args = "aborting association: %s", (exc,)
        record.exc_info = record.exc_text = None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
    return True


def _unencodable_dataset(record: logging.LogRecord) -> bool:
    """One warning line naming the error's type, for a data set pydicom cannot encode.

    pynetdicom's `dsutils.encode` logs "pydicom.write_dataset() failed:" and then the
    exception with its traceback; the caller answers the failure (an MPPS attribute
    list with a value of the wrong length: 0x0106). pydicom's messages may quote the
    value's bytes, which can be patient data, so only the type is kept."""
    if record.exc_info is None:
        return record.msg != "pydicom.write_dataset() failed:"
    record.msg, record.args = "a data set cannot be encoded error=%s", (
        type(record.exc_info[1]).__name__,)
    record.exc_info = record.exc_text = None
    record.levelno, record.levelname = logging.WARNING, "WARNING"
    return True


# Longest log message that may quote what a peer sent (an AE title or UID is 64 at most).
PEER_TEXT_LIMIT = 256
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _safe_peer_text(record: logging.LogRecord) -> bool:
    """Escape control characters in a message that quotes a peer's value, and cut it
    down to PEER_TEXT_LIMIT characters.

    pynetdicom logs an odd AE title or UID as it came ("Non-conformant 'Abstract
    Syntax Name' value '...'"; its UID check is a length check only), and an invalid
    one with its whole value ("Invalid 'Implementation Version Name' value '...'"),
    which the edge logs again with the refused PDU's error: a "UID" holding a newline
    wrote a forged log line, and one 60 KB user item put 120 KB of the peer's bytes
    in the log, every time it was sent."""
    text = record.getMessage()
    safe = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
    if len(safe) > PEER_TEXT_LIMIT:
        safe = f"{safe[:PEER_TEXT_LIMIT]}... (cut, {len(safe)} characters)"
    if safe != text:
        record.msg, record.args = safe, None
    return True


# A filter sees only the records of the logger it is added to, not its children's.
_LOG_FILTERS: tuple[tuple[str, Callable[[logging.LogRecord], bool]], ...] = (
    ("pynetdicom.dul", _not_our_abort),
    ("pynetdicom.utils", _undecodable_text),
    ("pynetdicom.utils", _safe_peer_text),
    ("appliance.base.compat", _safe_peer_text),
    ("pynetdicom.association", _request_for_another_service),
    ("pynetdicom.dsutils", _unencodable_dataset),
)


class DimseServer:
    def __init__(
        self,
        config: DicomConfig,
        allowlist: Allowlist,
        handlers: Sequence[tuple[Any, Any]],
        *,
        reuse_port: bool = False,
        stored_syntaxes: StoredCounts | None = None,
        store_target: StoreTarget | None = None,
        tls_context: ssl.SSLContext | None = None,
        on_tls_failure: Callable[[str, str], None] | None = None,
    ) -> None:
        self.config = config
        check_extra_storage_classes(config)
        stored = storage_classes(config)
        self.ae = AllowlistAE(config.ae_title, allowlist, stored)
        self.ae.require_called_aet = True
        self.ae.maximum_associations = config.max_associations
        self.ae.maximum_pdu_size = config.max_pdu
        self.ae.acse_timeout = config.acse_timeout
        self.ae.dimse_timeout = config.dimse_timeout
        self.ae.network_timeout = config.network_timeout
        self.ae.connection_timeout = config.connect_timeout
        self.ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
        for sop_class in stored:
            # scu_role/scp_role: accept C-GET's role reversal on the storage contexts
            self.ae.add_supported_context(
                sop_class, ALL_TRANSFER_SYNTAXES, scu_role=True, scp_role=True
            )
        for uid in QUERY_RETRIEVE_CONTEXTS:
            self.ae.add_supported_context(uid, ALL_TRANSFER_SYNTAXES)
        find_scp.install()  # C-FIND matches go out pre-encoded, one PDU each
        for uid in WORKFLOW_CONTEXTS:
            self.ae.add_supported_context(uid)
        self._handlers = list(handlers)
        self._reuse_port = reuse_port
        self._stored_syntaxes = stored_syntaxes
        self._store_target = store_target
        self._tls_context = tls_context
        self._on_tls_failure = on_tls_failure
        self._servers: dict[str, EdgeAssociationServer] = {}
        self._stopping = threading.Event()

    @property
    def ports(self) -> dict[str, int]:
        """Bound port per listener: "plain" and/or "tls"."""
        return {name: int(server.server_address[1]) for name, server in self._servers.items()}

    def start(self) -> dict[str, int]:
        """Start the plain and/or TLS listeners; returns their bound ports."""
        guard = ConnectionGuard(idle_limit=self.config.idle_connection_limit,
                                per_address_limit=self.config.connections_per_address)
        self._stopping.clear()
        listeners: list[tuple[str, int, ssl.SSLContext | None]] = []
        if self.config.plain_enabled:
            listeners.append(("plain", self.config.port, None))
        if self._tls_context is not None:
            listeners.append(("tls", self.config.tls_port, self._tls_context))
        if not listeners:
            raise PacsEdgeError("no DICOM listener: the plain port is off and TLS is off",
                                hint="set [dicom] plain_enabled = true or a tls_port")
        for name, port, context in listeners:
            server_class = type("Server", (EdgeAssociationServer,), {
                "reuse_port": self._reuse_port, "guard": guard,
                "stored_syntaxes": self._stored_syntaxes,
                "store_target": self._store_target,
                "handshake_timeout": self.config.tls_handshake_timeout,
                "stopping": self._stopping,
                "on_tls_failure": staticmethod(self._on_tls_failure)
                if self._on_tls_failure else None,
            })
            try:
                server = self.ae.make_server(
                    (self.config.host, port),
                    evt_handlers=self._handlers,
                    server_class=server_class,
                    request_handler=EdgeRequestHandler,
                    ssl_context=context,
                )
            except OSError as exc:
                if exc.errno not in LISTEN_ERRNOS:
                    raise
                self.stop(0.0)  # the plain listener, when the TLS one is refused
                raise listen_error(exc, self.config.host, port,
                                   "port" if context is None else "tls_port") from exc
            server.contexts = SupportedContexts(server.contexts)
            threading.Thread(target=server.serve_forever, args=(ACCEPT_POLL_SECONDS,),
                             name=f"dimse-accept-{name}", daemon=True).start()
            self._servers[name] = server
        return self.ports

    def _established(self) -> int:
        return sum(1 for assoc in self.ae.active_associations if assoc.is_established)

    def active_associations(self) -> int:
        return len(self.ae.active_associations)

    def stop(self, grace_seconds: float = 10.0) -> None:
        """Stop accepting, wait up to `grace_seconds` for associations to end, abort the rest."""
        if not self._servers:
            return
        for server in self._servers.values():
            # Stop the accept loop and close the listening socket. Not server.shutdown():
            # pynetdicom's version also unregisters from the AE, which make_server()
            # never registered it with.
            socketserver.BaseServer.shutdown(server)
            server.server_close()
        # Only established associations can be mid-transfer; connections still
        # negotiating (or left half-open by a broken peer) are aborted at once.
        deadline = time.monotonic() + grace_seconds
        while self._established() and time.monotonic() < deadline:
            time.sleep(0.05)
        left = self._established()
        if left:
            log.warning("aborting associations still open after grace period count=%d", left)
        # Connections mid-PDU or waiting for their peer's close give up at once.
        self._stopping.set()
        self.ae.shutdown()
        self._servers = {}


def event_handlers(h: Any) -> list[tuple[Any, Any]]:
    """pynetdicom event bindings for a handler object (see appliance.dimse.handlers)."""
    return [
        (evt.EVT_REQUESTED, h.on_requested),
        (evt.EVT_REJECTED, h.on_rejected),
        (evt.EVT_ACCEPTED, h.on_accepted),
        (evt.EVT_C_ECHO, h.on_echo),
        (evt.EVT_N_EVENT_REPORT, h.on_event_report),
        (evt.EVT_C_STORE, h.on_store),
        (evt.EVT_SOP_EXTENDED, query_options.on_sop_extended),  # what on_find may use
        (evt.EVT_C_FIND, h.on_find),
    ]
