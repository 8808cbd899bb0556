"""The remote reader's side: find granted studies in the cloud, pull and verify them.

A reader holds three things and never the site key or the name secret:
the cloud URL, credentials that can read the container (for azure://), and
its X25519 private key. Its home (`pacs-edge reader init --home DIR`)::

    DIR/reader.toml          cloud_url = "...", credentials_file = "..." (optional)
    DIR/secrets/reader.key   the private key, 32 raw bytes, 0600

Finding studies: list `studies/`, keep the names `...keys/reader-<rid>` with
this reader's id, unwrap each (the data key of one pack version), read and
open that version's manifest. Versions of one study share the `study_key`
part of their names; the study is the union of its granted versions, a SOP
Instance UID in several versions taking its content from the highest, and one
a version withdraws (it left for another study) gone from the versions below.

Pulling: the instances not already there are read per pack version as the
edge's recall reads them (sync.pack.reader.read_instances): when at least
half of a pack's instances are wanted, the whole pack is streamed once and
decrypted segment by segment; else each is range-read (only its segments).
Each is checked against the manifest (length and SHA-256 of the dataset
bytes), then written as `<to>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm` with
the durable write (temp file, fsync, rename, fsync folder): what is there is
always whole and verified. Temp files are named as this pull's and only those
are swept (sync.pull_temp): other files in the folder are never touched. A
second pull skips files already present whose bytes verify, so an
interrupted pull resumes where it stopped. A version of the study that the
cloud holds but this reader was not granted (`RemoteStudy.not_granted`) makes
what a pull wrote possibly incomplete: the command line says so and fails.

Errors (ReaderClientError, each with a hint; see the tree in sync/__init__.py):
    NotGranted               no granted version of that study for this reader
    NothingLeft              every instance of the study left it for another study
    ReaderIntegrityError     a key object, manifest or pack failed verification
    NewerFormat              a blob of the study is in a format only a newer pacs-edge
                             reads (sync.pack.blob_format tells it from damage)
    PullWriteFailed          the target folder did not take a file (a full disk)
A missing or unsafe reader key raises provisioning's KeyFileError.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import re
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from appliance.base import compat
from appliance.base.dicom_wire import UNLIMITED_PDU
from appliance.base.durable import ensure_dir, fsync_dir
from appliance.base.errors import PacsEdgeError
from appliance.base.uids import is_valid_uid
from provisioning.site_secrets import create_reader_key, load_reader_key
from sync import pull_temp
from sync.blobstore.base import BlobNotFound, BlobStore
from sync.pack import naming
from sync.pack.data_keys import (
    format_reader_public_key,
    parse_key_object,
    reader_public_key,
    unwrap_with_reader,
)
from sync.pack.manifest import Manifest, ManifestEntry, StudyAttributes, open_manifest
from sync.pack.pack_errors import PackError, PackFormatError, PackIntegrityError
from sync.pack.reader import read_instances, verify_instance_chunks
from sync.pack_reads import pack_ranges

CONFIG_FILE = "reader.toml"
# Bytes read at a time when a file already pulled is checked again (a resumed pull).
_VERIFY_CHUNK = 1 << 20
Progress = Callable[[int, int], None]  # (bytes done, bytes total)

_TAMPER_HINT = ("the cloud copy was modified or damaged, or was not written by your site; "
                "nothing unverified was written. Tell the site's administrator (the edge can "
                "check and re-replicate the study)")

_RESUME = "then pull again: the files already pulled are verified and kept"

UPGRADE_HINT = ("the site's edge runs a newer pacs-edge than this machine: upgrade pacs-edge "
                "here, then pull again")

EMPTY_CLOUD_HINT = ("check cloud_url (and the credentials) in the reader home's reader.toml "
                    "against the site's [cloud] url: a mistyped container or folder looks "
                    "empty")


class ReaderClientError(PacsEdgeError):
    pass


class NotGranted(ReaderClientError):
    pass


class NothingLeft(ReaderClientError):
    pass


class ReaderIntegrityError(ReaderClientError):
    pass


class NewerFormat(ReaderClientError):
    pass


class PullWriteFailed(ReaderClientError):
    pass


@dataclass(frozen=True)
class ReaderConfig:
    home: Path
    cloud_url: str
    credentials_file: Path | None = None


def init_reader(home: Path, cloud_url: str, credentials_file: Path | None = None
                ) -> tuple[str, list[str]]:
    """Create the reader's key (kept if present) and config; (public key text, created)."""
    if not cloud_url.startswith(("file:///", "azure://")):
        raise ReaderClientError(f"unsupported cloud URL {cloud_url.split('?', 1)[0]!r}",
                                hint="use file:///ABSOLUTE/PATH or azure://CONTAINER, as the "
                                "edge's [cloud] url")
    home = Path(home)
    created = []
    if create_reader_key(home):
        created.append(str(home / "secrets" / "reader.key"))
    private = load_reader_key(home)
    config = home / CONFIG_FILE
    lines = [f"cloud_url = {json.dumps(cloud_url)}"]
    if credentials_file is not None:
        lines.append(f"credentials_file = {json.dumps(str(Path(credentials_file).resolve()))}")
    text = "\n".join(lines) + "\n"
    if not config.exists():
        from appliance.base.durable import atomic_write

        atomic_write(config, text.encode(), mode=0o640)
        created.append(str(config))
    elif config.read_text(encoding="utf-8") != text:
        raise ReaderClientError(f"{config} exists with another cloud URL or credentials",
                                hint="edit it, or use another --home")
    return format_reader_public_key(reader_public_key(private)), created


def load_reader_config(home: Path) -> ReaderConfig:
    path = Path(home) / CONFIG_FILE
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
        url = str(data["cloud_url"])
    except FileNotFoundError:
        raise ReaderClientError(f"{path} is missing",
                                hint="run `pacs-edge reader init --home DIR --cloud URL` "
                                "first") from None
    except (OSError, KeyError, tomllib.TOMLDecodeError) as exc:
        raise ReaderClientError(f"{path}: cannot be read ({exc})",
                                hint="fix it, or init a new reader home") from exc
    creds = data.get("credentials_file")
    return ReaderConfig(Path(home), url, Path(creds) if creds else None)


@dataclass
class GrantedVersion:
    study_key: str
    version: int
    pack_name: str
    data_key: bytes
    manifest: Manifest


@dataclass
class RemoteStudy:
    """A granted study: the union of its granted versions."""

    study_key: str
    versions: list[GrantedVersion] = field(default_factory=list)
    # Versions of the study the cloud holds (a manifest) with no key object of this
    # reader: a grant that failed, or one not made yet. Without them the study may be
    # incomplete or out of date, which a pull must not pass off as the whole study.
    not_granted: list[int] = field(default_factory=list)

    @property
    def attributes(self) -> StudyAttributes:
        return self.versions[-1].manifest.study

    def current(self) -> list[tuple[GrantedVersion, ManifestEntry]]:
        """(version, entry) of every instance, highest version winning, in series order;
        an instance a version withdraws (it left for another study) is gone from the
        versions below it."""
        latest: dict[str, tuple[GrantedVersion, ManifestEntry]] = {}
        for version in sorted(self.versions, key=lambda v: v.version):
            for sop_uid in version.manifest.withdrawn:
                latest.pop(sop_uid, None)
            for entry in version.manifest.instances:
                latest[entry.instance.sop_uid] = (version, entry)
        return sorted(latest.values(), key=lambda ve: (
            ve[1].instance.series.series_number or 0, ve[1].instance.series.series_uid,
            ve[1].instance.instance_number or 0, ve[1].instance.sop_uid))

    @property
    def modalities(self) -> list[str]:
        return sorted({e.instance.series.modality for _, e in self.current()} - {""})

    def summary(self) -> dict[str, object]:
        s = self.attributes
        current = self.current()
        return {
            "study_uid": s.study_uid, "patient_name": s.patient_name,
            "patient_id": s.patient_id, "birth_date": s.birth_date,
            "study_date": s.study_date, "study_time": s.study_time,
            "accession_number": s.accession_number,
            "study_description": s.study_description,
            "referring_physician": s.referring_physician,
            "modalities": self.modalities,
            "series": len({e.instance.series.series_uid for _, e in current}),
            "instances": len(current), "bytes": sum(e.length for _, e in current),
            "versions": [v.version for v in self.versions],
        }


@dataclass
class Catalogue:
    studies: dict[str, RemoteStudy]
    failures: dict[str, list[str]]  # study_key -> what failed verification
    # No blob at all under studies/: a mistyped cloud URL, not "nothing granted yet".
    cloud_empty: bool = True
    # study_key -> versions in a format only a newer pacs-edge reads (not tampering)
    newer_format: dict[str, list[str]] = field(default_factory=dict)

    def unreadable(self, study_key: str) -> bool:
        return study_key in self.failures or study_key in self.newer_format

    def find(self, study_uid: str) -> RemoteStudy:
        for study in self.studies.values():
            if study.attributes.study_uid == study_uid:
                if study.study_key in self.failures:
                    raise ReaderIntegrityError(
                        "a granted version of this study failed verification: "
                        + "; ".join(self.failures[study.study_key]), hint=_TAMPER_HINT)
                if study.study_key in self.newer_format:
                    raise NewerFormat("a granted version of this study cannot be read here: "
                                      + "; ".join(self.newer_format[study.study_key]),
                                      hint=UPGRADE_HINT)
                if not study.current():
                    raise NothingLeft(
                        "the study holds no instance any more: each was sent again under"
                        " another Study Instance UID, and the site withdrew it from this"
                        " one", hint="find the study they went to with `pacs-edge reader"
                        " list` (by patient or date)")
                return study
        if self.failures:
            raise ReaderIntegrityError(
                f"the study is not among the readable grants, and {len(self.failures)} "
                "granted study(ies) failed verification (it may be one of them)",
                hint=_TAMPER_HINT)
        if self.newer_format:
            raise NewerFormat(
                f"the study is not among the readable grants, and {len(self.newer_format)} "
                "granted study(ies) are in a format only a newer pacs-edge reads (it may be "
                "one of them)", hint=UPGRADE_HINT)
        if self.cloud_empty:
            raise NotGranted("no grant for this study: the cloud holds no studies at all",
                             hint=EMPTY_CLOUD_HINT)
        raise NotGranted("no grant for this study",
                         hint="ask the site's administrator to add you as a reader with a "
                         "scope that covers it (`pacs-edge readers add`); after that, new "
                         "studies appear here as they are replicated")


@dataclass
class PullReport:
    written: int = 0
    skipped: int = 0
    bytes: int = 0
    files: list[tuple[Path, ManifestEntry]] = field(default_factory=list)


class ReaderClient:
    def __init__(self, config: ReaderConfig, store: BlobStore, private_key: bytes) -> None:
        self.config = config
        self.store = store
        self._private = private_key
        self.reader_id = naming.reader_id(reader_public_key(private_key))

    @classmethod
    def open(cls, home: Path) -> ReaderClient:
        from sync.blobstore.factory import CONNECTION_STRING_ENV, CredentialsError, open_blob_store

        config = load_reader_config(home)
        key = load_reader_key(config.home)
        try:
            store = open_blob_store(config.cloud_url, credentials_file=config.credentials_file)
        except CredentialsError as exc:
            if config.credentials_file is not None:
                raise
            # The box's hint names its [cloud] section, which reader.toml does not have.
            raise CredentialsError(
                "no Azure connection string", source=config.cloud_url,
                hint=f"set {CONNECTION_STRING_ENV}, or put the connection string in a file"
                     f" (chmod 600) and add credentials_file = \"FILE\" to"
                     f" {config.home / CONFIG_FILE}") from exc
        return cls(config, store, key)

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> ReaderClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- finding ------------------------------------------------------------------------

    def catalogue(self) -> Catalogue:
        """Every granted study (key objects of this reader, unwrapped, manifests opened)."""
        cat = Catalogue({}, {})
        in_cloud: dict[str, set[int]] = {}  # study key -> versions with a manifest
        for name in self._my_key_objects(cat, in_cloud):
            parsed = naming.parse_blob_name(name)
            assert parsed is not None
            try:
                version = self._open_version(name, parsed.study_key, parsed.version)
            except PackFormatError as exc:  # a newer pacs-edge's blob, not a damaged one
                cat.newer_format.setdefault(parsed.study_key, []).append(
                    f"version {parsed.version}: {exc.message}")
                continue
            except (PackError, BlobNotFound) as exc:  # a manifest missing: incomplete copy
                cat.failures.setdefault(parsed.study_key, []).append(
                    f"version {parsed.version}: {exc.message}")
                continue
            cat.studies.setdefault(parsed.study_key, RemoteStudy(parsed.study_key)) \
                .versions.append(version)
        for study in cat.studies.values():
            study.versions.sort(key=lambda v: v.version)
            granted = {v.version for v in study.versions}
            study.not_granted = sorted(in_cloud.get(study.study_key, set()) - granted)
        return cat

    def _my_key_objects(self, cat: Catalogue, in_cloud: dict[str, set[int]]
                        ) -> Iterator[str]:
        """This reader's key objects; `in_cloud` gets every study version with a manifest."""
        for info in self.store.list(naming.STUDIES_PREFIX):
            cat.cloud_empty = False
            parsed = naming.parse_blob_name(info.name)
            if parsed is None:
                continue
            if parsed.kind == "manifest":
                in_cloud.setdefault(parsed.study_key, set()).add(parsed.version)
            elif parsed.kind == "reader-key" and parsed.reader_id == self.reader_id:
                yield info.name

    def _open_version(self, key_name: str, study_key: str, version: int) -> GrantedVersion:
        blob = self.store.open_range(key_name)
        # Parsed first: a blob cut short is damage (or a newer format), and its bytes
        # 8..24 would not even make a pack_id. The unwrap checks the kind and the AAD.
        pack_id = parse_key_object(blob).pack_id
        data_key = unwrap_with_reader(self._private, pack_id, blob)
        manifest = open_manifest(self.store.open_range(naming.manifest_name(study_key, version)),
                                 data_key, expected_pack_id=pack_id)
        if manifest.study_version != version:
            raise PackIntegrityError("manifest names another study version than its blob")
        return GrantedVersion(study_key, version, naming.pack_name(study_key, version),
                              data_key, manifest)

    # --- pulling ------------------------------------------------------------------------

    def pull(self, study: RemoteStudy, to: Path, *, on_progress: Progress | None = None
             ) -> PullReport:
        """Download, decrypt and verify every current instance of `study` into `to`."""
        to = Path(to)
        ensure_dir(to)
        pull_temp.sweep(to)
        current = study.current()
        total = sum(entry.length for _, entry in current)
        report = PullReport()
        missing: dict[int, list[ManifestEntry]] = {}  # version -> entries still to fetch
        versions = {version.version: version for version, _ in current}
        for version, entry in current:
            path = _target(to, entry)
            report.files.append((path, entry))
            if _verified(path, entry):
                report.skipped += 1
                report.bytes += entry.length
            else:
                missing.setdefault(version.version, []).append(entry)
        if on_progress is not None:
            on_progress(report.bytes, total)
        for number in sorted(missing):
            for entry in self._fetch_version(versions[number], missing[number], to):
                report.written += 1
                report.bytes += entry.length
                if on_progress is not None:
                    on_progress(report.bytes, total)
        return report

    def _fetch_version(self, version: GrantedVersion, entries: list[ManifestEntry],
                       to: Path) -> Iterator[ManifestEntry]:
        """Write `entries` of one pack version under `to`; yields each once its file is
        fsynced and renamed into place (a folder is fsynced once, when the pull moves
        on to the next folder or ends).

        sync.pack.reader.read_instances reads them as the edge's recall does: the
        whole pack streamed once when at least half of it is wanted, else range
        reads of only their segments."""
        pieces = read_instances(pack_ranges(self.store, version.pack_name),
                                lambda: self.store.iter_chunks(version.pack_name),
                                version.data_key, version.manifest, entries)
        fh: BinaryIO | None = None
        tmp = ""
        folder: Path | None = None  # renamed into, not yet fsynced
        try:
            for piece in pieces:
                path = _target(to, piece.entry)
                if fh is None:
                    ensure_dir(path.parent)
                    fd, tmp = pull_temp.create(path)
                    fh = os.fdopen(fd, "wb")
                fh.write(piece.data)
                if piece.last:  # length and SHA-256 verified against the manifest
                    fh.flush()
                    os.fsync(fh.fileno())
                    fh.close()
                    fh = None
                    os.replace(tmp, path)
                    if folder is not None and folder != path.parent:
                        fsync_dir(folder)
                    folder = path.parent
                    yield piece.entry
            if folder is not None:
                fsync_dir(folder)
        except PackIntegrityError as exc:
            raise ReaderIntegrityError(
                f"study version {version.version}, {exc.message}", hint=_TAMPER_HINT) from exc
        except PackFormatError as exc:  # the pack's header names a newer format
            raise NewerFormat(f"study version {version.version}, {exc.message}",
                              hint=UPGRADE_HINT) from exc
        except BlobNotFound as exc:  # its manifest and key object are there: not a typo
            raise ReaderIntegrityError(f"study version {version.version}: its pack is "
                                       "missing from the cloud", hint=_TAMPER_HINT) from exc
        except OSError as exc:  # the target's (the cloud's own errors are BlobStoreErrors)
            # A write or fsync error names no file: it escaped as a traceback.
            raise _write_failed(exc, to) from exc
        finally:
            if fh is not None:
                with contextlib.suppress(OSError):  # its flush fails as the write did
                    fh.close()
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)


def _write_failed(exc: OSError, to: Path) -> PullWriteFailed:
    reason = exc.strerror or type(exc).__name__
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return PullWriteFailed(f"{reason} in {to}", hint="free disk space there (or pull"
                               f" --to another folder), {_RESUME}")
    return PullWriteFailed(f"cannot write the study to {to}: {reason}",
                           hint=f"check the folder and its disk, {_RESUME}")


def _target(to: Path, entry: ManifestEntry) -> Path:
    """`<to>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm`; the UIDs checked first (they
    come from an authenticated manifest, but name a path on this disk)."""
    inst = entry.instance
    if not (is_valid_uid(inst.series.series_uid) and is_valid_uid(inst.sop_uid)):
        raise ReaderIntegrityError("a manifest names an invalid UID", hint=_TAMPER_HINT)
    return to / inst.series.series_uid / f"{inst.sop_uid}.dcm"


def _verified(path: Path, entry: ManifestEntry) -> bool:
    """The file is there with exactly the manifest's length and dataset SHA-256."""
    try:
        if path.stat().st_size != entry.length:
            return False
        with path.open("rb") as fh:  # in chunks: one file of a multi-frame study may be GBs
            verify_instance_chunks(entry, iter(functools.partial(fh.read, _VERIFY_CHUNK), b""))
    except (OSError, PackIntegrityError):
        return False
    return True


def matches(summary: dict[str, object], *, patient: str | None, date: str | None,
            modality: str | None) -> bool:
    """The `reader list` filters: patient (name or ID, substring, any case), date
    (YYYYMMDD, YYYYMMDD-YYYYMMDD, -YYYYMMDD, YYYYMMDD-) and modality."""
    if patient:
        wanted = patient.casefold()
        if not any(wanted in str(summary[k]).casefold() for k in ("patient_name", "patient_id")):
            return False
    if date:
        low, sep, high = date.partition("-")
        value = str(summary["study_date"])
        if not sep:
            high = low
        if (low and value < low) or (high and value > high) or not value:
            return False
    if modality:
        modalities = summary["modalities"]
        assert isinstance(modalities, list)
        if modality.upper() not in modalities:
            return False
    return True


# --- sending to the reader's workstation ---------------------------------------------------

_ADDRESS = re.compile(r"^(?P<ae>[^@]{1,16})@(?P<host>[^:]+|\[[0-9a-fA-F:]+\]):(?P<port>\d{1,5})$")


@dataclass(frozen=True)
class SendReport:
    sent: int
    failed: list[str]


def parse_address(text: str) -> tuple[str, str, int]:
    """AE@HOST:PORT -> (AE title, host, port)."""
    match = _ADDRESS.match(text.strip())
    if match is None or not 0 < int(match["port"]) < 65536 or not match["ae"].strip():
        raise ReaderClientError(f"invalid destination {text!r}",
                                hint="write it as AE_TITLE@HOST:PORT, e.g. "
                                "WORKSTATION@127.0.0.1:104")
    return match["ae"].strip(), match["host"].strip("[]"), int(match["port"])


def send_files(files: list[tuple[Path, ManifestEntry]], address: str, *, calling_ae: str,
               on_progress: Progress | None = None) -> SendReport:
    """C-STORE the pulled files' bytes as they are (no decode, no re-encode) to AE@HOST:PORT."""
    from pynetdicom import AE, _config

    ae_title, host, port = parse_address(address)
    _config.STORE_SEND_CHUNKED_DATASET = True  # stream each file's dataset bytes as stored
    ae = AE(ae_title=calling_ae)
    contexts = sorted({(e.instance.sop_class_uid, e.instance.transfer_syntax) for _, e in files})
    if len(contexts) > 128:
        raise ReaderClientError("the study needs more than 128 presentation contexts",
                                hint="send it with a DICOM tool that opens several associations")
    for sop_class, syntax in contexts:
        ae.add_requested_context(sop_class, [syntax])
    compat.close_requestor_reactor_race()
    assoc = ae.associate(host, port, ae_title=ae_title)
    if not assoc.is_established:
        raise ReaderClientError(f"association with {ae_title} at {host}:{port} was not "
                                "established (rejected, aborted or nobody listening)",
                                hint="check the workstation's AE title, address and that it "
                                f"accepts calls from {calling_ae}")
    compat.set_nodelay(assoc)  # else each C-STORE waits ~40 ms for a delayed ACK
    compat.cap_peer_maximum_pdu(assoc, UNLIMITED_PDU)  # never one PDU of a whole instance
    compat.ack_after_sends(assoc)  # and so would its response, from a peer with Nagle on
    sent, failed = 0, []
    try:
        for done, (path, _entry) in enumerate(files, 1):
            status = assoc.send_c_store(path)
            code = getattr(status, "Status", None)
            if code is not None and (code == 0 or 0xB000 <= code <= 0xBFFF):
                sent += 1
            else:
                failed.append(f"{path.name}: status "
                              f"{'none (connection lost)' if code is None else hex(code)}")
            if on_progress is not None:
                on_progress(done, len(files))
            if not assoc.is_established:
                failed.append("association ended early")
                break
    finally:
        if assoc.is_established:
            assoc.release()
    return SendReport(sent, failed)
