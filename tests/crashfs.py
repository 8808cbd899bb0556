"""crashfs: a FUSE file system that can lose power, for the power-loss tests.

A SIGKILL of serve proves little about durability: the page cache outlives the
process, so a missing or misordered fsync goes unseen. A real power cut needs a
disk that forgets, and this machine has no device-mapper (dm-flakey); it has
/dev/fuse. crashfs passes every operation through to a backing folder (the live
view the processes see) and keeps, beside it, the durable view: what a power
loss would leave on storage that promises no more than POSIX does.

The model, strict POSIX durability, the worst a power loss may leave:
- every object (file, folder, symbolic link) gets its own id when it is created;
  backing inode numbers are never used as identities (they are reused);
- a file's contents become durable only at an fsync or fdatasync of that file
  (FUSE fsync, datasync or not): the durable contents are then the contents it
  had when that fsync started;
- a folder's entries (create, mkdir, link, symlink, unlink, rename in and out,
  rmdir) become durable only at an fsync of THAT folder (FUSE fsyncdir), which
  makes its entries as they were when the fsync started durable; a rename touches
  two folders, each made durable by its own fsync. A symbolic link's target is
  part of its creation;
- everything present at mount time is durable;
- an fsync takes effect when it returns: one under way at the cut counts for
  nothing (`--fsync-delay` makes each last that long, as a disk's flush does, so
  that a program that answers before its fsyncs returned is caught in the act).
  Concurrent fsyncs of one object run one after the other. Nothing changes an
  object while its own fsync runs: the kernel holds its inode lock through FUSE
  fsync and fsyncdir (a write, or a create in the folder, waits), so what the
  delay exposes is the state of the other objects.

A power cut (the `cut` command on the control socket, outside the mount) takes
the lock every operation takes, records time.monotonic() of the cut and freezes
the file system: every later operation fails with EIO. `materialize DEST` then
writes the durable view into DEST: from the root, the durable entries only, each
file with its durable contents, modes and owners copied from the backing files
(serve checks the modes of its secrets). With `--keep-probability P` (and
`--keep-seed`), the cut first makes a seeded random share P of the objects with
unsynced changes durable as they are, as a real disk may write some of what it
was never asked to flush: a folder's entries, or a file's contents, whole.

Run as `python crashfs.py --backing B --state S --mount M [...]`, in its own
process; `CrashFS` below starts, drives and stops it for a test.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import random
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

BLOCK = 1 << 16
ROOT_ID = 1
START_TIMEOUT = 20.0
STOP_TIMEOUT = 20.0
CONTROL_TIMEOUT = 120.0


# -- the file system process ---------------------------------------------------------

@dataclass
class _Object:
    """One file, folder or symbolic link, by id. A folder's `live` entries are what its
    backing folder holds; `durable` what a power loss leaves. A file's `dirty` blocks
    (block -> write generation) and `floor` (lowest length truncated to) are what its
    durable copy (`<state>/objects/<id>`) lacks."""

    id: int
    kind: str  # "dir", "file" or "link"
    live: dict[str, int] = field(default_factory=dict)
    durable: dict[str, int] = field(default_factory=dict)
    links: set[tuple[int, str]] = field(default_factory=set)  # live (folder id, name)
    dirty: dict[int, int] = field(default_factory=dict)
    floor: tuple[int, int] | None = None  # (length, generation)
    target: str = ""
    last_stat: os.stat_result | None = None
    sync_lock: threading.Lock = field(default_factory=threading.Lock)


class PowerCut(OSError):
    def __init__(self) -> None:
        super().__init__(errno.EIO, "crashfs: the power was cut")


def _make_operations(base: type) -> type:
    """The FUSE operations class (mfusepy is imported by the file system process only)."""

    class CrashOperations(base):  # type: ignore[misc,valid-type]
        use_ns = True
        flag_nullpath_ok = True

        def __init__(self, backing: str, state: str, fsync_delay: float,
                     keep_probability: float, keep_seed: int, slow: dict[str, float]) -> None:
            self.root = os.path.abspath(backing)
            self.shadow = os.path.join(state, "objects")
            os.makedirs(self.shadow, exist_ok=True)
            self.fsync_delay = fsync_delay
            self.slow = slow  # relative path -> its fsyncs' delay, instead of fsync_delay
            self.syncing: set[int] = set()  # objects whose fsync is waiting out its delay
            self.keep_probability = keep_probability
            self.keep_seed = keep_seed
            self._lock = threading.Lock()
            self.cut_at: float | None = None
            self.objects: dict[int, _Object] = {}
            self.handles: dict[int, int] = {}  # backing fd -> object id
            self.generation = 0
            self._scan()

        # -- bookkeeping ---------------------------------------------------------

        def _new(self, kind: str) -> _Object:
            obj = _Object(len(self.objects) + ROOT_ID, kind)
            self.objects[obj.id] = obj
            return obj

        def _scan(self) -> None:
            """Everything in the backing folder at mount time is durable."""
            root = self._new("dir")
            by_inode: dict[tuple[int, int], int] = {}
            folders = {self.root: root}
            for dirpath, dirnames, filenames in os.walk(self.root):
                parent = folders[dirpath]
                for name in sorted(dirnames + filenames):
                    path = os.path.join(dirpath, name)
                    st = os.lstat(path)
                    if stat.S_ISDIR(st.st_mode):
                        obj = self._new("dir")
                        folders[path] = obj
                    elif (st.st_dev, st.st_ino) in by_inode:  # a hard link, within this scan
                        obj = self.objects[by_inode[(st.st_dev, st.st_ino)]]
                    elif stat.S_ISLNK(st.st_mode):
                        obj = self._new("link")
                        obj.target = os.readlink(path)
                    else:
                        obj = self._new("file")
                        by_inode[(st.st_dev, st.st_ino)] = obj.id
                        shutil.copyfile(path, self._shadow(obj.id))
                    parent.live[name] = parent.durable[name] = obj.id
                    obj.links.add((parent.id, name))

        def _shadow(self, oid: int) -> str:
            return os.path.join(self.shadow, str(oid))

        def _backing(self, path: str) -> str:
            return os.path.join(self.root, path.lstrip("/"))

        def _resolve(self, path: str) -> _Object:
            obj = self.objects[ROOT_ID]
            for part in path.strip("/").split("/"):
                if part:
                    obj = self.objects[obj.live[part]]
            return obj

        def _parent(self, path: str) -> tuple[_Object, str]:
            head, name = os.path.split(path.rstrip("/"))
            return self._resolve(head), name

        def _live_path(self, obj: _Object) -> str | None:
            parts: list[str] = []
            seen: set[int] = set()
            while obj.id != ROOT_ID:
                if not obj.links or obj.id in seen:
                    return None
                seen.add(obj.id)
                parent_id, name = min(obj.links)
                parts.append(name)
                obj = self.objects[parent_id]
            return os.path.join(self.root, *reversed(parts))

        def _stat(self, path: str) -> os.stat_result | None:
            """The mode and owner of a name about to go: kept in case it was the last."""
            try:
                return os.lstat(path)
            except OSError:
                return None

        def _detach(self, parent: _Object, name: str, st: os.stat_result | None) -> None:
            """`name` left `parent`'s live entries (unlink, rmdir, rename away or over)."""
            oid = parent.live.pop(name, None)
            if oid is None:
                return
            obj = self.objects[oid]
            obj.links.discard((parent.id, name))
            if not obj.links:
                obj.last_stat = st

        def _attach(self, parent: _Object, name: str, obj: _Object) -> None:
            parent.live[name] = obj.id
            obj.links.add((parent.id, name))

        @contextlib.contextmanager
        def _op(self) -> Iterator[None]:
            with self._lock:
                if self.cut_at is not None:
                    raise PowerCut()
                yield

        def _own(self, path: str) -> None:
            from mfusepy import fuse_get_context
            uid, gid, _pid = fuse_get_context()
            if (uid, gid) != (os.getuid(), os.getgid()):
                os.lchown(path, uid, gid)

        def _dirty(self, obj: _Object, offset: int, length: int) -> None:
            self.generation += 1
            for block in range(offset // BLOCK, (offset + max(length, 1) - 1) // BLOCK + 1):
                obj.dirty[block] = self.generation

        def _truncated(self, obj: _Object, length: int) -> None:
            self.generation += 1
            if obj.floor is None or length <= obj.floor[0]:
                obj.floor = (length, self.generation)
            else:
                obj.floor = (obj.floor[0], self.generation)

        # -- durability ------------------------------------------------------------

        def _capture_file(self, obj: _Object, fd: int) -> tuple[int, tuple[int, int] | None,
                                                                  dict[int, tuple[int, bytes]]]:
            size = os.fstat(fd).st_size
            blocks = {block: (gen, os.pread(fd, BLOCK, block * BLOCK))
                      for block, gen in obj.dirty.items() if block * BLOCK < size}
            return size, obj.floor, blocks

        def _apply_file(self, obj: _Object, size: int, floor: tuple[int, int] | None,
                        blocks: dict[int, tuple[int, bytes]]) -> None:
            fd = os.open(self._shadow(obj.id), os.O_RDWR | os.O_CREAT, 0o600)
            with os.fdopen(fd, "r+b") as shadow:
                if floor is not None:
                    shadow.truncate(min(floor[0], size))
                shadow.truncate(size)
                for block, (_gen, data) in blocks.items():
                    shadow.seek(block * BLOCK)
                    shadow.write(data)
            for block, (gen, _data) in blocks.items():
                if obj.dirty.get(block) == gen:
                    del obj.dirty[block]
            for block in [b for b in obj.dirty if b * BLOCK >= size]:
                if floor is None or obj.dirty[block] <= floor[1]:
                    del obj.dirty[block]
            if obj.floor == floor:
                obj.floor = None

        def _durable(self, obj: _Object, capture: object, apply: object) -> None:
            """Capture the object's state under the lock, wait the fsync delay, then make
            the capture durable unless the power was cut meanwhile. One at a time per
            object, so captures are applied in the order they were taken."""
            with obj.sync_lock:
                with self._op():
                    taken = capture()  # type: ignore[operator]
                    path = self._live_path(obj)
                    delay = self.slow.get(os.path.relpath(path, self.root) if path else "",
                                          self.fsync_delay)
                    self.syncing.add(obj.id)
                try:
                    if delay:
                        time.sleep(delay)
                finally:
                    with self._lock:
                        self.syncing.discard(obj.id)
                with self._op():
                    apply(taken)  # type: ignore[operator]

        def fsync(self, path: str | None, datasync: int, fh: int) -> int:
            obj = self.objects[self.handles[fh]]
            reader = os.open(f"/proc/self/fd/{fh}", os.O_RDONLY)
            try:
                self._durable(obj, lambda: self._capture_file(obj, reader),
                              lambda taken: self._apply_file(obj, *taken))
            finally:
                os.close(reader)
            return 0

        def fsyncdir(self, path: str | None, datasync: int, fh: int) -> int:
            obj = self.objects[self.handles[fh]]

            def apply(entries: dict[str, int]) -> None:
                obj.durable = entries

            self._durable(obj, lambda: dict(obj.live), apply)
            return 0

        # -- the power cut and the durable view ---------------------------------------

        def syncing_paths(self) -> list[str]:
            """The paths (relative) of the objects whose fsync is under way."""
            with self._lock:
                paths = (self._live_path(self.objects[oid]) for oid in self.syncing)
                return sorted(os.path.relpath(p, self.root) for p in paths if p is not None)

        def cut(self) -> float:
            with self._lock:
                if self.cut_at is None:
                    self.cut_at = time.monotonic()
                    if self.keep_probability:
                        self._keep_some()
                return self.cut_at

        def _keep_some(self) -> None:
            rng = random.Random(self.keep_seed)
            for obj in sorted(self.objects.values(), key=lambda o: o.id):
                if obj.kind == "dir" and obj.durable != obj.live:
                    if rng.random() < self.keep_probability:
                        obj.durable = dict(obj.live)
                elif obj.kind == "file" and (obj.dirty or obj.floor is not None):
                    path = self._live_path(obj)
                    if path is None or rng.random() >= self.keep_probability:
                        continue
                    fd = os.open(path, os.O_RDONLY)
                    try:
                        self._apply_file(obj, *self._capture_file(obj, fd))
                    finally:
                        os.close(fd)

        def materialize(self, dest: str) -> tuple[int, int]:
            """Write the durable view into `dest` (made here); (files, folders) written."""
            with self._lock:
                if self.cut_at is None:
                    raise RuntimeError("materialize comes after the cut")
                os.mkdir(dest)
                counts = [0, 0]
                self._write_dir(self.objects[ROOT_ID], dest, {ROOT_ID}, {}, counts)
                self._copy_meta(self.objects[ROOT_ID], dest)
                return counts[0], counts[1]

        def _write_dir(self, folder: _Object, dest: str, above: set[int],
                       written: dict[int, str], counts: list[int]) -> None:
            for name, oid in sorted(folder.durable.items()):
                obj = self.objects[oid]
                path = os.path.join(dest, name)
                if obj.kind == "dir":
                    if oid in above:  # a cycle the durable view may hold: cut it
                        continue
                    os.mkdir(path)
                    counts[1] += 1
                    self._write_dir(obj, path, above | {oid}, written, counts)
                elif obj.kind == "link":
                    os.symlink(obj.target, path)
                    continue
                elif oid in written:
                    os.link(written[oid], path)
                    continue
                else:
                    shadow = self._shadow(oid)
                    if os.path.exists(shadow):
                        shutil.copyfile(shadow, path)
                    else:
                        open(path, "wb").close()
                    written[oid] = path
                    counts[0] += 1
                self._copy_meta(obj, path)

        def _copy_meta(self, obj: _Object, path: str) -> None:
            live = self._live_path(obj)
            st = obj.last_stat
            if live is not None:
                with contextlib.suppress(OSError):
                    st = os.lstat(live)
            if st is not None:
                os.chown(path, st.st_uid, st.st_gid)
                os.chmod(path, stat.S_IMODE(st.st_mode))

        # -- pass-through operations -------------------------------------------------

        def getattr(self, path: str | None, fh: int | None = None) -> dict[str, int]:
            with self._op():
                st = os.fstat(fh) if fh is not None else os.lstat(self._backing(path or "/"))
            return {key: getattr(st, key) for key in (
                "st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_blocks",
                "st_blksize")} | {"st_atime": st.st_atime_ns, "st_mtime": st.st_mtime_ns,
                                  "st_ctime": st.st_ctime_ns}

        def access(self, path: str, amode: int) -> int:
            with self._op():
                if not os.access(self._backing(path), amode):
                    raise OSError(errno.EACCES, "access")
            return 0

        def readlink(self, path: str) -> str:
            with self._op():
                return os.readlink(self._backing(path))

        def statfs(self, path: str) -> dict[str, int]:
            with self._op():
                sv = os.statvfs(self.root)
            return {key: getattr(sv, key) for key in (
                "f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                "f_ffree", "f_favail", "f_namemax")}

        def opendir(self, path: str) -> int:
            with self._op():
                fd = os.open(self._backing(path), os.O_RDONLY | os.O_DIRECTORY)
                self.handles[fd] = self._resolve(path).id
                return fd

        def readdir(self, path: str | None, fh: int) -> list[str]:
            with self._op():
                return [".", "..", *os.listdir(f"/proc/self/fd/{fh}")]

        def releasedir(self, path: str | None, fh: int) -> int:
            with self._lock:
                self.handles.pop(fh, None)
                os.close(fh)
            return 0

        def mkdir(self, path: str, mode: int) -> int:
            with self._op():
                parent, name = self._parent(path)
                os.mkdir(self._backing(path), mode)
                self._own(self._backing(path))
                self._attach(parent, name, self._new("dir"))
            return 0

        def rmdir(self, path: str) -> int:
            with self._op():
                parent, name = self._parent(path)
                st = self._stat(self._backing(path))
                os.rmdir(self._backing(path))
                self._detach(parent, name, st)
            return 0

        def unlink(self, path: str) -> int:
            with self._op():
                parent, name = self._parent(path)
                st = self._stat(self._backing(path))
                os.unlink(self._backing(path))
                self._detach(parent, name, st)
            return 0

        def symlink(self, target: str, source: str) -> int:
            with self._op():
                parent, name = self._parent(target)
                os.symlink(source, self._backing(target))
                self._own(self._backing(target))
                obj = self._new("link")
                obj.target = source
                self._attach(parent, name, obj)
            return 0

        def link(self, target: str, source: str) -> int:
            with self._op():
                parent, name = self._parent(target)
                obj = self._resolve(source)
                os.link(self._backing(source), self._backing(target))
                self._attach(parent, name, obj)
            return 0

        def rename(self, old: str, new: str) -> int:
            with self._op():
                old_parent, old_name = self._parent(old)
                new_parent, new_name = self._parent(new)
                moving = old_parent.live[old_name]
                if new_parent.live.get(new_name) == moving:
                    return 0  # two names of one file: rename(2) does nothing
                replaced = self._stat(self._backing(new))
                os.rename(self._backing(old), self._backing(new))
                self._detach(new_parent, new_name, replaced)
                self._detach(old_parent, old_name, None)
                self._attach(new_parent, new_name, self.objects[moving])
            return 0

        def chmod(self, path: str | None, mode: int) -> int:
            with self._op():
                if path is not None:
                    os.chmod(self._backing(path), mode)
            return 0

        def chown(self, path: str | None, uid: int, gid: int) -> int:
            with self._op():
                if path is not None:
                    os.lchown(self._backing(path), uid, gid)
            return 0

        def utimens(self, path: str | None, times: tuple[int, int] | None = None) -> int:
            with self._op():
                if path is not None:
                    os.utime(self._backing(path), ns=times)
            return 0

        def truncate(self, path: str | None, length: int, fh: int | None = None) -> int:
            with self._op():
                if fh is not None:
                    os.ftruncate(fh, length)
                    obj = self.objects[self.handles[fh]]
                else:
                    os.truncate(self._backing(path or "/"), length)
                    obj = self._resolve(path or "/")
                self._truncated(obj, length)
            return 0

        def _open(self, path: str, flags: int, mode: int, obj: _Object | None) -> int:
            flags &= ~os.O_APPEND  # the kernel sends appends at the offset of the end
            fd = os.open(self._backing(path), flags, mode)
            if obj is None:
                parent, name = self._parent(path)
                obj = self._new("file")
                self._attach(parent, name, obj)
                self._own(self._backing(path))
            self.handles[fd] = obj.id
            if flags & os.O_TRUNC:
                self._truncated(obj, 0)
            return fd

        def create(self, path: str, mode: int, flags: int) -> int:
            with self._op():
                parent, name = self._parent(path)
                existing = parent.live.get(name)
                obj = None if existing is None else self.objects[existing]
                return self._open(path, flags | os.O_CREAT, mode, obj)

        def open(self, path: str, flags: int) -> int:
            with self._op():
                return self._open(path, flags, 0, self._resolve(path))

        def read(self, path: str | None, size: int, offset: int, fh: int) -> bytes:
            with self._op():
                return os.pread(fh, size, offset)

        def write(self, path: str | None, data: bytes, offset: int, fh: int) -> int:
            with self._op():
                written = os.pwrite(fh, data, offset)
                self._dirty(self.objects[self.handles[fh]], offset, written)
                return written

        def fallocate(self, path: str | None, mode: int, offset: int, size: int,
                      fh: int) -> int:
            if mode:  # hole punching and friends: nothing here uses them
                raise OSError(errno.EOPNOTSUPP, "fallocate mode")
            with self._op():
                os.posix_fallocate(fh, offset, size)  # zeros: durable as the size is
            return 0

        def flush(self, path: str | None, fh: int) -> int:
            with self._op():
                return 0

        def release(self, path: str | None, fh: int) -> int:
            with self._lock:
                self.handles.pop(fh, None)
                os.close(fh)
            return 0

    return CrashOperations


def _serve_control(ops: object, sock_path: str) -> None:
    """The control socket: one command per connection, one line back."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(sock_path)
    server.listen(4)
    while True:
        conn, _ = server.accept()
        with conn:
            words = conn.makefile("r").readline().split(" ", 1)
            try:
                if words[0].strip() == "cut":
                    reply = f"ok {ops.cut()!r}"  # type: ignore[attr-defined]
                elif words[0] == "materialize":
                    files, folders = ops.materialize(words[1].strip())  # type: ignore[attr-defined]
                    reply = f"ok {files} {folders}"
                elif words[0].strip() == "syncing":
                    reply = "ok " + "\t".join(ops.syncing_paths())  # type: ignore[attr-defined]
                else:
                    reply = "ok"
            except Exception as exc:  # reported to the test, which fails on it
                reply = f"error {type(exc).__name__}: {exc}"
            conn.sendall(reply.encode() + b"\n")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--backing", required=True)
    parser.add_argument("--state", required=True)
    parser.add_argument("--mount", required=True)
    parser.add_argument("--fsync-delay", type=float, default=0.0)
    parser.add_argument("--keep-probability", type=float, default=0.0)
    parser.add_argument("--keep-seed", type=int, default=0)
    parser.add_argument("--slow", action="append", default=[], metavar="PATH=SECONDS",
                        help="fsyncs of PATH (relative to the root) take SECONDS")
    args = parser.parse_args(argv)
    slow = {path: float(seconds) for path, seconds in (s.rsplit("=", 1) for s in args.slow)}
    import mfusepy

    os.umask(0)  # the kernel applied the caller's umask already
    ops = _make_operations(mfusepy.Operations)(
        args.backing, args.state, args.fsync_delay, args.keep_probability, args.keep_seed,
        slow)
    control = threading.Thread(target=_serve_control,
                               args=(ops, os.path.join(args.state, "control.sock")),
                               daemon=True)
    control.start()
    mfusepy.FUSE(ops, args.mount, foreground=True, fsname="crashfs", hard_remove=True,
                 auto_unmount=True)


# -- the harness the tests use -------------------------------------------------------------

def require_fuse() -> None:
    """Fail (not skip) without FUSE: CI has it, and a silent skip would hide the module."""
    import pytest

    missing = [what for what, ok in (
        ("/dev/fuse", os.path.exists("/dev/fuse")),
        ("fusermount3 (Debian package fuse3)", shutil.which("fusermount3") is not None),
    ) if not ok]
    if missing:
        pytest.fail(f"the power-loss tests need {', '.join(missing)}: "
                    "scripts/setup-test-deps.sh installs fuse3", pytrace=False)


class CrashFS:
    """One crashfs process over `backing`, mounted at `mount` (made here if missing),
    its model's state in `state`. Use as a context manager: it is unmounted and its
    process stopped at the end, whatever happened."""

    def __init__(self, backing: Path, mount: Path, state: Path, *, fsync_delay: float = 0.0,
                 keep_probability: float = 0.0, keep_seed: int = 0,
                 slow: dict[str, float] | None = None) -> None:
        self.backing, self.mount, self.state = Path(backing), Path(mount), Path(state)
        self.args = ["--fsync-delay", str(fsync_delay), "--keep-probability",
                     str(keep_probability), "--keep-seed", str(keep_seed),
                     *(f"--slow={path}={delay}" for path, delay in (slow or {}).items())]
        self.proc: subprocess.Popen[bytes] | None = None
        self.cut_at: float | None = None

    def __enter__(self) -> CrashFS:
        require_fuse()
        self.mount.mkdir(exist_ok=True)
        self.state.mkdir(exist_ok=True)
        self.log = (self.state / "crashfs.log").open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--backing", str(self.backing), "--state",
             str(self.state), "--mount", str(self.mount), *self.args],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT
        while not (_is_mounted(self.mount) and (self.state / "control.sock").exists()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise RuntimeError(f"crashfs did not mount:\n{self.log_text()}")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.unmount()
        finally:
            self.log.close()

    def command(self, line: str) -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(CONTROL_TIMEOUT)
            conn.connect(str(self.state / "control.sock"))
            conn.sendall(line.encode() + b"\n")
            reply = conn.makefile("r").readline().strip()
        if not reply.startswith("ok"):
            raise RuntimeError(f"crashfs {line.split()[0]}: {reply}")
        return reply[2:].strip()

    def cut(self) -> float:
        """Cut the power now; time.monotonic() of the cut (the same clock in every process)."""
        self.cut_at = float(self.command("cut"))
        return self.cut_at

    def syncing(self) -> list[str]:
        """The paths (relative to the root) whose fsync is under way now."""
        reply = self.command("syncing")
        return reply.split("\t") if reply else []

    def materialize(self, dest: Path) -> tuple[int, int]:
        """The durable view written into `dest` (a new folder): (files, folders)."""
        files, folders = self.command(f"materialize {dest}").split()
        return int(files), int(folders)

    def unmount(self) -> None:
        """Unmount (lazily if something still holds it) and stop the process, bounded."""
        if self.proc is None:
            return
        unmount_fuse(self.mount, self.proc)
        self.proc = None

    def log_text(self) -> str:
        return (self.state / "crashfs.log").read_text(errors="replace")


def unmount_fuse(mount: Path, proc: subprocess.Popen[bytes]) -> None:
    """Unmount a FUSE file system (lazily if something still holds it) and stop its
    process, bounded."""
    if _is_mounted(mount):
        done = subprocess.run(["fusermount3", "-u", str(mount)], capture_output=True)
        if done.returncode != 0:
            subprocess.run(["fusermount3", "-u", "-z", str(mount)], capture_output=True)
    try:
        proc.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(STOP_TIMEOUT)


def _is_mounted(path: Path) -> bool:
    """From the mount table: os.path.ismount stats the mount point, which fails (EIO)
    once the power was cut, and then answers False."""
    where = os.path.abspath(path).encode().replace(b" ", b"\\040")
    with open("/proc/self/mounts", "rb") as table:
        return any(line.split()[1] == where for line in table)


if __name__ == "__main__":
    main(sys.argv[1:])
