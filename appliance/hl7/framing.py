"""MLLP framing with bounds: the blocks of one connection, read in chunks, so that the
silence before a block, the silence inside it and the time it takes are bounded apart.

- Before a block (the RIS has nothing to send): at most ``idle_timeout`` of silence,
  then `Idle`.
- Inside a block, from its first byte: each read waits at most ``idle_timeout`` (a
  sender that stops mid-message: `Stalled`), and the whole block takes at most
  ``message_timeout`` (one that trickles bytes to hold its connection: `Overdue`).
  A long message whose first byte comes late in the idle window is read to its end:
  bounding it by what was left of that window cut off a RIS sending steadily.
- A block is at most ``max_bytes`` without its framing (`TooLarge`): the bytes held
  per connection stay about that plus a few chunks (the block, read a chunk at a
  time, and the stream's own buffer, which the listener limits to a chunk or two).

A block ends at <FS> alone; the <CR> (and LF) that end the last block are skipped one
by one before the next, so a sender that ends its blocks with <FS><CR><LF>, or with
<FS> alone, is read as one that follows MLLP (<FS> is never part of HL7 text). Anything
else before the next <VT>, blank lines too, belongs to the next block, which must then
begin with <VT> (`InvalidBlockError`); a flood of line breaks is a block too large.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from hl7.mllp import InvalidBlockError
from hl7.mllp.streams import END_BLOCK, START_BLOCK

CHUNK = 65536  # bytes asked of the stream per read


class BlockTimeout(TimeoutError):
    """The connection is closed for its silence or slowness; `event` is the log line."""

    event = ""


class Idle(BlockTimeout):
    event = "hl7 connection idle, closed"


class Stalled(BlockTimeout):
    event = "hl7 message stalled, connection closed"


class Overdue(BlockTimeout):
    event = "hl7 message not finished within message_timeout, connection closed"


class TooLarge(Exception):
    """A block longer than ``max_bytes``: the listener answers AR and closes."""


class BlockReader:
    def __init__(self, reader: asyncio.StreamReader, *, max_bytes: int, idle_timeout: float,
                 message_timeout: float) -> None:
        self._reader = reader
        self._max_bytes = max_bytes
        self._idle_timeout = idle_timeout
        self._message_timeout = message_timeout
        self._pending = bytearray()  # read from the stream, not yet part of a block

    async def next_block(self, started: Callable[[], None]) -> bytes:
        """The next block without its framing; `started` is called at its first byte.
        Raises a `BlockTimeout`, `TooLarge`, `InvalidBlockError`, or
        `asyncio.IncompleteReadError` when the peer closes mid-block (or before one)."""
        idle_until = time.monotonic() + self._idle_timeout
        first = await self._byte(idle_until)
        for trailer in (b"\r", b"\n"):
            if first == trailer:
                first = await self._byte(idle_until)
        started()
        block = bytearray(first)
        if first != END_BLOCK:
            await self._until_end(block, time.monotonic() + self._message_timeout)
        if first != START_BLOCK:
            block = block.lstrip(b"\r\n")
            if not block.startswith(START_BLOCK):
                raise InvalidBlockError("Block does not begin with Start Block character <VT>")
        return bytes(block[1:-1])

    async def _byte(self, idle_until: float) -> bytes:
        if not self._pending:
            await self._fill(idle_until, Idle)
        first = bytes(self._pending[:1])
        del self._pending[:1]
        return first

    async def _until_end(self, block: bytearray, deadline: float) -> None:
        """Move pending bytes into `block` up to its <FS>, reading on as needed: each
        read waits at most idle_timeout, and none goes past `deadline`."""
        while True:
            end = self._pending.find(END_BLOCK)
            taken = len(self._pending) if end < 0 else end + 1
            block += self._pending[:taken]
            del self._pending[:taken]
            if len(block) - (end >= 0) > self._max_bytes:  # without the <FS>
                raise TooLarge
            if end >= 0:
                return
            stalled_at = time.monotonic() + self._idle_timeout
            if deadline < stalled_at:
                await self._fill(deadline, Overdue)
            else:
                await self._fill(stalled_at, Stalled)

    async def _fill(self, until: float, timeout: type[BlockTimeout]) -> None:
        """One read into pending; `timeout` when nothing came by `until`."""
        wait = until - time.monotonic()
        if wait <= 0:
            raise timeout
        try:
            chunk = await asyncio.wait_for(self._reader.read(CHUNK), wait)
        except TimeoutError:
            raise timeout from None
        if not chunk:
            raise asyncio.IncompleteReadError(bytes(self._pending), None)
        self._pending += chunk
