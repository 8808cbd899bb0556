"""Chain-head anchors: the log's (seq, head hash) written where the box cannot rewrite it alone.

The hash chain shows an edit, a removal or a reordering, but not a log cut
short at the end, nor a chain recomputed from scratch by someone holding the
file. An anchor fixes both: a small blob `audit/anchors/<position, 12 digits>`
in the cloud container holding

    {"v": 2, "base": B, "seq": N, "hash": "<head hash at N>", "time": "...", "mac": "<hex>"}

at position B + N, where `mac` is HMAC-SHA256 under `<home>/secrets/audit.key`
(0600, created on first use, escrowed since escrow format 2) over the
canonical JSON of the other fields. `verify` checks every anchor of this log
(its `base`) against it: a log that ends before an anchor's seq was
truncated; a record at an anchor's seq with another hash was rewritten.
Version 1 anchors (written before bases existed) have no "base" (it is 0) and
a MAC over v, seq, hash and time; they are still read.

The base: a box restored from the cloud (`pacs-edge restore`) starts a new
log, at seq 1, in a container that holds the lost box's anchors. Restore
records in the home (`<home>/audit/anchor-base.json`) the highest anchor
position in the container; the new log's anchors go above it, so they never
collide with the old ones. Anchors at or below the base are the predecessor
logs': `verify` authenticates them (with the escrowed key) and counts them,
but cannot compare them with records this box never held. An anchor above the
base that names another base belongs to no log this box knows: an alarm.

Why this holds: blob names are never overwritten (BlobStore.put refuses an
existing name), so what was anchored stays anchored. The HMAC stops a party
who can write to the container but does not hold the box's key from planting
anchors. It does not stop someone with the box's cloud credentials from
*deleting* anchors: for that, give the container (or the audit/anchors/
prefix) an immutability or retention policy; see docs/security.md. Someone
with root on the box could also raise the base to put anchors out of
verify's comparison; `verify` prints the base and its restore date, and the
restore itself is an audit record. Names carry only a number, no PHI.

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
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from appliance.audit.log import AUDIT_DIR, AuditLog, canonical
from appliance.base.durable import atomic_write
from appliance.base.errors import PacsEdgeError
from provisioning.home import AUDIT_KEY
from provisioning.site_secrets import create_secret_file, load_secret_file, secrets_dir

log = logging.getLogger(__name__)

ANCHOR_PREFIX = "audit/anchors/"
KEY_FILE = AUDIT_KEY
BASE_FILE = "anchor-base.json"
_VERSION = 2
_NAME = re.compile(rf"^{re.escape(ANCHOR_PREFIX)}(?P<position>[0-9]{{12}})$")


class AnchorError(PacsEdgeError):
    """An anchor cannot be written or read, or one contradicts the log."""


class AnchorStore(Protocol):
    """The part of sync.blobstore.base.BlobStore that anchoring uses."""

    def put(self, name: str, data: Iterable[bytes], *,
            metadata: dict[str, str] | None = None) -> Any: ...

    def open_range(self, name: str, offset: int = 0, length: int | None = None) -> bytes: ...

    def list(self, prefix: str = "") -> Iterator[Any]: ...


def anchor_name(position: int) -> str:
    """Zero-padded, so that name order is position order (base + seq)."""
    return f"{ANCHOR_PREFIX}{position:012d}"


def anchor_position(name: str) -> int | None:
    """The position an anchor blob's name stands for; None for any other name."""
    match = _NAME.match(name)
    return int(match["position"]) if match else None


def load_base(home: Path) -> int:
    """This log's anchor base: 0 unless the home was restored into a container with anchors."""
    path = Path(home) / AUDIT_DIR / BASE_FILE
    try:
        base = json.loads(path.read_text(encoding="utf-8"))["base"]
    except FileNotFoundError:
        return 0
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise AnchorError(f"{path} cannot be read ({type(exc).__name__})",
                          hint="keep it as evidence; it is written only by `pacs-edge "
                          "restore`") from exc
    if not isinstance(base, int) or base < 0:
        raise AnchorError(f"{path} holds no valid anchor base",
                          hint="keep it as evidence; it is written only by `pacs-edge restore`")
    return base


def set_base_after_restore(home: Path, store: AnchorStore) -> int:
    """Put this home's anchors above every anchor in the container (once; kept after).

    Called by `pacs-edge restore`: the container holds the lost box's anchors,
    and this box's log starts again at seq 1."""
    path = Path(home) / AUDIT_DIR / BASE_FILE
    if path.exists():
        return load_base(home)
    positions = [anchor_position(info.name) for info in store.list(ANCHOR_PREFIX)]
    base = max((p for p in positions if p is not None), default=0)
    if base:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        document = {"base": base,
                    "restored_at": datetime.now(UTC).isoformat(timespec="seconds")}
        atomic_write(path, canonical(document) + b"\n", mode=0o600)
    return base


def load_key(home: Path, *, create: bool = False) -> bytes:
    """The anchor HMAC key; with `create`, made on first use (never replaced)."""
    path = secrets_dir(home) / KEY_FILE
    if create and not path.exists():
        import secrets

        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        create_secret_file(path, secrets.token_bytes(32))
    return load_secret_file(path)  # KeyFileError (a PacsEdgeError) for a bad file


@dataclass(frozen=True)
class Anchor:
    seq: int
    hash: str
    time: str
    mac: str
    base: int = 0
    version: int = _VERSION

    @property
    def position(self) -> int:
        return self.base + self.seq

    @classmethod
    def make(cls, seq: int, head_hash: str, key: bytes, *, base: int = 0) -> Anchor:
        time = datetime.now(UTC).isoformat(timespec="seconds")
        return cls(seq, head_hash, time, _mac(key, _VERSION, base, seq, head_hash, time), base)

    def to_bytes(self) -> bytes:
        return canonical({**_body(self.version, self.base, self.seq, self.hash, self.time),
                          "mac": self.mac})

    @classmethod
    def parse(cls, name: str, data: bytes, key: bytes) -> Anchor:
        """Parse and authenticate an anchor blob (version 1 or 2); AnchorError if it is
        not genuine."""
        try:
            raw = json.loads(data)
            version = raw["v"]
            base = int(raw["base"]) if version == _VERSION else 0
            anchor = cls(int(raw["seq"]), str(raw["hash"]), str(raw["time"]), str(raw["mac"]),
                         base, version)
        except (ValueError, KeyError, TypeError) as exc:
            raise AnchorError(f"anchor {name} is not an anchor blob",
                              hint="something else wrote into audit/anchors/") from exc
        if version not in (1, _VERSION) or name != anchor_name(anchor.position):
            raise AnchorError(f"anchor {name} does not match its name or format version")
        expected = _mac(key, version, base, anchor.seq, anchor.hash, anchor.time)
        if not hmac.compare_digest(expected, anchor.mac):
            raise AnchorError(f"anchor {name} fails its HMAC check",
                              hint="it was not written by this box's anchor key (a restore "
                              "from a version 1 escrow, which lacks audit.key, or audit.key "
                              "changed)")
        return anchor


def _body(version: int, base: int, seq: int, head_hash: str, time: str) -> dict[str, Any]:
    body: dict[str, Any] = {"v": version, "seq": seq, "hash": head_hash, "time": time}
    if version != 1:
        body["base"] = base
    return body


def _mac(key: bytes, version: int, base: int, seq: int, head_hash: str, time: str) -> str:
    body = canonical(_body(version, base, seq, head_hash, time))
    return hmac.new(key, body, hashlib.sha256).hexdigest()


def write_anchor(audit_log: AuditLog, store: AnchorStore, key: bytes, *,
                 base: int = 0) -> Anchor | None:
    """Anchor the current head above `base`; None for an empty log. An existing anchor
    for the same seq is fine when it holds the same hash, and an alarm when it does not."""
    head = audit_log.head()
    if head.seq == 0:
        return None
    anchor = Anchor.make(head.seq, head.hash, key, base=base)
    name = anchor_name(anchor.position)
    try:
        store.put(name, [anchor.to_bytes()])
    except PacsEdgeError as exc:  # BlobExists, or the store is unavailable
        try:
            existing = Anchor.parse(name, store.open_range(name), key)
        except PacsEdgeError:
            raise AnchorError(f"anchor {name} could not be written: {exc.message}",
                              hint=exc.hint) from exc
        if (existing.base, existing.seq, existing.hash) != (base, anchor.seq, anchor.hash):
            raise AnchorError(
                f"anchor {name} already exists with another head hash: the audit log was"
                " rewritten after it was anchored",
                hint="keep the log file and the anchor as evidence; run `pacs-edge audit"
                " verify`") from exc
        return existing
    log.info("audit log anchored seq=%d base=%d", head.seq, base)
    return anchor


@dataclass(frozen=True)
class Anchors:
    """The container's anchors as one log sees them (see the module docstring)."""

    base: int
    own: list[Anchor]  # this log's, in seq order: verify compares them with the records
    predecessors: list[Anchor]  # at or below the base: authenticated, not comparable


def read_anchors(store: AnchorStore, key: bytes, *, base: int = 0) -> Anchors:
    """Every anchor in the store, authenticated and sorted by whose it is; AnchorError for
    one that is not genuine, or one above `base` that names another base."""
    found = Anchors(base, [], [])
    for info in store.list(ANCHOR_PREFIX):
        anchor = Anchor.parse(info.name, store.open_range(info.name), key)
        if anchor.position <= base:
            found.predecessors.append(anchor)
        elif anchor.base == base:
            found.own.append(anchor)
        else:
            raise AnchorError(
                f"anchor {info.name} names anchor base {anchor.base}, this log's is {base}",
                hint=f"another box writes anchors into this container, or {BASE_FILE} in the "
                "audit folder was changed; keep both as evidence")
    found.own.sort(key=lambda a: a.seq)
    return found


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
        anchor = write_anchor(self.log, self.store, load_key(self.home, create=True),
                              base=load_base(self.home))
        if anchor is not None:
            self._last = (anchor.seq, anchor.hash)
        return anchor
