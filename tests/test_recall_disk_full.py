"""A recall into a full disk fails cleanly: the study stays `evicted` with none of its
files left behind, the operator is told why, and the same recall succeeds once space is
freed. The store's reserve refusal before any download is in test_store_reserve.py;
these are the failures that come after the files are written."""

from __future__ import annotations

from pathlib import Path

import dicomgen
from conftest import EdgeServer, init_home, run_pacs_edge
from smalldisk import NEEDS_ROOT, fill, no_reserve, tmpfs
from syncagent import evict, import_files, paused, sync_once, tier_state

pytestmark = NEEDS_ROOT


def test_a_recall_whose_index_commit_finds_the_disk_full_rolls_back_and_can_run_again(
        tmp_path: Path) -> None:
    """Every recalled file on disk, the index could not take the commit that marks them
    local (SQLITE_FULL: the files took the disk's last blocks): the study stayed
    `recalling` with all its files on the full disk, and `pacs-edge recall` refused it
    ("study is recalling, not evicted") until a sync pass rolled it back."""
    study = dicomgen.make_studies(tmp_path / "study", seed=61, series_per_study=1,
                                  instances_per_series=4, size=256)
    uid = study[0].study_uid
    with tmpfs(tmp_path / "disk", 40) as disk:
        # No serve: the recall's own connection starts the WAL, so its commit must grow it.
        home = no_reserve(init_home(disk / "home"))
        box = EdgeServer(home)
        box.configure(cloud={"url": f"file://{tmp_path / 'cloud'}"})
        import_files(home, *study)
        sync_once(home)
        evict(home, uid)

        with paused(home, "recall:before-commit", "recall", uid, returncode=2,
                    says="error: no space left for the index"):
            filler = fill(disk)
        assert tier_state(box, uid) == "evicted"
        assert not list((home / "store").rglob("*.dcm"))
        assert not list((home / "store" / ".spool").iterdir())

        filler.unlink()
        run_pacs_edge("recall", uid, "--home", str(home))
        assert tier_state(box, uid) == "replicated"
        assert len(list((home / "store").rglob("*.dcm"))) == len(study)
