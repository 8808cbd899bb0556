"""A real HL7 sender for the tests: python-hl7's MLLP client, and raw MLLP frames.

`orm(...)`, `omi(...)`, `adt(...)` build messages as a RIS would; `send`
sends one with python-hl7's MLLPClient and returns the parsed ACK (`send_many`:
several, one after the other on one connection, as a RIS does); `raw`
opens a plain socket (optionally from another loopback source address) for
frames no library would produce. `listen(server, port, **limits)` turns a
server's MLLP listener on and allows this host (the RIS) to send HL7.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass

import hl7
from conftest import EdgeServer
from hl7.client import MLLPClient

HOST = "127.0.0.1"
TIMEOUT = 30.0
SB, EB, CR = b"\x0b", b"\x1c", b"\r"


def listen(server: EdgeServer, port: int, **limits: object) -> None:
    """[hl7] on `port` with `limits` (max_message_bytes, idle_timeout, ...), and the
    RIS (127.0.0.1) allowed to send HL7; takes effect at the server's next start."""
    server.configure(hl7={"port": port, **limits})
    server.cli("peers", "add", "ris", "--ae-title", "RIS", "--host", HOST, "--allow", "hl7")


@dataclass(frozen=True)
class Ack:
    code: str  # MSA-1
    control_id: str  # MSA-2
    text: str  # MSA-3
    error_location: str  # ERR-2, e.g. "ORC^1^1"
    error_code: str  # ERR-3.1
    error_text: str = ""  # ERR-8 of the first ERR: the whole text MSA-3 cuts at 80

    @property
    def error_field(self) -> str:
        """ERR-2 as "ORC-1"."""
        parts = self.error_location.split("^")
        return f"{parts[0]}-{parts[2]}" if len(parts) > 2 and parts[2] else parts[0]


# An ACK's MSH-18 -> the codec it is in: the box answers in its message's set.
ACK_CODECS = {"": "utf-8", "ASCII": "ascii", "UNICODE UTF-8": "utf-8", "UTF-8": "utf-8",
              "8859/1": "latin-1", "8859/5": "iso8859-5", "8859/7": "iso8859-7",
              "8859/15": "iso8859-15",
              "ISO IR87": "iso2022_jp"}


def parse_ack(data: bytes) -> Ack:
    """An MLLP-framed ACK, decoded strictly in the set its MSH-18 names."""
    assert data.startswith(SB) and data.endswith(EB + CR), data[:80]
    body = data[1:-2]
    fields = body.split(CR, 1)[0].split(b"|")
    charset = fields[17].decode("ascii") if len(fields) > 17 else ""
    message = hl7.parse(body.decode(ACK_CODECS[charset]))
    msa = message.segment("MSA")
    try:
        err = message.segment("ERR")
        location, code = str(err(2)), str(err.extract_field(1, 3, 1, 1, 1))
        text = str(err(8)) if len(err) > 8 else ""
    except KeyError:
        location, code, text = "", "", ""
    return Ack(str(msa(1)), str(msa(2)), str(msa(3)) if len(msa) > 3 else "", location, code,
               text)


def msh(control_id: str, message_type: str, *, sender: str = "RIS",
        charset: str = "") -> str:
    fields = ["MSH", "^~\\&", sender, "HOSP", "PACS-EDGE", "IMAGING", "20240102083000", "",
              message_type, control_id, "P", "2.5"]
    if charset:
        fields += ["", "", "", "", "", charset]
    return "|".join(fields)


def pid(patient_id: str = "PAT1", name: str = "DOE^JANE", birth: str = "19700101",
        sex: str = "F", issuer: str = "HOSP") -> str:
    return f"PID|1||{patient_id}^^^{issuer}||{name}||{birth}|{sex}"


def orm(control_id: str, control: str = "NW", *, accession: str = "ACC1",
        patient_id: str = "PAT1", name: str = "DOE^JANE", study_uid: str = "",
        start: str = "202401021030", modality: str = "CT", station: str = "CT1",
        procedure: str = "CTHEAD^CT head^LOCAL") -> str:
    segments = [
        msh(control_id, "ORM^O01^ORM_O01"), pid(patient_id, name),
        "PV1|1|O||||||1234^WELBY^MARCUS",
        f"ORC|{control}|PL{accession}|FL{accession}||||^^^{start}^^R",
        f"OBR|1|PL{accession}|FL{accession}|{procedure}||||||||||||||{accession}|RP{accession}"
        f"|SPS{accession}|{station}|||{modality}",
    ]
    if study_uid:
        segments.append(f"ZDS|{study_uid}^PACS^Application^DICOM")
    return "\r".join(segments) + "\r"


def omi(control_id: str, control: str = "NW", *, accession: str = "ACC2",
        patient_id: str = "PAT1", study_uid: str = "1.2.826.0.1.3680043.8.498.77",
        station: str = "MR1") -> str:
    return "\r".join([
        msh(control_id, "OMI^O23^OMI_O23"), pid(patient_id),
        f"ORC|{control}|PL{accession}|FL{accession}",
        "TQ1|1||||||20240103141500",
        f"OBR|1|PL{accession}|FL{accession}|MRKNEE^MR knee^LOCAL",
        f"IPC|{accession}|RP{accession}|{study_uid}|SPS{accession}|MR||MRSTATION|ROOM2|{station}",
    ]) + "\r"


def adt(control_id: str, event: str, *, patient_id: str = "PAT1", name: str = "DOE^JANE",
        birth: str = "19700101", sex: str = "F", prior: str = "", issuer: str = "HOSP") -> str:
    segments = [msh(control_id, f"ADT^{event}^ADT_A01"), "EVN|" + event,
                pid(patient_id, name, birth, sex, issuer)]
    if prior:
        segments.append(f"MRG|{prior}^^^{issuer}")
    return "\r".join(segments) + "\r"


def send(port: int, message: str | bytes) -> Ack:
    """One message with python-hl7's MLLP client; the ACK parsed."""
    with MLLPClient(HOST, port) as client:
        client.socket.settimeout(TIMEOUT)
        return parse_ack(_complete(client.socket, client.send_message(message)))


def send_many(port: int, messages: list[str]) -> list[Ack]:
    """Messages on one MLLP connection (python-hl7's client), each ACK awaited in turn."""
    with MLLPClient(HOST, port) as client:
        client.socket.settimeout(TIMEOUT)
        return [parse_ack(_complete(client.socket, client.send_message(message)))
                for message in messages]


def _complete(sock: socket.socket, data: bytes) -> bytes:
    """MLLPClient reads once; read on until the end of the block."""
    deadline = time.monotonic() + TIMEOUT
    while not data.endswith(EB + CR) and time.monotonic() < deadline:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def frame(message: str | bytes) -> bytes:
    body = message.encode("utf-8") if isinstance(message, str) else message
    return SB + body + EB + CR


def raw(port: int, *, source: str = "") -> socket.socket:
    """A plain TCP connection to the listener, from `source` if given."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(TIMEOUT)
    if source:
        sock.bind((source, 0))
    sock.connect((HOST, port))
    return sock


def read_ack(sock: socket.socket) -> Ack:
    return parse_ack(_complete(sock, sock.recv(4096)))


def read_acks(sock: socket.socket, count: int) -> list[Ack]:
    """The next `count` ACKs of a connection that was sent several messages at once: one
    read may hold more than one ACK (read_ack would take the first and drop the rest)."""
    data = b""
    deadline = time.monotonic() + TIMEOUT
    while data.count(EB + CR) < count and time.monotonic() < deadline:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    blocks = [block + EB + CR for block in data.split(EB + CR)[:-1]]
    assert len(blocks) == count, data[-200:]
    return [parse_ack(block) for block in blocks]


def read_ack_unless_closed(sock: socket.socket) -> Ack | None:
    """The next ACK, or None when the server closed the connection (or died) instead."""
    first = sock.recv(4096)
    return parse_ack(_complete(sock, first)) if first else None


def closed_by_peer(sock: socket.socket, timeout: float = TIMEOUT) -> bool:
    """True when the server closes the connection (EOF or reset) within `timeout`."""
    sock.settimeout(timeout)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
