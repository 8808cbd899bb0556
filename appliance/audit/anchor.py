"""Chain-head anchors: the log's (seq, head hash) written where the box cannot rewrite it alone.

The hash chain shows an edit, a removal or a reordering, but not a log cut
short at the end, nor a chain recomputed from scratch by someone holding the
file. An anchor fixes both: a small blob `audit/anchors/<seq, 12 digits>`
in the cloud container holding

    {"v": 1, "seq": N, "hash": "<head hash at N>", "time": "...", "mac": "<hex>"}

where `mac` is HMAC-SHA256 under `<home>/secrets/audit.key` (0600, created
on first use) over the canonical JSON of the other fields. `verify` checks
every anchor against the log: a log that ends before an anchor's seq was
truncated; a record at an anchor's seq with another hash was rewritten.

Why this holds: blob names are never overwritten (BlobStore.put refuses an
existing name), so what was anchored stays anchored. The HMAC stops a party
who can write to the container but does not hold the box's key from planting
anchors. It does not stop someone with the box's cloud credentials from
*deleting* anchors: for that, give the container (or the audit/anchors/
prefix) an immutability or retention policy; see docs/security.md. Names
carry only a number, no PHI.

Writing anchors is the sync agent's job (it alone holds cloud credentials):
`AnchorJob` runs every `[audit] anchor_interval_seconds`, and
`pacs-edge audit anchor` writes one on demand. The appliance side depends
only on the three BlobStore methods in `AnchorStore`, not on sync's modules.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from appliance.audit.log import AuditLog, canonical
from appliance.errors import PacsEdgeError
from provisioning.keys import (
    KeyFileError,
    create_secret_file,
    load_secret_file,
    secrets_dir,
)

log = logging.getLogger(__name__)

ANCHOR_PREFIX = "audit/anchors/"
KEY_FILE = "audit.key"
_VERSION = 1


class AnchorError(PacsEdgeError):
    """An anchor cannot be written or read, or one contradicts the log."""


class AnchorStore(Protocol):
    """The part of sync.blobstore.base.BlobStore that anchoring uses."""

    def put(self, name: str, data: Iterable[bytes], *,
            metadata: dict[str, str] | None = None) -> Any: ...

    def open_range(self, name: str, offset: int = 0, length: int | None = None) -> bytes: ...

    def list(self, prefix: str = "") -> Iterator[Any]: ...


def anchor_name(seq: int) -> str:
    """Zero-padded, so that name order is seq order."""
    return f"{ANCHOR_PREFIX}{seq:012d}"


def load_key(home: Path, *, create: bool = False) -> bytes:
    """The anchor HMAC key; with `create`, made on first use (never replaced)."""
    path = secrets_dir(home) / KEY_FILE
    try:
        if create and not path.exists():
            import secrets

            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            create_secret_file(path, secrets.token_bytes(32))
        return load_secret_file(path)
    except KeyFileError as exc:
        raise AnchorError(exc.message, hint=exc.hint) from exc


@dataclass(frozen=True)
class Anchor:
    seq: int
    hash: str
    time: str
    mac: str

    @classmethod
    def make(cls, seq: int, head_hash: str, key: bytes) -> Anchor:
        time = datetime.now(UTC).isoformat(timespec="seconds")
        return cls(seq, head_hash, time, _mac(key, seq, head_hash, time))

    def to_bytes(self) -> bytes:
        return canonical({"v": _VERSION, "seq": self.seq, "hash": self.hash,
                          "time": self.time, "mac": self.mac})

    @classmethod
    def parse(cls, name: str, data: bytes, key: bytes) -> Anchor:
        """Parse and authenticate an anchor blob; AnchorError if it is not genuine."""
        try:
            raw = json.loads(data)
            anchor = cls(int(raw["seq"]), str(raw["hash"]), str(raw["time"]), str(raw["mac"]))
            version = raw["v"]
        except (ValueError, KeyError, TypeError) as exc:
            raise AnchorError(f"anchor {name} is not an anchor blob",
                              hint="something else wrote into audit/anchors/") from exc
        if version != _VERSION or name != anchor_name(anchor.seq):
            raise AnchorError(f"anchor {name} does not match its name or format version")
        expected = _mac(key, anchor.seq, anchor.hash, anchor.time)
        if not hmac.compare_digest(expected, anchor.mac):
            raise AnchorError(f"anchor {name} fails its HMAC check",
                              hint="it was not written by this box (or audit.key changed)")
        return anchor


def _mac(key: bytes, seq: int, head_hash: str, time: str) -> str:
    body = canonical({"v": _VERSION, "seq": seq, "hash": head_hash, "time": time})
    return hmac.new(key, body, hashlib.sha256).hexdigest()


def write_anchor(audit_log: AuditLog, store: AnchorStore, key: bytes) -> Anchor | None:
    """Anchor the current head; None for an empty log. An existing anchor for the
    same seq is fine when it holds the same hash, and an alarm when it does not."""
    head = audit_log.head()
    if head.seq == 0:
        return None
    anchor = Anchor.make(head.seq, head.hash, key)
    name = anchor_name(head.seq)
    try:
        store.put(name, [anchor.to_bytes()])
    except PacsEdgeError as exc:  # BlobExists, or the store is unavailable
        try:
            existing = Anchor.parse(name, store.open_range(name), key)
        except PacsEdgeError:
            raise AnchorError(f"anchor {name} could not be written: {exc.message}",
                              hint=exc.hint) from exc
        if existing.hash != anchor.hash:
            raise AnchorError(
                f"anchor {name} already exists with another head hash: the audit log was"
                " rewritten after it was anchored",
                hint="keep the log file and the anchor as evidence; run `pacs-edge audit"
                " verify`") from exc
        return existing
    log.info("audit log anchored seq=%d", head.seq)
    return anchor


def read_anchors(store: AnchorStore, key: bytes) -> list[Anchor]:
    """Every anchor in the store, in seq order; AnchorError for one that is not genuine."""
    return [Anchor.parse(info.name, store.open_range(info.name), key)
            for info in store.list(ANCHOR_PREFIX)]


class AnchorJob:
    """The sync agent's periodic job: anchor the head when it moved since the last run."""

    def __init__(self, home: Path, store: AnchorStore) -> None:
        self.log = AuditLog.for_home(home)
        self.home = home
        self.store = store
        self._last: tuple[int, str] | None = None

    async def run(self) -> Anchor | None:
        return await asyncio.to_thread(self._run)

    def _run(self) -> Anchor | None:
        head = self.log.head()
        if head.seq == 0 or self._last == (head.seq, head.hash):
            return None
        anchor = write_anchor(self.log, self.store, load_key(self.home, create=True))
        if anchor is not None:
            self._last = (anchor.seq, anchor.hash)
        return anchor
