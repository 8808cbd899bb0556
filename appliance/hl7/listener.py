"""The MLLP listener: HL7 v2 messages in, ACKs out, on the serving process's loop.

Thin edge: it frames (python-hl7's asyncio MLLP server and stream reader),
checks the sender's host against the allowlist (permission ``hl7``),
translates with messages.py, calls the order service and maps its outcome
to an ACK (ack.py). The AA is written only after the service returned, i.e.
after the effect was committed (fsync of the WAL).

Bounds, so a slow, silent or hostile sender cannot exhaust the box:
- a message (one MLLP block) is at most ``[hl7] max_message_bytes``, read a
  chunk at a time (framing.py), so about that is buffered per connection; a
  larger one is answered AR and the connection closed;
- a connection silent for ``[hl7] idle_timeout`` seconds before a message, or
  inside one, is closed, and so is one whose message is not in within
  ``[hl7] message_timeout`` of its first byte; every write waits at most
  ``idle_timeout``;
- at most ``[hl7] max_connections`` connections are open: a new one closes
  the connection that has been idle longest (one with a message in hand,
  arriving or being applied, is never cut), or is itself closed when every
  one has; a message still arriving keeps its slot at most ``message_timeout``,
  so a sender trickling bytes cannot hold it;
- a connection from a host that is not an hl7 peer is closed before a byte
  is read (the refusal is audited, counted per address).

A message rejected before any order in it is understood (a frame that is not
MLLP or too large, a message that cannot be parsed, an unsupported type, a
processing ID this box does not apply) is told to `on_rejected` (the audit:
one failed record per sender, address and reason in a window).

Messages on one connection are answered in order, one at a time, with the one
ACK (or none) that MSH-15 and MSH-16 ask for (ack.py: original mode, or as much
of enhanced mode as one connection carries); connections are served
concurrently.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from hl7.mllp import HL7StreamReader, HL7StreamWriter, InvalidBlockError, start_hl7_server

from appliance.base.config import Hl7Config
from appliance.base.errors import PacsEdgeError
from appliance.base.metrics import HL7_MESSAGES
from appliance.hl7 import framing, messages
from appliance.hl7.ack import AckCode, Reply, reply
from appliance.hl7.messages import ErrorCode, Hl7Error
from appliance.services.orders import MessageHeader, OrderService, Outcome, Refusal
from appliance.services.peers import Allowlist

log = logging.getLogger(__name__)

STOP_GRACE = 10.0  # seconds stop() lets messages being applied finish

_REFUSAL_CODES = {
    Refusal.UNKNOWN_ORDER: ErrorCode.UNKNOWN_KEY,
    Refusal.DUPLICATE_ORDER: ErrorCode.DUPLICATE_KEY,
    Refusal.NOT_ALLOWED: ErrorCode.INTERNAL,
    Refusal.OTHER_PATIENT: ErrorCode.UNKNOWN_KEY,
}


@dataclass(frozen=True)
class Rejected:
    """A message rejected before any order in it was understood, for the audit trail:
    `reason` is stable (the ACK code, the field, the HL7 error code), `text` the one
    the sender was told."""

    sender: str
    address: str
    reason: str
    text: str
    message_type: str = ""


@dataclass(eq=False)
class _Connection:
    writer: HL7StreamWriter
    address: str
    last_active: float = field(default_factory=time.monotonic)
    receiving: bool = False  # the first byte of a block is in, its <FS> not yet
    busy: bool = False  # a message is being applied and answered


class Hl7Listener:
    def __init__(self, config: Hl7Config, allowlist: Allowlist, service: OrderService, *,
                 tls_context: ssl.SSLContext | None = None,
                 on_refused: Callable[[str, str], None] | None = None,
                 on_rejected: Callable[[Rejected], None] | None = None) -> None:
        self.config = config
        self.allowlist = allowlist
        self.service = service
        self.tls_context = tls_context
        self.on_refused = on_refused
        self.on_rejected = on_rejected
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()  # admitted: counted against the cap
        self._open: set[_Connection] = set()  # every accepted connection
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False

    async def start(self) -> int:
        """Listen; returns the bound port."""
        try:
            self._server = await start_hl7_server(
                self._accepted, self.config.host, self.config.port,
                # framing.py reads a chunk at a time: the stream needs no more.
                limit=framing.CHUNK, ssl=self.tls_context,
                ssl_handshake_timeout=self.config.idle_timeout if self.tls_context else None,
                reuse_address=True)
        except OSError as exc:
            raise PacsEdgeError(
                f"cannot listen for HL7 on {self.config.host}:{self.config.port}:"
                f" {exc.strerror or exc}",
                hint="choose another [hl7] port, or set it to 0 to turn HL7 off") from exc
        port = int(self._server.sockets[0].getsockname()[1])
        log.info("hl7 listener ready host=%s port=%d tls=%s", self.config.host, port,
                 self.tls_context is not None)
        return port

    async def stop(self) -> None:
        """Stop accepting, let messages being applied finish, close every connection."""
        self._stopping = True
        if self._server is not None:
            self._server.close()
        for connection in list(self._open):
            if not connection.busy:
                connection.writer.close()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=min(self.config.idle_timeout, STOP_GRACE))
        for task in self._tasks:
            task.cancel()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5.0)
        self._server = None

    def _accepted(self, reader: HL7StreamReader, writer: HL7StreamWriter) -> None:
        # python-hl7 does not keep the task of a coroutine callback: keep it here.
        task = asyncio.get_running_loop().create_task(self._serve(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _make_room(self) -> bool:
        """Below the connection cap, or made so by closing the longest-idle connection."""
        if len(self._connections) < self.config.max_connections:
            return True
        idle = [c for c in self._connections if not (c.receiving or c.busy)]
        if not idle:
            return False
        oldest = min(idle, key=lambda c: c.last_active)
        self._connections.discard(oldest)
        oldest.writer.close()
        log.info("hl7 connection closed to admit a new one address=%s", oldest.address)
        return True

    async def _serve(self, reader: HL7StreamReader, writer: HL7StreamWriter) -> None:
        peername = writer.get_extra_info("peername")
        address = str(peername[0]) if peername else ""
        connection = _Connection(writer, address)
        self._open.add(connection)
        try:
            peer = await asyncio.to_thread(self.allowlist.hl7_sender, address)
            if peer is None:
                log.warning("hl7 connection refused: host is not an hl7 peer address=%s",
                            address)
                if self.on_refused is not None:
                    await asyncio.to_thread(self.on_refused, address,
                                            "host is not allowed to send HL7 (permission hl7)")
                return
            if not self._make_room():
                log.warning("hl7 connection refused: every connection has a message in hand"
                            " address=%s",
                            address)
                return
            self._connections.add(connection)
            await self._messages(reader, connection, sender=peer.name)
        except (ConnectionError, TimeoutError, asyncio.IncompleteReadError, ssl.SSLError):
            pass  # the peer went away or stalled: nothing to answer
        finally:
            self._connections.discard(connection)
            self._open.discard(connection)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def _messages(self, reader: HL7StreamReader, connection: _Connection, *,
                        sender: str) -> None:
        timeout = self.config.idle_timeout
        blocks = framing.BlockReader(reader, max_bytes=self.config.max_message_bytes,
                                     idle_timeout=timeout,
                                     message_timeout=self.config.message_timeout)

        def started() -> None:
            # A sender in the middle of a long message is not idle, however long ago its
            # last ACK was, and must not be closed to admit a new connection.
            connection.receiving = True

        while True:
            connection.receiving = False
            try:
                block = await blocks.next_block(started)
            except framing.BlockTimeout as exc:
                log.info("%s address=%s", exc.event, connection.address)
                return
            except framing.TooLarge:
                log.warning("hl7 message too large, connection closed address=%s limit=%d",
                            connection.address, self.config.max_message_bytes)
                text = f"message exceeds {self.config.max_message_bytes} bytes"
                await self._rejected(sender, connection.address, AckCode.REJECT, "MSH",
                               ErrorCode.DATA_TYPE, text)
                await self._send(connection, reply(
                    AckCode.REJECT, None, location="MSH", error=ErrorCode.DATA_TYPE,
                    text=text), timeout)
                return
            except InvalidBlockError:
                log.warning("hl7 frame without start block address=%s", connection.address)
                text = "MLLP block does not begin with <VT>"
                await self._rejected(sender, connection.address, AckCode.REJECT, "MSH",
                               ErrorCode.SEGMENT_SEQUENCE, text)
                await self._send(connection, reply(
                    AckCode.REJECT, None, location="MSH", error=ErrorCode.SEGMENT_SEQUENCE,
                    text=text), timeout)
                continue
            connection.busy = True
            try:
                answer = await self._answer(block, sender=sender, address=connection.address)
                await self._send(connection, answer, timeout)
            finally:
                connection.busy = False
                connection.last_active = time.monotonic()
            if self._stopping:
                # The message in hand is answered; read no next one, or a RIS that sends
                # back to back would keep the connection, and the stop, for the whole grace.
                return

    async def _answer(self, block: bytes, *, sender: str, address: str) -> Reply:
        try:
            parsed = messages.parse(block, self.config.unnamed_charset)
        except Hl7Error as exc:
            log.info("hl7 message %s field=%s code=%d", "rejected" if exc.reject else "refused",
                     exc.location, exc.code)
            code = AckCode.REJECT if exc.reject else AckCode.ERROR
            await self._rejected(sender, address, code, exc.location, exc.code, exc.text,
                                 exc.header)
            return reply(code, exc.header, text=exc.text, location=exc.location,
                         error=exc.code)
        processing = parsed.header.processing_id.upper() or "P"
        if processing not in self.config.processing_ids:
            # A RIS's training or debugging message on a production box: its order would
            # stand on a real modality's worklist.
            log.info("hl7 message rejected field=MSH-11 code=%d",
                     ErrorCode.UNSUPPORTED_PROCESSING_ID)
            text = ("this box applies messages with processing ID "
                    f"{' or '.join(self.config.processing_ids)} only")
            await self._rejected(sender, address, AckCode.REJECT, "MSH-11",
                           ErrorCode.UNSUPPORTED_PROCESSING_ID, text, parsed.header)
            return reply(AckCode.REJECT, parsed.header, location="MSH-11",
                         error=ErrorCode.UNSUPPORTED_PROCESSING_ID, text=text)
        try:
            outcome = await self.service.apply(parsed.header, parsed.request, sender=sender,
                                               address=address)
        except PacsEdgeError as exc:
            log.error("hl7 message not applied type=%s error=%s", parsed.header.message_type,
                      type(exc).__name__)
            return reply(AckCode.REJECT, parsed.header, error=ErrorCode.INTERNAL,
                         text="the box could not apply the message now; resend it")
        if outcome.accepted:
            for note in parsed.notes:  # the field and why, never its value (PHI)
                log.info("hl7 field not stored as sent type=%s field=%s reason=%s",
                         parsed.header.message_type, note.location, note.reason)
        return _ack_for(outcome, parsed)

    async def _rejected(self, sender: str, address: str, ack: AckCode, location: str,
                        code: ErrorCode, text: str, header: MessageHeader | None = None
                        ) -> None:
        """Tell `on_rejected`, in a thread: the audit may fsync before the ACK goes, and
        the event loop serves every other connection meanwhile."""
        if self.on_rejected is not None:
            await asyncio.to_thread(self.on_rejected, Rejected(
                sender, address, f"{ack.value} {location} {code.name.lower()}", text,
                header.message_type if header is not None else ""))

    async def _send(self, connection: _Connection, answer: Reply, timeout: float) -> None:
        HL7_MESSAGES.labels(answer.code.value).inc()
        if answer.ack is None:
            return  # the sender asked for no acknowledgement (MSH-15, MSH-16)
        connection.writer.writeblock(answer.ack)
        await asyncio.wait_for(connection.writer.drain(), timeout)


def _ack_for(outcome: Outcome, parsed: messages.Parsed) -> Reply:
    if outcome.accepted:
        return reply(AckCode.ACCEPT, parsed.header,
                     text="duplicate: already applied" if outcome.duplicate else outcome.text,
                     notes=parsed.notes)
    assert outcome.refusal is not None
    return reply(AckCode.ERROR, parsed.header, text=outcome.text, location=outcome.location,
                 error=_REFUSAL_CODES[outcome.refusal])
