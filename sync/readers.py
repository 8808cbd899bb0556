"""Remote readers on the edge: the registry, scopes, grants and revocation.

Registry: `<home>/readers.toml`, one table per reader, written atomically by
the command line (`pacs-edge readers add|remove`) and read by the agent at
every grant::

    [readers.dr-smith]
    public_key = "pacs-edge-reader-v1:..."     as printed by `pacs-edge reader init`
    scope = "referring:SMITH^*"
    added_at = 1700000000.0

Scopes (decided from the edge's index, for the whole study):
    all                      every study
    referring:PATTERN        ReferringPhysicianName matches PATTERN, case-insensitively,
                             with `*` and `?` wildcards (DICOM C-FIND style)
    modality:CT,MR           any series of the study has one of these modalities

A grant is one reader key object per pack version (docs/cloud-format.md,
"Key objects"): the pack's data key, unwrapped with the site key, wrapped for
the reader's public key. Packs and manifests are never re-uploaded.

When grants happen:
- `readers add` grants every verified pack of every study in scope
  (`grant_reader`); running it again for the same reader repairs missing ones;
- after the sync agent verifies a new pack version, `grant_study` (one call
  in sync.replicate) grants every reader in scope, or holding a version of the
  study already (a study can leave a scope), every version of that study it
  lacks. A grant failure there is logged and does not fail the
  replication; `readers add` again repairs it.
Revocation (`revoke_reader`) deletes every `keys/reader-<rid>` object of the
reader, found by listing the container, before and after the registry entry
goes, and a grant looks at the registry again after each key object it wrote
(deleting it when the reader is gone), so a grant racing with the removal
leaves nothing, whichever comes first. It cannot take back
what the reader already downloaded, nor data keys it already unwrapped.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import json
import logging
import re
import time
import tomllib
from collections.abc import Callable, Set
from dataclasses import dataclass
from pathlib import Path

from appliance.base.durable import atomic_write
from appliance.base.errors import PacsEdgeError
from appliance.store.index import Index
from appliance.store.packs import PackGrant, pack_grants, study_pack_grants
from provisioning.keyring import SiteKeyring, load_keyring
from sync.blobstore.base import BlobExists, BlobNotFound, BlobStore, BlobStoreUnavailable
from sync.pack import naming
from sync.pack.data_keys import format_reader_public_key, parse_reader_public_key, wrap_for_reader
from sync.pack.manifest import manifest_pack_id, open_manifest
from sync.pack.pack_errors import PackError
from sync.sitekeys import unwrap_site_object

log = logging.getLogger(__name__)

READERS_FILE = "readers.toml"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class ReaderError(PacsEdgeError):
    """A reader registry edit or a grant that cannot be done."""


@dataclass(frozen=True)
class Scope:
    kind: str  # "all", "referring" or "modality"
    referring: str = ""
    modalities: frozenset[str] = frozenset()

    @classmethod
    def parse(cls, text: str) -> Scope:
        text = text.strip()
        if text == "all":
            return cls("all")
        kind, _, value = text.partition(":")
        value = value.strip()
        if kind == "referring" and value:
            return cls("referring", referring=value)
        if kind == "modality" and value:
            mods = frozenset(m.strip().upper() for m in value.split(",") if m.strip())
            if mods and all(re.fullmatch(r"[A-Z0-9]{1,16}", m) for m in mods):
                return cls("modality", modalities=mods)
        raise ReaderError(f"invalid reader scope {text!r}",
                          hint="use all, referring:NAME (wildcards * and ?) or "
                          "modality:CT,MR")

    def __str__(self) -> str:
        if self.kind == "referring":
            return f"referring:{self.referring}"
        if self.kind == "modality":
            return "modality:" + ",".join(sorted(self.modalities))
        return "all"

    def matches(self, referring_physician: str, modalities: Set[str]) -> bool:
        if self.kind == "all":
            return True
        if self.kind == "referring":
            return fnmatch.fnmatchcase(referring_physician.upper(), self.referring.upper())
        return bool(self.modalities & {m.upper() for m in modalities})


@dataclass(frozen=True)
class Reader:
    name: str
    public_key: bytes
    scope: Scope
    added_at: float

    @property
    def reader_id(self) -> str:
        return naming.reader_id(self.public_key)

    @property
    def public_text(self) -> str:
        return format_reader_public_key(self.public_key)


# --- registry -------------------------------------------------------------------------


def load_readers(home: Path) -> dict[str, Reader]:
    path = Path(home) / READERS_FILE
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ReaderError(f"{path}: cannot be read ({exc})",
                          hint="fix the file or remove the broken reader entry") from exc
    readers = {}
    for name, entry in data.get("readers", {}).items():
        try:
            readers[name] = Reader(name, parse_reader_public_key(entry["public_key"]),
                                   Scope.parse(entry.get("scope", "all")),
                                   float(entry.get("added_at", 0.0)))
        except (KeyError, TypeError, ValueError, PackError) as exc:
            raise ReaderError(f"{path}: reader {name!r} is invalid ({exc})",
                              hint="fix or remove its entry") from exc
    return readers


def save_readers(home: Path, readers: dict[str, Reader]) -> None:
    lines = ["# Remote readers: edit with `pacs-edge readers add|remove`.", ""]
    for reader in sorted(readers.values(), key=lambda r: r.name):
        lines += [f"[readers.{json.dumps(reader.name)}]",
                  f"public_key = {json.dumps(reader.public_text)}",
                  f"scope = {json.dumps(str(reader.scope), ensure_ascii=False)}",
                  f"added_at = {reader.added_at!r}", ""]
    atomic_write(Path(home) / READERS_FILE, "\n".join(lines).encode("utf-8"), mode=0o640)


def add_reader(home: Path, name: str, public_key_text: str, scope_text: str) -> tuple[Reader,
                                                                                        bool]:
    """Register a reader; (reader, True) if new, (reader, False) if already there unchanged."""
    if not _NAME.match(name):
        raise ReaderError(f"invalid reader name {name!r}",
                          hint="use letters, digits, '.', '_' and '-' (at most 64)")
    try:
        public_key = parse_reader_public_key(public_key_text)
    except PackError as exc:
        raise ReaderError(exc.message, hint=exc.hint) from exc
    scope = Scope.parse(scope_text)
    readers = load_readers(home)
    existing = readers.get(name)
    if existing is not None:
        if existing.public_key == public_key and existing.scope == scope:
            return existing, False
        raise ReaderError(f"reader {name!r} exists with another key or scope",
                          hint=f"remove it first: pacs-edge readers remove {name}")
    for other in readers.values():
        if other.public_key == public_key:
            raise ReaderError(f"this public key is already reader {other.name!r}",
                              hint="one key, one reader; remove the other first")
    reader = Reader(name, public_key, scope, time.time())
    readers[name] = reader
    save_readers(home, readers)
    return reader, True


def forget_reader(home: Path, name: str) -> Reader:
    readers = load_readers(home)
    reader = readers.pop(name, None)
    if reader is None:
        raise ReaderError(f"no reader named {name!r}", hint="see `pacs-edge readers list`")
    save_readers(home, readers)
    return reader


# --- grants ---------------------------------------------------------------------------


@dataclass
class GrantReport:
    granted: int = 0
    already: int = 0
    failures: list[str] | None = None


async def grant_reader(index: Index, store: BlobStore, ring: SiteKeyring, reader: Reader, *,
                       on_progress: Callable[[int, int], None] | None = None) -> GrantReport:
    """Give `reader` a key object for every verified pack of every study in its scope.

    A store that stopped answering (BlobStoreUnavailable, its retries spent) stops the
    walk: every further pack would wait out the same retries. Running it again resumes."""
    todo = [(grant.pack_name, grant.manifest_name) for grant in await pack_grants(index)
            if reader.scope.matches(grant.referring_physician, grant.modalities)]
    report = GrantReport(failures=[])
    for done, (pack_name, manifest_name) in enumerate(todo, 1):
        assert report.failures is not None
        try:
            made = await asyncio.to_thread(_grant_pack, store, ring, reader, pack_name,
                                           manifest_name)
        except BlobStoreUnavailable as exc:  # the retries are spent: so would the rest be
            report.failures.append(f"{pack_name}: {exc.message}; stopped there, "
                                   f"{len(todo) - done} pack version(s) not tried")
            break
        except PacsEdgeError as exc:
            report.failures.append(f"{pack_name}: {exc.message}")
        else:
            if made:
                report.granted += 1
            else:
                report.already += 1
        if on_progress is not None:
            on_progress(done, len(todo))
    return report


async def grant_study(home: Path, index: Index, store: BlobStore, study_id: int) -> int:
    """Grant every reader in scope, or holding a version of it already, every verified
    version of one study (after replication).

    Never raises for a grant that fails: the pack is safe in the cloud either
    way; the failure is logged with the repair (`pacs-edge readers add` again).
    """
    try:
        readers = load_readers(home)
        if not readers:
            return 0
        grants = await study_pack_grants(index, study_id)
        ring = load_keyring(home)
    except PacsEdgeError as exc:
        log.error("reader grants skipped error=%s", exc.message)
        return 0
    made = 0
    for reader in readers.values():
        if not grants or not await _reads_study(store, reader, grants):
            continue
        for grant in grants:
            try:
                granted = await asyncio.to_thread(_grant_pack, store, ring, reader,
                                                  grant.pack_name, grant.manifest_name)
                if granted and not await asyncio.to_thread(_still_a_reader, home, store,
                                                           reader, grant.pack_name):
                    break
                made += granted
            except Exception as exc:  # the pack is safe in the cloud: never fail replication
                log.error("reader grant failed reader=%s pack=%s error=%s; run `pacs-edge "
                          "readers add` for this reader again to repair", reader.name,
                          grant.pack_name, getattr(exc, "message", type(exc).__name__))
    if made:
        log.info("granted readers key objects=%d", made)
    return made


async def _reads_study(store: BlobStore, reader: Reader, grants: list[PackGrant]) -> bool:
    """Whether the reader is in the study's scope, or holds a version of it already: a
    study can leave a scope (its MR instances sent again into another study and
    withdrawn from it, store/amendments.py), and the reader who has it still needs
    the versions that say so. A study of one version has no earlier one to hold."""
    if reader.scope.matches(grants[0].referring_physician, grants[0].modalities):
        return True
    return len(grants) > 1 and await asyncio.to_thread(_holds_a_version, store, reader, grants)


def _holds_a_version(store: BlobStore, reader: Reader, grants: list[PackGrant]) -> bool:
    for grant in reversed(grants):
        parsed = naming.parse_blob_name(grant.pack_name)
        if parsed is None:
            continue
        with contextlib.suppress(BlobNotFound):
            store.stat(naming.reader_key_name(parsed.study_key, parsed.version,
                                              reader.reader_id))
            return True
    return False


def _grant_pack(store: BlobStore, ring: SiteKeyring, reader: Reader, pack_name: str,
                manifest_name: str) -> bool:
    """Put the reader's key object for one pack; False when it is already there."""
    parsed = naming.parse_blob_name(pack_name)
    if parsed is None or parsed.kind != "pack":
        raise ReaderError(f"the index names a pack blob this format does not make: "
                          f"{pack_name!r}")
    name = naming.reader_key_name(parsed.study_key, parsed.version, reader.reader_id)
    with contextlib.suppress(BlobNotFound):
        store.stat(name)
        return False
    sealed = store.open_range(manifest_name)
    pack_id = manifest_pack_id(sealed)
    data_key = unwrap_site_object(
        store, naming.site_key_name(parsed.study_key, parsed.version), pack_id, ring)
    open_manifest(sealed, data_key, expected_pack_id=pack_id)  # the key really opens it
    try:
        store.put(name, [wrap_for_reader(reader.public_key, pack_id, data_key)])
    except BlobExists:
        return False  # a concurrent grant won
    log.debug("granted reader=%s pack=%s", reader.name, pack_name)
    return True


def _still_a_reader(home: Path, store: BlobStore, reader: Reader, pack_name: str) -> bool:
    """After a key object was written: whether its reader is still registered. A reader
    removed since this grant read the registry (`readers remove` revokes before and
    after its entry goes; a write after both would stay for ever) loses it here."""
    if any(r.reader_id == reader.reader_id for r in load_readers(home).values()):
        return True
    parsed = naming.parse_blob_name(pack_name)
    if parsed is not None:
        with contextlib.suppress(BlobNotFound):
            store.delete(naming.reader_key_name(parsed.study_key, parsed.version,
                                                reader.reader_id))
    log.info("reader removed while it was granted; its key object deleted reader=%s",
             reader.name)
    return False


def revoke_reader(store: BlobStore, reader_id: str) -> int:
    """Delete every key object of reader `reader_id`; returns how many went."""
    deleted = 0
    for info in list(store.list(naming.STUDIES_PREFIX)):
        parsed = naming.parse_blob_name(info.name)
        if parsed is not None and parsed.kind == "reader-key" and parsed.reader_id == reader_id:
            with contextlib.suppress(BlobNotFound):
                store.delete(info.name)
                deleted += 1
    return deleted
