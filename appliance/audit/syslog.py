"""Forward audit records to a collector as RFC 5424 syslog over TLS (RFC 5425).

The spool is the audit log itself: a cursor file (`audit/syslog.cursor`:
last delivered seq and the byte offset after it) says how far delivery got.
A forwarder thread sends every record after the cursor, in seq order, then
advances the cursor (fsync'd). While the collector is down, records simply
wait in the log; when it is back they go out oldest first. Nothing is
dropped and no second copy of PHI is kept on disk.

Delivery guarantees: RFC 5425 has no acknowledgement, so "sent" means the
collector's TCP stack took the bytes. Before each batch the forwarder checks
that the collector has not closed the connection (a collector never sends
data, so a readable socket means close), which covers a collector that was
stopped or restarted. A batch whose send fails is sent again on a new
connection, so a collector may see a repeat; a collector that crashes with
records received but unread loses those (they stay in the audit log). Each
message carries its seq (and chain hash) in structured data, so a collector
can drop repeats and see gaps; `pacs-edge audit export` fills a gap.

Only one process forwards: serve and the sync agent both run a forwarder,
and the one holding `flock` on `audit/syslog.lock` delivers (the other
takes over if that process stops).

Message format (PS3.15 A.6 / IHE ATNA): PRI facility 10 (security/
authorization), severity from the outcome; APP-NAME `pacs-edge`; MSGID
`DICOM+RFC3881`; MSG the AuditMessage XML (UTF-8 with BOM). Framing is
octet counting (RFC 5425 4.3). TLS: 1.2 or later, the collector's
certificate checked against `[audit] syslog_ca_file` (or the system CAs) and
its host name, optional client certificate for mutual TLS.

Why not a library: on PyPI, `rfc5424-logging-handler` (last release 2019)
and `syslog-rfc5424-formatter` (2022) format stdlib LogRecords and own the
socket; neither exposes "format this message" apart from a logging handler
that swallows send errors, which is the opposite of spooled, in-order
delivery. The header is one f-string (`format_message`); SD-PARAM escaping
is the only subtle part and is done per RFC 5424 6.3.3.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import select
import socket
import ssl
import threading
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from appliance.audit.export import audit_message_xml
from appliance.audit.log import AuditLog, Entry
from appliance.base.durable import atomic_write

log = logging.getLogger(__name__)

FACILITY = 10  # security/authorization (authpriv)
APP_NAME = "pacs-edge"
MSG_ID = "DICOM+RFC3881"
SD_ID = "audit@32473"  # 32473: the example enterprise number of RFC 5612
BOM = b"\xef\xbb\xbf"
BATCH = 100
RETRY_SECONDS = 2.0
POLL_SECONDS = 1.0
CONNECT_TIMEOUT = 10.0  # and the handshake's, and each send's (a collector that stops reading)
CLOSE_TIMEOUT = 2.0  # for the collector's answer to our close_notify at stop
_SEVERITY = {0: 5, 4: 4, 8: 3, 12: 2}  # notice, warning, error, critical


@dataclass(frozen=True)
class SyslogTarget:
    host: str
    port: int = 6514
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None


def format_message(entry: Entry, hostname: str, procid: int) -> bytes:
    """One RFC 5424 message (without framing) for a log entry."""
    outcome = entry.record["EventIdentification"]["EventOutcomeIndicator"]
    pri = FACILITY * 8 + _SEVERITY.get(int(outcome), 5)
    sd = f'[{SD_ID} seq="{entry.seq}" hash="{_sd_escape(entry.hash)}"]'
    header = f"<{pri}>1 {entry.time} {hostname} {APP_NAME} {procid} {MSG_ID} {sd} "
    body: bytes = ET.tostring(audit_message_xml(entry.record), encoding="utf-8",
                              xml_declaration=False)
    return header.encode("ascii") + BOM + body


def frame(message: bytes) -> bytes:
    """RFC 5425 octet counting: `MSG-LEN SP SYSLOG-MSG`."""
    return f"{len(message)} ".encode("ascii") + message


def _sd_escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def _hostname() -> str:
    name = socket.getfqdn() or socket.gethostname() or "-"
    cleaned = "".join(c for c in name if 33 <= ord(c) <= 126)[:255]
    return cleaned or "-"


def cursor_path(audit_log: AuditLog) -> Path:
    """Where the forwarder records the last record the collector took."""
    return audit_log.path.parent / "syslog.cursor"


def read_cursor(audit_log: AuditLog) -> tuple[int, int]:
    """(seq, file offset) of the last forwarded record; (0, 0) before the first."""
    try:
        raw = json.loads(cursor_path(audit_log).read_text(encoding="utf-8"))
        return int(raw["seq"]), int(raw["offset"])
    except FileNotFoundError:
        return 0, 0
    except (ValueError, KeyError, TypeError):
        log.warning("audit syslog cursor unreadable; starting over")
        return 0, 0


class SyslogForwarder:
    """The forwarding thread; see the module docstring for the guarantees."""

    def __init__(self, audit_log: AuditLog, target: SyslogTarget, *,
                 retry_seconds: float = RETRY_SECONDS, poll_seconds: float = POLL_SECONDS) -> None:
        self.log = audit_log
        self.target = target
        self.retry_seconds = retry_seconds
        self.poll_seconds = poll_seconds
        folder = audit_log.path.parent
        self.cursor_path = cursor_path(audit_log)
        self.lock_path = folder / "syslog.lock"
        self._hostname = _hostname()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sock: ssl.SSLSocket | None = None
        self._lock_fd: int | None = None
        self._down = False

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="audit-syslog", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """New records were appended: deliver now rather than at the next poll."""
        self._wake.set()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        # RFC 5425 4.4: a sender closing a connection it will not use again MUST send
        # close_notify first (only when the thread is done with the socket).
        self._close(notify=self._thread is None or not self._thread.is_alive())
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # --- the loop ------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            wait = self.poll_seconds
            if self._elected():
                try:
                    self._deliver()
                    if self._down:
                        log.info("audit syslog collector reachable again host=%s port=%d",
                                 self.target.host, self.target.port)
                    self._down = False
                except ValueError:
                    if not self._down:
                        log.error("audit syslog forwarding paused: the audit log has a damaged"
                                  " record (run `pacs-edge audit verify`)")
                    self._down = True
                    wait = self.retry_seconds
                except OSError as exc:
                    self._close()
                    if not self._down:
                        log.warning("audit syslog collector unreachable; records wait in the"
                                    " audit log host=%s port=%d error=%s", self.target.host,
                                    self.target.port, type(exc).__name__)
                    self._down = True
                    wait = self.retry_seconds
            else:
                wait = self.retry_seconds
            self._wake.wait(wait)
            self._wake.clear()

    def _elected(self) -> bool:
        if self._lock_fd is not None:
            return True
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._lock_fd = fd
        return True

    def _deliver(self) -> None:
        seq, offset = self._load_cursor()
        pending: list[bytes] = []
        last = (seq, offset)
        for _number, end, line in self.log.entries(start=offset):
            try:
                entry = Entry.parse(line)
            except ValueError:
                entry = None
            if entry is None or entry.seq != last[0] + 1:
                if last == (seq, offset) and offset and not self._ends_at(seq, offset):
                    self._save_cursor(seq, self._resync(seq))  # the cursor lost its place
                    return
                # A damaged line inside the log: `pacs-edge audit verify` says which. The
                # records before it go out; the cursor stops in front of it.
                if pending:
                    self._send(pending)
                    self._save_cursor(*last)
                raise ValueError("audit log record cannot be forwarded")
            pending.append(frame(format_message(entry, self._hostname, os.getpid())))
            last = (entry.seq, end)
            if len(pending) >= BATCH:
                self._send(pending)
                self._save_cursor(*last)
                pending = []
        if pending:
            self._send(pending)
            self._save_cursor(*last)

    def _ends_at(self, seq: int, offset: int) -> bool:
        """Whether the line that ends at byte `offset` is the record `seq` (the cursor is
        in place, so a line after it that does not follow is damaged: before, that was
        taken for a lost cursor, and the whole log was read again at every poll)."""
        window = 64 * 1024
        with self.log.path.open("rb") as fh:
            while True:
                start = max(0, offset - window)
                fh.seek(start)
                data = fh.read(offset - start)
                if not data.endswith(b"\n"):
                    return False
                begin = data.rfind(b"\n", 0, len(data) - 1)
                if begin < 0 and start > 0:
                    window *= 4
                    continue
                try:
                    return Entry.parse(data[begin + 1:-1]).seq == seq
                except ValueError:
                    return False

    def _resync(self, seq: int) -> int:
        """Byte offset after the record with `seq` (the file changed under the cursor)."""
        log.warning("audit syslog cursor does not match the log; looking for seq=%d", seq)
        found = 0
        for _number, end, line in self.log.entries():
            with contextlib.suppress(ValueError):
                if Entry.parse(line).seq <= seq:
                    found = end
        return found

    def _send(self, frames: list[bytes]) -> None:
        sock = self._connection()
        sock.sendall(b"".join(frames))

    # --- connection ------------------------------------------------------------------

    def _connection(self) -> ssl.SSLSocket:
        if self._sock is not None and self._alive(self._sock):
            return self._sock
        self._close()
        context = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH,
            cafile=str(self.target.ca_file) if self.target.ca_file else None)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.target.cert_file is not None:
            context.load_cert_chain(
                str(self.target.cert_file),
                str(self.target.key_file) if self.target.key_file else None)
        raw = socket.create_connection((self.target.host, self.target.port),
                                       timeout=CONNECT_TIMEOUT)
        try:
            self._sock = context.wrap_socket(raw, server_hostname=self.target.host)
        except BaseException:
            raw.close()
            raise
        return self._sock

    @staticmethod
    def _alive(sock: ssl.SSLSocket) -> bool:
        """False once the collector closed the connection (it never sends data)."""
        try:
            readable, _, _ = select.select([sock], [], [], 0)
        except (OSError, ValueError):
            return False
        if not readable:
            return True
        timeout = sock.gettimeout()
        sock.setblocking(False)
        try:
            return sock.recv(1) != b""
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return True  # only TLS housekeeping (e.g. a TLS 1.3 session ticket)
        except OSError:
            return False
        finally:
            with contextlib.suppress(OSError):
                sock.settimeout(timeout)

    def _close(self, *, notify: bool = False) -> None:
        """Close the connection; with `notify`, TLS close_notify first (waiting at most
        CLOSE_TIMEOUT for the collector's own)."""
        if self._sock is not None:
            if notify:
                with contextlib.suppress(OSError, ValueError):
                    self._sock.settimeout(CLOSE_TIMEOUT)
                    self._sock.unwrap()
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None

    # --- cursor ------------------------------------------------------------------------

    def _load_cursor(self) -> tuple[int, int]:
        return read_cursor(self.log)

    def _save_cursor(self, seq: int, offset: int) -> None:
        atomic_write(self.cursor_path, json.dumps({"seq": seq, "offset": offset}).encode(),
                     mode=0o600)
