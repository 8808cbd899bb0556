"""scratchedmedia: a read-only FUSE view of a folder in which some files cannot be read
past a given offset (EIO), as a scratched CD or a failing disk answers.

The file opens and its first bytes read fine (its header), so a reader meets the error
half-way through, where a real bad sector stops it. Run as `python scratchedmedia.py
--backing B --mount M --bad NAME=OFFSET ...` (NAME relative to B), or through
`ScratchedMedia` as a context manager.
"""

from __future__ import annotations

import argparse
import errno
import os
import subprocess
import sys
import time
from pathlib import Path

from crashfs import _is_mounted, require_fuse, unmount_fuse

START_TIMEOUT = 20.0


def _make_operations(base: type) -> type:
    class ScratchedOperations(base):  # type: ignore[misc,valid-type]
        use_ns = True

        def __init__(self, backing: str, bad: dict[str, int]) -> None:
            self.root = os.path.abspath(backing)
            self.bad = bad

        def _full(self, path: str) -> str:
            return os.path.join(self.root, path.lstrip("/"))

        def getattr(self, path: str, fh: int | None = None) -> dict[str, int]:
            st = os.lstat(self._full(path))
            return {key: getattr(st, key) for key in (
                "st_mode", "st_nlink", "st_size", "st_uid", "st_gid", "st_atime_ns",
                "st_mtime_ns", "st_ctime_ns", "st_ino")}

        def readdir(self, path: str, fh: int) -> list[str]:
            return [".", "..", *os.listdir(self._full(path))]

        def open(self, path: str, flags: int) -> int:
            return os.open(self._full(path), os.O_RDONLY)

        def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
            limit = self.bad.get(path.lstrip("/"))
            if limit is not None and offset + size > limit:
                raise OSError(errno.EIO, "scratchedmedia: bad sector")
            return os.pread(fh, size, offset)

        def release(self, path: str, fh: int) -> int:
            os.close(fh)
            return 0

    return ScratchedOperations


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--backing", required=True)
    parser.add_argument("--mount", required=True)
    parser.add_argument("--bad", action="append", default=[], metavar="NAME=OFFSET")
    args = parser.parse_args(argv)
    bad = {name: int(offset) for name, offset in (b.rsplit("=", 1) for b in args.bad)}
    import mfusepy

    ops = _make_operations(mfusepy.Operations)(args.backing, bad)
    # direct_io: every read reaches read() above, none is answered from the page cache
    mfusepy.FUSE(ops, args.mount, foreground=True, ro=True, direct_io=True,
                 fsname="scratchedmedia", auto_unmount=True)


class ScratchedMedia:
    """`backing` seen at `mount` (made here), each file of `bad` failing with EIO when
    read past its offset; unmounted and stopped at the end of the block."""

    def __init__(self, backing: Path, mount: Path, bad: dict[str, int]) -> None:
        self.backing, self.mount, self.bad = Path(backing), Path(mount), bad
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Path:
        require_fuse()
        self.mount.mkdir(exist_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--backing", str(self.backing), "--mount",
             str(self.mount), *(f"--bad={name}={offset}" for name, offset in self.bad.items())],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT
        while not _is_mounted(self.mount):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError("scratchedmedia did not mount")
            time.sleep(0.02)
        return self.mount

    def __exit__(self, *exc: object) -> None:
        if self.proc is None:
            return
        unmount_fuse(self.mount, self.proc)
        self.proc = None


if __name__ == "__main__":
    main(sys.argv[1:])
