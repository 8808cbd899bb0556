"""Read the indexed elements of a deflated dataset with bounded memory and work.

Deflated Explicit VR Little Endian (1.2.840.10008.1.2.1.99, PS3.5 A.5) compresses
the whole dataset with raw deflate, and deflate reaches ~1000:1 on repetitive data:
a 0.8 MB instance can inflate to 800 MB. pydicom inflates the whole stream into
memory before parsing (twice over: the inflated bytes and their copy), so a peer
could make the server grow by gigabytes with one small C-STORE. Here:

- the stream is inflated in chunks of at most `CHUNK` bytes, counted as they come:
  past `limit` bytes in total, InflateLimitExceeded, whatever the ratio;
- the top-level elements are walked without decoding them. Only the ones asked for
  (the index's attributes, each at most `MAX_VALUE` bytes) are kept; every other
  value is skipped as it is inflated, sequences of undefined length included (their
  nesting is counted, never built), and at most `MAX_ELEMENTS` element headers are
  walked, so a stream of millions of empty items costs seconds, not minutes;
- every top-level element is walked, since writers put elements out of tag order
  and some give one twice (the later is kept, as for every other transfer syntax:
  docs/conformance.md, "Non-conformant data sets"); past the highest tag asked for,
  elements that do not parse (a trailing pad) end the walk rather than refuse the
  instance, as the other syntaxes' readers tolerate them. The rest of the stream is
  then inflated and thrown away, to prove it complete and within the limit.

Memory stays at a chunk plus the kept values. The stored file is never touched:
this only reads it.
"""

from __future__ import annotations

import struct
import zlib
from typing import BinaryIO

from appliance.base.errors import InflateLimitExceeded, InvalidInstance
from appliance.services.element_encoding import (
    ITEM,
    ITEM_END,
    LONG_VRS,
    SEQUENCE_END,
    UNDEFINED_LENGTH,
)

CHUNK = 1 << 20
MAX_VALUE = 64 << 10
MAX_ELEMENTS = 1_000_000
MAX_DEPTH = 64

_SEQUENCE, _ITEM_DATASET = "sequence", "item"


def read_deflated_elements(fh: BinaryIO, wanted: frozenset[int], *, limit: int) -> bytes:
    """The top-level elements of `wanted` from the deflated dataset at `fh`'s position,
    as Explicit VR Little Endian bytes (their headers and values as they were inflated).

    Raises InflateLimitExceeded past `limit` inflated bytes, InvalidInstance when the
    stream is corrupt or truncated or the elements are malformed.
    """
    source = _Inflater(fh, limit)
    walker = _Walker(source)
    kept: dict[int, bytes] = {}  # tag -> the element, the later one of a tag given twice
    try:
        walker.walk(wanted, kept)
    except InvalidInstance:
        if not walker.past(max(wanted)):
            raise
    source.drain()
    return b"".join(kept.values())


class _Inflater:
    """A raw deflate stream from `fh`, inflated `CHUNK` bytes at a time and counted."""

    def __init__(self, fh: BinaryIO, limit: int) -> None:
        self._fh = fh
        self._limit = limit
        self._z = zlib.decompressobj(-zlib.MAX_WBITS)
        self._buffer = b""
        self._pos = 0
        self.inflated = 0

    def read(self, n: int) -> bytes:
        """Up to `n` bytes; fewer only at the end of the stream."""
        while len(self._buffer) - self._pos < n and self._more():
            pass
        out = self._buffer[self._pos:self._pos + n]
        self._pos += len(out)
        return out

    def read_exactly(self, n: int) -> bytes:
        out = self.read(n)
        if len(out) < n:
            raise InvalidInstance("dataset is truncated")
        return out

    def skip(self, n: int) -> None:
        while n:
            if self._pos == len(self._buffer) and not self._more():
                raise InvalidInstance("dataset is truncated")
            step = min(n, len(self._buffer) - self._pos)
            self._pos += step
            n -= step

    def drain(self) -> None:
        """Inflate the rest of the stream and throw it away."""
        while self._more():
            self._pos = len(self._buffer)

    def _more(self) -> bool:
        """Inflate the next chunk onto the unread part of the buffer; False at the end.

        Bytes after the end of the deflate stream are ignored, as zlib does: PS3.5
        A.5 pads an odd-length stream with a null byte, and some writers pad more.
        """
        while not self._z.eof:
            data = self._z.unconsumed_tail or self._fh.read(CHUNK)
            if not data:
                raise InvalidInstance("deflated dataset is truncated")
            try:
                out = self._z.decompress(data, CHUNK)
            except zlib.error as exc:
                raise InvalidInstance("deflated dataset is corrupt") from exc
            if out:
                self.inflated += len(out)
                if self.inflated > self._limit:
                    raise InflateLimitExceeded(self._limit)
                self._buffer = self._buffer[self._pos:] + out
                self._pos = 0
                return True
        return False


class _Walker:
    """Element headers of Explicit VR Little Endian data, counted against MAX_ELEMENTS."""

    def __init__(self, source: _Inflater) -> None:
        self._source = source
        self._count = 0
        self._highest = -1  # the highest top-level tag walked so far

    def past(self, tag: int) -> bool:
        """Whether a top-level element above `tag` was walked."""
        return self._highest > tag

    def walk(self, wanted: frozenset[int], kept: dict[int, bytes]) -> None:
        """Walk the top-level elements to the end, keeping those of `wanted` in `kept`."""
        while (element := self.header()) is not None:
            tag, length, raw = element
            self._highest = max(self._highest, tag)
            if tag in wanted:
                if length == UNDEFINED_LENGTH or length > MAX_VALUE:
                    raise InvalidInstance("an indexed attribute is too long")
                kept[tag] = raw + self._source.read_exactly(length)
            elif length == UNDEFINED_LENGTH:
                self.skip_undefined()
            else:
                self._source.skip(length)

    def header(self) -> tuple[int, int, bytes] | None:
        """(tag, value length, header bytes) of the next element; None at the end."""
        raw = self._source.read(8)
        if not raw:
            return None
        if len(raw) < 8:
            raise InvalidInstance("dataset is truncated")
        self._count += 1
        if self._count > MAX_ELEMENTS:
            raise InvalidInstance(f"more than {MAX_ELEMENTS} elements")
        group, element = struct.unpack_from("<HH", raw)
        vr = raw[4:6]
        if vr in LONG_VRS and group != 0xFFFE:
            extra = self._source.read_exactly(4)
            return group << 16 | element, struct.unpack("<I", extra)[0], raw + extra
        if group == 0xFFFE or not (vr.isalpha() and vr.isupper()):
            # Items and delimiters have no VR; a writer switching to implicit VR inside
            # a sequence (pydicom tolerates it) neither.
            return group << 16 | element, struct.unpack_from("<I", raw, 4)[0], raw
        return group << 16 | element, struct.unpack_from("<H", raw, 6)[0], raw

    def skip_undefined(self) -> None:
        """Skip a value of undefined length: items up to the Sequence Delimitation Item,
        where an item of undefined length holds elements up to its Item Delimitation Item.
        Encapsulated pixel data has the same shape (items of defined length)."""
        open_values = [_SEQUENCE]
        while open_values:
            element = self.header()
            if element is None:
                raise InvalidInstance("dataset is truncated")
            tag, length, _raw = element
            if open_values[-1] == _SEQUENCE:
                if tag == SEQUENCE_END:
                    open_values.pop()
                    continue
                if tag != ITEM:
                    raise InvalidInstance("a sequence holds something other than items")
            elif tag == ITEM_END:
                open_values.pop()
                continue
            if length != UNDEFINED_LENGTH:
                self._source.skip(length)
                continue
            open_values.append(_ITEM_DATASET if open_values[-1] == _SEQUENCE else _SEQUENCE)
            if len(open_values) > MAX_DEPTH:
                raise InvalidInstance(f"sequences nested more than {MAX_DEPTH} deep")
