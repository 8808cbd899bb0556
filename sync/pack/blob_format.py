"""A blob of a newer format, or a damaged one: the one rule every reader applies.

Each blob kind starts with a magic whose last two ASCII digits are its format
version: b"PEPACK01" (pack), b"PEMANI01" (manifest), b"PEKEY01" (key object).
These bytes, and a key object's kind and size or a pack header's reserved field,
come before or beside what AES-GCM authenticates, so no tag check sees an edit
there. Every reader of the cloud copy (the edge's recall, scrub and reader
grants, `pacs-edge restore`, a remote reader's `reader pull`) finds a blob by
its name (sync.pack.naming), which says what kind it is; so when its first
bytes do not parse:

- the kind's magic with a higher version: a newer pacs-edge wrote it. That is a
  PackFormatError whose message says to upgrade;
- anything else (another magic, a lower or non-numeric version, or a kind,
  reserved field or size that this version fixes): no pacs-edge wrote it as it
  is, so it was modified or damaged. That is a PackIntegrityError, with the
  tamper hint; the edge audits it as a security alert like a failed tag.

This holds whoever wrote the blob and whether this process verified it: the
name and the magic's version say what the bytes must be.
"""

from __future__ import annotations

from dataclasses import dataclass

from sync.pack.pack_errors import PackFormatError, PackIntegrityError

_UPGRADE_HINT = ("a newer version of pacs-edge wrote this blob: upgrade pacs-edge here to "
                 "read it")


@dataclass(frozen=True)
class BlobFormat:
    """One blob kind's magic: `family` followed by the two-digit `version`."""

    what: str  # as messages name the blob: "pack", "manifest", "key object"
    family: bytes
    version: int = 1

    @property
    def magic(self) -> bytes:
        return self.family + b"%02d" % self.version

    def check_magic(self, blob: bytes | bytearray | memoryview) -> None:
        """Return when `blob` starts with this format's magic; else PackFormatError for
        a newer version of it, PackIntegrityError for anything else."""
        found = bytes(blob[:len(self.magic)])
        if found == self.magic:
            return
        digits = found[len(self.family):]
        if found.startswith(self.family) and len(digits) == 2 and digits.isdigit() \
                and int(digits) > self.version:
            raise PackFormatError(
                f"{self.what} is in format {digits.decode()}, which only a newer pacs-edge "
                f"reads (this one reads {self.version:02d}): upgrade", hint=_UPGRADE_HINT)
        raise self.damaged(f"it starts with {found!r}, not {self.magic!r}")

    def damaged(self, detail: str) -> PackIntegrityError:
        """A blob of this format's version whose fixed fields do not hold."""
        return PackIntegrityError(f"{self.what} is not as pacs-edge writes it: {detail} "
                                  "(modified or damaged)")


PACK = BlobFormat("pack", b"PEPACK")
MANIFEST = BlobFormat("manifest", b"PEMANI")
KEY_OBJECT = BlobFormat("key object", b"PEKEY")
