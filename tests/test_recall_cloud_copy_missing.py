"""A recall whose pack is gone from the cloud, or that the cloud refuses, in a real agent.

The box evicted a study after verifying its pack in Azure (a real Azurite); then the
blob went (deleted in the portal, or with its container), or the account refused the
key. A C-MOVE, C-GET or the viewer files a recall request; the agent's recall-requests
job looks at the study's packs before it recalls, and that look is where these fail.
It failed the request and said nothing else: no `recall failed` line in the journal,
no count (so PacsEdgeRecallsFailing never fired), no audit record; a pack gone said
only "no such blob" and raised no security alert, though the evicted instances' only
copy was lost. Now the failure is said, counted and audited as a recall that fails
half-way is, a missing copy is named with what to do, and it is a security alert.
"""

from __future__ import annotations

from pathlib import Path

from azure.storage.blob import ContainerClient
from conftest import EdgeServer
from syncagent import SyncAgent, evict, index_rows, security_alerts, sync_once, tier_state
from test_recall_requests_archive import request_recalls
from test_sync_outage import azure_home, import_study, wait_for


def recalls_failed(home: Path) -> float:
    from prometheus_client import CollectorRegistry, multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(home / "run" / "metrics"))
    return registry.get_sample_value("pacs_edge_recalls_total", {"outcome": "failed"}) or 0.0


def evicted_study(azurite: str, tmp_path: Path, seed: int) -> tuple[Path, str, str]:
    """A home on Azure with one study replicated and evicted: (home, container, its UID)."""
    home, container = azure_home(tmp_path, azurite)
    EdgeServer(home).configure(sync={"recall_poll_seconds": 0.2})
    import_study(home, tmp_path / "study", seed=seed)
    sync_once(home)
    [(uid,)] = index_rows(home, "SELECT study_uid FROM studies")
    evict(home, str(uid))
    return home, container, str(uid)


def run_request(home: Path, uid: str) -> tuple[str, str, SyncAgent]:
    """File a recall request, let the agent serve it; (request state, its message, agent)."""
    request_recalls(home, uid)
    agent = SyncAgent(home).start()
    try:
        wait_for(lambda: index_rows(home, "SELECT state FROM recall_requests")
                 != [("pending",)], "the recall request to be served", agent)
    finally:
        assert agent.stop() == 0, agent.log()
    [(state, message)] = index_rows(home, "SELECT state, error FROM recall_requests")
    return str(state), str(message), agent


def test_a_recall_of_a_study_whose_pack_is_gone_is_said_counted_and_a_security_alert(
        azurite: str, tmp_path: Path) -> None:
    home, container, uid = evicted_study(azurite, tmp_path, seed=95)
    with ContainerClient.from_connection_string(azurite, container) as cloud:
        [pack] = [b.name for b in cloud.list_blobs() if b.name.endswith(".pack")]
        cloud.delete_blob(pack)
    alerts = security_alerts(home)

    state, message, agent = run_request(home, uid)

    assert state == "failed"
    assert "the study's cloud copy is missing" in message, message
    assert tier_state(EdgeServer(home), uid) == "evicted"
    failed = [line for line in agent.log().splitlines() if "recall failed" in line]
    assert failed and "cloud copy is missing" in failed[0], agent.log()
    assert uid not in agent.log()
    assert recalls_failed(home) == 1
    assert security_alerts(home) == alerts + 1


def test_a_recall_request_the_cloud_refuses_is_said_and_counted(
        azurite: str, tmp_path: Path) -> None:
    home, _, uid = evicted_study(azurite, tmp_path, seed=96)
    (home / "secrets" / "azure.conn").write_text(
        azurite.replace("AccountKey=", "AccountKey=X", 1))
    alerts = security_alerts(home)

    state, message, agent = run_request(home, uid)

    assert state == "failed"
    assert "Azure refused our credentials (HTTP 403" in message, message
    assert tier_state(EdgeServer(home), uid) == "evicted"
    failed = [line for line in agent.log().splitlines() if "recall failed" in line]
    assert failed and "Azure refused our credentials" in failed[0], agent.log()
    assert recalls_failed(home) == 1
    assert security_alerts(home) == alerts  # a refusal is not tampering
