"""dcmtk's dcmqrscp as the legacy PACS of a migration, and a proxy that gives it a result limit.

LegacyPacs runs dcmqrscp on 127.0.0.1 and a free port, in its own process group
(it forks one process per association), with its archive indexed by dcmqridx
straight from the generated files. Readiness is polled with C-ECHO; stop()
sends SIGTERM to the group, then SIGKILL.

dcmqrscp 3.6.7 quirks that shape this fixture:
- it sends an instance on the first presentation context accepted for its SOP
  class and converts the data set to that context's transfer syntax (it never
  looks for a context in the syntax the file is stored in). So that what it
  sends is byte-identical to its file, each SOP class is stored in one transfer
  syntax (`syntax_by_class`) and the association profiles (dcmqrscp -xf) offer
  and accept exactly that syntax for it: outgoing (C-MOVE sub-operations) and
  incoming (C-GET storage contexts, with SCP/SCU role selection).
- it answers neither NumberOfStudyRelatedInstances nor ModalitiesInStudy: the
  migration must count at series or image level.
- it has no C-FIND result limit, and caps a storage area at 500 studies
  (a larger maxStudies is set back to 500 with a warning).

FindLimitProxy is the result limit: a TCP proxy in front of the PACS that reads
the PDUs coming back (P-DATA-TF, PS3.8 9.3.5) and drops every pending C-FIND
response after the first `limit` of a query, data set included, and passes the
final Success: a silent truncation, what many old archives do. Everything else
(C-MOVE, C-GET, their C-STOREs) passes byte for byte.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import dcmtk
from tcpproxy import TcpProxy

HOST = "127.0.0.1"
QR_CLASSES = (
    "1.2.840.10008.1.1",  # Verification
    "1.2.840.10008.5.1.4.1.2.1.1", "1.2.840.10008.5.1.4.1.2.1.2", "1.2.840.10008.5.1.4.1.2.1.3",
    "1.2.840.10008.5.1.4.1.2.2.1", "1.2.840.10008.5.1.4.1.2.2.2", "1.2.840.10008.5.1.4.1.2.2.3",
)
READY_TIMEOUT = 20.0


def _profile(syntax_by_class: Mapping[str, str]) -> str:
    syntaxes = sorted(set(syntax_by_class.values()))
    lines = ["[[TransferSyntaxes]]", "[Uncompressed]",
             "TransferSyntax1 = 1.2.840.10008.1.2.1", "TransferSyntax2 = 1.2.840.10008.1.2"]
    for n, ts in enumerate(syntaxes):
        lines += [f"[TS{n}]", f"TransferSyntax1 = {ts}"]
    lines += ["[[PresentationContexts]]", "[In]"]
    incoming = [f"{sop}\\Uncompressed" for sop in QR_CLASSES]
    incoming += [f"{sop}\\TS{syntaxes.index(ts)}" for sop, ts in syntax_by_class.items()]
    lines += [f"PresentationContext{n} = {item}" for n, item in enumerate(incoming, 1)]
    lines += ["[Out]"]
    lines += [f"PresentationContext{n} = {sop}\\TS{syntaxes.index(ts)}"
              for n, (sop, ts) in enumerate(syntax_by_class.items(), 1)]
    lines += ["[[SCPSCURoleSelection]]", "[Roles]"]
    lines += [f"Role{n} = {sop}\\SCP" for n, sop in enumerate(syntax_by_class, 1)]
    lines += ["[[Profiles]]", "[InProfile]", "PresentationContexts = In",
              "SCPSCURoleSelection = Roles", "[OutProfile]", "PresentationContexts = Out", ""]
    return "\n".join(lines)


class LegacyPacs:
    """dcmqrscp (AE `ae_title`) serving the files loaded with load()."""

    def __init__(self, folder: Path, syntax_by_class: Mapping[str, str], *,
                 ae_title: str = "LEGACY", nagle: bool = False) -> None:
        """`nagle`: leave Nagle's algorithm on, as dcmtk does unless TCP_NODELAY=1."""
        self.folder = Path(folder)
        self.nagle = nagle
        self.db = self.folder / "db"
        self.syntax_by_class = dict(syntax_by_class)
        self.ae_title = ae_title
        self.port = dcmtk.free_port()
        self.destinations: dict[str, tuple[str, int]] = {}
        # The calling AE titles it accepts (None: any); takes effect at the next start.
        # It rejects others for good, as "called AE title not recognized".
        self.callers: tuple[str, ...] | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.folder / "dcmqrscp.log"

    def load(self, files: Iterable[Path]) -> None:
        """Index files into the archive (dcmqridx), in batches for the command line."""
        self.db.mkdir(parents=True, exist_ok=True)
        paths = [str(p) for p in files]
        for start in range(0, len(paths), 200):
            dcmtk.run_tool("dcmqridx", str(self.db), *paths[start:start + 200],
                           timeout=300).check()

    def know(self, ae_title: str, port: int) -> None:
        """A move destination (takes effect at the next start)."""
        self.destinations[ae_title] = (HOST, port)

    def start(self) -> LegacyPacs:
        self.db.mkdir(parents=True, exist_ok=True)
        hosts = [f"dest{n} = ({ae}, {host}, {port})"
                 for n, (ae, (host, port)) in enumerate(self.destinations.items())]
        peers = "ANY"
        if self.callers is not None:
            peers = "callers"
            # dcmqrscp matches the caller's host by name; the tests' own AE for start().
            hosts.append("callers = " + ", ".join(
                f"({ae}, localhost, 0)" for ae in (*self.callers, dcmtk.TEST_AE)))
        host_table = "\n".join(hosts)
        (self.folder / "dcmqrscp.cfg").write_text(
            f"NetworkTCPPort = {self.port}\nMaxPDUSize = 65536\nMaxAssociations = 32\n"
            f"HostTable BEGIN\n{host_table}\nHostTable END\nVendorTable BEGIN\nVendorTable END\n"
            f"AETable BEGIN\n{self.ae_title} {self.db} RW (500, 4096mb) {peers}\nAETable END\n")
        (self.folder / "assoc.cfg").write_text(_profile(self.syntax_by_class))
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [dcmtk.dcmtk_tool("dcmqrscp"), "-c", str(self.folder / "dcmqrscp.cfg"),
                 "-xf", str(self.folder / "assoc.cfg"), "InProfile", "OutProfile",
                 "-ll", "warn"], stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
                env={**{k: v for k, v in os.environ.items() if k != "TCP_NODELAY"},
                     **({} if self.nagle else {"TCP_NODELAY": "1"})})
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            if dcmtk.echoscu(self.port, aec=self.ae_title, timeout=10).ok:
                return self
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"dcmqrscp did not start:\n{self.log_path.read_text()}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        with contextlib.suppress(ProcessLookupError):  # forked association processes
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc = None


_C_FIND_RSP = 0x8020
_PENDING = (0xFF00, 0xFF01)
_NO_DATASET = 0x0101


def _command(data: bytes) -> dict[int, int]:
    """US elements of a command set (implicit VR little endian) by element number."""
    out, pos = {}, 0
    while pos + 8 <= len(data):
        _group, element, length = struct.unpack_from("<HHI", data, pos)
        value = data[pos + 8:pos + 8 + length]
        if length == 2:
            out[element] = struct.unpack("<H", value)[0]
        pos += 8 + length
    return out


class FindLimitProxy(TcpProxy):
    """Forwards 127.0.0.1:`port` to `upstream_port`, answering at most `limit` C-FIND
    matches per query (see the module docstring). `truncated` counts cut queries."""

    def __init__(self, upstream_port: int, limit: int) -> None:
        self.limit = limit
        self.truncated = 0
        super().__init__(upstream_port)

    def to_client(self, source: socket.socket, sink: socket.socket) -> None:
        self._filter(source, sink)

    def _filter(self, source: socket.socket, sink: socket.socket) -> None:
        reader = source.makefile("rb")
        answered, dropping, held = 0, False, b""
        try:
            while header := reader.read(6):
                body = reader.read(struct.unpack(">I", header[2:6])[0])
                if header[0] != 0x04:  # not P-DATA-TF
                    sink.sendall(header + body)
                    continue
                kept, pos = [], 0
                while pos < len(body):
                    length = struct.unpack_from(">I", body, pos)[0]
                    item = body[pos:pos + 4 + length]
                    control = item[5]
                    pos += 4 + length
                    if not control & 0x01:  # a data set fragment
                        if not dropping:
                            kept.append(item)
                        elif control & 0x02:
                            dropping = False
                        continue
                    held += item[6:]
                    if not control & 0x02:
                        kept.append(item)
                        continue
                    fields, held = _command(held), b""
                    if fields.get(0x0100) == _C_FIND_RSP and fields.get(0x0900) in _PENDING:
                        answered += 1
                        if answered > self.limit:
                            if answered == self.limit + 1:
                                with self._lock:
                                    self.truncated += 1
                            dropping = fields.get(0x0800) != _NO_DATASET
                            continue
                    elif fields.get(0x0100) == _C_FIND_RSP:
                        answered = 0
                    kept.append(item)
                if kept:
                    payload = b"".join(kept)
                    sink.sendall(b"\x04\x00" + struct.pack(">I", len(payload)) + payload)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)
