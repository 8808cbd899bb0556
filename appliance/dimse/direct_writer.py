"""Responses written straight to an association's socket, not through its DUL thread.

pynetdicom sends every PDU from the DUL thread: the thread that produced a
response queues it, wakes the DUL, whose state machine encodes and writes it:
for C-FIND, one wake-up per match (dimse/find_scp.py). A response whose
bytes are already framed can be written by the producing thread instead, under
the lock every write of the DUL takes (compat.share_send_lock), so PDUs never
interleave.

Only on a plain TCP socket (an SSL socket must not be written by one thread
while another reads it) and only while the association is established (Sta6)
with nothing queued for the DUL to send first: anything else goes through
pynetdicom as before.
"""

from __future__ import annotations

import ssl
from typing import Any

from appliance.base import compat

WRITE_BATCH = 1 << 16  # bytes of pending responses gathered per socket write


class DirectWriter:
    """PDUs written straight to a plain TCP socket, in batches, under the lock every
    write of the DUL takes."""

    def __init__(self, assoc: Any, sock: Any) -> None:
        self.assoc = assoc
        self.sock = sock
        self.buffer: list[bytes] = []
        self.size = 0

    @classmethod
    def for_association(cls, assoc: Any) -> DirectWriter | None:
        """A writer for `assoc`, or None where its PDUs must go through its DUL."""
        sock = getattr(assoc.dul.socket, "socket", None)
        if sock is None or isinstance(sock, ssl.SSLSocket):
            return None
        if str(assoc.dul.state_machine.current_state) != "Sta6":
            return None
        if not assoc.dul.to_provider_queue.empty():
            return None  # the DUL has PDUs to send first
        return cls(assoc, sock)

    def add(self, pdu: bytes) -> None:
        self.buffer.append(pdu)
        self.size += len(pdu)
        if self.size >= WRITE_BATCH:
            self.write()

    def write(self) -> None:
        """Send what is buffered; raises OSError when the socket is broken."""
        if not self.buffer:
            return
        data, self.buffer, self.size = b"".join(self.buffer), [], 0
        with compat.share_send_lock(self.assoc.dul):
            self.sock.sendall(data)
        compat.note_transport_activity(self.assoc.dul)
