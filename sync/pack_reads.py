"""Range reads of a pack blob, as the box's recall and a reader's pull both do them.

sync.pack is a pure library: `read_instances` and `iter_instance` range-read
through a `fetch(offset, length)` the caller gives. `pack_ranges` is that
fetch for a pack blob in a BlobStore, shared so that both callers report a
pack cut short the same way.

The manifest is authenticated and says where every segment lies, so a range
the store refuses as past the blob's end (BlobRangeError) means the pack is
shorter than it was written: tampering or damage, a TruncatedPackError (a
PackIntegrityError: the tamper hint, a security alert in the recall's audit),
as a whole pack streamed to its end reports it. Left as the store's error, it
read "outside the blob" with the store's hint, and a recall raised no alert.
"""

from __future__ import annotations

from sync.blobstore.base import BlobRangeError, BlobStore
from sync.pack.pack_errors import TruncatedPackError
from sync.pack.reader import Fetch


def pack_ranges(store: BlobStore, pack_name: str) -> Fetch:
    """The `fetch` of sync.pack.reader.read_instances for the pack blob `pack_name`."""
    def fetch(offset: int, length: int) -> bytes:
        try:
            return store.open_range(pack_name, offset, length)
        except BlobRangeError as exc:
            raise TruncatedPackError("pack is shorter than its manifest says "
                                     "(truncated)") from exc

    return fetch
