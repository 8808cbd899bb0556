"""What the drop folder ingests: plain files, DICOMDIR media sets, ZIP archives.

A *unit* is what becomes ready and is processed as one:

- a file, usually one instance; a file that starts with a ZIP signature is an
  archive whose members are ingested one by one;
- a *media set*: a folder holding a `DICOMDIR` (a CD/DVD copied in). Its
  instances are the files its directory records reference (ReferencedFileID);
  the DICOMDIR itself is an index, not an instance, and is never stored.
  Every file below that folder belongs to the unit, which is ready only when
  the whole tree is quiet: a half-copied CD is not read half-way. Files the
  DICOMDIR does not reference stay where they are and, once the DICOMDIR is
  gone, are handled as plain files (a DICOM file the DICOMDIR forgot is still
  ingested; a viewer's EXE goes to rejected/).

ZIP archives are read defensively. Member names never become paths while
ingesting (each member is streamed to an anonymous temp file; names are only
used, sanitised, below rejected/), so zip-slip has nothing to aim at; a member
that is a symlink is refused (the archive goes to rejected/). Bombs are
bounded: member count, declared size per member and in total, actual bytes
never beyond the declared size (zipfile stops there and checks the CRC; we
count too), one member on disk at a time, and the free space checked first.

Symlinks are never followed (see confine): files, DICOMDIRs and archives are
opened through a descriptor walk from the watched root, and a DICOMDIR record
whose path crosses a symlink counts as invalid, like one that says `..`.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import lzma
import os
import shutil
import stat
import tempfile
import zipfile
import zlib
from collections.abc import Hashable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import pydicom
from pydicom.filereader import read_preamble
from pydicom.multival import MultiValue
from pydicom.uid import ExplicitVRLittleEndian

from appliance.base import compat
from appliance.base.durable import is_no_space
from appliance.base.errors import InvalidInstance, OutOfSpace, UnsafePath
from appliance.base.uids import normalise_uid
from appliance.dropfolder import confine
from appliance.dropfolder.layout import Root, is_ignored

DICOMDIR_NAMES = ("DICOMDIR", "dicomdir")
ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")

# A DICOMDIR is read whole into memory; a DVD's, indexing some 10,000 files, is a few MB.
MAX_DICOMDIR_BYTES = 64 << 20
MAX_ZIP_MEMBERS = 100_000
MAX_ZIP_MEMBER_BYTES = 16 << 30
MAX_ZIP_TOTAL_BYTES = 256 << 30
ZIP_SPACE_MARGIN = 256 << 20  # left free on the temp folder's file system while unpacking
_CHUNK = 1 << 20


class UnitKind(enum.Enum):
    FILE = "file"
    MEDIA = "media"


@dataclass(frozen=True)
class Unit:
    kind: UnitKind
    path: Path  # the file, or the folder holding the DICOMDIR
    root: Root


# --- finding units ---------------------------------------------------------------


def find_dicomdir(folder: Path) -> Path | None:
    for name in DICOMDIR_NAMES:
        candidate = folder / name
        if file_signature(candidate) is not None:  # a regular file, not a symlink
            return candidate
    return None


def unit_for(path: Path, root: Root) -> Unit:
    """The unit a file belongs to: the nearest enclosing media set, else the file itself."""
    folder = path.parent
    while True:
        if find_dicomdir(folder) is not None:
            return Unit(UnitKind.MEDIA, folder, root)
        if folder == root.path or not folder.is_relative_to(root.path):
            return Unit(UnitKind.FILE, path, root)
        folder = folder.parent


def walk_files(folder: Path, unreadable: list[Path] | None = None) -> Iterator[Path]:
    """Regular, non-ignored files below `folder`; symlinks are neither followed nor listed.

    A folder that cannot be listed (one the service user may not read, a disk error)
    is added to `unreadable`: its files are not there for the drop folder, and the
    caller says so rather than skip them in silence."""

    def note(exc: OSError) -> None:
        if (unreadable is not None and exc.filename is not None
                and not isinstance(exc, FileNotFoundError | NotADirectoryError)):
            unreadable.append(Path(os.fsdecode(exc.filename)))

    for dirpath, dirnames, filenames in os.walk(folder, onerror=note):
        dirnames[:] = sorted(d for d in dirnames if not is_ignored(d))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if not is_ignored(name) and not path.is_symlink():
                yield path


def signature(unit: Unit) -> Hashable | None:
    """What must stay unchanged for the unit to be complete; None when it is gone.

    Beyond a file's signature it holds the inode's change time: a unit left alone
    because it could not be read or removed is looked at again once the operator
    fixes that (chmod, chown, chattr change the ctime, not the content or mtime)."""
    if unit.kind is UnitKind.FILE:
        return _watch_signature(unit.path)
    if find_dicomdir(unit.path) is None:
        return None
    digest = hashlib.sha256()
    for path in walk_files(unit.path):
        sig = _watch_signature(path)
        if sig is not None:
            digest.update(f"{path}\0{sig}\0".encode(errors="surrogateescape"))
    return digest.hexdigest()


def file_signature(path: Path) -> tuple[int, int, int] | None:
    st = _regular_lstat(path)
    return None if st is None else (st.st_size, st.st_mtime_ns, st.st_ino)


def _watch_signature(path: Path) -> tuple[int, int, int, int] | None:
    st = _regular_lstat(path)
    return None if st is None else (st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)


def _regular_lstat(path: Path) -> os.stat_result | None:
    """None unless `path` is a regular file this process can see: gone, or below a
    folder it may not search (PermissionError; walk_files reports that folder)."""
    try:
        st = path.lstat()
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return None
    return st if stat.S_ISREG(st.st_mode) else None


# --- DICOMDIR ----------------------------------------------------------------------


@dataclass(frozen=True)
class MediaIndex:
    files: list[Path]  # referenced files that exist, in record order, each once
    missing: int  # references to files that are not there (already ingested, or lost)
    invalid: int  # references that would leave the media folder (.., a symlink) or are malformed


def _check_dicomdir(fh: BinaryIO) -> None:
    """Refuse what pydicom's dcmread would read whole into memory without bound: a
    DICOMDIR larger than MAX_DICOMDIR_BYTES, or one in another transfer syntax than
    Explicit VR Little Endian, which PS3.10 requires of it (a deflated one could inflate
    to any size). Leaves `fh` at its start."""
    if os.fstat(fh.fileno()).st_size > MAX_DICOMDIR_BYTES:
        raise InvalidInstance(f"DICOMDIR is larger than {MAX_DICOMDIR_BYTES >> 20} MB")
    read_preamble(fh, force=False)
    syntax = normalise_uid(compat.read_file_meta(fh).get("TransferSyntaxUID", ""))
    if syntax != ExplicitVRLittleEndian:
        raise InvalidInstance("DICOMDIR is not in Explicit VR Little Endian, as PS3.10"
                              " requires")
    fh.seek(0)


def read_media_index(dicomdir: Path, root: Path) -> MediaIndex:
    """The files a DICOMDIR's records reference, resolved below its folder.

    CD file systems are case-insensitive and may show ISO 9660 version
    suffixes (`IM1;1`), so components are matched ignoring both. A reference
    through a symlink is invalid: its file is not listed (and so never read,
    moved or deleted). The DICOMDIR is opened from `root` (see confine).
    """
    try:
        with confine.open_file(root, dicomdir) as fh:
            _check_dicomdir(fh)
            ds = pydicom.dcmread(fh, force=False)
        file_ids: list[Any] = [record.get("ReferencedFileID")
                               for record in ds.DirectoryRecordSequence]
    except (UnsafePath, InvalidInstance):
        raise
    except OSError as exc:
        if exc.errno is not None:  # the disk's; pydicom's own (a cut-off file) have none
            raise
        raise InvalidInstance(f"DICOMDIR cannot be parsed ({type(exc).__name__})") from exc
    except Exception as exc:  # pydicom raises many types for bad input, reading or converting
        raise InvalidInstance(f"DICOMDIR cannot be parsed ({type(exc).__name__})") from exc
    folder = dicomdir.parent
    files: list[Path] = []
    seen: set[Path] = set()
    missing = invalid = 0
    listings: dict[Path, dict[str, str]] = {}
    for file_id in file_ids:
        if not file_id:
            continue
        parts = _file_id_parts(file_id)
        if parts is None or not all(_safe_component(p) for p in parts):
            invalid += 1
            continue
        resolved = _resolve(folder, parts, listings)
        if resolved is None:
            missing += 1
        elif resolved is _THROUGH_SYMLINK:
            invalid += 1
        elif resolved not in seen:
            seen.add(resolved)
            files.append(resolved)
    return MediaIndex(files, missing, invalid)


def _file_id_parts(file_id: Any) -> list[str] | None:
    """The path components of a Referenced File ID (CS, one or more values); None for a
    value of another kind (a damaged VR makes it a number, say)."""
    if isinstance(file_id, str):
        return [file_id]
    if isinstance(file_id, MultiValue | list) and all(isinstance(p, str) for p in file_id):
        return [str(p) for p in file_id]
    return None


def _safe_component(part: str) -> bool:
    return part not in ("", ".", "..") and not any(c in part for c in "/\\\0:")


_THROUGH_SYMLINK = Path("/")  # _resolve's answer for a path that crosses a symlink


def _resolve(folder: Path, parts: list[str], listings: dict[Path, dict[str, str]]) -> Path | None:
    """The existing regular file `parts` names below `folder`, None if there is none,
    _THROUGH_SYMLINK if a component is a symlink. Each component is lstat'ed before
    the next is looked up in it; the processor opens the file through confine, which
    also catches a folder swapped for a symlink after this check."""
    current = folder
    for depth, part in enumerate(parts, 1):
        if current not in listings:
            try:
                names = os.listdir(current)
            except OSError:
                return None
            listings[current] = {_fold(n): n for n in sorted(names, reverse=True)}
            listings[current].update({n: n for n in names})
        name = listings[current].get(part) or listings[current].get(_fold(part))
        if name is None:
            return None
        current = current / name
        try:
            mode = current.lstat().st_mode
        except OSError:
            return None
        if stat.S_ISLNK(mode):
            return _THROUGH_SYMLINK
        wanted = stat.S_ISREG if depth == len(parts) else stat.S_ISDIR
        if not wanted(mode):
            return None
    return current


def _fold(name: str) -> str:
    return name.lower().removesuffix(";1")


# --- ZIP ---------------------------------------------------------------------------


def is_zip(root: Path, path: Path) -> bool:
    with confine.open_file(root, path) as fh:
        return fh.read(4) in ZIP_MAGIC


@dataclass(frozen=True)
class ZipMember:
    info: zipfile.ZipInfo
    parts: tuple[str, ...]  # sanitised name components, for rejected/ only

    @property
    def is_media_index(self) -> bool:
        return bool(self.parts) and self.parts[-1].upper() == "DICOMDIR"


class ZipSource:
    """A ZIP archive below `root` opened for reading its members one at a time
    (blocking calls)."""

    def __init__(self, root: Path, path: Path) -> None:
        self._file = confine.open_file(root, path)
        try:
            self._zip = zipfile.ZipFile(self._file)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError,
                NotImplementedError) as exc:  # a version of the format zipfile cannot read
            self._file.close()
            raise InvalidInstance(f"ZIP archive cannot be read ({type(exc).__name__})") from exc
        self.members = [
            ZipMember(info, sanitise_member_name(info.filename, n))
            for n, info in enumerate(self._zip.infolist())
            if not info.filename.endswith("/")  # ZipInfo.is_dir() raises on an empty name
        ]
        if len(self.members) > MAX_ZIP_MEMBERS:
            self.close()
            raise InvalidInstance(f"ZIP archive has more than {MAX_ZIP_MEMBERS} members")
        if any(m.info.header_offset < 0 for m in self.members):
            # A damaged central directory; seeking there would fail as an I/O error (EINVAL).
            self.close()
            raise InvalidInstance("ZIP archive cannot be read (member before its start)")
        total = sum(m.info.file_size for m in self.members)
        if total > MAX_ZIP_TOTAL_BYTES:
            self.close()
            raise InvalidInstance("ZIP archive expands beyond the size limit")

    def close(self) -> None:
        self._zip.close()
        self._file.close()

    def __enter__(self) -> ZipSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def extract(self, member: ZipMember, tmp_dir: Path) -> Path:
        """Stream one member to a fresh temp file in `tmp_dir`; the caller removes it."""
        info = member.info
        if info.flag_bits & 0x1:
            raise InvalidInstance("ZIP member is encrypted")
        if stat.S_ISLNK(info.external_attr >> 16):
            # Unpacked by another tool it would point anywhere; here it is never followed.
            raise InvalidInstance("ZIP member is a symbolic link")
        if info.file_size > MAX_ZIP_MEMBER_BYTES:
            raise InvalidInstance("ZIP member expands beyond the size limit")
        if shutil.disk_usage(tmp_dir).free < info.file_size + ZIP_SPACE_MARGIN:
            raise OutOfSpace("no space to unpack a ZIP member")
        fd, name = tempfile.mkstemp(dir=tmp_dir, prefix="zip-", suffix=".member")
        try:
            with os.fdopen(fd, "wb") as out, self._zip.open(info) as src:
                written = 0
                while chunk := src.read(_CHUNK):
                    written += len(chunk)
                    if written > info.file_size:
                        raise InvalidInstance("ZIP member is larger than declared")
                    out.write(chunk)
        except BaseException as exc:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)
            mapped = _zip_error(exc)
            if mapped is exc:
                raise
            raise mapped from exc
        return Path(name)


_CORRUPT = (zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError, RuntimeError, ValueError)


def _zip_error(exc: BaseException) -> BaseException:
    """zipfile/zlib failures as a PHI-free rejection; a full disk as OutOfSpace (retried).

    The decompressors report damaged data in their own ways: zlib.error, LZMAError,
    and, from bz2, an OSError that carries no errno (a real I/O error has one and is
    retried, as the file may be readable later)."""
    if is_no_space(exc):
        return OutOfSpace("no space to unpack a ZIP member")
    if isinstance(exc, NotImplementedError):
        return InvalidInstance("ZIP member uses an unsupported compression method")
    if isinstance(exc, _CORRUPT) or (isinstance(exc, OSError) and exc.errno is None):
        return InvalidInstance(f"ZIP member is corrupt ({type(exc).__name__})")
    return exc


def sanitise_member_name(name: str, index: int) -> tuple[str, ...]:
    """Member name as safe relative path components (no root, no `..`, no drive)."""
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".", "..")]
    parts = [p.replace("\0", "_").replace(":", "_") for p in parts]
    return tuple(parts) if parts else (f"member-{index}",)
