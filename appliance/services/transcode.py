"""The one transcoding WADO-RS does: uncompressed little endian to Explicit VR Little Endian.

PS3.18 makes Explicit VR Little Endian the syntax a client gets when it names
none, and most DICOMweb clients name none. Instances stored in Implicit VR
Little Endian (what many modalities send) or Deflated Explicit VR Little Endian
are re-encoded for them: same elements, same values, same pixel bytes, only
the encoding of the element headers (and the deflate) differs. Nothing else is
transcoded: compressed pixel data would need a codec and could lose
information, and big endian data would need every multi-byte value swapped
(pydicom refuses, rightly); those answer 406 unless the client accepts the
stored syntax.

The pixel data value is never held: its bytes are the same in both encodings, so an
Implicit VR Little Endian instance is answered as the elements around it, re-encoded
by pydicom (with a placeholder pixel value, so that pydicom decides the value
representation as it would for the whole instance), and the value itself copied from
the stored file in between (`Transcoded`): an uncompressed tomosynthesis or cine of
GBs costs its header in memory, not three copies of itself. Pixel data of 1 MiB or
less, and a Deflated instance (pydicom inflates it in memory; ingest bounded what it
inflates to, `store.max_inflated_mb`), are re-encoded whole.

Blocking: the edge calls it in a worker thread.
"""

from __future__ import annotations

import io
import secrets
from dataclasses import dataclass
from typing import BinaryIO

from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite

EXPLICIT_LITTLE = "1.2.840.10008.1.2.1"
_DEFLATED = "1.2.840.10008.1.2.1.99"
TRANSCODABLE = frozenset({"1.2.840.10008.1.2", _DEFLATED})
# Values larger than this stay in the file while the header is read (pixel data).
_DEFER_BYTES = 1 << 20
_PIXEL_TAGS = (0x7FE00010, 0x7FE00009, 0x7FE00008)
_UNDEFINED = 0xFFFFFFFF
_LONG_HEADER = 12  # an explicit OB/OW/OF/OD element header: tag, VR, 2 reserved, length
_MARKER = 16  # bytes: a multiple of every pixel VR's value size


@dataclass(frozen=True)
class Transcoded:
    """An instance in Explicit VR Little Endian: `head`, then bytes [value_offset,
    value_offset + value_length) of the stored file (its pixel data value, as
    stored), then `tail`."""

    head: bytes
    value_offset: int = 0
    value_length: int = 0
    tail: bytes = b""


def explicit_little(fh: BinaryIO, transfer_syntax: str) -> Transcoded | None:
    """The stored instance open at `fh`, stored in `transfer_syntax` (one of
    TRANSCODABLE), as a Part 10 file in Explicit VR Little Endian, or None when pydicom
    cannot re-encode it. Instances are stored as sent, so one may hold a value pydicom
    reads but cannot write (a malformed value of a standard element, an unknown VR);
    pydicom raises many types for those. An OSError is the disk's, not the data's,
    and stays one."""
    try:
        if transfer_syntax == _DEFLATED:
            return Transcoded(_encoded(dcmread(fh)))
        ds = dcmread(fh, defer_size=_DEFER_BYTES)
        tag = next((t for t in _PIXEL_TAGS if t in ds), None)
        raw = None if tag is None else ds.get_item(tag, keep_deferred=True)
        if tag is None or not isinstance(raw, RawDataElement) or raw.value is not None \
                or raw.length == _UNDEFINED:
            return Transcoded(_encoded(ds))  # no pixel data, or a small one: whole
        # A placeholder value no header holds by chance marks where the value goes.
        marker = secrets.token_bytes(_MARKER)
        ds[tag] = raw._replace(length=_MARKER, value=marker)
        encoded = _encoded(ds)
    except OSError:
        raise
    except Exception:
        return None
    start = encoded.index(marker) - _LONG_HEADER
    padded = raw.length + raw.length % 2  # pydicom pads an odd value with a zero byte
    header = encoded[start:start + _LONG_HEADER - 4] + padded.to_bytes(4, "little")
    return Transcoded(encoded[:start] + header, raw.value_tell, raw.length,
                      b"\0" * (raw.length % 2) + encoded[start + _LONG_HEADER + _MARKER:])


def _encoded(ds: Dataset) -> bytes:
    ds.file_meta.TransferSyntaxUID = EXPLICIT_LITTLE
    out = io.BytesIO()
    dcmwrite(out, ds, enforce_file_format=True, implicit_vr=False, little_endian=True)
    return out.getvalue()
