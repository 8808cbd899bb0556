"""The sync agent while the cloud fails: what the operator sees in the journal and `status`.

A real agent runs against a real Azurite; the failures are real ones (a container
refused by the storage account), not mocks. Timings are shortened through the
config: passes every second, studies stable at once.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import dicomgen
from conftest import EdgeServer, init_home, run_pacs_edge
from faultproxy import BUSY, FailingRequests, Request
from syncagent import SyncAgent, index_rows, sync_once
from tcpproxy import TcpProxy

WAIT = 30.0


def azure_home(tmp_path: Path, connection_string: str) -> tuple[Path, str]:
    """A home replicating to a fresh Azurite container; returns it and the container."""
    home = init_home(tmp_path / "home")
    credentials = home / "secrets" / "azure.conn"
    credentials.write_text(connection_string)
    credentials.chmod(0o600)
    container = f"outage-{uuid.uuid4().hex[:12]}"
    EdgeServer(home).configure(
        cloud={"url": f"azure://{container}", "credentials_file": credentials},
        sync={"stable_after_seconds": 0, "replicate_interval_seconds": 1})
    return home, container


def import_study(home: Path, folder: Path, seed: int) -> None:
    dicomgen.make_studies(folder, seed=seed, series_per_study=1, instances_per_series=2)
    run_pacs_edge("import", "--home", str(home), str(folder))


def wait_for(condition: Callable[[], bool], what: str, agent: SyncAgent) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}:\n{agent.log()}")
        time.sleep(0.1)


def test_agent_log_says_why_a_replication_failed(azurite: str, tmp_path: Path) -> None:
    """The storage account refuses the agent's key (rotated in the portal, an expired
    SAS): the journal's failure line names the reason, not only "replication failed"."""
    wrong_key = azurite.replace("AccountKey=", "AccountKey=X", 1)
    home, _ = azure_home(tmp_path, wrong_key)
    import_study(home, tmp_path / "study", seed=71)
    agent = SyncAgent(home).start()
    try:
        wait_for(lambda: "replication failed" in agent.log(), "the upload to fail", agent)
    finally:
        assert agent.stop() == 0, agent.log()
    failed = [line for line in agent.log().splitlines() if "replication failed" in line]
    assert "Azure refused our credentials (HTTP 403" in failed[0], agent.log()


def test_agent_log_says_why_an_eviction_failed(azurite: str, tmp_path: Path) -> None:
    """A replicated study is due for eviction, and the account now refuses the key: the
    agent keeps the local files (the cloud copy cannot be checked) and its journal says
    why, where before only the index's pass record did."""
    home, _ = azure_home(tmp_path, azurite)
    import_study(home, tmp_path / "study", seed=73)
    sync_once(home)
    (home / "secrets" / "azure.conn").write_text(azurite.replace("AccountKey=", "AccountKey=X", 1))
    EdgeServer(home).configure(sync={"evict_after_days": 1e-9})  # due at once
    agent = SyncAgent(home).start()
    try:
        wait_for(lambda: "eviction failed" in agent.log(), "the eviction to fail", agent)
    finally:
        assert agent.stop() == 0, agent.log()
    failed = [line for line in agent.log().splitlines() if "eviction failed" in line]
    assert "Azure refused our credentials (HTTP 403" in failed[0], agent.log()
    assert len(list((home / "store").rglob("*.dcm"))) == 2


def test_a_pack_upload_rides_out_a_throttled_put_block(azurite: str, tmp_path: Path) -> None:
    """Azure answers one Put Block of a pack 503 ServerBusy. The pack streams as it is
    encrypted, so the retry wrapper could not send it again: the whole upload failed,
    the study stayed local and the next pass began again from zero (on a link losing
    1% of requests a 1 GB study's 250 blocks went through in one pass of 12). Now
    the backend sends that block again under the same retry policy."""
    port = int(re.search(r"BlobEndpoint=http://127\.0\.0\.1:(\d+)", azurite).group(1))  # type: ignore[union-attr]
    throttled: list[Request] = []

    def first_pack_block_busy(request: Request) -> str | None:
        if throttled or request.comp != "block" or not request.blob.endswith(".pack"):
            return None
        throttled.append(request)
        return BUSY

    with FailingRequests(port, first_pack_block_busy) as proxy:
        home, _ = azure_home(tmp_path, azurite.replace(f"127.0.0.1:{port}",
                                                       f"127.0.0.1:{proxy.port}"))
        import_study(home, tmp_path / "study", seed=81)
        once = sync_once(home, check=False)
    output = once.stdout + once.stderr
    assert len(throttled) == 1, output
    assert once.returncode == 0, output
    assert index_rows(home, "SELECT tier_state FROM studies") == [("replicated",)], output
    assert "blob store retry operation=put" in output


def test_a_file_missing_from_the_store_fails_its_replication_without_a_uid_in_any_output(
        tmp_path: Path) -> None:
    """A stored file lost (disk damage, an operator's rm): replication fails, and said
    so with the OSError's text, the file's path, made of the study's, series' and
    instance's UIDs, in the journal, `sync --once`'s output and `status`, every pass."""
    home = init_home(tmp_path / "home")
    study = dicomgen.make_study(tmp_path / "gen", seed=11)
    run_pacs_edge("import", "--home", str(home), str(tmp_path / "gen"))
    next((home / "store").rglob("*.dcm")).unlink()
    synced = sync_once(home, check=False)
    assert "cannot be packed: FileNotFoundError: No such file or directory" in (
        synced.stdout + synced.stderr)
    status = run_pacs_edge("status", "--home", str(home), check=False)
    said = synced.stdout + synced.stderr + status.stdout + status.stderr
    uids = {u for i in study for u in (i.study_uid, i.series_uid, i.sop_instance_uid)}
    assert not [u for u in uids if u in said], said


def warnings_of(home: Path) -> dict[str, str]:
    """`pacs-edge status --json`'s warnings, code -> message."""
    status = run_pacs_edge("status", "--json", "--home", str(home), check=False)
    return {w["code"]: w["message"] for w in json.loads(status.stdout)["warnings"]}


def test_status_warns_with_the_reason_while_the_agents_passes_fail(
    azurite: str, tmp_path: Path,
) -> None:
    """The box replicated fine, then the account refuses the key: within a few pass
    intervals `status` (so the status page and /metrics too) warns `sync_failing` with the
    reason, where before it said nothing for an hour and then only that the agent was
    silent. A pass that succeeds again clears it."""
    home, _ = azure_home(tmp_path, azurite)
    import_study(home, tmp_path / "first", seed=74)
    sync_once(home)
    credentials = home / "secrets" / "azure.conn"
    credentials.write_text(azurite.replace("AccountKey=", "AccountKey=X", 1))
    import_study(home, tmp_path / "second", seed=75)
    agent = SyncAgent(home).start()
    try:
        wait_for(lambda: "sync_failing" in warnings_of(home), "a sync_failing warning", agent)
    finally:
        assert agent.stop() == 0, agent.log()
    warning = warnings_of(home)["sync_failing"]
    assert "Azure refused our credentials (HTTP 403" in warning, warning
    assert "sync_agent_silent" not in warnings_of(home)
    credentials.write_text(azurite)
    sync_once(home)
    assert "sync_failing" not in warnings_of(home)


def test_a_pass_stops_uploading_at_the_first_study_the_cloud_refuses(
    azurite: str, tmp_path: Path,
) -> None:
    """Three studies wait and the account refuses the key: one pass tries one upload, not
    three. Each failed upload leaves an unverified version (its clean-up is refused too)
    that every later pass tries to delete again, after its retries; during an outage of
    an hour that was one more per study per pass, and passes grew ever longer."""
    home, _ = azure_home(tmp_path, azurite.replace("AccountKey=", "AccountKey=X", 1))
    for seed in (76, 77, 78):
        import_study(home, tmp_path / f"study-{seed}", seed=seed)
    once = sync_once(home, check=False)
    assert "Azure refused our credentials (HTTP 403" in once.stdout + once.stderr
    assert index_rows(home, "SELECT state FROM packs") == [("uploading",)]
    assert index_rows(home, "SELECT tier_state FROM studies") == [("local",)] * 3


class StalledPath(TcpProxy):
    """A path to Azurite that takes every request and never brings an answer back:
    a link that stalls (connections accepted, nothing returned)."""

    def to_client(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while source.recv(1 << 16):
                pass


def test_the_agent_starts_while_the_cloud_stalls_and_stops_on_time(
    azurite: str, tmp_path: Path,
) -> None:
    """A box rebooted while its link stalls: the agent's start checked the container
    (5 attempts of a 120 s read each) before it said ready, and systemd's start timeout
    (90 s) killed it, again and again. Its passes check the container anyway, before
    they upload or evict; the start now waits for nothing the cloud must answer."""
    home, _ = azure_home(tmp_path, azurite)
    import_study(home, tmp_path / "study", seed=79)
    sync_once(home)  # a pack in the index: the container check has something to look for
    port = int(re.search(r"BlobEndpoint=http://127\.0\.0\.1:(\d+)", azurite).group(1))
    with StalledPath(port) as stalled:
        (home / "secrets" / "azure.conn").write_text(
            azurite.replace(f"127.0.0.1:{port}", f"127.0.0.1:{stalled.port}"))
        agent = SyncAgent(home).start()  # ready within SyncAgent's 60 s, or it raises
        assert agent.stop() == 0, agent.log()
