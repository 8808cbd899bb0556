"""SIGKILL the sync agent at every step of replicate, evict and recall; restart; nothing lost.

Each case runs the real command in a subprocess with PACS_EDGE_CRASH_AT naming
a crash point (sync/crashpoints.py): the process kills itself with SIGKILL
exactly there. Then the agent runs again normally, and the study must be in a
consistent state, every verified pack whole in the cloud with nothing left
over, the store clean, and every instance retrievable byte-identical.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import dicomgen
import pytest
from conftest import init_home, pacs_edge_command, run_pacs_edge
from syncagent import SyncAgent, index_rows, sync_once

CRASH_ENV = "PACS_EDGE_CRASH_AT"


def study_state(home: Path) -> tuple[str, list[tuple[int, str]]]:
    db = sqlite3.connect(f"file:{home / 'index.sqlite3'}?mode=ro", uri=True)
    try:
        state = db.execute("SELECT tier_state FROM studies").fetchone()[0]
        packs = db.execute("SELECT version, state FROM packs ORDER BY version").fetchall()
    finally:
        db.close()
    return state, packs


def cloud_blobs(home: Path) -> list[str]:
    """Study blobs in the home's cloud, listed through the product's own blob store."""
    from appliance.base.config import load_config
    from sync.blobstore.factory import open_blob_store

    config = load_config(home)
    store = open_blob_store(config.cloud_url, credentials_file=config.cloud.credentials_file)
    try:
        return sorted(info.name for info in store.list("studies/"))
    finally:
        store.close()


def local_hashes(home: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(dicomgen.dataset_bytes(p)).hexdigest()
            for p in (home / "store").rglob("*.dcm")}


def crash(home: Path, point: str, *args: str) -> None:
    proc = subprocess.run([*pacs_edge_command(), *args, "--home", str(home)],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, CRASH_ENV: point})
    assert proc.returncode == -signal.SIGKILL, (point, proc.returncode, proc.stderr)


@pytest.fixture(params=["local", "azurite"])
def home(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, dict[str, str], str]:
    """A data home holding one imported study, its cloud a local folder or a real Azurite."""
    import tomlkit

    home = init_home(tmp_path / "home")
    study = dicomgen.make_studies(tmp_path / "study", seed=61, series_per_study=2,
                                  instances_per_series=4, size=96)
    run_pacs_edge("import", "--home", str(home), str(tmp_path / "study"))
    config = home / "pacs-edge.toml"
    doc = tomlkit.parse(config.read_text())
    # Small segments: the pack streams in many chunks, so "mid-pack" is mid-pack.
    doc["sync"]["segment_size"] = 8192  # type: ignore[index]
    if request.param == "azurite":
        credentials = home / "secrets" / "azure.conn"
        credentials.write_text(request.getfixturevalue("azurite"))
        credentials.chmod(0o600)
        doc["cloud"]["url"] = f"azure://crash-{uuid.uuid4().hex[:12]}"  # type: ignore[index]
        doc["cloud"]["credentials_file"] = str(credentials)  # type: ignore[index]
    config.write_text(tomlkit.dumps(doc))
    return home, local_hashes(home), study[0].study_uid


def assert_consistent(home: Path, hashes: dict[str, str], study_uid: str) -> None:
    state, packs = study_state(home)
    assert all(p_state == "verified" for _, p_state in packs), packs
    assert len(cloud_blobs(home)) == 3 * len(packs), cloud_blobs(home)  # no leftovers
    fsck = run_pacs_edge("fsck", "--home", str(home), check=False)
    assert fsck.returncode == 0, fsck.stdout
    if state == "evicted":
        run_pacs_edge("recall", study_uid, "--home", str(home))
    assert local_hashes(home) == hashes


@pytest.mark.parametrize("point", [
    "replicate:before-upload", "upload:mid-pack", "upload:after-pack",
    "upload:after-manifest", "replicate:before-commit", "replicate:after-commit",
])
def test_agent_killed_during_replication_resumes(
    home: tuple[Path, dict[str, str], str], point: str
) -> None:
    path, hashes, study_uid = home
    crash(path, point, "sync", "--once", "--stable-after", "0")
    assert study_state(path)[0] in {"replicating", "replicated"}
    sync_once(path)
    assert study_state(path)[0] == "replicated"
    assert_consistent(path, hashes, study_uid)


@pytest.mark.parametrize("point", ["evict:after-commit", "evict:mid-delete"])
def test_agent_killed_during_eviction_never_loses_the_only_copy(
    home: tuple[Path, dict[str, str], str], point: str
) -> None:
    path, hashes, study_uid = home
    sync_once(path)
    crash(path, point, "evict", study_uid)
    assert study_state(path)[0] == "evicted"
    report = json.loads(run_pacs_edge("status", "--json", "--home", str(path)).stdout)
    assert report["tier_states"]["evicted"] == 1
    sync_once(path)  # the restarted agent removes what the killed eviction left
    assert not list((path / "store").rglob("*.dcm"))
    assert_consistent(path, hashes, study_uid)


@pytest.mark.parametrize("point", ["recall:mid-instances", "recall:before-commit"])
def test_agent_killed_during_recall_rolls_back_and_recalls_again(
    home: tuple[Path, dict[str, str], str], point: str
) -> None:
    path, hashes, study_uid = home
    sync_once(path)
    run_pacs_edge("evict", study_uid, "--home", str(path))
    crash(path, point, "recall", study_uid)
    assert study_state(path)[0] == "recalling"
    sync_once(path)
    assert study_state(path)[0] == "evicted"
    assert not list((path / "store").rglob("*.dcm"))
    assert_consistent(path, hashes, study_uid)
    assert study_state(path)[0] == "replicated"


@pytest.mark.parametrize("home", ["local"], indirect=True)  # Azurite rehydrates at once
def test_recall_of_an_archived_pack_requests_rehydration_first(
    home: tuple[Path, dict[str, str], str]
) -> None:
    """The lifecycle moved the pack to Archive: a recall asks for it back online, waits
    (poll interval from [sync]) and then restores every instance."""
    from sync.blobstore.base import Tier
    from sync.blobstore.local import LocalFolderStore

    path, hashes, study_uid = home
    sync_once(path)
    run_pacs_edge("evict", study_uid, "--home", str(path))
    store = LocalFolderStore(path / "cloud")
    pack = next(info.name for info in store.list() if info.name.endswith("pack"))
    store.set_tier(pack, Tier.ARCHIVE)
    assert not store.stat(pack).online
    result = run_pacs_edge("recall", study_uid, "--home", str(path))
    assert "recalled" in result.stdout
    assert store.stat(pack).online
    assert local_hashes(path) == hashes


def replicate_at_once(home: Path) -> None:
    """[sync] stable_after_seconds = 0: the agent's first pass takes the studies."""
    import tomlkit

    config = home / "pacs-edge.toml"
    doc = tomlkit.parse(config.read_text())
    doc["sync"]["stable_after_seconds"] = 0.0  # type: ignore[index]
    config.write_text(tomlkit.dumps(doc))


def paused_agent(home: Path, point: str, barrier: Path) -> SyncAgent:
    """The agent, started; its work waits at `point` until `barrier / "go"` exists."""
    barrier.mkdir()
    return SyncAgent(home, env={"PACS_EDGE_PAUSE_AT": point,
                                "PACS_EDGE_PAUSE_DIR": str(barrier)}).start()


@pytest.mark.parametrize("home", ["local"], indirect=True)
def test_agent_stopped_mid_upload_ends_the_pass_quietly_and_replicates_at_its_next_start(
    home: tuple[Path, dict[str, str], str], tmp_path: Path,
) -> None:
    """SIGTERM while a pass uploads: the agent cancels the pass, which waits until the
    upload's thread has stopped and then rolls back; the agent exits 0 with no traceback,
    no blob is left over, and the next pass replicates."""
    path, hashes, study_uid = home
    replicate_at_once(path)
    barrier = tmp_path / "barrier"
    agent = paused_agent(path, "upload:mid-pack", barrier)
    try:
        wait_for(lambda: (barrier / "reached").exists(), "the upload to start")
        assert agent.proc is not None
        agent.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: "sync agent stopping" in agent.log(), "the agent to stop")
        time.sleep(0.5)  # the stop waits for the paused upload's thread: nothing is undone yet
        assert agent.proc.poll() is None
        assert study_state(path) == ("replicating", [(1, "uploading")])
        (barrier / "go").touch()
        assert agent.proc.wait(60) == 0, agent.log()
        assert "job cancelled by stop job=replicate-evict" in agent.log()
    finally:
        agent.stop()
    assert "Traceback" not in agent.log()
    sync_once(path)
    assert study_state(path)[0] == "replicated"
    assert_consistent(path, hashes, study_uid)


@pytest.mark.parametrize("home", ["local"], indirect=True)
def test_a_pass_longer_than_its_interval_skips_runs_without_a_warning(
    home: tuple[Path, dict[str, str], str], tmp_path: Path,
) -> None:
    """One run of a job at a time is the design: while an upload outlasts
    replicate_interval_seconds, the runs it skips put nothing in the log (APScheduler
    warned at every interval)."""
    import tomlkit

    path, hashes, study_uid = home
    replicate_at_once(path)
    config = path / "pacs-edge.toml"
    doc = tomlkit.parse(config.read_text())
    doc["sync"]["replicate_interval_seconds"] = 0.5  # type: ignore[index]
    config.write_text(tomlkit.dumps(doc))
    barrier = tmp_path / "barrier"
    agent = paused_agent(path, "upload:mid-pack", barrier)
    try:
        wait_for(lambda: (barrier / "reached").exists(), "the upload to start")
        time.sleep(2.0)  # four intervals
        (barrier / "go").touch()
        wait_for(lambda: study_state(path)[0] == "replicated", "the upload to finish")
    finally:
        assert agent.stop() == 0
    assert "skipped" not in agent.log() and "WARNING" not in agent.log(), agent.log()
    assert_consistent(path, hashes, study_uid)


# `pacs-edge sync` with the agent's stop bound shortened (argv[1] seconds), so that a test
# can pass it without waiting 15 s: the real command line, asyncio.run and all.
SHORT_BOUND_AGENT = """
import sys
from pathlib import Path

from appliance.base.metrics_dir import use_metrics_dir

use_metrics_dir(Path(sys.argv[2]))  # as `sync` does, before prometheus-client loads
import sync.agent

sync.agent.JOB_STOP_TIMEOUT = float(sys.argv[1])
from appliance.cli import main

sys.argv = ["pacs-edge", "sync", "--home", sys.argv[2]]
main()
"""


@pytest.mark.parametrize("home", ["local"], indirect=True)
@pytest.mark.parametrize("point", ["upload:mid-pack", "recall:mid-instances"])
def test_agent_exits_at_its_stop_bound_while_a_job_thread_still_runs(
    home: tuple[Path, dict[str, str], str], tmp_path: Path, point: str,
) -> None:
    """SIGTERM while a job's thread cannot reach its next stop check (an Azure upload
    waits for its blocks in flight: minutes over a slow uplink). The agent waits
    JOB_STOP_TIMEOUT for the job, closes the index and exits 0 without the thread, before
    systemd's TimeoutStopSec would kill it; the next start rolls back what was left."""
    import sys


    path, hashes, study_uid = home
    replicate_at_once(path)
    if point.startswith("recall"):
        sync_once(path)
        run_pacs_edge("evict", study_uid, "--home", str(path))
        ask_for_recall(path, study_uid)
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    log_path = tmp_path / "agent.log"
    with open(log_path, "wb") as log:
        agent = subprocess.Popen(
            [sys.executable, "-c", SHORT_BOUND_AGENT, "0.2", str(path)], stdout=log,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "PACS_EDGE_PAUSE_AT": point,
                 "PACS_EDGE_PAUSE_DIR": str(barrier)})
    try:
        wait_for(lambda: (barrier / "reached").exists() or agent.poll() is not None,
                 "the job's thread to start")
        assert agent.poll() is None, log_path.read_text()
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(20) == 0, log_path.read_text()  # the thread is still held
    finally:
        (barrier / "go").touch()
        if agent.poll() is None:
            os.killpg(agent.pid, signal.SIGKILL)
            agent.wait()
    text = log_path.read_text()
    assert "jobs still running at stop count=1" in text
    assert "Traceback" not in text and " ERROR " not in text, text
    sync_once(path)  # rolls back what the stopped job left, then replicates
    assert_consistent(path, hashes, study_uid)


@pytest.mark.parametrize("home", ["local"], indirect=True)
def test_agent_stop_whose_roll_back_fails_still_ends_the_pass(
    home: tuple[Path, dict[str, str], str], tmp_path: Path,
) -> None:
    """SIGTERM mid-upload, and the upload's roll-back fails (its study lease lapsed, as
    after a stall): the cancellation must still end the pass, not turn into a failure of
    that study after which the pass uploads the next study while the agent stops."""
    path, _, study_uid = home
    dicomgen.make_studies(tmp_path / "second", seed=62, series_per_study=1,
                          instances_per_series=2, size=96)
    run_pacs_edge("import", "--home", str(path), str(tmp_path / "second"))
    hashes = local_hashes(path)
    replicate_at_once(path)
    barrier = tmp_path / "barrier"
    agent = paused_agent(path, "upload:mid-pack", barrier)
    try:
        wait_for(lambda: (barrier / "reached").exists(), "the first upload to start")
        db = sqlite3.connect(path / "index.sqlite3", timeout=30)
        try:
            with db:
                db.execute("UPDATE study_leases SET expires_at = 0")  # lapsed
        finally:
            db.close()
        assert agent.proc is not None
        agent.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: "sync agent stopping" in agent.log(), "the agent to stop")
        (barrier / "go").touch()
        assert agent.proc.wait(60) == 0, agent.log()
    finally:
        agent.stop()
    states = [state for (state,) in index_rows(path, "SELECT tier_state FROM studies")]
    assert sorted(states) == ["local", "replicating"], agent.log()  # no upload after the stop
    assert "roll-back at stop left to the next start work=replicate" in agent.log()
    assert "job cancelled by stop job=replicate-evict" in agent.log()
    sync_once(path)
    assert_consistent(path, hashes, study_uid)


def ask_for_recall(home: Path, study_uid: str) -> None:
    """A recall request, as the appliance makes one for a C-MOVE of an evicted study."""
    import asyncio

    from appliance.base.config import load_config
    from appliance.store.index import Index
    from appliance.store.recall_requests import request_recall

    async def ask() -> None:
        async with Index(load_config(home).index.path) as index:
            await request_recall(index, [study_uid], "test")

    asyncio.run(ask())


@pytest.mark.slow
def test_upload_failure_whose_clean_up_also_fails_is_rolled_back_by_the_running_agent(
    tmp_path: Path,
) -> None:
    """A cloud outage mid-upload: the upload fails and so does the removal of what it left.
    The study must not stay `replicating` until the agent restarts: the running agent
    retries the clean-up on its next passes and replicates the study once the cloud is
    back, leaving exactly one verified version in the container."""
    import tomlkit
    from azurite import AzuriteServer

    from sync.blobstore.azure import AzureBlobStore

    home = init_home(tmp_path / "home")
    dicomgen.make_studies(tmp_path / "study", seed=63, series_per_study=1,
                          instances_per_series=4, size=96)
    run_pacs_edge("import", "--home", str(home), str(tmp_path / "study"))
    azurite = AzuriteServer(tmp_path / "azurite").start()
    try:
        credentials = home / "secrets" / "azure.conn"
        credentials.write_text(azurite.connection_string)
        credentials.chmod(0o600)
        config = home / "pacs-edge.toml"
        doc = tomlkit.parse(config.read_text())
        doc["cloud"]["url"] = "azure://outage"  # type: ignore[index]
        doc["cloud"]["credentials_file"] = str(credentials)  # type: ignore[index]
        for key, value in {"segment_size": 8192, "stable_after_seconds": 0.0,
                           "replicate_interval_seconds": 1.0, "evict_after_days": 0.0}.items():
            doc["sync"][key] = value  # type: ignore[index]
        config.write_text(tomlkit.dumps(doc))
        barrier = tmp_path / "barrier"
        barrier.mkdir()
        agent = SyncAgent(home, env={"PACS_EDGE_PAUSE_AT": "upload:mid-pack",
                                     "PACS_EDGE_PAUSE_DIR": str(barrier)}).start()
        try:
            wait_for(lambda: (barrier / "reached").exists(), "the upload to start")
            azurite.stop()
            (barrier / "go").touch()
            wait_for(lambda: "clean-up of an unverified pack deferred" in agent.log(),
                     "the failed clean-up")
            state, packs = study_state(home)
            assert state == "local" and packs and all(s == "uploading" for _, s in packs)
            azurite.start()
            wait_for(lambda: study_state(home)[0] == "replicated", "replication after the outage")
        finally:
            agent.stop()
        state, packs = study_state(home)
        assert [s for _, s in packs] == ["verified"]
        store = AzureBlobStore("outage", azurite.connection_string)
        try:
            assert len(list(store.list("studies/"))) == 3
        finally:
            store.close()
    finally:
        azurite.stop()


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
