"""The temp files of `pacs-edge reader pull`: named as its own, and only its own swept.

A pull writes each instance to a temp file next to its final name, then
renames it (sync.reader_client). A pull that was killed leaves temp files
behind, and the next pull removes them. The folder is the reader's (`--to
DIR`, perhaps their Downloads folder), so the sweep must never touch a file
another program left there, such as a browser's `*.part` download.

Names: `<series folder>/.<SOPInstanceUID>.dcm.<pid>.<random>.pull-part`. The
sweep looks only one folder deep under DIR, only at names of exactly that
shape, and skips those whose pid is a running process other than this one: a
second pull running into the same folder keeps its files.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path

SUFFIX = ".pull-part"
_NAME = re.compile(rf"^\.[0-9.]+\.dcm\.(?P<pid>[0-9]+)\.[a-z0-9_]+{re.escape(SUFFIX)}$")


def create(path: Path) -> tuple[int, str]:
    """Open a new temp file for `path` (its folder must exist): (fd, temp path)."""
    return tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.",
                            suffix=SUFFIX)


def sweep(to: Path) -> int:
    """Remove what killed pulls left in `to`'s series folders; return how many went."""
    removed = 0
    for tmp in Path(to).glob(f"*/.*{SUFFIX}"):
        match = _NAME.match(tmp.name)
        if match is None or not tmp.is_file():
            continue
        pid = int(match["pid"])
        if pid != os.getpid() and _running(pid):
            continue
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
            removed += 1
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True
