"""A damaged index file: every command that opens it, and `serve`, says so in one
line and exits; none prints a traceback, and none hangs on the connection thread
that was open when SQLite found the damage."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import init_home, run_pacs_edge

EXIT_WITHIN = 60.0  # seconds; the hang this guards against never ended


def _damage(home: Path, how: str) -> None:
    index = home / "index.sqlite3"
    if how == "not-a-database":
        index.write_bytes(os.urandom(16384))
    else:  # cut off: the header says more pages than the file holds
        with index.open("r+b") as fh:
            fh.truncate(8192)
    for leftover in ("index.sqlite3-wal", "index.sqlite3-shm"):
        (home / leftover).unlink(missing_ok=True)


@pytest.mark.parametrize("how", ["not-a-database", "cut-off"])
@pytest.mark.parametrize("command", [("status",), ("fsck",), ("sync", "--once"),
                                     ("serve",)])
def test_a_damaged_index_is_one_error_line_and_an_exit(tmp_path: Path, how: str,
                                                       command: tuple[str, ...]) -> None:
    home = init_home(tmp_path / "home")
    run_pacs_edge("status", "--home", str(home))  # the index exists, migrated
    _damage(home, how)
    result = run_pacs_edge(*command, "--home", str(home), check=False, timeout=EXIT_WITHIN)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Traceback" not in output
    assert "index.sqlite3" in output and ("is damaged" in output
                                          or "cannot be opened" in output), output
