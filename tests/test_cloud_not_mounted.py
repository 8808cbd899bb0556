"""A file:// cloud whose NAS is not mounted is an empty folder on the box's own disk:
the sync jobs refuse it, rather than upload there and evict the local copies."""

from __future__ import annotations

import shutil
from pathlib import Path

import dicomgen
from conftest import EdgeServer, init_home, run_pacs_edge
from syncagent import evict, import_files, index_rows, sent_hashes, stored_hashes, sync_once


def test_sync_refuses_a_cloud_folder_without_the_packs_it_uploaded(tmp_path: Path) -> None:
    home = init_home(tmp_path / "home")
    nas = tmp_path / "nas"
    cloud = nas / "pacs-cloud"
    EdgeServer(home).configure(cloud={"url": f"file://{cloud}"})
    first, second = (dicomgen.make_studies(tmp_path / name, seed=seed, series_per_study=1,
                                           instances_per_series=2, size=64)
                     for name, seed in (("first", 81), ("second", 82)))
    import_files(home, *first)
    sync_once(home)

    mounted = nas.rename(tmp_path / "nas-mounted")  # the mount goes away: an empty mount point
    nas.mkdir()
    import_files(home, *second)
    refused = sync_once(home, check=False)
    assert refused.returncode != 0
    assert "holds none of the 1 newest packs this box uploaded" in refused.stderr
    assert "mount the NAS" in refused.stderr and "Traceback" not in refused.stderr
    assert not any(p.is_file() for p in nas.rglob("*"))  # nothing went to the box's own disk
    refused = run_pacs_edge("evict", first[0].study_uid, "--home", str(home), check=False)
    assert refused.returncode != 0 and "holds none" in refused.stderr
    assert stored_hashes(home) == sent_hashes([*first, *second])

    shutil.rmtree(nas)  # the empty folders the store made under the mount point
    mounted.rename(nas)  # mounted again
    assert "replicated 1 study version(s)" in sync_once(home).stdout
    for study in (first, second):
        evict(home, study[0].study_uid)
        run_pacs_edge("recall", study[0].study_uid, "--home", str(home))
    assert stored_hashes(home) == sent_hashes([*first, *second])
    assert index_rows(home, "SELECT COUNT(*) FROM packs") == [(2,)]
