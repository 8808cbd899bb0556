"""A seeded fuzz of the MLLP listener of a real `pacs-edge serve`.

Each step takes a valid ORM, OMI or ADT message as the other HL7 tests send it,
damages it (bit flips, odd MSH-2 and field separators, missing or repeated
segments, non-UTF-8 bytes, very long or repeated fields, other segment
terminators) and frames it, or not (no <VT>, no <FS><CR>, blocks over the size
limit, several blocks at once, garbage around them), then writes it in pieces
with pauses, and either reads every answer after a half-close, closes abruptly, or
goes silent. What the listener promises (appliance/hl7/listener.py):

- every complete block (ended by <FS><CR>) is answered by one well-formed ACK
  (AA, AE or AR), in order; a block over max_message_bytes is answered AR and the
  connection closed; an unfinished block at EOF is dropped, unanswered;
- a silent connection is closed after idle_timeout;
- after every step a valid new order is acknowledged AA within a few seconds, no
  exception escaped into the serve log, and the server's RSS stays under a cap;
- at the end every order acknowledged AA is in the worklist, as sent.

PACS_EDGE_FUZZ_SEED and PACS_EDGE_FUZZ_STEPS choose the inputs (tests/fuzzing.py).
"""

from __future__ import annotations

import json
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import fuzzing
import hl7peer
import pytest
from conftest import EdgeServer

STEPS = fuzzing.steps(400)
LIMIT = 16384  # [hl7] max_message_bytes
IDLE = 2.0  # [hl7] idle_timeout: silent connections must be gone soon after
MAX_CONNECTIONS = 8
ANSWER_DEADLINE = 15.0  # for all the answers of one step's connection
VALID_ACK_SECONDS = 10.0
RSS_GROWTH_KB = 96 * 1024  # far above what bounded connections can use
SB, EB, CR = hl7peer.SB, hl7peer.EB, hl7peer.CR
ENCODING_CHARS = [b"^~\\&", b"^~\\&#", b"^~", b"^^\\&", b"", b"\x00\x01\x02\x03", b"^~\\\xff",
                  b"||||", b"abcd", b"^~\\\r", b"^ \\&", b"\xc3\xa9~\\&"]
SEPARATORS = [b"#", b"\t", b"^", b" ", b"\x00", b"\xc3", b"\r", b"\\", b"A"]
ODD_VALUES = [b"", b"~~~~", b"^^^^", b"\\E\\", b"\\X0D\\", b"\\", b"&&&", b"M\xfcller",
              b"\xff\xfe\xfd", "Müller".encode(), b"\x00", b"20241399", b"-1", b"~a~b~c~",
              b"1.2.3.04", b"9" * 80, "\u202e".encode()]
CHARSETS = [b"8859/1", b"UNICODE UTF-8", b"ASCII", b"8859/15", b"KLINGON", b"", b"\xff"]
MESSAGE_TYPES = [b"ORM^O01^ORM_O01", b"OMI^O23^OMI_O23", b"ADT^A04^ADT_A01", b"ADT^A08",
                 b"ADT^A40^ADT_A39", b"ORU^R01", b"ACK", b"^", b"", b"ORM^O01^ORM_O01^X^Y"]


@dataclass
class Fuzz:
    server: EdgeServer
    port: int
    rng: random.Random
    valid: dict[str, str] = field(default_factory=dict)  # accession -> patient ID
    held: list[tuple[socket.socket, float]] = field(default_factory=list)
    peak_rss_kb: int = 0


@pytest.fixture
def fuzz(edge_server_factory: Callable[..., EdgeServer],
         free_port: Callable[[], int]) -> Fuzz:
    server = edge_server_factory(start=False)
    port = free_port()
    hl7peer.listen(server, port, max_message_bytes=LIMIT, idle_timeout=IDLE,
                   max_connections=MAX_CONNECTIONS)
    server.start()
    return Fuzz(server, port, random.Random(fuzzing.SEED))


# --- inputs -----------------------------------------------------------------------

def _base(rng: random.Random, step: int) -> bytes:
    """A valid message of the kinds the other tests send; keys never those of valid orders."""
    control, accession, patient = f"M{step}", f"MUT{step}", f"MUTP{step}"
    kind = rng.randrange(6)
    if kind == 0:
        text = hl7peer.orm(control, accession=accession, patient_id=patient)
    elif kind == 1:
        text = hl7peer.orm(control, rng.choice(["CA", "DC", "XO"]), accession=accession,
                           patient_id=patient)
    elif kind == 2:
        text = hl7peer.omi(control, accession=accession, patient_id=patient,
                           study_uid=f"1.2.826.0.1.3680043.8.498.78.{step}")
    elif kind == 3:
        text = hl7peer.adt(control, rng.choice(["A04", "A08"]), patient_id=patient)
    elif kind == 4:
        text = hl7peer.adt(control, "A40", patient_id=patient, prior=f"MUTQ{step}")
    else:
        text = hl7peer.orm(control, accession=accession, patient_id=patient,
                           study_uid=f"1.2.826.0.1.3680043.8.498.79.{step}")
    return text.encode("utf-8")


def _fields(message: bytes) -> list[list[bytes]]:
    return [segment.split(b"|") for segment in message.split(b"\r")]


def _join(segments: list[list[bytes]]) -> bytes:
    return b"\r".join(b"|".join(fields) for fields in segments)


def _mutate(rng: random.Random, message: bytes) -> bytes:
    kind = rng.randrange(12)
    data = bytearray(message)
    if kind == 0:  # bit flips
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        return bytes(data)
    if kind == 1:  # bytes inserted and deleted
        for _ in range(rng.randint(1, 6)):
            at = rng.randrange(len(data) + 1)
            if rng.random() < 0.5:
                data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 4)))
            else:
                del data[at:at + rng.randint(1, 4)]
        return bytes(data)
    if kind == 2:  # MSH-2
        return b"MSH|" + rng.choice(ENCODING_CHARS) + message[len(b"MSH|^~\\&"):]
    if kind == 3:  # another field separator, everywhere or in MSH-1 only
        sep = rng.choice(SEPARATORS)
        return message.replace(b"|", sep) if rng.random() < 0.5 else b"MSH" + sep + message[4:]
    segments = _fields(message.rstrip(b"\r"))
    if kind == 4:  # a segment missing
        del segments[rng.randrange(len(segments))]
    elif kind == 5:  # a segment repeated
        at = rng.randrange(len(segments))
        segments[at:at] = [segments[at]] * rng.randint(1, 5)
    elif kind == 6:  # odd values in random fields
        for _ in range(rng.randint(1, 4)):
            fields = rng.choice(segments)
            fields[rng.randrange(1, len(fields)) if len(fields) > 1 else 0] = rng.choice(
                ODD_VALUES)
    elif kind == 7:  # a very long or much-repeated field (sometimes over the limit)
        fields = rng.choice(segments)
        value = (b"X" * rng.choice([300, 4000, LIMIT // 2, LIMIT * 2]) if rng.random() < 0.5
                 else b"~".join([b"R"] * rng.randint(10, 2000)))
        fields.append(value)
    elif kind == 8:  # MSH-18 character set, with bytes that may not fit it
        segments[0] = segments[0][:12] + [b""] * 5 + [rng.choice(CHARSETS)]
        segments[-1].append(rng.choice([b"M\xfcller", "Müller".encode(), b"\xa4\xbe"]))
    elif kind == 9:  # message type, version, control ID
        msh = segments[0] + [b""] * (12 - len(segments[0]))
        segments[0] = msh
        where = rng.choice([8, 9, 11])
        msh[where] = (rng.choice(MESSAGE_TYPES) if where == 8
                      else rng.choice([b"", b"3.0", b"2.9.9", b"X" * 200, b"~", b"2.5"]))
    elif kind == 10:  # many small segments
        segments += [[b"NTE", str(n).encode(), b"", b"note"] for n in range(rng.randint(1, 900))]
    else:  # empty segments and empty fields
        segments.insert(rng.randrange(len(segments) + 1), [b""])
        segments[rng.randrange(len(segments))] = [b"PID"] + [b""] * rng.randint(0, 30)
    ending = rng.choice([b"\r", b"\n", b"\r\n", b""])
    return _join(segments).replace(b"\r", ending if ending else b"\r") + ending


def _framed(rng: random.Random, body: bytes) -> bytes:
    kind = rng.randrange(10)
    if kind < 4:
        return SB + body + EB + CR
    return {
        4: lambda: body + EB + CR,  # no <VT>
        5: lambda: SB + body,  # never ended
        6: lambda: SB + body + EB,  # <FS> without <CR>: answered as well
        7: lambda: b"junk" + SB + body + EB + CR,
        8: lambda: SB + SB + body + EB + CR + EB + CR,
        9: lambda: SB + EB + CR + SB + body + EB + CR + rng.randbytes(rng.randint(0, 64)),
    }[kind]()


def _payload(rng: random.Random, step: int) -> bytes:
    kind = rng.randrange(10)
    if kind == 0:  # one block over the limit, sometimes far over it
        size = rng.choice([LIMIT + 1, LIMIT * 4, 1 << 20])
        return SB + b"MSH|^~\\&|" + rng.randbytes(size) + EB + CR
    if kind == 1:  # random bytes, sometimes with framing bytes in them
        noise = bytearray(rng.randbytes(rng.randint(1, 3000)))
        for _ in range(rng.randint(0, 4)):
            noise[rng.randrange(len(noise)):0] = rng.choice([SB, EB + CR, CR])
        return bytes(noise)
    if kind == 2:  # several messages at once, some damaged
        return b"".join(_framed(rng, _mutate(rng, _base(rng, step)) if rng.random() < 0.7
                                else _base(rng, step)) for _ in range(rng.randint(2, 5)))
    message = _base(rng, step)
    for _ in range(rng.randint(1, 3)):
        message = _mutate(rng, message)
    return _framed(rng, message)


# --- what the listener must answer -------------------------------------------------

def _expected_answers(payload: bytes) -> tuple[int, bool]:
    """(ACKs the listener owes for `payload` followed by EOF, whether it closes early):
    one per block ended by <FS> (the <CR> after it is skipped with the next block's
    leading line breaks, and counts towards its length), and an AR that ends the
    connection for the first block (or unfinished tail) longer than the limit."""
    *blocks, tail = payload.split(EB)
    for n, block in enumerate(blocks):
        if len(block) > LIMIT:
            return n + 1, True
    return len(blocks) + (len(tail) > LIMIT), len(tail) > LIMIT


def _read_to_eof(sock: socket.socket) -> tuple[bytes, bool]:
    """Everything the server sends until it closes (or ANSWER_DEADLINE); and whether it
    reset the connection (a close with unread input sends RST, which may drop answers)."""
    data = b""
    deadline = time.monotonic() + ANSWER_DEADLINE
    while time.monotonic() < deadline:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            return data, True
        except TimeoutError:
            break
        if not chunk:
            return data, False
        data += chunk
    raise AssertionError(f"the listener neither answered nor closed within {ANSWER_DEADLINE}s"
                         f" (got {data[:200]!r})")


def _acks(data: bytes) -> list[hl7peer.Ack]:
    acks = []
    for block in data.split(EB + CR)[:-1]:
        assert block.startswith(SB) and SB not in block[1:], block[:200]
        ack = hl7peer.parse_ack(block + EB + CR)
        assert ack.code in ("AA", "AE", "AR"), ack
        acks.append(ack)
    assert data.endswith(EB + CR) or not data, data[-200:]
    return acks


def _hostile(fuzz: Fuzz, step: int) -> str:
    rng = fuzz.rng
    payload = _payload(rng, step)
    ending = rng.choices(["read", "abort", "silent"], weights=[85, 12, 3])[0]
    sock = hl7peer.raw(fuzz.port)
    sent = fuzzing.send_in_pieces(rng, sock, payload, sizes=(1, 7, 100, 4096),
                                  pause_chance=0.1)
    if ending == "abort":
        if rng.random() < 0.5:  # RST rather than FIN
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        sock.close()
        return "abort"
    if ending == "silent" and sent and not payload.endswith(EB + CR):
        fuzz.held.append((sock, time.monotonic()))
        return "silent"
    if sent:
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:  # the server already closed (and reset) the connection
            sent = False
    data, reset = _read_to_eof(sock)
    sock.close()
    acks = _acks(data)
    owed, closes = _expected_answers(payload)
    if closes or reset or not sent:
        assert len(acks) <= owed, (len(acks), owed)
        if closes and len(acks) == owed:
            assert acks[-1].code == "AR"
    else:
        assert len(acks) == owed, f"{len(acks)} ACKs for {owed} blocks: {payload[:300]!r}"
    return f"read acks={len(acks)}"


def _valid_order(fuzz: Fuzz, step: int) -> None:
    """A new order from a well-behaved RIS: AA within VALID_ACK_SECONDS, whatever came before."""
    accession, patient = f"VAL{step}", f"VALP{step}"
    if fuzz.rng.random() < 0.5:
        message = hl7peer.orm(f"V{step}", accession=accession, patient_id=patient)
    else:
        message = hl7peer.omi(f"V{step}", accession=accession, patient_id=patient,
                              study_uid=f"1.2.826.0.1.3680043.8.498.77.{step + 1}")
    started = time.monotonic()
    ack = hl7peer.send(fuzz.port, message)
    assert (ack.code, ack.control_id) == ("AA", f"V{step}"), ack
    assert time.monotonic() - started < VALID_ACK_SECONDS
    fuzz.valid[accession] = patient


def _check_held(fuzz: Fuzz, *, all_of_them: bool = False) -> None:
    """Silent connections older than the idle timeout (and a margin) must be closed."""
    keep = []
    for sock, since in fuzz.held:
        if not all_of_them and time.monotonic() - since < IDLE + 5:
            keep.append((sock, since))
            continue
        wait = max(0.1, since + IDLE + 10 - time.monotonic())
        assert hl7peer.closed_by_peer(sock, wait), "a silent connection outlived idle_timeout"
        sock.close()
    fuzz.held = keep


def _after_step(fuzz: Fuzz, step: int, what: str) -> None:
    server = fuzz.server
    assert server.running, f"serve died at step {step} ({what}):\n{server.log()[-3000:]}"
    _valid_order(fuzz, step)
    assert not fuzzing.unhandled(server), (step, what, fuzzing.unhandled(server))
    fuzz.peak_rss_kb = max(fuzz.peak_rss_kb, fuzzing.rss_kb(server.pid))


def test_mllp_listener_answers_random_frames_and_keeps_every_valid_order(fuzz: Fuzz) -> None:
    _valid_order(fuzz, -1)
    baseline_kb = fuzzing.rss_kb(fuzz.server.pid)
    step = -1
    try:
        for step in range(STEPS):
            what = _hostile(fuzz, step)
            _check_held(fuzz)
            _after_step(fuzz, step, what)
        _check_held(fuzz, all_of_them=True)
    except AssertionError as exc:
        raise AssertionError(f"PACS_EDGE_FUZZ_SEED={fuzzing.SEED} step {step}: {exc}") from exc
    finally:
        for sock, _ in fuzz.held:
            sock.close()
    orders = json.loads(fuzz.server.cli("worklist", "list", "--json").stdout)
    found = {o["accession_number"]: o for o in orders}
    for accession, patient in fuzz.valid.items():
        assert accession in found, f"acknowledged order {accession} is missing"
        assert (found[accession]["patient_id"], found[accession]["status"]) == (
            patient, "SCHEDULED")
    growth = fuzz.peak_rss_kb - baseline_kb
    assert growth < RSS_GROWTH_KB, f"serve grew by {growth} KiB over {STEPS} steps"
