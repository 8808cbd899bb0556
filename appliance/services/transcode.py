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

Blocking, and one instance in memory: the edge calls it in a worker thread,
one instance at a time.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import BinaryIO

from pydicom import dcmread
from pydicom.filewriter import dcmwrite

EXPLICIT_LITTLE = "1.2.840.10008.1.2.1"
TRANSCODABLE = frozenset({"1.2.840.10008.1.2", "1.2.840.10008.1.2.1.99"})


def explicit_little(path: Path | BinaryIO) -> bytes | None:
    """The stored instance at `path` (or an open file) as a Part 10 file in Explicit VR
    Little Endian, or None when pydicom cannot re-encode it. Instances are stored as
    sent, so one may hold a value pydicom reads but cannot write (a malformed value of
    a standard element, an unknown VR); pydicom raises many types for those. An OSError is the
    disk's, not the data's, and stays one."""
    try:
        ds = dcmread(path)
        ds.file_meta.TransferSyntaxUID = EXPLICIT_LITTLE
        out = io.BytesIO()
        dcmwrite(out, ds, enforce_file_format=True, implicit_vr=False, little_endian=True)
    except OSError:
        raise
    except Exception:
        return None
    return out.getvalue()
