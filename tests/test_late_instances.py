"""Instances that arrive after their study was replicated or evicted are never lost.

A late instance of an evicted study is uploaded in a new pack version, and the
row that says "not on local disk" is committed in the same transaction as the
pack: the file is deleted only after that, so a recall brings it back with the
others and fsck never sees an index row without its file.
"""

from __future__ import annotations

from pathlib import Path

import dicomgen
import pytest
from conftest import init_home, run_pacs_edge
from syncagent import (
    import_files,
    index_rows,
    sent_hashes,
    stored_hashes,
    sync_once,
)


def tier_state(home: Path) -> str:
    return str(index_rows(home, "SELECT tier_state FROM studies")[0][0])


@pytest.fixture
def study(tmp_path: Path) -> tuple[Path, list[dicomgen.GeneratedInstance]]:
    home = init_home(tmp_path / "home")
    instances = dicomgen.make_study(tmp_path / "study", seed=71, series_per_study=2,
                                    instances_per_series=2, size=32)
    return home, instances






def test_late_instance_of_evicted_study_is_recalled_with_the_others(
    study: tuple[Path, list[dicomgen.GeneratedInstance]],
) -> None:
    home, instances = study
    first, late = instances[:3], instances[3]
    uid = first[0].study_uid
    import_files(home, *first)
    sync_once(home)
    run_pacs_edge("evict", uid, "--home", str(home))
    import_files(home, late)
    sync_once(home)  # uploads the late instance as version 2, then frees its file
    assert tier_state(home) == "evicted"
    assert not list((home / "store").rglob("*.dcm"))
    rows = index_rows(home, "SELECT is_local, pack_fk FROM instances")
    assert all(is_local == 0 and pack is not None for is_local, pack in rows)
    fsck = run_pacs_edge("fsck", "--home", str(home), check=False)
    assert fsck.returncode == 0, fsck.stdout

    result = run_pacs_edge("recall", uid, "--home", str(home))
    assert "recalled 4 instance(s)" in result.stdout
    assert stored_hashes(home) == sent_hashes(instances)
    assert run_pacs_edge("fsck", "--home", str(home), check=False).returncode == 0


def test_late_instance_of_evicted_study_stays_local_until_replicated(
    study: tuple[Path, list[dicomgen.GeneratedInstance]],
) -> None:
    """Before the next pass the late file is the only copy: it stays local, the study
    stays evicted, and a recall restores the others beside it."""
    home, instances = study
    uid = instances[0].study_uid
    import_files(home, *instances[:3])
    sync_once(home)
    run_pacs_edge("evict", uid, "--home", str(home))
    import_files(home, instances[3])
    assert tier_state(home) == "evicted"
    assert stored_hashes(home) == sent_hashes(instances[3:])
    result = run_pacs_edge("recall", uid, "--home", str(home))
    assert "recalled 3 instance(s)" in result.stdout
    assert stored_hashes(home) == sent_hashes(instances)
    sync_once(home)  # the late one now goes to the cloud; nothing is deleted
    assert tier_state(home) == "replicated"
    assert stored_hashes(home) == sent_hashes(instances)
    assert run_pacs_edge("fsck", "--home", str(home), check=False).returncode == 0
