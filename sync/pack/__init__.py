"""The cloud format: encrypted, PHI-free, verifiable packs (docs/cloud-format.md).

Pure library, no blob-store I/O: the sync agent and the reader tools feed it
bytes and get bytes back.

    blob_format  a newer format's magic (upgrade) or a damaged one (tampering)
    segments   pack header, AEAD segments, range arithmetic
    writer     PackWriter: stream instance files into one pack
    reader     stream a whole pack back, or range-read one instance
    manifest   per-pack encrypted manifest (the only home of patient data)
    keys       data keys wrapped for the site and for readers (X25519)
    naming     keyed-hash blob names
    errors     the error tree
"""

from sync.pack.data_keys import (
    format_reader_public_key,
    new_data_key,
    new_pack_id,
    parse_reader_public_key,
    reader_public_key,
    site_key_id,
    unwrap_with_reader,
    unwrap_with_site,
    wrap_for_reader,
    wrap_for_site,
)
from sync.pack.manifest import (
    InstanceAttributes,
    Manifest,
    ManifestEntry,
    SeriesAttributes,
    StudyAttributes,
    open_manifest,
    seal_manifest,
)
from sync.pack.pack_errors import (
    PackError,
    PackFormatError,
    PackIntegrityError,
    PackSourceError,
    TruncatedPackError,
    WrongKeyError,
)
from sync.pack.reader import (
    InstancePiece,
    PackDecryptor,
    decrypt_pack,
    iter_instance,
    read_instance,
    read_instances,
    streams_whole_pack,
    unpack_instances,
    verify_instance,
)
from sync.pack.segments import (
    DEFAULT_SEGMENT_SIZE,
    PackHeader,
    RangePlan,
    decrypt_range,
    pack_size,
    plan_range,
)
from sync.pack.writer import PackResult, PackSlot, PackWriter

__all__ = [
    "DEFAULT_SEGMENT_SIZE",
    "InstanceAttributes",
    "InstancePiece",
    "Manifest",
    "ManifestEntry",
    "PackDecryptor",
    "PackError",
    "PackFormatError",
    "PackHeader",
    "PackIntegrityError",
    "PackResult",
    "PackSlot",
    "PackSourceError",
    "PackWriter",
    "RangePlan",
    "SeriesAttributes",
    "StudyAttributes",
    "TruncatedPackError",
    "WrongKeyError",
    "decrypt_pack",
    "decrypt_range",
    "format_reader_public_key",
    "iter_instance",
    "new_data_key",
    "new_pack_id",
    "open_manifest",
    "pack_size",
    "parse_reader_public_key",
    "plan_range",
    "read_instance",
    "read_instances",
    "reader_public_key",
    "seal_manifest",
    "site_key_id",
    "streams_whole_pack",
    "unpack_instances",
    "unwrap_with_reader",
    "unwrap_with_site",
    "verify_instance",
    "wrap_for_reader",
    "wrap_for_site",
]
