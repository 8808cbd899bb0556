"""A damaged index file: every command that opens it, and `serve`, says so in one
line and exits; none prints a traceback, and none hangs on the connection thread
that was open when SQLite found the damage.

A lost index (deleted, truncated to 0 bytes: SQLite takes either as a new, empty
database) is refused by `serve`, the sync agent and `import` until the rebuild of
docs/operator-guide.md ("A lost or damaged index") pairs a new one with the store
(appliance/store/pairing.py)."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import dicomgen
import pytest
from azurite import unanswered_credentials
from conftest import EdgeServer, init_home, run_pacs_edge
from syncagent import import_files, sync_once

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
                                     ("serve",), ("logref", "3f9c0a1b2c4d")])
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


def _lose(home: Path, how: str) -> None:
    for name in ("index.sqlite3", "index.sqlite3-wal", "index.sqlite3-shm"):
        (home / name).unlink(missing_ok=True)
    if how == "emptied":
        (home / "index.sqlite3").write_bytes(b"")


@pytest.mark.parametrize("how", ["deleted", "emptied"])
def test_a_lost_index_is_refused_until_the_rebuild_pairs_a_new_one(
        tmp_path: Path, how: str) -> None:
    home = init_home(tmp_path / "home")
    study = dicomgen.make_studies(tmp_path / "study", seed=81, series_per_study=1,
                                  instances_per_series=2, size=64)
    import_files(home, *study[:1])
    sync_once(home)
    _lose(home, how)
    # status refuses nothing (it reads), but says so rather than report an empty box.
    status = run_pacs_edge("status", "--home", str(home), check=False)
    assert "warning: the index" in status.stderr and "belongs to an index that is gone" \
        in status.stderr and "A lost or damaged index" in status.stderr, status.stderr
    for command in (("serve",), ("sync", "--once"), ("import", str(study[1].path))):
        result = run_pacs_edge(*command, "--home", str(home), check=False,
                               timeout=EXIT_WITHIN)
        output = result.stdout + result.stderr
        assert result.returncode == 2, (command, output)
        assert "Traceback" not in output
        assert "belongs to an index that is gone" in output, (command, output)
        assert "A lost or damaged index" in output
    restored = run_pacs_edge("restore", "--home", str(home)).stdout
    assert "restored 1 pack version(s)" in restored
    assert run_pacs_edge("sync", "--once", "--home", str(home), check=False).returncode == 2
    run_pacs_edge("fsck", "--repair", "--home", str(home))
    sync_once(home)
    import_files(home, study[1])


def test_an_empty_index_next_to_stored_files_is_refused_even_without_ids(
        tmp_path: Path) -> None:
    """A box from before the ids whose index was lost: neither side has an id, and the
    index holds nothing the store holds."""
    home = init_home(tmp_path / "home")
    study = dicomgen.make_studies(tmp_path / "study", seed=82, series_per_study=1,
                                  instances_per_series=1, size=64)
    import_files(home, *study)
    (home / "store" / ".index-id").unlink()
    _lose(home, "deleted")
    result = run_pacs_edge("sync", "--once", "--home", str(home), check=False)
    assert result.returncode == 2
    assert "holds no instance, but the store" in result.stderr, result.stderr


def test_a_box_from_before_the_ids_is_paired_at_its_first_start(tmp_path: Path) -> None:
    home = init_home(tmp_path / "home")
    study = dicomgen.make_studies(tmp_path / "study", seed=83, series_per_study=1,
                                  instances_per_series=1, size=64)
    import_files(home, *study)
    (home / "store" / ".index-id").unlink()
    db = sqlite3.connect(home / "index.sqlite3")
    with db:
        db.execute("DELETE FROM index_identity")
    db.close()
    sync_once(home)
    assert len((home / "store" / ".index-id").read_text()) == 32


def test_force_new_keys_is_refused_while_the_cloud_holds_studies_the_index_does_not(
        tmp_path: Path) -> None:
    """With the index moved away for a rebuild, the index counted no pack and a new site
    key replaced the one every version in the cloud is wrapped with."""
    home = init_home(tmp_path / "home")
    study = dicomgen.make_studies(tmp_path / "study", seed=84, series_per_study=1,
                                  instances_per_series=1, size=64)
    import_files(home, *study)
    sync_once(home)
    site_key = (home / "secrets" / "site.key").read_bytes()
    _lose(home, "deleted")
    result = run_pacs_edge("init", "--home", str(home), "--force-new-keys", check=False)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "refusing --force-new-keys: the cloud holds study versions" in result.stderr
    assert (home / "secrets" / "site.key").read_bytes() == site_key


def test_force_new_keys_refused_for_a_cloud_that_cannot_be_listed_says_nothing_was_replaced(
        tmp_path: Path) -> None:
    """The refusal was the blob store's own error, with the hint 'the agent retries': it
    did not say that --force-new-keys was refused, nor that the keys were left alone."""
    home = init_home(tmp_path / "home")
    site_key = (home / "secrets" / "site.key").read_bytes()
    with unanswered_credentials(tmp_path) as credentials:
        EdgeServer(home).configure(cloud={"url": "azure://site-packs",
                                          "credentials_file": str(credentials)})
        result = run_pacs_edge("init", "--home", str(home), "--force-new-keys", check=False)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "refusing --force-new-keys: the cloud azure://site-packs cannot be listed" in (
        result.stderr)
    assert "nothing was replaced" in result.stderr and "the agent retries" not in result.stderr
    assert (home / "secrets" / "site.key").read_bytes() == site_key
