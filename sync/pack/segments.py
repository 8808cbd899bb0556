"""The pack blob's byte layout: header, AEAD segments, and range arithmetic.

A pack blob is a 32-byte header followed by segments::

    header  = b"PEPACK01" | pack_id (16) | segment_size (u32 BE) | reserved (u32 BE, 0)
    segment i = AES-256-GCM(data_key, nonce_i, chunk_i, aad_i)   (chunk_i + 16-byte tag)
    nonce_i = 00 00 00 00 | i (u64 BE)
    aad_i   = header (32) | i (u64 BE) | final (u8: 1 on the last segment, else 0)

Why each part is there:
- the index in nonce and AAD makes reordering or duplicating segments fail;
- the header (hence pack_id and segment_size) in the AAD makes a segment
  copied in from another pack fail, even one encrypted under a reused key;
- the final flag makes truncation at a segment boundary fail: the last
  segment a reader got must carry final=1, and only the real last one does.

Every chunk holds exactly segment_size plaintext bytes except the last, which
holds 1..segment_size bytes (0 only when the whole pack is empty: an empty
pack is one segment that is only a tag). So the segment count and the blob
size follow from the plaintext size alone, and a reader can compute where any
plaintext byte range lives in the blob (plan_range) and fetch only that.

Everything here is pure: no I/O, no clocks.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sync.pack.blob_format import PACK
from sync.pack.pack_errors import PackIntegrityError

PACK_MAGIC = PACK.magic
HEADER_SIZE = 32
TAG_SIZE = 16
KEY_SIZE = 32
PACK_ID_SIZE = 16
DEFAULT_SEGMENT_SIZE = 1 << 20
# Upper bound so that a reader's memory stays bounded whatever a header says,
# and far below AES-GCM's 2^36-byte limit per message.
MAX_SEGMENT_SIZE = 64 << 20

_HEADER = struct.Struct(">8s16sII")
_INDEX = struct.Struct(">Q")
_NONCE_PREFIX = b"\x00\x00\x00\x00"


@dataclass(frozen=True)
class PackHeader:
    """The first 32 bytes of a pack blob; part of every segment's AAD."""

    pack_id: bytes
    segment_size: int

    def __post_init__(self) -> None:
        check_pack_id(self.pack_id)
        check_segment_size(self.segment_size)

    def to_bytes(self) -> bytes:
        return _HEADER.pack(PACK_MAGIC, self.pack_id, self.segment_size, 0)

    @classmethod
    def from_bytes(cls, data: bytes) -> PackHeader:
        """Parse a header. A newer format's magic is a PackFormatError; another magic, a
        non-zero reserved field or a bad size is a PackIntegrityError (blob_format)."""
        PACK.check_magic(data)
        if len(data) < HEADER_SIZE:
            raise PACK.damaged(f"its header is {len(data)} bytes, not {HEADER_SIZE}")
        _, pack_id, segment_size, reserved = _HEADER.unpack(bytes(data[:HEADER_SIZE]))
        if reserved != 0:
            raise PACK.damaged("its header's reserved field is not zero")
        try:
            return cls(pack_id, segment_size)
        except ValueError as exc:
            raise PACK.damaged(f"its header's {exc}") from exc


def check_pack_id(pack_id: bytes) -> None:
    if not isinstance(pack_id, bytes) or len(pack_id) != PACK_ID_SIZE:
        raise ValueError(f"pack_id must be {PACK_ID_SIZE} bytes")


def check_segment_size(segment_size: int) -> None:
    if not isinstance(segment_size, int) or not 1 <= segment_size <= MAX_SEGMENT_SIZE:
        raise ValueError(f"segment_size must be 1..{MAX_SEGMENT_SIZE}, not {segment_size!r}")


def check_data_key(data_key: bytes) -> None:
    if not isinstance(data_key, bytes) or len(data_key) != KEY_SIZE:
        raise ValueError(f"a data key is {KEY_SIZE} bytes")


def segment_nonce(index: int) -> bytes:
    return _NONCE_PREFIX + _INDEX.pack(index)


def segment_aad(header: bytes, index: int, final: bool) -> bytes:
    return header + _INDEX.pack(index) + (b"\x01" if final else b"\x00")


def encrypt_segment(aead: AESGCM, header: bytes, index: int, final: bool,
                    chunk: bytes | memoryview) -> bytes:
    """Ciphertext of one segment: chunk + 16-byte tag."""
    return aead.encrypt(segment_nonce(index), chunk, segment_aad(header, index, final))


def decrypt_segment(aead: AESGCM, header: bytes, index: int, final: bool,
                    ciphertext: bytes | memoryview) -> bytes:
    """Plaintext of one segment, or PackIntegrityError naming the segment.

    GCM cannot say why a tag fails; the message lists what can cause it.
    """
    try:
        return aead.decrypt(segment_nonce(index), ciphertext, segment_aad(header, index, final))
    except InvalidTag:
        where = "final segment" if final else "segment"
        raise PackIntegrityError(
            f"pack {where} {index} failed authentication (modified, truncated, reordered, "
            "from another pack, or the wrong data key)"
        ) from None


# --- arithmetic -------------------------------------------------------------


def segment_count(plaintext_size: int, segment_size: int) -> int:
    """Number of segments of a pack; an empty pack still has one (empty) segment."""
    if plaintext_size < 0:
        raise ValueError("plaintext_size is negative")
    return max(1, -(-plaintext_size // segment_size))


def pack_size(plaintext_size: int, segment_size: int) -> int:
    """Size of the pack blob for `plaintext_size` bytes of plaintext."""
    return HEADER_SIZE + plaintext_size + TAG_SIZE * segment_count(plaintext_size, segment_size)


def plaintext_size_of(blob_size: int, segment_size: int) -> int:
    """Inverse of pack_size; PackIntegrityError when no plaintext size gives `blob_size`
    (a blob cut mid-segment can still look valid here: decryption catches that)."""
    body = blob_size - HEADER_SIZE
    stride = segment_size + TAG_SIZE
    if body < TAG_SIZE:
        raise PackIntegrityError(f"pack of {blob_size} bytes is shorter than one segment")
    full, rest = divmod(body, stride)
    if rest == 0:
        return full * segment_size
    if rest < TAG_SIZE or (rest == TAG_SIZE and full > 0):
        raise PackIntegrityError(f"pack size {blob_size} is impossible for segment size "
                                 f"{segment_size} (truncated mid-segment)")
    return full * segment_size + rest - TAG_SIZE


def segment_blob_offset(index: int, segment_size: int) -> int:
    """Where segment `index` starts in the blob."""
    return HEADER_SIZE + index * (segment_size + TAG_SIZE)


def segment_plain_length(index: int, plaintext_size: int, segment_size: int) -> int:
    """Plaintext bytes in segment `index` (the last one may be shorter)."""
    return min(segment_size, plaintext_size - index * segment_size)


@dataclass(frozen=True)
class RangePlan:
    """Which segments hold plaintext bytes [offset, offset+length), and where they are.

    Fetch blob bytes [blob_offset, blob_offset+blob_length), decrypt segments
    first..last (inclusive; `last == final_segment` means it carries final=1),
    then drop `skip` bytes and keep `length`.
    """

    offset: int
    length: int
    first_segment: int
    last_segment: int
    final_segment: int
    blob_offset: int
    blob_length: int
    skip: int


def plan_range(offset: int, length: int, *, segment_size: int,
               plaintext_size: int) -> RangePlan:
    """Plan the range read of plaintext [offset, offset+length) of a pack.

    `plaintext_size` (from the manifest) fixes which segment is final. A zero
    length still reads one segment, so even an empty instance is authenticated.
    """
    check_segment_size(segment_size)
    if offset < 0 or length < 0 or offset + length > plaintext_size:
        raise ValueError(f"range {offset}+{length} is outside the pack's {plaintext_size} "
                         "plaintext bytes")
    final = segment_count(plaintext_size, segment_size) - 1
    first = min(offset // segment_size, final)
    last = first if length == 0 else (offset + length - 1) // segment_size
    start = segment_blob_offset(first, segment_size)
    end = (segment_blob_offset(last, segment_size) + TAG_SIZE
           + segment_plain_length(last, plaintext_size, segment_size))
    return RangePlan(offset=offset, length=length, first_segment=first, last_segment=last,
                     final_segment=final, blob_offset=start, blob_length=end - start,
                     skip=offset - first * segment_size)


def decrypt_range(data_key: bytes, header: PackHeader, plan: RangePlan,
                  fetched: bytes | memoryview) -> bytes:
    """Decrypt the blob bytes a plan asked for and return exactly the planned plaintext.

    `header` may be rebuilt from the manifest (pack_id, segment_size) instead
    of read from the blob: the AAD makes a mismatch fail all the same.
    """
    check_data_key(data_key)
    if len(fetched) != plan.blob_length:
        raise PackIntegrityError(f"range read returned {len(fetched)} bytes, expected "
                                 f"{plan.blob_length} (pack truncated?)")
    aead = AESGCM(data_key)
    head = header.to_bytes()
    stride = header.segment_size + TAG_SIZE
    view = memoryview(fetched)
    out = bytearray()
    for n, index in enumerate(range(plan.first_segment, plan.last_segment + 1)):
        piece = view[n * stride:(n + 1) * stride]
        out += decrypt_segment(aead, head, index, index == plan.final_segment, piece)
    return bytes(out[plan.skip:plan.skip + plan.length])
