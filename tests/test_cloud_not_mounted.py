"""A file:// cloud whose NAS is not mounted is an empty folder on the box's own disk:
the sync jobs refuse it, rather than upload there and evict the local copies."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import dicomgen
from conftest import EdgeServer, init_home, run_pacs_edge
from syncagent import (
    SyncAgent,
    evict,
    import_files,
    index_rows,
    sent_hashes,
    stored_hashes,
    sync_once,
)


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


def test_sync_refuses_a_missing_nas_after_a_scrub_found_every_pack_damaged(
        tmp_path: Path) -> None:
    """The check looked only for packs no scrub found damaged: with every one damaged it
    had none to look for and took the empty mount point as a first upload's."""
    home = init_home(tmp_path / "home")
    nas = tmp_path / "nas"
    EdgeServer(home).configure(cloud={"url": f"file://{nas / 'pacs-cloud'}"})
    first, second = (dicomgen.make_studies(tmp_path / name, seed=seed, series_per_study=1,
                                           instances_per_series=2, size=64)
                     for name, seed in (("first", 86), ("second", 87)))
    import_files(home, *first)
    sync_once(home)
    [pack] = [p for p in nas.rglob("*.pack") if p.is_file()]
    rotten = bytearray(pack.read_bytes())
    rotten[len(rotten) // 2] ^= 0xFF
    pack.write_bytes(bytes(rotten))
    scrubbed = run_pacs_edge("scrub", "--home", str(home), check=False)
    assert scrubbed.returncode == 1 and "damaged" in scrubbed.stdout, scrubbed.stdout

    nas.rename(tmp_path / "nas-mounted")  # the mount goes away: an empty mount point
    nas.mkdir()
    import_files(home, *second)
    refused = sync_once(home, check=False)
    assert refused.returncode != 0, refused.stdout
    assert "holds none of the 1 newest packs this box uploaded" in refused.stderr
    assert not any(p.is_file() for p in nas.rglob("*"))  # nothing went to the box's own disk


def test_an_agents_pass_refused_for_a_missing_nas_is_a_failing_pass_status_reports(
        tmp_path: Path) -> None:
    """The refusal is a failed pass like any other: `status` (so /metrics and the
    PacsEdgeSyncFailing alert) warns sync_failing with the reason, where it said
    nothing and, an hour later, that the running agent was silent."""
    home = init_home(tmp_path / "home")
    nas = tmp_path / "nas"
    EdgeServer(home).configure(cloud={"url": f"file://{nas / 'pacs-cloud'}"},
                               sync={"replicate_interval_seconds": 1,
                                     "stable_after_seconds": 0})
    import_files(home, *dicomgen.make_studies(tmp_path / "study", seed=85, series_per_study=1,
                                              instances_per_series=1, size=64))
    agent = SyncAgent(home).start()
    try:
        wait_until("the study's pack", lambda: index_rows(
            home, "SELECT COUNT(*) FROM packs WHERE state = 'verified'") == [(1,)])
        nas.rename(tmp_path / "nas-mounted")
        nas.mkdir()
        wait_until("a sync_failing warning", lambda: "sync_failing" in warnings_of(home))
    finally:
        assert agent.stop() == 0
    assert "holds none of the 1 newest packs" in warnings_of(home)["sync_failing"]
    assert "sync_agent_silent" not in warnings_of(home)


def warnings_of(home: Path) -> dict[str, str]:
    report = json.loads(run_pacs_edge("status", "--json", "--home", str(home)).stdout)
    return {w["code"]: w["message"] for w in report["warnings"]}


def test_a_running_agent_stops_uploading_when_the_nas_goes_away(tmp_path: Path) -> None:
    home = init_home(tmp_path / "home")
    nas = tmp_path / "nas"
    EdgeServer(home).configure(cloud={"url": f"file://{nas / 'pacs-cloud'}"},
                               sync={"replicate_interval_seconds": 1,
                                     "stable_after_seconds": 0})
    first, second = (dicomgen.make_studies(tmp_path / name, seed=seed, series_per_study=1,
                                           instances_per_series=2, size=64)
                     for name, seed in (("first", 83), ("second", 84)))
    import_files(home, *first)
    agent = SyncAgent(home).start()
    try:
        wait_until("the first study's pack", lambda: index_rows(
            home, "SELECT COUNT(*) FROM packs WHERE state = 'verified'") == [(1,)])
        mounted = nas.rename(tmp_path / "nas-mounted")
        nas.mkdir()
        import_files(home, *second)
        wait_until("two passes refused",
                   lambda: agent.log().count("holds none of the 1 newest packs") >= 2)
        assert not any(p.is_file() for p in nas.rglob("*"))
        assert index_rows(home, "SELECT COUNT(*) FROM packs") == [(1,)]
        shutil.rmtree(nas)
        mounted.rename(nas)
        wait_until("the second study's pack", lambda: index_rows(
            home, "SELECT COUNT(*) FROM packs WHERE state = 'verified'") == [(2,)])
    finally:
        assert agent.stop() == 0
    assert "Traceback" not in agent.log()


def wait_until(what: str, check: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
